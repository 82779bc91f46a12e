"""Batched function secret sharing for 2PC with a dealer: DCF comparisons and DPF table lookups in one round.

Self-contained (numpy, `cryptography` and numba only; nothing else from mpcache), so the dealer, the parties and
the simulator can all import it. Who learns what, in every gate: the dealer generates keys from its own randomness
(it never sees inputs or opened values); each party sees its own shares, its key (root seed + correction words
that look random on their own) and the opened masked values, which are uniform whatever the inputs are.

    prg.py      fixed-key AES-128 MMO PRG (one AES-ECB call per tree level per batch), seeded AES-CTR stream
    tree.py     correction words shared by DCF and DPF, serialization, the batched tree walks
    fused.py    the dealer's walk, one compiled (numba) pass per tree level besides the AES calls
    fused_lut.py a party's table lookup, one compiled pass per tree level and one for the leaves x tables
    batch.py    key batches in bounded chunks with per-chunk party streams (what a dealer ships, what a party derives)
    dcf.py      distributed comparison functions: beta * [x < alpha] + offset
    dpf.py      distributed point functions: beta * [x == alpha], point and full-domain evaluation
    masked.py   the online message: (x_b + r_b) mod 2^n, ceil(n/8) bytes; what a party derives from its seed
    compare.py  [x < c], [x <= c], [x > c], [x >= c] from one (n-1)-bit DCF
    lut.py      T[x mod 2^n] from one n-bit DPF (n <= 16), several tables per key
"""

from mpcache.mpc.fss.compare import CompareKey, compare_eval, compare_gen, compare_key, compare_mask, simulate_compare
from mpcache.mpc.fss.dcf import dcf_eval, dcf_gen
from mpcache.mpc.fss.dpf import dpf_eval, dpf_eval_all, dpf_gen
from mpcache.mpc.fss.lut import LutKey, lut_eval, lut_gen, lut_key, lut_mask, simulate_lut
from mpcache.mpc.fss.masked import from_open_bytes, message_bytes, open_bytes, reconstruct
from mpcache.mpc.fss.prg import AesStream, new_seed
from mpcache.mpc.fss.tree import Corrections, Key

__all__ = [
    "AesStream",
    "CompareKey",
    "Corrections",
    "Key",
    "LutKey",
    "compare_eval",
    "compare_gen",
    "compare_key",
    "compare_mask",
    "dcf_eval",
    "dcf_gen",
    "dpf_eval",
    "dpf_eval_all",
    "dpf_gen",
    "from_open_bytes",
    "lut_eval",
    "lut_gen",
    "lut_key",
    "lut_mask",
    "message_bytes",
    "new_seed",
    "open_bytes",
    "reconstruct",
    "simulate_compare",
    "simulate_lut",
]
