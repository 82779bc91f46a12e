"""bench.prefill_replay: a recorded prefill replayed under a method decodes exactly as a real prefill would."""

from __future__ import annotations

import pytest
import torch

from bench.prefill_replay import PrefillStore, replay_prefill, record_prefill
from mpcache.generate import generate
from tests.test_methods import SMALL, VOCAB, tiny_model
from mpcache.methods import make_policy

CASES = [
    ("full", None, {}),
    ("mpcache", 24, {}),
    ("mpcache", 24, {"share_layers": False, "topk": "rank", "similarity": "linear"}),
    ("snapkv", 24, {}),
    ("h2o", 24, {}),
    ("quest", 24, {}),
    ("streamingllm", 24, {}),
]


@pytest.mark.parametrize("method,budget,options", CASES)
def test_replayed_generation_equals_generation(tmp_path, method, budget, options) -> None:
    model = tiny_model("llama", n_layer=4)
    ids = torch.randint(0, VOCAB, (1, 96), generator=torch.Generator().manual_seed(3))
    factory = None if method == "full" else make_policy(method, budget, **{**SMALL.get(method, {}), **options})
    expected = generate(model, ids, 12, policy=factory)
    store = PrefillStore(tmp_path)
    for _ in range(2):  # recorded, then loaded from disk
        replayed = torch.stack(list(store.generate_fn()(model, ids, 12, policy=factory)), 1)
        assert torch.equal(replayed, expected)
    assert store.recorded == 1


def test_replay_refuses_methods_that_act_before_attention() -> None:
    model = tiny_model("llama", n_layer=2)
    prefill = record_prefill(model, torch.randint(0, VOCAB, (1, 40)))
    cache = make_policy("snapkv", 16, window=8, timing="before")(model)
    with pytest.raises(ValueError, match="before attention"):
        replay_prefill(prefill, cache)
    with pytest.raises(ValueError, match="unpadded prompt"):
        record_prefill(model, torch.zeros(2, 8, dtype=torch.long))
