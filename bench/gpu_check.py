"""One prepared GPU check of the plaintext path (issue #17): every Triton kernel against its torch reference, decode
attention's bandwidth against a device-to-device copy of the same bytes, and every KV-cache method's decode speed
on SmolLM2 against the full cache and transformers' own decode.

    python -m bench.gpu_check                      # a CUDA machine: <= 8 minutes, bench/results/gpu_check.json
    python -m bench.gpu_check --smoke --json X     # CPU: Triton interpreter, tiny shapes, a tiny random model

Targets (#17): decode attention over a 32K-token cache at batch 8 reads its bytes at >= 80% of the bandwidth of a
device-to-device copy (copy bandwidth = bytes read + bytes written per second; the kernel's = bytes it must read,
keys, values, positions and validity, per second); every method's decode step within 1.3x of the full cache's decode
step at the same prompt (the method at its budget).

Sections, each recorded in the JSON as it finishes (a failure is recorded, the rest still runs; a deadline,
`--minutes`, skips what is left):
1. kernels: each kernel's output against its reference on ragged caches (bf16 and float32 on a GPU), max error
   and tolerance;
2. bandwidth: decode attention at batch 8 over 32K tokens for SmolLM2's heads (9 query / 3 KV heads of 64) and
   Llama-8B's (32 / 8 of 128), CUDA-event medians, against `dst.copy_(src)` of the same byte count and against
   the torch reference (SDPA);
3. decode: SmolLM2 (`mpcache.model.load_model("smollm2")`, bf16) prefills one random prompt per method, then
   `--steps` single-token steps are timed (CUDA-synchronised, median); kernels on (the switch's "auto"); the
   same prompt through transformers' LlamaForCausalLM with its DynamicCache when transformers is installed.

`--smoke` runs the same code on the CPU under the interpreter (kernels forced on) with tiny shapes and a tiny
random Llama (built with transformers when available, so both implementations share its weights): it exercises
every step and measures nothing; its times are interpreter times and the JSON says so.
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # the kernels must be defined for the interpreter before mpcache.kernels is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from bench.kernels import time_ms  # noqa: E402
from mpcache import kernels  # noqa: E402
from mpcache.kernels import compressed, paged  # noqa: E402
from mpcache.methods import METHODS, make_policy  # noqa: E402
from mpcache.methods.base import chunk_min_max  # noqa: E402
from mpcache.model import ModelConfig, Transformer  # noqa: E402
from mpcache.model.cache import LayerKV  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # bf16 outputs: a few ulps of values of magnitude ~1-4
BANDWIDTH_TARGET, DECODE_TARGET = 0.8, 1.3
# Method knobs for the speed run where the defaults do not fit a model they were not trained for.
SPEED_KNOBS: dict[str, dict[str, Any]] = {"locret": {"heads": "random"}, "attention_gate": {"gates": "random"}}


# ------------------------------------------------------------------------------------------------ shared
class Deadline:
    """Wall-clock budget of the whole run: sections ask `left()` before starting work."""

    def __init__(self, minutes: float) -> None:
        self.end = time.perf_counter() + 60 * minutes

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ragged(b: int, hkv: int, length: int, d: int, dv: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A layer whose heads hold different slot counts (one empty), holes and scattered positions."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (b, hkv), generator=g)
    lengths[0, -1] = 0
    lengths[-1, 0] = length
    valid = (torch.arange(length) < lengths[..., None]) & (torch.rand(b, hkv, length, generator=g) > 0.15)
    layer = LayerKV(
        torch.randn(b, hkv, length, d, generator=g).to(dtype), torch.randn(b, hkv, length, dv, generator=g).to(dtype),
        torch.randint(0, length + 20, (b, hkv, length), generator=g), valid, lengths,
    )  # fmt: skip
    return LayerKV(*(x.to(device) for x in dataclasses.astuple(layer)))


def max_error(got: Any, ref: Any) -> float:
    """Largest absolute difference over a tensor or the tensors of a tuple / cache layer."""
    if isinstance(got, LayerKV):
        got, ref = dataclasses.astuple(got), dataclasses.astuple(ref)
    if isinstance(got, tuple):
        return max(max_error(a, b) for a, b in zip(got, ref, strict=True))
    if got.shape != ref.shape:
        return math.inf
    return float((got.double() - ref.double()).abs().max()) if got.numel() else 0.0


# ----------------------------------------------------------------------------------------------- 1. kernels
def kernel_cases(device: torch.device, dtype: torch.dtype, big: bool) -> list[tuple[str, Callable, Callable, float]]:
    """(name, kernel call, reference call, tolerance) for every kernel at one size."""
    b, hkv, group, length, d = (2, 8, 4, 4096, 128) if big else (2, 2, 2, 70, 20)
    g = torch.Generator().manual_seed(1)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    entry = ragged(b, hkv, length, d, d, dtype, device, seed=2)
    q = rand(b, hkv * group, 1, d)
    qpos = torch.tensor([[length], [length // 2]], device=device)
    index = torch.randint(-2, length + 2, (b, hkv, length // 2), generator=g).to(device)
    count = torch.randint(0, length // 2 + 1, (b, hkv), generator=g).to(device)
    low = ragged(b, hkv, length, d, d, dtype, device, seed=3)
    balance = (torch.rand(b, hkv, d, generator=g) + 0.5).to(dtype).to(device)
    store = compressed.quantize_entry(low, 3, balance)
    kept = (d * 3) // 5
    channels = torch.rand(b, hkv, d, generator=g).argsort(-1)[..., :kept].sort(-1).values.to(device)
    pruned = dataclasses.replace(low, keys=low.keys[..., :kept].contiguous())
    target = torch.randint(-1, length, (b, hkv, length), generator=g).to(device)
    weight = torch.rand(b, hkv, length, generator=g).to(device)
    bs, n_blocks = 16, b * (-(-length // 16)) + 3
    pool_k, pool_v = rand(n_blocks, hkv, bs, d), rand(n_blocks, hkv, bs, d)
    pool_pos = torch.randint(0, length, (n_blocks, hkv, bs), generator=g, dtype=torch.int32).to(device)
    tables = torch.randperm(n_blocks, generator=g)[: b * (-(-length // bs))].view(b, -1).to(device)
    window_q = rand(b, hkv * group, 16, d)
    window_pos = torch.full((b, 16), length, device=device)
    weights = torch.rand(b, 16, generator=g).to(device)
    kmax, kmin, _ = chunk_min_max(entry.keys, entry.valid, 16)
    grouped = q[:, :, 0].view(b, hkv, group, d)

    def both(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Callable, Callable]:
        return (lambda: fn(*args, **kwargs, use_kernels=True)), (lambda: fn(*args, **kwargs))

    tol = TOL[dtype]
    cases = [
        ("decode attention", *both(kernels.decode_attention, q, entry, qpos), tol),
        ("decode attention, sliding window", *both(kernels.decode_attention, q, entry, qpos, 50), tol),
        ("decode attention over slot lists", *both(kernels.decode_attention, q, entry, qpos, index=index,
                                                   count=count), tol),
        ("decode attention + probabilities", *both(kernels.decode_attention_probs, q, entry, qpos), tol),
        ("compaction (gather_slots)", *both(kernels.gather_slots, entry, index, count), 0.0),
        ("merge (scatter-add)", *both(kernels.merge_kv, entry.keys, entry.values, target, weight, weight + 0.5),
         tol * 4),
        ("MiKV 3-bit store + main", *both(compressed.lowbit_attention, q, entry, store, 3, balance, qpos), tol),
        ("ThinK pruned keys + main", *both(compressed.pruned_attention, q, entry, pruned, channels, qpos), tol),
        ("paged decode attention", *both(paged.paged_attention, q, pool_k, pool_v, pool_pos, tables,
                                         entry.lengths.clamp(max=tables.shape[1] * bs), qpos), tol),
        ("window attention sums", *both(kernels.window_attention_sums, window_q, entry.keys, window_pos,
                                        entry.positions, entry.valid, weights), tol),
        ("Quest page bound", *both(kernels.page_bound, grouped, kmax, kmin), tol * 10),
        ("MPCache cluster score", *both(kernels.approx_similarity, grouped.sum(2), kmax, kmin, 0.6), tol * 10),
        ("key norms", *both(kernels.token_key_norms, entry.keys, entry.valid), tol * 10),
        ("ThinK channel scores", *both(kernels.channel_scores, window_q.view(b, hkv, group * 16, d), entry.keys,
                                       entry.valid), tol * 10),
    ]  # fmt: skip
    return cases


def check_kernels(device: torch.device, dtypes: list[torch.dtype], big: bool) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for name, fast, slow, tol in kernel_cases(device, dtype, big):
            row: dict[str, Any] = {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "tolerance": tol}
            try:
                start = time.perf_counter()
                err = max_error(fast(), slow())
                sync(device)
                row.update(max_abs_err=err, ok=err <= tol, seconds=round(time.perf_counter() - start, 3))
            except Exception as e:  # recorded, the other kernels still run
                row.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=3))
            print(f"  {row['kernel']:34s} {row['dtype']:9s} err {row.get('max_abs_err', float('nan')):.2e} "
                  f"tol {tol:.0e} {'ok' if row['ok'] else 'FAIL ' + row.get('error', '')}", flush=True)  # fmt: skip
            rows.append(row)
    return rows


# -------------------------------------------------------------------------------------------- 2. bandwidth
def bandwidth(device: torch.device, shapes: list[tuple[str, int, int, int, int, int]], iters: int) -> list[dict]:
    """Decode attention over full caches against a copy of the same bytes, per (name, B, Hq, Hkv, L, D)."""
    return [bandwidth_row(device, *shape, iters) for shape in shapes]


def bandwidth_row(device: torch.device, name: str, b: int, hq: int, hkv: int, length: int, d: int, iters: int) -> dict:
    """One shape of `bandwidth` (its tensors are freed on return)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    slots = torch.arange(length, device=device)
    entry = LayerKV(
        torch.randn(b, hkv, length, d, device=device, dtype=dtype),
        torch.randn(b, hkv, length, d, device=device, dtype=dtype),
        slots.expand(b, hkv, length).contiguous(), torch.ones(b, hkv, length, dtype=torch.bool, device=device),
        torch.full((b, hkv), length, device=device),
    )  # fmt: skip
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    qpos = torch.full((b, 1), length, device=device)
    nbytes = sum(t.numel() * t.element_size() for t in (entry.keys, entry.values, entry.positions, entry.valid))
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    kernel_ms = time_ms(lambda: kernels.decode_attention(q, entry, qpos, use_kernels=True), iters, device)
    torch_ms = time_ms(
        lambda: kernels.cached_attention(q, entry.keys, entry.values, qpos, entry.positions, entry.valid), iters, device
    )
    copy_ms = time_ms(lambda: dst.copy_(src), iters, device)
    copy_gbps, kernel_gbps = 2 * nbytes / copy_ms / 1e6, nbytes / kernel_ms / 1e6
    row = dict(shape=name, batch=b, q_heads=hq, kv_heads=hkv, tokens=length, head_dim=d, dtype=str(dtype),
               bytes_read=nbytes, kernel_ms=kernel_ms, torch_ms=torch_ms, copy_ms=copy_ms,
               kernel_gbps=kernel_gbps, torch_gbps=nbytes / torch_ms / 1e6, copy_gbps=copy_gbps,
               fraction_of_copy=kernel_gbps / copy_gbps, target=BANDWIDTH_TARGET,
               met=kernel_gbps / copy_gbps >= BANDWIDTH_TARGET)  # fmt: skip
    print(f"  {name:28s} kernel {kernel_ms:8.3f} ms {kernel_gbps:7.0f} GB/s | torch {torch_ms:8.3f} ms | copy "
          f"{copy_gbps:7.0f} GB/s | kernel / copy {row['fraction_of_copy']:.2f}", flush=True)  # fmt: skip
    return row


# ----------------------------------------------------------------------------------------------- 3. decode
def decode_steps(step: Callable[[Tensor], Tensor], token: Tensor, warmup: int, steps: int, device) -> list[float]:
    """Milliseconds of each of `steps` greedy decode steps after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        token = step(token)
        sync(device)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return times


def mpcache_decode(model: Transformer, method: str, ids: Tensor, budget: int, warmup: int, steps: int) -> dict:
    factory = make_policy(method, None if method == "full" else budget, **SPEED_KNOBS.get(method, {}))
    cache = factory(model)
    device = ids.device
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        logits = model(ids, cache=cache, last_only=True)
        sync(device)
        prefill = time.perf_counter() - start

        def step(token: Tensor) -> Tensor:
            return model(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)

        times = decode_steps(step, logits[:, -1].argmax(-1, keepdim=True), warmup, steps, device)
    read = [float(cache.attended_tokens(layer).float().mean()) for layer in range(model.config.n_layer)]
    return dict(prefill_s=prefill, step_ms=statistics.median(times), step_ms_mean=statistics.mean(times),
                tokens_read_per_head=statistics.mean(read), cache_bytes=cache.memory_bytes())  # fmt: skip


def transformers_decode(hf_model: Any, ids: Tensor, warmup: int, steps: int) -> dict:
    from transformers import DynamicCache

    cache = DynamicCache()
    device = ids.device
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        out = hf_model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        sync(device)
        prefill = time.perf_counter() - start

        def step(token: Tensor) -> Tensor:
            logits = hf_model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            return logits[:, -1].argmax(-1, keepdim=True)

        times = decode_steps(step, out.logits[:, -1].argmax(-1, keepdim=True), warmup, steps, device)
    return dict(prefill_s=prefill, step_ms=statistics.median(times), step_ms_mean=statistics.mean(times))


def decode_speed(
    model: Transformer, hf_model: Any, methods: list[str], prompt: int, budget: int, warmup: int, steps: int,
    deadline: Deadline,
) -> list[dict]:  # fmt: skip
    device = next(model.parameters()).device
    ids = torch.randint(100, model.config.vocab_size - 1, (1, prompt), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rows: list[dict] = []
    for method in ["full", *[m for m in methods if m != "full"]]:
        if deadline.left() < 20:
            rows.append(dict(impl="mpcache", method=method, skipped="deadline"))
            continue
        row: dict[str, Any] = dict(impl="mpcache", method=method, budget=None if method == "full" else budget)
        try:
            row.update(mpcache_decode(model, method, ids, budget, warmup, steps))
        except Exception as e:  # recorded; the other methods still run
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
        rows.append(row)
        print(f"  {method:15s} " + (f"step {row['step_ms']:8.2f} ms  read {row['tokens_read_per_head']:7.0f} tok/head"
              if "step_ms" in row else f"FAILED {row['error']}"), flush=True)  # fmt: skip
    if hf_model is not None:
        row = dict(impl="transformers", method="full", budget=None)
        try:
            row.update(transformers_decode(hf_model, ids, warmup, steps))
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc(limit=4))
        rows.append(row)
        print(f"  transformers    step {row.get('step_ms', float('nan')):8.2f} ms", flush=True)
    full = next((r for r in rows if r["impl"] == "mpcache" and r["method"] == "full" and "step_ms" in r), None)
    hf = next((r for r in rows if r["impl"] == "transformers" and "step_ms" in r), None)
    for r in rows:
        if "step_ms" in r:
            r["tokens_per_s"] = 1000 / r["step_ms"]
            r["vs_full"] = r["step_ms"] / full["step_ms"] if full else None
            r["vs_transformers"] = r["step_ms"] / hf["step_ms"] if hf else None
            r["met"] = None if full is None else r["vs_full"] <= DECODE_TARGET
    return rows


def tiny_models(device: torch.device) -> tuple[Transformer, Any]:
    """The smoke run's models: a tiny random Llama through transformers (saved, then loaded by mpcache, so both
    share its weights), or mpcache's own when transformers is missing."""
    try:
        import transformers
    except ImportError:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_position=256)
        return Transformer(config).eval().to(device), None
    from mpcache.model import from_pretrained

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        model = from_pretrained(folder).eval()
    return model.to(device), hf.to(device)


def smollm2(device: torch.device) -> tuple[Transformer, Any]:
    from mpcache.model import checkpoint_folder, load_model

    model, _ = load_model("smollm2", dtype=torch.bfloat16)  # weights in bf16, RoPE frequencies stay float32
    model = model.to(device).eval()
    try:
        import transformers
    except ImportError:
        print("  transformers is not installed: no transformers baseline", flush=True)
        return model, None
    folder = str(checkpoint_folder("smollm2"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval()
    return model, hf


# ------------------------------------------------------------------------------------------------- main
def environment(device: torch.device) -> dict:
    import triton

    info = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                kernel_mode=kernels.mode(), interpreter=kernels.INTERPRET, device=str(device))  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30)
    return info


def run(args: argparse.Namespace) -> dict:
    deadline = Deadline(args.minutes)
    smoke = args.smoke
    if not smoke and not (torch.cuda.is_available() and kernels.available()):
        raise SystemExit("bench.gpu_check needs CUDA and triton (or --smoke for the CPU interpreter run)")
    device = torch.device("cpu" if smoke else "cuda")
    report: dict[str, Any] = dict(
        note=("SMOKE RUN: CPU, Triton interpreter, tiny shapes and model; times are interpreter times and mean "
              "nothing" if smoke else "GPU run"),
        command=" ".join(["python -m bench.gpu_check", *sys.argv[1:]]), environment=environment(device),
        targets=dict(bandwidth_fraction_of_copy=BANDWIDTH_TARGET, decode_step_vs_full=DECODE_TARGET),
    )  # fmt: skip
    started = time.perf_counter()

    def section(name: str, fn: Callable[[], Any]) -> None:
        print(f"== {name} ({deadline.left():.0f} s left)", flush=True)
        if deadline.left() <= 0:
            report[name] = {"skipped": "deadline"}
            return
        try:
            report[name] = fn()
        except Exception as e:  # recorded; later sections still run
            report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
            print(report[name]["trace"], flush=True)
        write(args.json, report)

    with kernels.forced(True) if smoke else kernels.forced("auto"):
        section("kernels", lambda: check_kernels(device, [torch.float32] if smoke else [torch.float32,
                                                                                         torch.bfloat16], not smoke))
        shapes = ([("tiny", 2, 4, 2, 64, 16)] if smoke else
                  [("SmolLM2 heads, 32K, batch 8", 8, 9, 3, 32768, 64),
                   ("Llama-8B heads, 32K, batch 8", 8, 32, 8, 32768, 128)])  # fmt: skip
        section("bandwidth", lambda: bandwidth(device, shapes, 3 if smoke else args.iters))
        methods = args.methods.split(",") if args.methods else sorted(METHODS)

        def decode() -> list[dict]:
            model, hf = tiny_models(device) if smoke else smollm2(device)
            return decode_speed(model, hf, methods, args.prompt, args.budget, args.warmup, args.steps, deadline)

        section("decode", decode)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["summary"] = summary(report, smoke)
    write(args.json, report)
    print(json.dumps(report["summary"], indent=1))
    return report


def summary(report: dict, smoke: bool) -> dict:
    """Which checks passed and which targets were met (a smoke run measures no target)."""
    out: dict[str, Any] = {}
    rows = report.get("kernels")
    if isinstance(rows, list):
        out["kernels_ok"] = all(r["ok"] for r in rows)
        out["kernels_failed"] = [f"{r['kernel']} ({r['dtype']})" for r in rows if not r["ok"]]
    rows = report.get("decode")
    if isinstance(rows, list):
        out["decode_failed"] = [r["method"] for r in rows if "error" in r or "skipped" in r]
    failed = [name for name in ("kernels", "bandwidth", "decode") if not isinstance(report.get(name), list)]
    out["sections_failed_or_skipped"] = failed
    if smoke:
        out["targets"] = "not measured: a smoke run times the CPU interpreter"
        return out
    rows = report.get("bandwidth")
    if isinstance(rows, list):
        out["bandwidth_fraction_of_copy"] = {r["shape"]: round(r["fraction_of_copy"], 3) for r in rows}
        out["bandwidth_target_met"] = all(r["met"] for r in rows)
    rows = report.get("decode")
    if isinstance(rows, list):
        measured = [r for r in rows if r["impl"] == "mpcache" and "vs_full" in r]
        out["decode_vs_full"] = {r["method"]: round(r["vs_full"], 3) for r in measured if r["vs_full"] is not None}
        out["decode_target_met"] = [r["method"] for r in measured if r["met"]]
        out["decode_target_missed"] = [r["method"] for r in measured if r["met"] is False]
    return out


def write(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter run on tiny shapes (measures nothing)")
    parser.add_argument("--json", type=Path, default=None, help="default bench/results/gpu_check.json (gpu_smoke)")
    parser.add_argument("--methods", default=None, help="comma-separated methods (default: all)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (4096; smoke 24)")
    parser.add_argument("--budget", type=int, default=None, help="tokens per KV head (512; smoke 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per method (32; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed decode steps first (4; smoke 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per bandwidth measurement")
    parser.add_argument("--minutes", type=float, default=7.5, help="deadline for the whole run")
    args = parser.parse_args(argv)
    defaults = dict(prompt=24, budget=8, steps=2, warmup=1) if args.smoke else dict(prompt=4096, budget=512,
                                                                                     steps=32, warmup=4)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.json is None:
        args.json = RESULTS / ("gpu_smoke.json" if args.smoke else "gpu_check.json")
    if args.methods and set(args.methods.split(",")) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(args.methods.split(',')) - set(METHODS))}")
    if args.smoke and not kernels.INTERPRET:
        parser.error("--smoke needs the interpreter: mpcache.kernels was imported before TRITON_INTERPRET was set")
    return run(args)


if __name__ == "__main__":
    main()
