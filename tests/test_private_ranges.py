"""The private decoder's public ranges against real activations (mpcache/mpc/nn/ranges.py).

SmolLM2-135M-Instruct on real prompts (chat questions, a passkey and a standard-library-documentation prompt,
greedy decoding after each) must stay inside every range of the default PrivateOptions; the range it broke
before (norm_range (2^-6, 2^14): its massive activation puts mean(x^2) near 1.1e6 from layer 12 on, and layer
0's input near 0.007) must be reported broken, so the check can fail. On a tiny model each recorded quantity is
compared with values computed independently, and pushing one past its limit is reported by name.
"""

from __future__ import annotations

import math

import pytest
import torch

from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer
from mpcache.mpc.nn import ranges as R
from mpcache.mpc.nn.layers import PrivateOptions


def tiny() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        family="llama", vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_position=64,
        activation="silu",
    )  # fmt: skip
    return Transformer(config).double().eval()


def test_recorded_values_match_an_independent_pass():
    model = tiny()
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(1))
    r = R.record(model, [ids], steps=0)
    with torch.no_grad():
        x = model.tok_emb(ids)
        want_lo = float((x.pow(2).mean(-1) + model.config.norm_eps).min())
        logits = model(ids)
    assert math.isclose(r.norm_lo[0], want_lo, rel_tol=1e-9) or r.norm_lo[0] < want_lo  # the MLP norm folds in
    assert math.isclose(r.logit_spread, float((logits.amax(-1) - logits.amin(-1)).max()), rel_tol=1e-9)
    assert r.tokens == 12 and r.prompts == 1
    assert R.check(r) == []


def test_each_broken_range_is_reported_by_name():
    model = tiny()
    ids = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.tok_emb.weight.mul_(3e4)  # residual near 3e4 x N(0, 1): norm domain and residual both break
        model.blocks[1].attn.q_proj.weight.mul_(400.0)  # scores spread far beyond 150 in layer 1
    problems = R.check(R.record(model, [ids], steps=2))
    assert any(p.startswith("layer 0: norm_hi") for p in problems), problems
    assert any(p.startswith("layer 0: residual") for p in problems), problems
    assert any(p.startswith("layer 1: spread") for p in problems), problems
    narrow = PrivateOptions(norm_range=(1.0, 2.0))
    assert any("norm_hi min" in p for p in R.check(R.record(tiny(), [ids], steps=0), narrow))


@pytest.mark.timeout(600)
def test_smollm2_stays_inside_the_private_ranges_on_real_prompts():
    from mpcache.model.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2")
    prompts = R.real_prompts(tok, [256])
    prompts = [prompts[0], prompts[len(R.QUESTIONS)], prompts[-1]]  # a chat question, passkey, stdlib docs
    r = R.record(model, prompts, steps=2)
    assert R.check(r) == []  # every range of the default options holds
    assert min(r.norm_lo) < 0.01 and max(r.norm_hi) > 1e6  # its massive activation is really there
    old = R.check(r, PrivateOptions(norm_range=(2.0**-6, 2.0**14)))
    assert any(p.startswith("layer 12: norm_hi max") for p in old) and any(p.startswith("layer 0:") for p in old)
