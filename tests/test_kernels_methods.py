"""Every KV-cache method decodes through the Triton kernels (forced on, CPU interpreter) as through the torch path.

A tiny Llama-family model (2 layers, GQA 4/2, batch 2 with left padding) prefills a prompt and decodes a few tokens
with each method twice: torch references (`kernels.forced(False)`) and kernels (`kernels.forced()`). The logits of
every decode step must agree, the caches must hold the same token positions (the kernels' probabilities, merges
and compactions lead to the same evictions), and the kernels must really have run: launches are counted.
Knobs are scaled down so each method's decode-time work happens within a 24-token prompt and 3 steps (the
interpreter runs a program in ~0.1 s: the whole matrix must stay within the suite's time budget).
"""

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from mpcache import kernels  # noqa: E402
from mpcache.kernels import compact, compressed, decode, merge, scores, window  # noqa: E402
from mpcache.methods import METHODS, make_policy  # noqa: E402
from mpcache.model import ModelConfig, Transformer  # noqa: E402

KNOBS = {
    "full": {},
    "streamingllm": {"sink": 2},
    "h2o": {},
    "snapkv": {"window": 4},
    "tova": {},
    "quest": {"page_size": 4, "dense_layers": 0},
    "think": {"window": 4, "recent": 4, "channel_queries": 4},
    "mikv": {},
    "mpcache": {"cluster_size": 4, "subcluster_size": 2, "own_first": 0, "own_last": 0, "sink": 2, "window": 2},
    "cake": {"window": 4},
    "kvmerger": {"decode_interval": 2},
    "elastic_cache": {"distance": 2},
    "d2o": {"first_dense": 0, "last_dense": 1},
    "compresskv": {"window": 4},
    "lazyeviction": {"window": 2},
    "locret": {"heads": "random", "stabilizers": 2},
    "ems": {"window": 4, "decode_interval": 2},
    "attention_gate": {"gates": "random"},
    "epicache": {"segment_size": 4, "question_tokens": 4, "n_medoid": 2},
}
PROMPT, BUDGET, STEPS = 24, 8, 3
# Kernels a method's run must launch besides decode attention (a fallback to torch would skip them).
EXPECTED = {
    "h2o": ["_probs_kernel", "_compact_kernel"], "tova": ["_probs_kernel", "_compact_kernel"],
    "cake": ["_probs_kernel", "_compact_kernel", "_column_sum_kernel"],
    "d2o": ["_probs_kernel", "_merge_scatter_kernel"],
    "kvmerger": ["_probs_kernel", "_merge_scatter_kernel"], "ems": ["_probs_kernel", "_merge_scatter_kernel"],
    "lazyeviction": ["_probs_kernel", "_compact_kernel"], "elastic_cache": ["_merge_scatter_kernel", "_compact_kernel"],
    "mikv": ["_lowbit_split_kernel", "_compact_kernel"], "quest": ["_chunk_score_kernel"],
    "streamingllm": ["_compact_kernel"], "snapkv": ["_column_sum_kernel", "_compact_kernel"],
    "think": ["_channel_norm_kernel", "_compact_kernel"], "mpcache": ["_column_sum_kernel", "_compact_kernel"],
}  # fmt: skip
MODULES = (decode, compact, compressed, merge, scores, window)


class Launches:
    """Counts the launches of a Triton kernel (`kernel[grid](...)`), passing them through."""

    def __init__(self, kernel) -> None:
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.kernel[grid]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_position=256)
    return Transformer(config).eval()


def run(model: Transformer, method: str) -> tuple[torch.Tensor, list[torch.Tensor], object]:
    """Decode logits [B, STEPS, V], every layer's kept positions (invalid slots as -1), and the cache."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 64, (2, PROMPT), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :5] = 0  # left padding
    budget = None if method == "full" else BUDGET
    cache = make_policy(method, budget, **KNOBS[method])(model)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    steps = []
    with torch.no_grad():
        out = model(prompt, cache=cache, positions=positions, attention_mask=mask, last_only=True)
        nxt = mask.sum(-1, keepdim=True)
        for _ in range(STEPS):
            out = model(out[:, -1].argmax(-1, keepdim=True), cache=cache, positions=nxt)
            steps.append(out)
            nxt = nxt + 1
    kept = [entry.positions.masked_fill(~entry.valid, -1).sort(-1).values for entry in cache.layers]
    return torch.cat(steps, 1), kept, cache


def test_the_matrix_covers_every_method():
    assert set(KNOBS) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_decodes_the_same_with_kernels(model, method, monkeypatch):
    with kernels.forced(False):
        ref_logits, ref_kept, _ = run(model, method)
    launches = {}
    for module in MODULES:
        for name in ["_decode_split_kernel", *EXPECTED.get(method, [])]:
            if hasattr(module, name):
                launches[name] = Launches(getattr(module, name))
                monkeypatch.setattr(module, name, launches[name])
    with kernels.forced():
        logits, kept, cache = run(model, method)
    assert launches["_decode_split_kernel"].count >= STEPS * model.config.n_layer, "decode steps ran torch"
    assert [name for name, count in launches.items() if count.count == 0] == [], "kernels that never ran"
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)
    for layer, (a, b) in enumerate(zip(kept, ref_kept, strict=True)):
        assert torch.equal(a, b), f"layer {layer} keeps other tokens with kernels"
    if method == "mikv":  # evicted tokens stay readable, at low precision
        assert all(store is not None for store in cache.low), "mikv moved nothing to its low-precision store"
    elif method != "full":
        read = min(int(cache.attended_tokens(layer).max()) for layer in range(model.config.n_layer))
        assert read < PROMPT + STEPS, f"{method} did not shrink what attention reads"
