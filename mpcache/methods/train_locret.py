"""Train Locret's retaining heads on the bundled model (about 3 minutes on one core).

    OMP_NUM_THREADS=1 python -m mpcache.methods.train_locret

Labels follow Locret's data generation: run the frozen model over prompt + answer and,
for every earlier token k and KV head g, take the largest pre-softmax logit
q_p . k_k / sqrt(d) over the label queries p and the query heads of g. Locret's label
queries are a long SFT answer; the task answers here are a few bytes, so the label
queries are the sequence's last `--label-queries` tokens (the answer and the question
before it). Loss (Locret's): Smooth-L1 to the labels, summed over layers, plus 0.0025 x
the squared difference of neighbouring tokens' predictions; AdamW (0.9, 0.95), lr 5e-4,
linear warm-up over the first 2/3 of the steps then linear decay, gradient values
clipped at 0.5, one sequence per step. Only the heads train; the model is frozen.
Data are the generated tasks at seeds the evaluation never uses. Writes
`mpcache/assets/methods/locret.safetensors` (with the model fingerprint) and
`locret_log.jsonl` (validation Smooth-L1 and the overlap of the predicted and true
top-10% token sets, Locret's metric). Fixed seeds and step counts, so reruns match.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.eval.tasks import TASKS, make_sample
from mpcache.methods.locret import RetainingHeads, qkv_features
from mpcache.methods.trained import ASSETS, artifact_path, fingerprint, save_parts
from mpcache.model import KVCache, load_bundled
from mpcache.model.transformer import Transformer

SEED_BASE = 50_000_000  # far from the evaluation seeds (seed * 100_003 + i for small seeds)


class Recorder(KVCache):
    """Keeps every layer's attention input and post-RoPE queries of one forward."""

    def __init__(self, n_layer: int) -> None:
        super().__init__(n_layer)
        self.hidden: list[Tensor] = [torch.empty(0)] * n_layer
        self.queries: list[Tensor] = [torch.empty(0)] * n_layer

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        self.hidden[layer] = hidden

    def observe(self, layer: int, queries: Tensor, query_positions: Tensor) -> None:
        self.queries[layer] = queries


def importance_labels(queries: Tensor, keys: Tensor, n_label: int) -> Tensor:
    """Locret's causal importance [Hkv, T - n_label]: max over the last `n_label` queries and
    the group's query heads of the logit to every earlier key. queries [Hq, T, D], keys [Hkv, T, D]."""
    hq, t, d = queries.shape
    hkv = keys.shape[0]
    q = queries[:, t - n_label :].reshape(hkv, hq // hkv * n_label, d)
    logits = q @ keys[:, : t - n_label].transpose(-1, -2) / math.sqrt(d)  # [Hkv, G * n_label, T']
    return logits.amax(1)


@torch.no_grad()
def make_example(model: Transformer, ids: list[int], n_label: int) -> dict[str, Tensor]:
    """Layer inputs [L, T, d_model] and labels [L, Hkv, T - n_label] of one sequence."""
    recorder = Recorder(model.config.n_layer)
    model(torch.tensor([ids]), cache=recorder, last_only=True)
    labels = []
    for layer in range(model.config.n_layer):
        entry = recorder.layers[layer]
        assert entry is not None
        labels.append(importance_labels(recorder.queries[layer][0], entry.keys[0], n_label))
    return {"hidden": torch.stack([h[0] for h in recorder.hidden]), "labels": torch.stack(labels)}


def dataset(model: Transformer, count: int, lengths: list[int], n_label: int, seed: int) -> list[dict[str, Tensor]]:
    tokenizer_count = lambda text: len(text.encode())  # the bundled model reads bytes
    rng = random.Random(seed)
    out = []
    for i in range(count):
        task, length = TASKS[i % len(TASKS)], rng.choice(lengths)
        sample = make_sample(task, length, seed + i, tokenizer_count)
        ids = [model.config.bos_token_id, *sample.prompt.encode(), *sample.answer.encode()]
        out.append(make_example(model, ids, n_label))
    return out


def loss_of(heads: RetainingHeads, model: Transformer, example: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(Locret's training loss, the per-layer Smooth-L1 [L]) on one sequence."""
    hidden, labels = example["hidden"], example["labels"]
    fit, smooth = [], []
    for layer, block in enumerate(model.blocks):
        pred = heads(layer, qkv_features(block.attn, hidden[layer]))[: labels.shape[-1]].T  # [Hkv, T']
        fit.append(F.smooth_l1_loss(pred, labels[layer]))
        smooth.append(F.mse_loss(pred[:, 1:], pred[:, :-1]))
    fit_t = torch.stack(fit)
    return fit_t.sum() + 0.0025 * torch.stack(smooth).sum(), fit_t


@torch.no_grad()
def validate(heads: RetainingHeads, model: Transformer, examples: list[dict[str, Tensor]]) -> dict[str, list[float]]:
    """Per layer: mean Smooth-L1 and mean overlap of the predicted and true top-10% token sets."""
    fits, overlaps = [], []
    for example in examples:
        hidden, labels = example["hidden"], example["labels"]
        _, fit = loss_of(heads, model, example)
        fits.append(fit)
        layer_overlap = []
        for layer, block in enumerate(model.blocks):
            pred = heads(layer, qkv_features(block.attn, hidden[layer]))[: labels.shape[-1]].T
            k = max(1, labels.shape[-1] // 10)
            top_true, top_pred = labels[layer].topk(k, -1).indices, pred.topk(k, -1).indices
            hits = (top_pred[:, :, None] == top_true[:, None, :]).any(-1).float().mean()
            layer_overlap.append(hits)
        overlaps.append(torch.stack(layer_overlap))
    return {
        "smooth_l1": [round(v, 4) for v in torch.stack(fits).mean(0).tolist()],
        "top10_overlap": [round(v, 4) for v in torch.stack(overlaps).mean(0).tolist()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps, one sequence each (Locret: 3000)")
    parser.add_argument("--train", type=int, default=56, help="training sequences")
    parser.add_argument("--val", type=int, default=14, help="validation sequences")
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--label-queries", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=artifact_path("locret"))
    parser.add_argument("--log", type=Path, default=ASSETS / "locret_log.jsonl")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, _ = load_bundled()
    model.requires_grad_(False)
    lengths = [int(x) for x in args.lengths.split(",")]
    train = dataset(model, args.train, lengths, args.label_queries, SEED_BASE + args.seed * 1000)
    val = dataset(model, args.val, lengths, args.label_queries, SEED_BASE + 500 + args.seed * 1000)
    heads = RetainingHeads(model.config)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, 2 * args.steps // 3)
    schedule = lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / (args.steps - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log = args.log.open("w")

    def write(record: dict) -> None:
        record["elapsed_s"] = round(time.perf_counter() - start, 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record))

    write({"event": "start", "model": fingerprint(model), "args": {k: str(v) for k, v in vars(args).items()}})
    write({"event": "val", "step": 0, **validate(heads, model, val)})
    order = random.Random(args.seed)
    running = 0.0
    for step in range(args.steps):
        loss, _ = loss_of(heads, model, train[order.randrange(len(train))])
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(heads.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if (step + 1) % 500 == 0:
            write({"event": "train", "step": step + 1, "loss": round(running / 500, 4)})
            running = 0.0
    metrics = validate(heads, model, val)
    write({"event": "val", "step": args.steps, **metrics})
    meta = {"method": "locret", "args": {k: str(v) for k, v in vars(args).items()}, **metrics}
    save_parts(heads, model, args.out, meta)
    write({"event": "done", "artifact": str(args.out), "bytes": args.out.stat().st_size})


if __name__ == "__main__":
    main()
