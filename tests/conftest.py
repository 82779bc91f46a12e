import os

# One intra-op thread per process: test tensors are tiny, and several processes (parties,
# dealer, client) share two cores, where OpenMP spin-waiting makes 2 threads ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# The Triton kernels run under the CPU interpreter in this process (tests/test_kernels.py). `@triton.jit` reads
# TRITON_INTERPRET when mpcache.kernels is first imported, and almost every test module imports it (the model and
# the methods call it), so it is defined here, before collection. The variable is removed again at once: the
# subprocesses tests start (parties, dealer, benches) must not import triton.
_interpret = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import mpcache.kernels  # noqa: E402, F401

if _interpret is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _interpret
