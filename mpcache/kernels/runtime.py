"""Where the Triton kernels can run, and triton itself, imported only when a kernel could run or be built.

The kernels run on CUDA tensors with triton installed, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` in the environment before mpcache.kernels is first imported: `@triton.jit` reads it when a
kernel is defined). `MPCACHE_TRITON_COMPILE=1` defines them without a device, to build them for a GPU target
(`python -m bench.kernels --compile`, which sets it). Otherwise triton is not imported at all (importing it and
defining the kernels costs ~0.5 s and ~70 MB in every process), and `triton.jit` below leaves each kernel a plain
Python function that nothing calls: every entry point checks `runs_on` first.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Triton is installed and can run: a CUDA device, or the interpreter (CPU tensors)."""
    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())


def runs_on(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors (all on CUDA, or all on CPU under the interpreter)."""
    if not available():
        return False
    device = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == device for t in tensors)


DEFINED = HAS_TRITON and (available() or os.environ.get("MPCACHE_TRITON_COMPILE") == "1")


class _NoTriton:
    """Stands in for `triton` and `triton.language` when the kernels are not defined."""

    @staticmethod
    def jit(fn: Any) -> Any:
        return fn

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"triton.{name}: the Triton kernels are not defined in this process (see mpcache.kernels)")


if DEFINED:
    import triton
    import triton.language as tl

    if INTERPRET:  # pinned for this process: triton reads the variable again at launch (tests/conftest.py drops it)
        triton.knobs.runtime.interpret = True
else:
    triton = tl = _NoTriton()

__all__ = ["DEFINED", "HAS_TRITON", "INTERPRET", "available", "runs_on", "tl", "triton"]
