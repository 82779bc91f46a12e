"""Trained parts of KV-cache methods (Locret's retaining heads, Attention-Gate's gates).

A trained part belongs to one model: it is saved as a safetensors file under
`mpcache/assets/methods/` together with the model's fingerprint, and `load_parts` hands
it back only for the model it was trained on. Any other model (the tiny random ones of
the tests, a checkpoint that kept training) gets freshly initialised parts, with a
warning unless the caller asked for random parts explicitly.

    parts = load_parts(model, "locret", build)      # build(model) -> nn.Module

`TrainedPolicy` is the cache side both methods share (where the parts come from, how their
per-token predictions become scores); `trainer_parser`, `frozen_bundled`, `task_samples` and
`fit` are the training side both trainers (`train_locret`, `train_gates`) share.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from mpcache.eval.tasks import TASKS, Sample, make_sample
from mpcache.methods.base import Budget, PolicyCache
from mpcache.model import load_bundled
from mpcache.model.cache import LayerKV
from mpcache.model.tokenizer import Tokenizer
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


# ------------------------------------------------------------------------------------------ the cache side
class TrainedPolicy(PolicyCache):
    """A policy that scores each token once, when it arrives, with trained parts of the model (`load_parts`).

    The parts live in the attribute `parts_attr` ("heads", "gates"), given by the knob of the same name: "auto"
    (this model's trained parts, else random ones with a warning), "random", or a path to an artifact of this
    model. `from_model` loads them; `store_scores` writes their per-token predictions into the new tokens' slots
    of the per-slot state `score_state`, which is the score eviction ranks by."""

    parts_attr: ClassVar[str]
    score_state: ClassVar[str]

    def __init__(self, n_layer: int, budget: Budget | None, source: str, **common) -> None:
        super().__init__(n_layer, budget, **common)
        if not isinstance(source, str):
            raise TypeError(f"{self.parts_attr} must be 'auto', 'random' or a path, got {type(source).__name__}")
        self.parts_source = source
        setattr(self, self.parts_attr, None)
        self.trained = False

    @staticmethod
    def build_parts(model: Transformer) -> nn.Module:
        """Fresh (untrained) parts for `model`."""
        raise NotImplementedError

    @classmethod
    def from_model(cls, model: Transformer, budget: Budget | None, **kwargs) -> TrainedPolicy:
        cache = super().from_model(model, budget, **kwargs)
        assert isinstance(cache, TrainedPolicy)
        parts, cache.trained = load_parts(model, cls.name, cls.build_parts, cache.parts_source)
        setattr(cache, cls.parts_attr, parts)
        return cache

    def store_scores(self, layer: int, entry: LayerKV, predicted: Tensor) -> None:
        """Predictions [B, T, Hkv] for the T tokens `update` just appended to `entry` become their scores."""
        t = predicted.shape[1]
        slots = (entry.lengths - t)[..., None] + torch.arange(t, device=predicted.device)  # the new tokens' slots
        self.slot_state(layer, self.score_state).scatter_(2, slots, predicted.transpose(1, 2).float())

    def score(self, layer: int, queries: Tensor, query_positions: Tensor) -> Tensor:
        return self.slot_state(layer, self.score_state)


# --------------------------------------------------------------------------------------- the training side
def trainer_parser(method: str, doc: str, *, steps: int, train: int, val: int, lengths: str, lr: float):
    """The flags every trainer takes, with its defaults (a trainer adds its own)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps, one sequence each")
    parser.add_argument("--train", type=int, default=train, help="training sequences")
    parser.add_argument("--val", type=int, default=val, help="validation sequences")
    parser.add_argument("--lengths", default=lengths, help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=artifact_path(method))
    parser.add_argument("--log", type=Path, default=ASSETS / f"{method}_log.jsonl")
    return parser


def frozen_bundled(args: argparse.Namespace) -> tuple[Transformer, Tokenizer, list[int], float]:
    """Seed torch, then (the bundled model with its weights frozen, its tokenizer, `--lengths` as ints, the start
    time the log counts from)."""
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_bundled()
    model.requires_grad_(False)
    return model, tokenizer, [int(x) for x in args.lengths.split(",")], start


def task_samples(count: int, lengths: list[int], seed: int) -> list[Sample]:
    """Generated samples of the tasks in turn at random lengths from `lengths`, seeds seed, seed + 1, ... (trainers
    use seeds the evaluation never does); lengths count bytes, as the bundled model reads them."""
    rng = random.Random(seed)
    return [
        make_sample(TASKS[i % len(TASKS)], rng.choice(lengths), seed + i, lambda text: len(text.encode()))
        for i in range(count)
    ]


def fit(
    method: str,
    args: argparse.Namespace,
    model: Transformer,
    parts: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    examples: list,
    losses: Callable[[Any], dict[str, Tensor]],
    validate: Callable[[], dict],
    every: int,
    start: float,
    clip_value: float | None = None,
) -> None:
    """The loop both trainers share: `args.steps` steps, each on one example drawn with random.Random(args.seed);
    `losses(example)` names scalar tensors, of which "loss" is minimised (gradient values clipped at `clip_value`)
    and every one is logged as its mean over each `every` steps; `validate()` at step 0 and at the end. Writes
    the JSON-lines log `args.log` (also printed) and the artifact `args.out` (the parts with the model's
    fingerprint and the final validation)."""
    args.log.parent.mkdir(parents=True, exist_ok=True)
    with args.log.open("w") as log:

        def write(record: dict) -> None:
            record["elapsed_s"] = round(time.perf_counter() - start, 1)
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record))

        settings = {k: str(v) for k, v in vars(args).items()}
        write({"event": "start", "model": fingerprint(model), "args": settings})
        write({"event": "val", "step": 0, **validate()})
        order = random.Random(args.seed)
        totals: dict[str, float] = {}
        for step in range(args.steps):
            named = losses(examples[order.randrange(len(examples))])
            optimizer.zero_grad()
            named["loss"].backward()
            if clip_value is not None:
                torch.nn.utils.clip_grad_value_(parts.parameters(), clip_value)
            optimizer.step()
            scheduler.step()
            for name, value in named.items():
                totals[name] = totals.get(name, 0.0) + value.item() / every
            if (step + 1) % every == 0:
                write({"event": "train", "step": step + 1, **{k: round(v, 4) for k, v in totals.items()}})
                totals = {}
        metrics = validate()
        write({"event": "val", "step": args.steps, **metrics})
        save_parts(parts, model, args.out, {"method": method, "args": settings, **metrics})
        write({"event": "done", "artifact": str(args.out), "bytes": args.out.stat().st_size})
