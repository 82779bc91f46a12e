"""Tensors and Python objects <-> bytes on the wire (protos/mpcache.proto), with nothing executable.

Two things cross between parties: tensors (shares) and small Python objects (sizes, requests). Tensors travel
as dtype + shape + raw little-endian bytes, checked on arrival. Objects use pickle because CrypTen hands the
communicator arbitrary values for `send_obj`/`broadcast_obj`, but a pickle from the network is code, so
`loads` only rebuilds an allow-list: builtin containers, numbers, str/bytes, `collections.OrderedDict`,
`torch.Size`, tensors/parameters/dtypes/devices through pickle's persistent-id hook (dtype + shape + bytes, never
torch's own reducers, which run `torch.load` machinery), and the classes CrypTen itself deems safe to receive
(`crypten.common.serial.register_safe_class`: its allow-list of torch.nn modules plus what a program registers, e.g.
`crypten.load_from_party(model_class=...)`), classes only, never CrypTen's storage loaders. Anything else is refused
before it is imported.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import sys
from typing import Any

import torch

from mpcache.mpc.transport.proto import mpcache_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("mpcache's wire format is little-endian; this platform is not")

DTYPES: dict[torch.dtype, int] = {
    torch.int64: pb.INT64,
    torch.int32: pb.INT32,
    torch.int16: pb.INT16,
    torch.int8: pb.INT8,
    torch.uint8: pb.UINT8,
    torch.bool: pb.BOOL,
    torch.float64: pb.FLOAT64,
    torch.float32: pb.FLOAT32,
    torch.float16: pb.FLOAT16,
    torch.bfloat16: pb.BFLOAT16,
}
TORCH_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPES.items()}
_DTYPE_BY_NAME: dict[str, torch.dtype] = {str(d).removeprefix("torch."): d for d in DTYPES}


class WireFormatError(ValueError):
    """A message or payload that does not decode to what it claims to be."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for something outside the allow-list (it would run code or build arbitrary objects)."""


def dtype_name(code: int) -> str:
    """Readable name of a proto DType code, for error messages."""
    try:
        return pb.DType.Name(code)
    except ValueError:
        return f"unknown dtype code {code}"


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encode a tensor as (dtype, shape, raw bytes); the bytes are a snapshot, later writes to `t` don't leak."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"dtype {t.dtype} cannot go on the wire; supported: {sorted(_DTYPE_BY_NAME)}")
    flat = t.detach().cpu().reshape(-1)
    if flat.stride() != (1,):  # a size-1 dimension may carry any stride (expanded, sliced) and still be "contiguous"
        flat = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
    return pb.Tensor(dtype=DTYPES[t.dtype], shape=list(t.shape), payload=flat.view(torch.uint8).numpy().tobytes())


def tensor_from_proto(msg: pb.Tensor) -> torch.Tensor:
    """Decode and validate a Tensor message (dtype known, shape sane, payload size exact, bools 0/1)."""
    if msg.dtype not in TORCH_DTYPES:
        raise WireFormatError(f"tensor has {dtype_name(msg.dtype)}; expected one of {sorted(pb.DType.keys())[1:]}")
    dtype = TORCH_DTYPES[msg.dtype]
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireFormatError(f"tensor shape {list(shape)} has a negative dimension")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(msg.payload) != expected:
        raise WireFormatError(
            f"tensor payload is {len(msg.payload)} bytes but shape {list(shape)} of {dtype_name(msg.dtype)} "
            f"needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(msg.payload), dtype=torch.uint8)
    if dtype == torch.bool and bool((raw > 1).any()):
        raise WireFormatError("bool tensor payload has bytes other than 0 and 1")
    return raw.view(dtype).reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# Restricted pickle
# --------------------------------------------------------------------------------------------------------------

_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "range"): range,
    ("builtins", "bytearray"): bytearray,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): torch.Size,
}


def _crypten_safe_class(module: str, name: str) -> type | None:
    """A class CrypTen's own restricted unpickler accepts (its allow-list plus `register_safe_class`), or None.
    Only classes: CrypTen also lists torch's storage loaders, which this format never needs."""
    serial = sys.modules.get("crypten.common.serial")  # loaded with CrypTen; without it nothing was registered
    unpickler = getattr(serial, "RestrictedUnpickler", None)
    found = getattr(unpickler, "_RestrictedUnpickler__SAFE_CLASSES", {}).get(f"{module}.{name}")
    if isinstance(found, type) and not issubclass(found, torch.Tensor) and "Storage" not in found.__name__:
        return found
    return None


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        # Tensors, dtypes and devices leave pickle's normal path, whose reducers name torch internals.
        if isinstance(obj, torch.Tensor):
            if type(obj) not in (torch.Tensor, torch.nn.Parameter):
                raise TypeError(f"cannot send tensor subclass {type(obj).__name__}; send a plain torch.Tensor")
            enc = tensor_to_proto(obj)
            if type(obj) is torch.nn.Parameter:
                return ("parameter", enc.dtype, tuple(enc.shape), enc.payload, bool(obj.requires_grad))
            return ("tensor", enc.dtype, tuple(enc.shape), enc.payload)
        if isinstance(obj, torch.dtype):
            return ("dtype", str(obj).removeprefix("torch."))
        if isinstance(obj, torch.device):
            return ("device", str(obj))
        return None


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _SAFE_GLOBALS.get((module, name)) or _crypten_safe_class(module, name)
        if found is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _SAFE_GLOBALS)
            raise UnsafePickleError(
                f"refusing to unpickle {module}.{name}: objects from the network may only contain builtin "
                f"containers, numbers, str/bytes, tensors, {allowed} and classes registered with "
                "crypten.common.serial.register_safe_class"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) in (4, 5) and pid[0] in ("tensor", "parameter"):
            code, shape, payload = pid[1:4]
            if not (isinstance(code, int) and isinstance(shape, tuple) and isinstance(payload, bytes)):
                raise WireFormatError(f"malformed tensor record in pickle: {type(code)}, {type(shape)}")
            if not all(isinstance(d, int) for d in shape):
                raise WireFormatError(f"malformed tensor shape in pickle: {shape!r}")
            tensor = tensor_from_proto(pb.Tensor(dtype=code, shape=list(shape), payload=payload))
            if pid[0] == "tensor" and len(pid) == 4:
                return tensor
            if pid[0] == "parameter" and len(pid) == 5 and isinstance(pid[4], bool):
                return torch.nn.Parameter(tensor, requires_grad=pid[4] and tensor.is_floating_point())
            raise WireFormatError(f"malformed parameter record in pickle: {str(pid[4:])[:80]}")
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "dtype" and pid[1] in _DTYPE_BY_NAME:
            return _DTYPE_BY_NAME[pid[1]]
        if isinstance(pid, tuple) and len(pid) == 2 and pid[0] == "device" and isinstance(pid[1], str):
            try:
                return torch.device(pid[1])
            except RuntimeError as e:
                raise WireFormatError(f"bad device string in pickle: {pid[1]!r}") from e
        raise UnsafePickleError(f"refusing unknown persistent record in pickle: {str(pid)[:80]}")


def dumps(obj: Any) -> bytes:
    """Pickle `obj` so that `loads` can rebuild it (tensors travel as dtype + shape + bytes)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    """Unpickle bytes from a peer, refusing anything outside the allow-list (raises UnsafePickleError)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"loads expects bytes, got {type(data).__name__}")
    try:
        obj = _Unpickler(io.BytesIO(data)).load()
    except (UnsafePickleError, WireFormatError):
        raise
    except Exception as e:  # truncated or garbage input: pickle raises a zoo of types
        raise WireFormatError(f"malformed pickle ({type(e).__name__}: {e})") from e
    if isinstance(obj, torch.nn.Module):  # as CrypTen checks: a received module runs no hooks of the sender's
        for module in obj.modules():
            hooks = [k for k, v in vars(module).items() if k.endswith("hooks") and isinstance(v, dict) and v]
            if hooks:
                raise UnsafePickleError(f"refusing a {type(module).__name__} that carries hooks {hooks}")
    return obj
