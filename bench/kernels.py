"""Triton kernels (mpcache.kernels) against the torch code they replace: time and max error.

    python -m bench.kernels                       # on a CUDA machine: markdown table on stdout
    python -m bench.kernels --json kernels.json   # also write the rows
    TRITON_INTERPRET=1 python -m bench.kernels    # no GPU: correctness on tiny shapes only
    python -m bench.kernels --compile 90          # no GPU needed: build every kernel for sm_90

Times are CUDA-event medians over `--iters` calls after warm-up, one GPU, inputs already
on the device; "torch" is the path the model takes without kernels (`cached_attention`
through SDPA; `gather_slots` first for a selected subset). GB/s counts the key/value
bytes a kernel must read. Without CUDA nothing is timed: the interpreter runs Triton
programs one by one in numpy, ~1000x slower than torch, so its times say nothing; the
rows then carry max errors only.

`--compile ARCH` builds the kernels for a CUDA architecture with the ptxas that ships in
the triton wheel (the launchers' own block sizes, Llama-like head dims) and prints each
one's registers and stack (spills): the interpreter accepts programs a GPU compiler
rejects (e.g. `tl.dot` under 16 wide), so this is the CPU-side check that they build.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if "--compile" in sys.argv:  # build without a GPU: the kernels must be defined for real (mpcache.kernels.runtime)
    os.environ["MPCACHE_TRITON_COMPILE"] = "1"

import torch  # noqa: E402

from mpcache import kernels  # noqa: E402
from mpcache.kernels import approx_similarity, cached_attention, gather_slots, page_bound  # noqa: E402
from mpcache.methods.base import chunk_min_max  # noqa: E402
from mpcache.model.cache import LayerKV  # noqa: E402


def make_cache(b: int, hkv: int, length: int, d: int, dtype: torch.dtype, device: str) -> LayerKV:
    """A cache whose heads hold between half and all of `length` slots (per-head lengths)."""
    lengths = torch.randint(length // 2, length + 1, (b, hkv), device=device)
    slots = torch.arange(length, device=device)
    return LayerKV(
        torch.randn(b, hkv, length, d, device=device, dtype=dtype),
        torch.randn(b, hkv, length, d, device=device, dtype=dtype),
        slots.expand(b, hkv, length).contiguous(),
        slots < lengths[..., None],
        lengths,
    )


def select_pages(entry: LayerKV, budget: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Quest-like subset: budget // page random pages per head, as slot lists (index, count)."""
    b, h, length = entry.valid.shape
    n_pages = length // page
    chosen = torch.rand(b, h, n_pages, device=entry.keys.device).argsort(-1)[..., : budget // page].sort(-1).values
    index = (chosen[..., None] * page + torch.arange(page, device=chosen.device)).flatten(2)
    count = torch.full((b, h), index.shape[-1], dtype=torch.long, device=index.device)
    return index, count


def time_ms(fn, iters: int, device: str | torch.device = "cuda") -> float:
    """Median milliseconds of `fn` over `iters` calls after 3 warm-ups: CUDA events on a GPU, perf_counter on the
    CPU (where, under the interpreter, the numbers mean nothing)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def cases(b: int, hq: int, hkv: int, length: int, d: int, dtype: torch.dtype, device: str, budget: int):
    """(name, kernel call, torch call, bytes read) for one shape."""
    entry = make_cache(b, hkv, length, d, dtype, device)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    qpos = torch.full((b, 1), length, device=device)
    index, count = select_pages(entry, budget, 16)
    kv_bytes = 2 * int(entry.lengths.sum()) * d * entry.keys.element_size()
    sub_bytes = 2 * int(count.sum()) * d * entry.keys.element_size()
    kmax, kmin, _ = chunk_min_max(entry.keys, entry.valid, 16)
    groups = q[:, :, 0].view(b, hkv, hq // hkv, d)
    window_q = torch.randn(b, hq, 32, d, device=device, dtype=dtype)
    window_pos = torch.full((b, 32), length, device=device)
    ones = torch.ones(b, 32, device=device)
    meta_bytes = 2 * kmax.numel() * kmax.element_size()

    def torch_subset():
        picked = gather_slots(entry, index, count)
        return cached_attention(q, picked.keys, picked.values, qpos, picked.positions, picked.valid)

    return [
        (
            "decode, full cache",
            lambda: kernels.decode_attention(q, entry, qpos, use_kernels=True),
            lambda: cached_attention(q, entry.keys, entry.values, qpos, entry.positions, entry.valid),
            kv_bytes,
        ),
        (
            f"decode, {budget} selected slots",
            lambda: kernels.decode_attention(q, entry, qpos, index=index, count=count, use_kernels=True),
            torch_subset,
            sub_bytes,
        ),
        (
            "Quest page bound",
            lambda: page_bound(groups, kmax, kmin, use_kernels=True),
            lambda: page_bound(groups, kmax, kmin),
            meta_bytes,
        ),
        (
            "MPCache cluster score",
            lambda: approx_similarity(groups.sum(2), kmax, kmin, 0.6, use_kernels=True),
            lambda: approx_similarity(groups.sum(2), kmax, kmin, 0.6),
            meta_bytes,
        ),
        (
            "key norms",
            lambda: kernels.token_key_norms(entry.keys, entry.valid, use_kernels=True),
            lambda: kernels.token_key_norms(entry.keys, entry.valid),
            kv_bytes // 2,
        ),
        (
            "window sums (32 queries)",
            lambda: kernels.window_attention_sums(
                window_q, entry.keys, window_pos, entry.positions, entry.valid, ones, use_kernels=True
            ),
            lambda: kernels.window_attention_sums(window_q, entry.keys, window_pos, entry.positions, entry.valid, ones),
            kv_bytes // 2,
        ),
    ]


# Pointer types for compile-only builds, by kernel argument name (bf16 caches, int64 positions); a build may
# override some (the compaction kernel copies raw 16-bit words, the merge writes bf16 rows).
POINTERS = {
    **dict.fromkeys(["Q", "K", "V", "KMAX", "KMIN", "KS", "KZ", "VS", "VZ", "BALANCE", "X"], "*bf16"),
    **dict.fromkeys(["QPOS", "KPOS", "LENGTHS", "INDEX", "COUNT", "CHANNELS", "TABLES", "TARGET", "POS"], "*i64"),
    **dict.fromkeys(["PART", "LSE", "LSE_OUT", "SCORES", "WEIGHT", "NORM", "OUT", "NUM", "NUM_K", "NUM_V"], "*fp32"),
    **dict.fromkeys(["DEN", "OUT_SQUARES", "OUT_ENTROPY"], "*fp32"),
    **dict.fromkeys(["VALID", "KC", "VC", "VALID_OUT"], "*u8"),
    "POS_OUT": "*i64",
}
WORDS = {"K": "*i16", "V": "*i16", "K_OUT": "*i16", "V_OUT": "*i16"}  # the compaction kernel's raw copies
FLOATS = ("alpha", "scale_log2")


def compile_kernels(arch: int) -> list[dict]:
    """Build every kernel specialization the launchers use at typical shapes for sm_`arch`;
    report registers and stack bytes (spills) from the cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mpcache.kernels import compact, compressed, decode, merge, scores, window

    if kernels.INTERPRET:
        raise SystemExit("--compile needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    split = decode.split_meta  # (group, head_dim, value_dim, index, window, upcast, channels, paged, scores)
    cuda = torch.device("cuda")
    builds = [  # every kernel, and each constexpr branch at the largest tiles the launchers use (where spills start)
        *[(decode._decode_split_kernel, split(4, 128, 128, idx, win, False), {}) for idx in (False, True)
          for win in (False, True)],
        (decode._decode_split_kernel, split(4, 128, 128, False, False, False, keep_scores=True), {}),
        (decode._decode_split_kernel, split(4, 76, 128, False, False, False, has_channels=True), {}),  # ThinK
        (decode._decode_split_kernel, split(4, 128, 128, False, True, False, paged=True), {"KPOS": "*i32"}),
        (decode._decode_split_kernel, split(1, 64, 64, False, False, False), {}),
        *[(decode._merge_kernel, decode.merge_meta(128, splits), {}) for splits in (2, 16)],
        (decode._probs_kernel, {"BLOCK": decode.PROB_BLOCK}, {}),
        (compact._compact_kernel, compact.compact_meta(128, 128, 4096, cuda), WORDS),
        (merge._merge_scatter_kernel, merge.merge_meta(128, 128), {}),
        (merge._merge_finish_kernel, {"DIM": 128, "BLOCK": merge.BLOCK_SLOTS, "BLOCK_D": 128}, {"OUT": "*bf16"}),
        (compressed._lowbit_split_kernel, compressed.lowbit_meta(3, 4, 128, 128, False, False), {}),
        *[(scores._chunk_score_kernel, scores.chunk_meta(256, 128, mode), {}) for mode in (scores.QUEST,
                                                                                           scores.LINEAR)],
        (scores._token_norm_kernel, scores.norm_meta(4096, 128), {}),
        (scores._channel_norm_kernel, scores.norm_meta(4096, 128), {}),
        *[(fn, window.window_meta(32, 4096, 128, True, False), {}) for fn in (window._row_lse_kernel,
                                                                             window._column_sum_kernel)],
        (window._column_sum_kernel, {**window.window_meta(32, 4096, 128, True, False), "STATS": True}, {}),  # CAKE
    ]  # fmt: skip
    rows = []
    for fn, meta, pointers in builds:
        meta = dict(meta)
        warps = meta.pop("num_warps", 4)
        names = fn.arg_names
        types = {**POINTERS, **pointers}
        signature = {n: "constexpr" if n in meta else types.get(n, "fp32" if n in FLOATS else "i32") for n in names}
        source = ASTSource(fn, signature, constexprs={(names.index(n),): v for n, v in meta.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line for item in line.split())
        row = dict(kernel=fn.__name__, meta=meta, num_warps=warps, registers=int(fields["REG"]),
                   stack_bytes=int(fields["STACK"]), shared_bytes=compiled.metadata.shared)  # fmt: skip
        print(f"sm_{arch} {row['kernel']:22s} regs {row['registers']:3d} stack {row['stack_bytes']:5d} "
              f"shared {row['shared_bytes']:6d}  {meta}")  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--compile", type=int, metavar="ARCH", help="only build the kernels for sm_ARCH (e.g. 90)")
    args = parser.parse_args()
    if args.compile:
        rows = compile_kernels(args.compile)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"note": f"compile-only for sm_{args.compile}; nothing ran", "rows": rows}, f, indent=1)
        return
    torch.manual_seed(0)
    gpu = torch.cuda.is_available() and kernels.available() and not kernels.INTERPRET
    if gpu:
        device, dtype = "cuda", torch.bfloat16
        shapes = [(1, 32, 8, 4096, 128), (1, 32, 8, 32768, 128), (8, 32, 8, 8192, 128), (4, 12, 12, 4096, 64)]
        budget = 2048
        note = f"GPU: {torch.cuda.get_device_name()}; bf16; CUDA-event medians of {args.iters} calls"
    elif kernels.available():
        device, dtype, shapes, budget = "cpu", torch.float32, [(1, 4, 2, 96, 32)], 32
        note = "NO GPU: Triton interpreter only (TRITON_INTERPRET=1); max errors only, no timing claims"
    else:
        note = "NO GPU and no interpreter (set TRITON_INTERPRET=1 for a CPU correctness run): nothing to measure"
        print(note)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"note": note, "rows": []}, f, indent=1)
        return
    print(note, "\n")
    print("| shape (B, Hq, Hkv, L, D) | op | triton ms | torch ms | speed-up | triton GB/s | max abs err |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for shape in shapes:
        for name, fast, slow, nbytes in cases(*shape, dtype, device, budget):
            err = (fast().float() - slow().float()).abs().max().item()
            row = dict(shape=list(shape), op=name, dtype=str(dtype), max_abs_err=err, triton_ms=None, torch_ms=None)
            if gpu:
                row["triton_ms"], row["torch_ms"] = time_ms(fast, args.iters), time_ms(slow, args.iters)
                row["triton_gbps"] = nbytes / row["triton_ms"] / 1e6
                timing = (
                    f"{row['triton_ms']:.4f} | {row['torch_ms']:.4f} | {row['torch_ms'] / row['triton_ms']:.2f}x | "
                    f"{row['triton_gbps']:.0f}"
                )
            else:
                timing = "n/a | n/a | n/a | n/a"
            print(f"| {tuple(shape)} | {name} | {timing} | {err:.2e} |")
            rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"note": note, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
