"""Train the bundled byte-level Llama-family model on the generated long-context task mix.

    python -m mpcache.train --minutes 85 --out mpcache/assets/bundled

Sized for 2 CPU cores: the learning-rate schedule and the length curriculum follow
*progress* = max(step / steps, elapsed / budget), so a run ends on time on any machine
(a faster machine simply takes more steps). Each sequence is BOS + task prompt + answer
+ filler; the loss is the mean next-byte loss plus the mean loss on answer bytes (the
part that needs long-range retrieval). Checkpoints are written every few minutes so an
interrupted run still leaves a usable model.
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
from safetensors.torch import save_file
from tqdm import tqdm

from mpcache.eval.tasks import TASKS, filler_sentence, make_sample
from mpcache.model import ByteTokenizer, ModelConfig, Transformer

BUNDLED_CONFIG = ModelConfig(
    family="llama",
    vocab_size=264,
    n_layer=4,
    n_head=8,
    n_kv_head=4,
    d_model=256,
    d_ff=768,
    max_position=4096,
    norm_eps=1e-5,
    rope_theta=10000.0,
    tie_embeddings=False,
    activation="silu",
    bos_token_id=ByteTokenizer.bos_id,
    eos_token_id=ByteTokenizer.eos_id,
    architecture="MpcacheByteLlama",
)

# Task weights of the training mix (passkey and single-needle NIAH matter most).
MIX = {"passkey": 3, "niah": 3, "niah_multikey": 2, "niah_multivalue": 1, "mqar": 2, "vt": 1, "episodic": 2}


def length_choices(progress: float, max_len: int) -> tuple[list[int], list[float]]:
    """Curriculum: short sequences first, long ones from a third of the way in."""
    lengths = [n for n in (256, 512, 1024, 2048) if n <= max_len]
    if progress < 0.15:
        weights = [1.0 if n <= 512 else 0.0 for n in lengths]
    elif progress < 0.35:
        weights = [1.0 if n <= 1024 else 0.0 for n in lengths]
    else:
        # Short rows carry more answers per token: most of the retrieval signal comes from them.
        weights = [3.0, 2.0, 1.0, 1.0][: len(lengths)]
    return lengths, weights


def make_sequence(rng: random.Random, length: int, tok: ByteTokenizer) -> tuple[list[int], list[int]]:
    """A training row of exactly length+1 tokens and the indices of its answer tokens."""
    count = lambda s: len(tok.encode(s, add_bos=False))  # noqa: E731
    tasks = list(MIX)
    while True:
        task = rng.choices(tasks, weights=[MIX[t] for t in tasks])[0]
        try:
            sample = make_sample(task, length - 24, rng.randrange(1 << 30), count)
            break
        except ValueError:  # too short for this task at this length
            continue
    prompt = tok.encode(sample.prompt)
    answer = tok.encode(sample.answer, add_bos=False) + tok.encode("\n", add_bos=False)
    ids = prompt + answer
    while len(ids) < length + 1:
        ids += tok.encode(filler_sentence(rng) + " ", add_bos=False)
    ids = ids[: length + 1]
    answer_positions = [i for i in range(len(prompt), len(prompt) + len(answer)) if i <= length]
    return ids, answer_positions


def make_batch(rng: random.Random, length: int, batch: int, tok: ByteTokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    rows, masks = [], []
    for _ in range(batch):
        ids, answer = make_sequence(rng, length, tok)
        mask = torch.zeros(length + 1, dtype=torch.bool)
        mask[answer] = True
        rows.append(torch.tensor(ids))
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


@torch.no_grad()
def quick_eval(model: Transformer, tok: ByteTokenizer, lengths: list[int], n: int) -> dict[str, float]:
    from mpcache.generate import generate

    model.eval()
    count = lambda s: len(tok.encode(s, add_bos=False))  # noqa: E731
    results = {}
    for task in ("passkey", "niah"):
        for length in lengths:
            hits = 0
            for i in range(n):
                sample = make_sample(task, length, 10_000 + i, count, depth=(i + 0.5) / n)
                ids = torch.tensor([tok.encode(sample.prompt)])
                out = generate(model, ids, max_new_tokens=len(sample.answer) + 2)
                hits += tok.decode(out[0].tolist()).strip().startswith(sample.answer)
            results[f"{task}@{length}"] = hits / n
    model.train()
    return results


def save_checkpoint(model: Transformer, config: ModelConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save(out / "config.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("mpcache/assets/bundled"))
    parser.add_argument("--minutes", type=float, default=85.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=100_000, help="upper bound on optimizer steps")
    parser.add_argument("--tokens-per-step", type=int, default=8192)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
    parser.add_argument("--eval-samples", type=int, default=20)
    parser.add_argument("--init-from", type=Path, default=None, help="start from this checkpoint folder's weights")
    parser.add_argument(
        "--resume-progress",
        type=float,
        default=0.0,
        help="with --init-from: continue the schedule from this progress (0-1) of the interrupted run",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = ByteTokenizer()
    config = BUNDLED_CONFIG
    model = Transformer(config)
    if args.init_from is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init_from / "model.safetensors")))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "train_log.jsonl"
    log = log_path.open("a" if args.init_from is not None else "w")
    header = {
        "event": "start",
        "params": model.num_parameters(),
        "config": config.to_dict(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "init_from": str(args.init_from) if args.init_from else None,
    }
    log.write(json.dumps(header) + "\n")
    print(f"training {model.num_parameters():,} parameters for {args.minutes} min", flush=True)

    budget = args.minutes * 60
    start = last_save = time.time()
    tokens = 0
    step = 0
    bar = tqdm(total=1000, desc="progress (per mille)", unit="‰")
    ema_loss = ema_answer = None
    while True:
        elapsed = time.time() - start
        own = max(step / args.steps, elapsed / budget)
        if own >= 1.0:
            break
        progress = args.resume_progress + (1.0 - args.resume_progress) * own
        warmup = min(1.0, step / (20 if args.init_from is not None else 100))
        lr = args.lr * warmup * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        lengths, weights = length_choices(progress, args.max_len)
        length = rng.choices(lengths, weights=weights)[0]
        batch = max(1, args.tokens_per_step // length)
        ids, answer_mask = make_batch(rng, length, batch, tok)
        logits = model(ids[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        target_is_answer = answer_mask[:, 1:].flatten()
        lm_loss = losses.mean()
        answer_loss = losses[target_is_answer].mean()
        loss = lm_loss + answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += ids[:, :-1].numel()
        ema_loss = lm_loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * lm_loss.item()
        ema_answer = answer_loss.item() if ema_answer is None else 0.95 * ema_answer + 0.05 * answer_loss.item()
        bar.n = int(1000 * progress)
        bar.set_postfix(step=step, len=length, loss=f"{ema_loss:.3f}", answer=f"{ema_answer:.3f}", lr=f"{lr:.1e}")
        if step % 20 == 0:
            row = {"event": "step", "step": step, "elapsed_s": round(elapsed, 1), "tokens": tokens, "length": length,
                   "lr": lr, "loss": round(ema_loss, 4), "answer_loss": round(ema_answer, 4)}
            log.write(json.dumps(row) + "\n")
            log.flush()
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(model, config, args.out)
            last_save = time.time()
    bar.close()
    save_checkpoint(model, config, args.out)
    train_seconds = time.time() - start
    scores = quick_eval(model, tok, [512, 1024, 2048], args.eval_samples)
    done = {"event": "done", "steps": step, "tokens": tokens, "train_seconds": round(train_seconds, 1),
            "quick_eval": scores, "tasks": list(TASKS)}
    log.write(json.dumps(done) + "\n")
    log.close()
    print(json.dumps(done, indent=2))


if __name__ == "__main__":
    main()
