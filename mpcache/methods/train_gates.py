"""Train Attention-Gate's gates on the bundled model (a few minutes on one core).

    OMP_NUM_THREADS=1 python -m mpcache.methods.train_gates

The model is frozen; only the gates train (the paper's continual pre-training setting,
on the generated task mix the model itself was trained on, at seeds the evaluation never
uses). The forward pass mirrors inference exactly: prompt tokens attend to the whole
prompt, and every answer token attends only to the tokens whose gate kept them, the
first `--sink` tokens and the newest `--window` (itself included). The hard flag
g >= 0.5 is used in the forward pass; its gradient is the sigmoid's (straight-through
estimator), entering through a multiplicative attention mask (softmax weights e^s x
flag, renormalised), so a dropped token is exactly invisible while the loss still
reaches its gate.

Loss = next-token cross-entropy on the answer + `--lam` x (mean keep flag - `--keep`)^2,
the eviction loss that steers the kept fraction towards the target (the paper's form
and target are not in the notes; this is the simplest loss with that effect; a
layer may keep more than another, only the mean is steered). Adam, lr 1e-2 (the gate
bias starts at +1 and must be able to cross 0 within the run), cosine decay, fixed step
count and seeds. Writes
`mpcache/assets/methods/attention_gate.safetensors` and `attention_gate_log.jsonl`
(validation: answer loss and teacher-forced answer accuracy with gates vs the full
cache, and the kept fraction per layer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mpcache.methods.attention_gate import Gates
from mpcache.methods.trained import fit, frozen_bundled, task_samples, trainer_parser
from mpcache.model.transformer import Transformer, apply_rope

SEED_BASE = 60_000_000  # far from the evaluation seeds


def gated_forward(
    model: Transformer, gates: Gates | None, ids: Tensor, answer_start: int, sink: int = 0, window: int = 0
) -> tuple[Tensor, Tensor]:
    """Logits [1, T, V] of one sequence whose answer queries (rows >= answer_start) see only
    gated-in tokens, the first `sink` tokens and the last `window` + 1 (themselves included,
    what `AttentionGate` keeps), and the flags [L, Hkv, T]. gates=None: full cache."""
    config = model.config
    t = ids.shape[1]
    positions = torch.arange(t)[None]
    x = model.tok_emb(ids)
    if config.family == "gpt2":
        x = x + model.pos_emb(positions)
    rows, cols = torch.arange(t)[:, None], torch.arange(t)[None]
    causal = cols <= rows
    gated_rows = (rows >= answer_start) & (cols >= sink) & (rows - cols > window)  # where a key's flag applies
    soft = []
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        h = block.attn_norm(x)
        q = attn.q_proj(h).view(1, t, config.n_head, -1).transpose(1, 2)
        k = attn.k_proj(h).view(1, t, config.n_kv_head, -1).transpose(1, 2)
        v = attn.v_proj(h).view(1, t, config.n_kv_head, -1).transpose(1, 2)
        if config.family == "llama":
            q, k = apply_rope(q, positions, attn.inv_freq), apply_rope(k, positions, attn.inv_freq)
        g = config.n_head // config.n_kv_head
        scores = q.view(1, config.n_kv_head, g, t, -1) @ k[:, :, None].transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~causal, float("-inf"))
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))  # [1, Hkv, G, T, T]
        if gates is not None:
            keep = torch.sigmoid(gates(layer, h))[0].T  # [Hkv, T]
            flag = (keep >= 0.5).float() + (keep - keep.detach())  # straight-through: exactly 0 or 1 forward
            weights = weights * torch.where(gated_rows, flag[:, None, None, :], 1.0)[None]  # [1, Hkv, 1, T, T]
            soft.append(flag)
        probs = weights / weights.sum(-1, keepdim=True)
        out = (probs @ v[:, :, None]).reshape(1, config.n_head, t, -1).transpose(1, 2).reshape(1, t, -1)
        x = x + attn.o_proj(out)
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x)), torch.stack(soft) if soft else torch.empty(0)


def make_data(count: int, lengths: list[int], seed: int, bos: int) -> list[tuple[Tensor, int]]:
    """(ids [1, T], answer start) of generated task samples."""
    out = []
    for sample in task_samples(count, lengths, seed):
        prompt = [bos, *sample.prompt.encode()]
        out.append((torch.tensor([prompt + list(sample.answer.encode())]), len(prompt)))
    return out


def answer_loss(logits: Tensor, ids: Tensor, start: int) -> tuple[Tensor, Tensor]:
    """(cross-entropy, accuracy) of the answer tokens, teacher-forced."""
    pred, target = logits[0, start - 1 : -1], ids[0, start:]
    return F.cross_entropy(pred, target), (pred.argmax(-1) == target).float().mean()


@torch.no_grad()
def validate(model: Transformer, gates: Gates, data: list[tuple[Tensor, int]], sink: int, window: int) -> dict:
    gated, full, acc_g, acc_f, kept = [], [], [], [], []
    for ids, start in data:
        logits, soft = gated_forward(model, gates, ids, start, sink, window)
        loss, acc = answer_loss(logits, ids, start)
        gated.append(float(loss))
        acc_g.append(float(acc))
        kept.append((soft >= 0.5).float().mean((1, 2)))
        loss, acc = answer_loss(gated_forward(model, None, ids, start)[0], ids, start)
        full.append(float(loss))
        acc_f.append(float(acc))
    mean = lambda xs: round(sum(xs) / len(xs), 4)
    return {
        "answer_loss": mean(gated),
        "answer_loss_full": mean(full),
        "answer_acc": mean(acc_g),
        "answer_acc_full": mean(acc_f),
        "kept_per_layer": [round(v, 4) for v in torch.stack(kept).mean(0).tolist()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = trainer_parser("attention_gate", __doc__, steps=400, train=140, val=21, lengths="512,768", lr=1e-2)
    parser.add_argument("--keep", type=float, default=0.5, help="target fraction of tokens kept")
    parser.add_argument("--lam", type=float, default=30.0, help="weight of the eviction loss")
    parser.add_argument("--sink", type=int, default=4, help="first tokens always kept (AttentionGate's default)")
    parser.add_argument("--window", type=int, default=32, help="newest tokens always kept (AttentionGate's default)")
    args = parser.parse_args(argv)
    model, tokenizer, lengths, start = frozen_bundled(args)
    train = make_data(args.train, lengths, SEED_BASE + args.seed * 1000, tokenizer.bos_id)
    val = make_data(args.val, lengths, SEED_BASE + 500 + args.seed * 1000, tokenizer.bos_id)
    gates = Gates(model.config)
    optimizer = torch.optim.Adam(gates.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

    def losses(example: tuple[Tensor, int]) -> dict[str, Tensor]:
        ids, answer = example
        logits, soft = gated_forward(model, gates, ids, answer, args.sink, args.window)
        ce, _ = answer_loss(logits, ids, answer)
        kept = soft.mean()
        return {"loss": ce + args.lam * (kept - args.keep) ** 2, "ce": ce, "kept": kept}

    fit(
        "attention_gate", args, model, gates, optimizer, scheduler, train, losses,
        lambda: validate(model, gates, val, args.sink, args.window), every=max(1, args.steps // 6), start=start,
    )  # fmt: skip


if __name__ == "__main__":
    main()
