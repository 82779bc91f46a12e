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

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.methods.locret import RetainingHeads, qkv_features
from mpcache.methods.trained import fit, frozen_bundled, task_samples, trainer_parser
from mpcache.model import KVCache
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
    return [
        make_example(model, [model.config.bos_token_id, *sample.prompt.encode(), *sample.answer.encode()], n_label)
        for sample in task_samples(count, lengths, seed)
    ]


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
    parser = trainer_parser("locret", __doc__, steps=3000, train=56, val=14, lengths="512,1024,2048", lr=5e-4)
    parser.add_argument("--label-queries", type=int, default=32)
    args = parser.parse_args(argv)
    model, _, lengths, start = frozen_bundled(args)
    train = dataset(model, args.train, lengths, args.label_queries, SEED_BASE + args.seed * 1000)
    val = dataset(model, args.val, lengths, args.label_queries, SEED_BASE + 500 + args.seed * 1000)
    heads = RetainingHeads(model.config)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, 2 * args.steps // 3)
    schedule = lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / (args.steps - warmup))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = lambda example: {"loss": loss_of(heads, model, example)[0]}
    fit(
        "locret", args, model, heads, optimizer, scheduler, train, losses, lambda: validate(heads, model, val),
        every=500, start=start, clip_value=0.5,
    )  # fmt: skip


if __name__ == "__main__":
    main()
