"""The only place that adapts CrypTen 0.4.1 (2022) to torch 2.x. Import `crypten` from here.

Fixes (see ../shared/research/feasibility.md, section 2):
1. `torch.onnx._internal.registration` moved; CrypTen imports it only as a feature probe,
   so it is aliased to its new home before CrypTen is imported.
2. `torch.onnx.export` defaults to the dynamo exporter (needs onnxscript); CrypTen's
   `from_pytorch` needs the TorchScript exporter, so the default becomes `dynamo=False`.
3. torch >= 2.6 loads with `weights_only=True`; `crypten.load`/`load_from_party` get a
   closure that loads full objects (only ever used on files this project wrote).
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch

_PATCHED = False


def _alias_onnx_registration() -> None:
    old = "torch.onnx._internal.registration"
    if old in sys.modules:
        return
    try:
        importlib.import_module(old)
    except ModuleNotFoundError:
        new = importlib.import_module("torch.onnx._internal.torchscript_exporter.registration")
        sys.modules[old] = new


def _default_torchscript_export() -> None:
    export = torch.onnx.export
    if getattr(export, "_mpcache_patched", False):
        return

    @functools.wraps(export)
    def torchscript_export(*args, **kwargs):
        kwargs.setdefault("dynamo", False)
        return export(*args, **kwargs)

    torchscript_export._mpcache_patched = True  # type: ignore[attr-defined]
    torch.onnx.export = torchscript_export


def _patch_loads(crypten_module) -> None:
    full_load = functools.partial(torch.load, weights_only=False)
    load, load_from_party = crypten_module.load, crypten_module.load_from_party

    @functools.wraps(load)
    def patched_load(f, load_closure=full_load, **kwargs):
        return load(f, load_closure=load_closure, **kwargs)

    @functools.wraps(load_from_party)
    def patched_load_from_party(*args, load_closure=full_load, **kwargs):
        return load_from_party(*args, load_closure=load_closure, **kwargs)

    crypten_module.load = patched_load
    crypten_module.load_from_party = patched_load_from_party


def import_crypten():
    """Return the `crypten` module with the torch-2.x fixes applied (idempotent)."""
    global _PATCHED
    if not _PATCHED:
        _alias_onnx_registration()
        _default_torchscript_export()
    import crypten

    if not _PATCHED:
        _patch_loads(crypten)
        _PATCHED = True
    return crypten
