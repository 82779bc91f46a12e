"""Where the Triton kernels run, the one switch that says whether they do, and triton itself (imported only
when a kernel could run or be built).

The switch (`mode`): "auto" (the default) runs the kernels on CUDA tensors and the torch references on CPU
tensors; "on" runs them wherever they can (CUDA, or CPU tensors under the interpreter: the tests force it so);
"off" always runs the torch references. `MPCACHE_KERNELS=auto|on|off` sets it for a process, `set_mode` and
`forced` (a context manager) inside one. Callers ask `wanted(*tensors)` and pass the answer as `use_kernels=`
to the kernel functions, whose own default is the torch reference.

The kernels run on CUDA tensors with triton installed, or on CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1` in the environment before mpcache.kernels is first imported: `@triton.jit` reads it when a
kernel is defined). `MPCACHE_TRITON_COMPILE=1` defines them without a device, to build them for a GPU target
(`python -m bench.kernels --compile`, which sets it). Otherwise triton is not imported at all (importing it and
defining the kernels costs ~0.5 s and ~70 MB in every process), and `triton.jit` below leaves each kernel a plain
Python function that nothing calls: every entry point checks `runs_on` first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def helper(fn: Any) -> Any:
    """Decorator of the `@triton.jit` functions kernels call (not launch): under the interpreter, a plain
    function (it runs inside the launch with `triton.language` patched, and each interpreted jit call would
    re-patch the language, ~15 ms per call per program); otherwise `triton.jit`."""
    return fn if INTERPRET else triton.jit(fn)


def available() -> bool:
    """Triton is installed and can run: a CUDA device, or the interpreter (CPU tensors)."""
    return HAS_TRITON and (INTERPRET or torch.cuda.is_available())


def runs_on(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors (all on CUDA, or all on CPU under the interpreter)."""
    if not available():
        return False
    device = "cpu" if INTERPRET else "cuda"
    return all(t.device.type == device for t in tensors)


MODES = ("auto", "on", "off")
_mode = os.environ.get("MPCACHE_KERNELS", "auto")
if _mode not in MODES:
    raise ValueError(f"MPCACHE_KERNELS must be one of {MODES}, got {_mode!r}")


def mode() -> str:
    """The switch: "auto", "on" or "off" (module docstring)."""
    return _mode


def set_mode(new: str) -> str:
    """Set the switch for this process; returns the previous mode."""
    global _mode
    if new not in MODES:
        raise ValueError(f"kernel mode must be one of {MODES}, got {new!r}")
    old, _mode = _mode, new
    return old


@contextlib.contextmanager
def forced(on: bool | str = True) -> Iterator[None]:
    """`with forced(): ...` runs the kernels wherever they can (`forced(False)`: the torch references)."""
    old = set_mode(on if isinstance(on, str) else "on" if on else "off")
    try:
        yield
    finally:
        set_mode(old)


def wanted(*tensors: Tensor) -> bool:
    """Whether the kernels should take these tensors: mode "on" and they `runs_on`, or mode "auto" and they are
    CUDA tensors (the interpreter is ~1000x slower than torch: never the CPU default)."""
    if _mode == "off":
        return False
    if _mode == "auto" and (INTERPRET or any(t.device.type != "cuda" for t in tensors)):
        return False
    return runs_on(*tensors)


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
        from triton.runtime import interpreter

        # The interpreter checks every int32 product and sum for overflow (a third of its time on these kernels);
        # the compiled kernels never do, and int32 offsets here stay far below 2^31 at test sizes.
        interpreter.interpreter_builder.options = interpreter.InterpreterOptions(sanitize_overflow=False)
else:
    triton = tl = _NoTriton()

__all__ = [
    "DEFINED", "HAS_TRITON", "INTERPRET", "MODES", "available", "forced", "helper", "mode", "runs_on", "set_mode",
    "tl", "triton", "wanted",
]  # fmt: skip
