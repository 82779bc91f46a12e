"""Trained parts of KV-cache methods (Locret's retaining heads, Attention-Gate's gates).

A trained part belongs to one model: it is saved as a safetensors file under
`mpcache/assets/methods/` together with the model's fingerprint, and `load_parts` hands
it back only for the model it was trained on. Any other model (the tiny random ones of
the tests, a checkpoint that kept training) gets freshly initialised parts, with a
warning unless the caller asked for random parts explicitly.

    parts = load_parts(model, "locret", build)      # build(model) -> nn.Module
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mpcache.model.transformer import Transformer

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "methods"
# Parts already built per model, so a factory called once per request loads them once.
_LOADED: weakref.WeakKeyDictionary[Transformer, dict[tuple[str, str], tuple[nn.Module, bool]]] = (
    weakref.WeakKeyDictionary()
)


def fingerprint(model: Transformer) -> str:
    """A short hash of the model's config and a strided sample of every weight tensor.

    Sampling (about 1k values per tensor) keeps it fast for large checkpoints, while any
    change of training step or architecture still changes it."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def artifact_path(method: str) -> Path:
    return ASSETS / f"{method}.safetensors"


def save_parts(parts: nn.Module, model: Transformer, path: Path, meta: dict[str, Any]) -> None:
    """Write `parts`' weights with the model fingerprint and `meta` (hyper-parameters, log)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in parts.state_dict().items()}
    save_file(state, str(path), metadata={"fingerprint": fingerprint(model), "meta": json.dumps(meta)})


def read_meta(path: Path) -> tuple[str, dict[str, Any]]:
    """(fingerprint, meta) stored with an artifact."""
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
    return header.get("fingerprint", ""), json.loads(header.get("meta", "{}"))


def load_parts(
    model: Transformer, method: str, build: Callable[[Transformer], nn.Module], source: str = "auto"
) -> tuple[nn.Module, bool]:
    """(parts, trained) for `model`.

    source: "auto" loads `mpcache/assets/methods/<method>.safetensors` when it was trained
    on this very model and falls back to random parts with a warning; "random" always
    builds random parts (seeded, so runs repeat); any other string is a path that must
    match the model (ValueError otherwise)."""
    if not isinstance(source, str):
        raise TypeError(f"the trained-part source must be 'auto', 'random' or a path, got {type(source).__name__}")
    loaded = _LOADED.setdefault(model, {})
    if (method, source) not in loaded:
        parts, trained = _load(model, method, build, source)
        loaded[method, source] = parts.to(next(model.parameters()).device), trained
    return loaded[method, source]


def _load(model: Transformer, method: str, build: Callable[[Transformer], nn.Module], source: str):
    with torch.random.fork_rng():  # seeded parts without disturbing the caller's random stream
        torch.manual_seed(0)
        parts = build(model).eval()
    parts.requires_grad_(False)
    if source == "random":
        return parts, False
    path = artifact_path(method) if source == "auto" else Path(source)
    if not path.exists():
        if source != "auto":
            raise ValueError(f"no {method} artifact at {path}")
        warnings.warn(f"{method}: no trained artifact at {path}; using random parts", stacklevel=3)
        return parts, False
    stored, _ = read_meta(path)
    if stored != fingerprint(model):
        if source != "auto":
            raise ValueError(f"{path} was trained for another model (fingerprint {stored} != {fingerprint(model)})")
        warnings.warn(f"{method}: {path} was trained for another model; using random parts", stacklevel=3)
        return parts, False
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    parts.load_state_dict(state)
    return parts, True
