"""Triton kernels (mpcache.kernels) against the torch code they replace, under the CPU interpreter.

TRITON_INTERPRET=1 must be set before the kernels are defined: tests/conftest.py sets it for this
process before anything imports mpcache.kernels (and only for this process: subprocesses must not
import triton). The interpreter runs programs one after another (~0.5 ms each), so shapes are tiny
but ragged: odd head dims, lengths that are not block multiples, empty heads, holes.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mpcache import kernels  # noqa: E402
from mpcache.kernels import approx_similarity, cached_attention, channel_scores, gather_slots, page_bound  # noqa: E402
from mpcache.kernels.compressed import lowbit_attention, pruned_attention, quantize_entry  # noqa: E402
from mpcache.kernels.paged import paged_attention  # noqa: E402
from mpcache.methods.base import chunk_min_max  # noqa: E402
from mpcache.methods.snapkv import SnapKV  # noqa: E402
from mpcache.model.cache import LayerKV  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def ragged_cache(b: int, hkv: int, length: int, d: int, dtype: torch.dtype, seed: int) -> LayerKV:
    """A padded layer whose heads hold different slot counts (one empty), with invalid holes
    and scattered positions, as eviction leaves them."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    values = torch.randn(b, hkv, length, d + 3, generator=g).to(dtype)  # Dv != D
    lengths = torch.randint(1, length + 1, (b, hkv), generator=g)
    lengths[0, -1] = 0  # an empty head
    lengths[-1, 0] = length
    valid = (torch.arange(length) < lengths[..., None]) & (torch.rand(b, hkv, length, generator=g) > 0.15)
    positions = torch.randint(0, length + 20, (b, hkv, length), generator=g)
    return LayerKV(keys, values, positions, valid, lengths)


def test_kernels_run_under_the_interpreter():
    # Otherwise every comparison below would compare the torch fallback with itself.
    assert kernels.INTERPRET and kernels.available()
    assert kernels.runs_on(torch.zeros(1))


def test_one_switch_auto_on_cuda_torch_on_cpu():
    """"auto" (the default) never runs the interpreter: CPU tensors take the torch references unless forced."""
    x = torch.zeros(2)
    assert kernels.mode() == "auto" and not kernels.wanted(x)
    with kernels.forced():
        assert kernels.mode() == "on" and kernels.wanted(x)
        with kernels.forced(False):
            assert not kernels.wanted(x)
        assert kernels.wanted(x)
    assert kernels.mode() == "auto"
    with pytest.raises(ValueError, match="kernel mode"):
        kernels.set_mode("fast")
    env = {**os.environ, "MPCACHE_KERNELS": "sometimes"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", "import mpcache.kernels"], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "MPCACHE_KERNELS must be one of" in run.stderr


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_cached_attention(dtype):
    b, hkv, group, length, d = 2, 2, 3, 150, 20
    entry = ragged_cache(b, hkv, length, d, dtype, seed=0)
    queries = torch.randn(b, hkv * group, 1, d, generator=torch.Generator().manual_seed(1)).to(dtype)
    query_positions = torch.tensor([[length], [length // 2]])  # row 1 cannot see its later slots
    for window, splits in ((None, 1), (None, 3), (25, 2)):
        out = kernels.decode_attention(queries, entry, query_positions, window, use_kernels=True, num_splits=splits)
        ref = cached_attention(queries, entry.keys, entry.values, query_positions, entry.positions, entry.valid, window)
        assert out.dtype == dtype and out.shape == ref.shape
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
        assert bool((out[0, -group:] == 0).all()), "an empty head must output zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_over_index_lists_matches_gather_slots(dtype):
    b, hkv, group, length, d = 2, 2, 2, 90, 16
    entry = ragged_cache(b, hkv, length, d, dtype, seed=2)
    g = torch.Generator().manual_seed(3)
    queries = torch.randn(b, hkv * group, 1, d, generator=g).to(dtype)
    index = torch.randint(-2, length + 2, (b, hkv, 70), generator=g)  # out-of-range entries are clamped
    count = torch.tensor([[70, 0], [33, 5]])
    query_positions = torch.tensor([[length + 5], [length + 5]])
    out = kernels.decode_attention(
        queries, entry, query_positions, index=index, count=count, use_kernels=True, num_splits=2
    )
    picked = gather_slots(entry, index, count)
    ref = cached_attention(queries, picked.keys, picked.values, query_positions, picked.positions, picked.valid)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=0)
    full = kernels.decode_attention(queries, entry, query_positions, use_kernels=True)
    assert not torch.allclose(out[1, :group].float(), full[1, :group].float(), atol=1e-3), "the index list was ignored"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_keeps_every_slots_probability(dtype):
    """The probabilities H2O-style policies accumulate, from the attention pass itself (scores stored by stage 1,
    normalised once the merge knows each head's log-sum-exp), against `attention_probs`."""
    b, hkv, group, length, d = 2, 2, 3, 90, 20
    entry = ragged_cache(b, hkv, length, d, dtype, seed=10)
    queries = torch.randn(b, hkv * group, 1, d, generator=torch.Generator().manual_seed(11)).to(dtype)
    query_positions = torch.tensor([[length], [length // 2]])
    out, probs = kernels.decode_attention_probs(queries, entry, query_positions, 30, use_kernels=True, num_splits=2)
    ref_out, ref_probs = kernels.decode_attention_probs(queries, entry, query_positions, 30)
    assert probs.shape == ref_probs.shape == (b, hkv, group, length)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(probs, ref_probs, atol=TOL[dtype] / 10, rtol=TOL[dtype])  # bf16: scores rounded
    sums = probs.sum(-1)
    torch.testing.assert_close(sums[sums > 0], torch.ones_like(sums[sums > 0]), atol=1e-5, rtol=0)
    assert bool((probs[0, -1] == 0).all()), "an empty head's slots get nothing"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compaction_kernel_moves_exactly_what_gather_slots_does(dtype):
    entry = ragged_cache(2, 3, 70, 20, dtype, seed=12)
    g = torch.Generator().manual_seed(13)
    index = torch.randint(-3, 73, (2, 3, 40), generator=g)  # out-of-range entries are clamped
    count = torch.tensor([[40, 0, 17], [3, 40, 29]])
    got, ref = gather_slots(entry, index, count, use_kernels=True), gather_slots(entry, index, count)
    for field in ("keys", "values", "positions", "valid", "lengths"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert got.keys.shape == (2, 3, 40, 20) and got.values.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_kernel_matches_merge_into(dtype):
    """KVMerger/Elastic/D2O/EMS merges: slots scatter weighted rows into targets (-1: nowhere), merged slots become
    sum(w x) / sum(norm), the others keep their rows bit for bit."""
    g = torch.Generator().manual_seed(14)
    b, h, length = 2, 2, 50
    keys, values = torch.randn(b, h, length, 20, generator=g).to(dtype), torch.randn(b, h, length, 23, generator=g)
    values = values.to(dtype)
    target = torch.randint(-1, length, (b, h, length), generator=g)
    target[:, :, ::3] = -1
    weight, norm = torch.rand(b, h, length, generator=g), torch.rand(b, h, length, generator=g) + 0.5
    got = kernels.merge_kv(keys, values, target, weight, norm, use_kernels=True)
    ref = kernels.merge_kv(keys, values, target, weight, norm)
    received = torch.zeros(b, h, length, dtype=torch.long)
    received = received.scatter_add_(2, target.clamp(min=0), (target >= 0).long()) > 0
    for x, y, original in zip(got, ref, (keys, values), strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), y.float(), atol=TOL[dtype] * 2, rtol=TOL[dtype])
        assert torch.equal(x[~received], original[~received]), "a slot nobody merged into changed"
        assert not torch.equal(x[received], original[received])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lowbit_store_attention_matches_dequantised_concat(dtype):
    """MiKV: the packed 3-bit store read by the kernel beside the main store, as one softmax, against attention
    over the dequantised store concatenated with the main one."""
    b, hkv, group, d = 2, 2, 2, 20
    main = ragged_cache(b, hkv, 40, d, dtype, seed=15)
    low = ragged_cache(b, hkv, 70, d, dtype, seed=16)
    g = torch.Generator().manual_seed(17)
    balance = (torch.rand(b, hkv, d, generator=g) + 0.5).to(dtype)
    store = quantize_entry(low, 3, balance)
    queries = torch.randn(b, hkv * group, 1, d, generator=g).to(dtype)
    query_positions = torch.tensor([[95], [40]])
    for window in (None, 30):
        got = lowbit_attention(queries, main, store, 3, balance, query_positions, window, use_kernels=True)
        ref = lowbit_attention(queries, main, store, 3, balance, query_positions, window)
        torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype] * 2, rtol=0)
    alone = kernels.decode_attention(queries, main, query_positions, use_kernels=True)
    assert not torch.allclose(got.float(), alone.float(), atol=1e-2), "the low-precision store was not read"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pruned_key_attention_matches_expanded_concat(dtype):
    """ThinK: keys holding 12 of 20 channels read against the query's kept channels, beside the full store."""
    b, hkv, group, d, kept = 2, 2, 2, 20, 12
    main = ragged_cache(b, hkv, 30, d, dtype, seed=18)
    old = ragged_cache(b, hkv, 60, d, dtype, seed=19)
    old = LayerKV(old.keys[..., :kept].contiguous(), old.values, old.positions, old.valid, old.lengths)
    g = torch.Generator().manual_seed(20)
    channels = torch.rand(b, hkv, d, generator=g).argsort(-1)[..., :kept].sort(-1).values
    queries = torch.randn(b, hkv * group, 1, d, generator=g).to(dtype)
    query_positions = torch.tensor([[90], [50]])
    got = pruned_attention(queries, main, old, channels, query_positions, use_kernels=True)
    ref = pruned_attention(queries, main, old, channels, query_positions)
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=0)
    shuffled = pruned_attention(queries, main, old, channels.flip(-1), query_positions, use_kernels=True)
    assert not torch.allclose(shuffled.float(), got.float(), atol=1e-2), "the channel list was ignored"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_kernel_matches_paged_attention(dtype):
    """Decode attention through block tables (the serving store): shuffled blocks, heads of unequal length,
    positions that do not follow slots (evicted caches), a sliding window."""
    g = torch.Generator().manual_seed(21)
    n_blocks, hkv, bs, d, b, group = 12, 2, 8, 20, 2, 2
    key_cache = torch.randn(n_blocks, hkv, bs, d, generator=g).to(dtype)
    value_cache = torch.randn(n_blocks, hkv, bs, d + 3, generator=g).to(dtype)
    slot_positions = torch.randint(0, 60, (n_blocks, hkv, bs), generator=g, dtype=torch.int32)
    block_tables = torch.randperm(n_blocks, generator=g)[: 2 * 5].view(2, 5)
    block_tables[1, 3:] = -1  # past row 1's last block: never read
    lengths = torch.tensor([[40, 33], [0, 21]])
    queries = torch.randn(b, hkv * group, 1, d, generator=g).to(dtype)
    query_positions = torch.tensor([[59], [45]])
    for window in (None, 20):
        args = (queries, key_cache, value_cache, slot_positions, block_tables, lengths, query_positions, window)
        got, ref = paged_attention(*args, use_kernels=True), paged_attention(*args)
        torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=0)
    assert bool((got[1, :group] == 0).all()), "an empty head must output zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scores_match_quest_and_mpcache(dtype):
    entry = ragged_cache(2, 3, 100, 20, dtype, seed=4)
    kmax, kmin, _ = chunk_min_max(entry.keys, entry.valid, 16)  # empty pages are zeros
    queries = torch.randn(2, 3, 2, 20, generator=torch.Generator().manual_seed(5)).to(dtype)
    tol = TOL[dtype] * 10  # sums of 20 products of magnitude ~1
    torch.testing.assert_close(
        page_bound(queries, kmax, kmin, use_kernels=True), page_bound(queries, kmax, kmin).float(), atol=tol, rtol=0
    )
    got = approx_similarity(queries[:, :, 0], kmax, kmin, 0.6, use_kernels=True)
    torch.testing.assert_close(got, approx_similarity(queries[:, :, 0], kmax, kmin, 0.6).float(), atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_norms(dtype):
    entry = ragged_cache(2, 2, 150, 20, dtype, seed=6)
    ref = torch.linalg.vector_norm(entry.keys.float(), dim=-1) * entry.valid
    got = kernels.token_key_norms(entry.keys, entry.valid, use_kernels=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(kernels.token_key_norms(entry.keys, entry.valid), ref)
    window_queries = torch.randn(2, 2, 6, 20, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = channel_scores(window_queries, entry.keys, entry.valid, use_kernels=True)
    ref = channel_scores(window_queries, entry.keys, entry.valid).float()
    torch.testing.assert_close(got, ref, atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_attention_sums_match_attention_received(dtype):
    """SnapKV's vote: the kernel against `PolicyCache.attention_received` on a real cache."""
    b, hkv, group, t, d = 2, 2, 2, 37, 16
    g = torch.Generator().manual_seed(8)
    cache = SnapKV(1, 8, window=4)
    keys = torch.randn(b, hkv, t, d, generator=g).to(dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :9] = False  # left padding: those queries see nothing and must add nothing
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    entry = cache.update(0, keys, keys.flip(-1), positions, mask)
    queries = torch.randn(b, hkv * group, t, d, generator=g).to(dtype)
    w = 20
    weights = torch.rand(b, w, generator=g)
    ref = cache.attention_received(0, queries, positions, last=w, weights=weights)
    got = kernels.window_attention_sums(
        queries[:, :, -w:], entry.keys, positions[:, -w:], entry.positions, entry.valid, weights * mask[:, -w:],
        use_kernels=True,
    )  # fmt: skip
    torch.testing.assert_close(got, ref, atol=TOL[dtype] * 10, rtol=0)
    windowed = kernels.window_attention_sums(
        queries, entry.keys, positions, entry.positions, entry.valid, mask.float(), sliding_window=5, use_kernels=True
    )
    ref = kernels.window_attention_sums(
        queries, entry.keys, positions, entry.positions, entry.valid, mask.float(), sliding_window=5
    )
    torch.testing.assert_close(windowed, ref, atol=TOL[dtype] * 10, rtol=0)
    # CAKE's statistics from the same pass: sums of p, p^2 and the entropy terms -p log(p + 1e-10)
    args = (queries[:, :, -w:], entry.keys, positions[:, -w:], entry.positions, entry.valid, mask[:, -w:].float())
    got, ref = kernels.window_attention_stats(*args, use_kernels=True), kernels.window_attention_stats(*args)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=TOL[dtype] * 10, rtol=0)
    assert float(got[2].sum()) > 1.0 and bool((got[1] <= got[0] + 1e-6).all())


def test_bad_inputs_raise_clear_errors():
    entry = ragged_cache(1, 2, 10, 8, torch.float32, seed=9)
    q = torch.randn(1, 4, 1, 8)
    pos = torch.tensor([[10]])
    with pytest.raises(ValueError, match="head dim"):
        kernels.decode_attention(torch.randn(1, 4, 1, 6), entry, pos)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        kernels.decode_attention(torch.randn(1, 3, 1, 8), entry, pos)
    with pytest.raises(ValueError, match="index and count go together"):
        kernels.decode_attention(q, entry, pos, index=torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        kernels.decode_attention(q, entry, pos, index=torch.zeros(1, 2, 3), count=torch.ones(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="query_positions"):
        kernels.decode_attention(q, entry, torch.tensor([10]))
    with pytest.raises(ValueError, match="kmax/kmin"):
        kernels.page_bound(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8))
    with pytest.raises(TypeError, match="bool"):
        kernels.token_key_norms(entry.keys, entry.valid.float())


@pytest.mark.timeout(300)
def test_kernels_build_for_a_gpu_without_spills(tmp_path):
    """The interpreter accepts programs a GPU compiler rejects: build every kernel for sm_90
    with the ptxas in the triton wheel (no GPU needed) and check no tile spills registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    report = tmp_path / "compile.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--compile", "90", "--json", str(report)],
        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True,
        timeout=280,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = json.loads(report.read_text())["rows"]
    built = {row["kernel"] for row in rows}
    assert built == {
        "_decode_split_kernel", "_merge_kernel", "_probs_kernel", "_compact_kernel", "_merge_scatter_kernel",
        "_merge_finish_kernel", "_lowbit_split_kernel", "_chunk_score_kernel", "_token_norm_kernel",
        "_channel_norm_kernel", "_row_lse_kernel", "_column_sum_kernel",
    }  # fmt: skip
    assert [row for row in rows if row["stack_bytes"] > 0] == []
