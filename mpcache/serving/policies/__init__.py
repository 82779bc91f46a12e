"""Block eviction policies behind one interface (`Policy.simulate(trace, capacity)`), one file each.

lru.LRU          least recently used (vLLM / SGLang), optionally with a second LRU tier
belady.Belady    offline optimum (needs the future trace): the bound
lsm_gnn.LSMGNN   static + dynamic hybrid, victim buffer, preemptive prefetch (LSM-GNN)
discard.DiscardBits, phase.PhaseBits   one-bit predictions (Paging with Succinct Predictions)
"""

from mpcache.serving.policies.base import Policy, SimResult
from mpcache.serving.policies.belady import Belady
from mpcache.serving.policies.discard import DiscardBits
from mpcache.serving.policies.lru import LRU
from mpcache.serving.policies.lsm_gnn import LSMGNN
from mpcache.serving.policies.phase import PhaseBits

__all__ = ["LRU", "LSMGNN", "Belady", "DiscardBits", "PhaseBits", "Policy", "SimResult"]
