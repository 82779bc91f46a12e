import os

# One intra-op thread per process: test tensors are tiny, and several processes (parties,
# dealer, client) share two cores, where OpenMP spin-waiting makes 2 threads ~100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
