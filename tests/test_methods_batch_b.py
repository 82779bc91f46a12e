"""Properties of Locret, Attention-Gate, EMS and EpiCache (each method's test oracle).

The method matrix in test_methods.py covers sizes, batching and the full-cache limit; here each
method's own rule is recomputed from recorded hidden states, queries and keys with plain loops
(or a closed form) and compared with what the cache kept, so a wrong score, merge, flag or
routing fails. Trained parts are random here (tiny models); their loading is tested on files
written to a temporary folder, never on the committed artifacts.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_methods import PROMPT, assert_top_set, batch, kept_positions, manual_probs, positions_of, run, spy
from test_methods import tiny_model as make_tiny_model
from torch import Tensor, nn

from mpcache.methods.attention_gate import AttentionGate, Gates
from mpcache.methods.ems import EMS, evict_then_merge, mean_align
from mpcache.methods.epicache import (
    EpiCache,
    allocate_layer_budget,
    episodic_prefill,
    kmeans,
    layer_input,
    layer_similarity,
    plan_episodes,
)
from mpcache.methods.locret import Locret, RetainingHeads
from mpcache.methods.train_gates import gated_forward
from mpcache.methods.train_locret import importance_labels, loss_of, make_example
from mpcache.methods.trained import load_parts, read_meta, save_parts
from mpcache.model import KVCache, Transformer
from mpcache.model.transformer import apply_rope


def tiny_model(family: str) -> Transformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_tiny_model(family)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request) -> Transformer:
    return tiny_model(request.param)


class HiddenSpy:
    """Mixin recording every layer's attention input, per forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hiddens: list[list[Tensor]] = [[] for _ in self.layers]

    def observe_hidden(self, layer: int, hidden: Tensor) -> None:
        self.hiddens[layer].append(hidden.clone())
        super().observe_hidden(layer, hidden)


def hidden_spy(cls, model: Transformer, budget, **kwargs):
    return spy(type("Hidden" + cls.__name__, (HiddenSpy, cls), {}), model, budget, **kwargs)


def act(model: Transformer, x: Tensor) -> Tensor:
    return F.silu(x) if model.config.activation == "silu" else F.gelu(x, approximate="tanh")


# ------------------------------------------------------------------------- Locret
def test_locret_chunks_keep_stabilizers_and_top_predicted_importance(model: Transformer) -> None:
    ids, mask = batch()
    budget, stabilizers, chunk = 12, 4, 10
    cache = hidden_spy(Locret, model, budget, stabilizers=stabilizers, heads="random")
    heads = cache.heads
    positions = positions_of(mask)
    predicted: list[dict] = [{} for _ in range(model.config.n_layer)]  # (row, head, position) -> score
    with torch.no_grad():
        for f, start in enumerate(range(0, PROMPT, chunk)):
            part = slice(start, start + chunk)
            model(ids[:, part], cache=cache, positions=positions[:, part], attention_mask=mask[:, part])
            for layer, block in enumerate(model.blocks):
                h = cache.hiddens[layer][f]
                a = block.attn
                x = torch.cat([a.q_proj(h), a.k_proj(h), a.v_proj(h)], -1)  # pre-RoPE q, k, v
                score = act(model, x @ heads.fc1[layer].weight.T) @ heads.fc2[layer].weight.T  # [B, T, Hkv]
                for row in range(2):
                    for t in range(h.shape[1]):
                        if mask[row, start + t]:
                            for head in range(model.config.n_kv_head):
                                predicted[layer][row, head, int(positions[row, start + t])] = float(score[row, t, head])
                snap = cache.seen[layer][-1]  # what was stored before this chunk's eviction
                kept = kept_positions(cache, layer)
                for row in range(2):
                    for head in range(model.config.n_kv_head):
                        stored = snap["pos"][row, head][snap["valid"][row, head]].tolist()
                        scores = {p: predicted[layer][row, head, p] for p in stored}
                        newest = set(sorted(stored)[-stabilizers:])
                        assert kept[row][head] <= set(stored)
                        assert_top_set(kept[row][head], scores, newest, min(budget, len(stored)), tol=1e-4)
    assert cache.forwards[0] == 5 and int(cache.tokens_per_head(0).max()) == budget


def test_locret_heads_shape_labels_and_gradients() -> None:
    model = tiny_model("llama").requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (30,), generator=g).tolist()
    example = make_example(model, ids, n_label=6)
    assert example["hidden"].shape == (3, 30, 64) and example["labels"].shape == (3, 2, 24)
    heads = RetainingHeads(model.config)
    out = heads(0, torch.randn(30, (4 + 2 * 2) * 16))
    assert out.shape == (30, 2)  # one score per token and KV head
    loss, fit = loss_of(heads, model, example)
    loss.backward()
    assert fit.shape == (3,)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
    assert all(p.grad is None for p in model.parameters())  # the model stays frozen


def test_locret_labels_are_the_largest_future_logit() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    labels = importance_labels(q, k, n_label=3)
    assert labels.shape == (2, 9)
    for head in range(2):
        for t in range(9):
            best = max(float(q[h, p] @ k[head, t]) for h in (2 * head, 2 * head + 1) for p in range(9, 12))
            assert labels[head, t] == pytest.approx(best / math.sqrt(8), abs=1e-5)


def test_trained_parts_load_only_for_their_model(tmp_path) -> None:
    model, other = tiny_model("llama"), tiny_model("llama")
    with torch.no_grad():
        other.lm_head.weight[0, 0] += 1.0  # one weight differs: another checkpoint
    heads = RetainingHeads(model.config)
    path = tmp_path / "locret.safetensors"
    save_parts(heads, model, path, {"note": "test"})
    assert read_meta(path)[1] == {"note": "test"}
    cache = Locret.from_model(model, 8, heads=str(path))
    assert cache.trained and torch.equal(cache.heads.fc1[1].weight, heads.fc1[1].weight)
    with pytest.raises(ValueError, match="another model"):
        Locret.from_model(other, 8, heads=str(path))
    with pytest.raises(ValueError, match="no locret artifact"):
        Locret.from_model(model, 8, heads=str(tmp_path / "missing.safetensors"))
    with pytest.warns(UserWarning, match="random parts"):
        parts, trained = load_parts(tiny_model("gpt2"), "locret", RetainingHeads.of_model, "auto")
    assert not trained
    with pytest.raises(TypeError, match="heads"):
        Locret(3, 8, heads=1)


# ------------------------------------------------------------------ Attention-Gate
def mixed_gates(model: Transformer) -> Gates:
    """Gates whose decisions split the tokens (zero bias, sharper logits)."""
    torch.manual_seed(5)
    gates = Gates(model.config).eval().requires_grad_(False)
    for out in gates.out:
        nn.init.zeros_(out.bias)
        out.weight.mul_(20.0)
    return gates


class RecordingGate(AttentionGate):
    """Keeps the gate value every token got when it arrived: (layer, row, head, position) -> g."""

    def update(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor, valid: Tensor):
        entry = super().update(layer, keys, values, positions, valid)
        t, gate = keys.shape[2], self.slot_state(layer, "gate")
        self.arrived = getattr(self, "arrived", {})
        for b in range(keys.shape[0]):
            for h in range(keys.shape[1]):
                for i in range(t):
                    if valid[b, i]:
                        self.arrived[layer, b, h, int(positions[b, i])] = float(gate[b, h, entry.lengths[b, h] - t + i])
        return entry


def gate_cache(model: Transformer, budget=None, sink: int = 0, window: int = 0) -> RecordingGate:
    cls = type("HiddenRecordingGate", (HiddenSpy, RecordingGate), {})
    cache = cls.from_model(model, budget, gates="random", sink=sink, window=window)
    cache.gates = mixed_gates(model)
    return cache


def test_attention_gate_flags_are_fixed_and_decide_what_stays(model: Transformer) -> None:
    ids, mask = batch()
    sink, window = 2, 3
    cache = gate_cache(model, sink=sink, window=window)
    full = KVCache(model.config.n_layer)
    kept_total = []
    run(model, full, ids, mask, steps=6)

    def check(step: int) -> None:
        for layer in range(model.config.n_layer):
            entry = cache.layers[layer]
            gate = cache.slot_state(layer, "gate")
            for b in range(2):
                for h in range(model.config.n_kv_head):
                    stored = {}
                    for slot in range(entry.capacity):
                        if entry.valid[b, h, slot]:
                            stored[int(entry.positions[b, h, slot])] = float(gate[b, h, slot])
                    seen = {p: g for (lay, r, hh, p), g in cache.arrived.items() if (lay, r, hh) == (layer, b, h)}
                    assert all(stored[p] == seen[p] for p in stored)  # a flag never changes
                    protected = {p for p in seen if p < sink or p > max(seen) - window}
                    flagged = {p for p, g in seen.items() if g >= 0.5}
                    assert set(stored) == flagged | protected  # kept exactly when flagged or protected
                    if step == 6:
                        kept_total.append(len(flagged | protected))

    run(model, cache, ids, mask, steps=6, on_step=check)
    gates = torch.tensor(list(cache.arrived.values()))
    assert 0.2 < float((gates >= 0.5).float().mean()) < 0.8  # the test gates really split the tokens
    kept = sum(int(cache.tokens_per_head(layer).sum()) for layer in range(model.config.n_layer))
    assert kept == sum(kept_total) < len(gates)  # eviction ratio = mean(1 - flag) outside the protection
    assert KVCache.memory_bytes(cache) < full.memory_bytes()
    # the gates' decisions through their own store equal their training-time forward on the unpadded row
    for layer in range(model.config.n_layer):
        hidden = torch.cat([h[:1] for h in cache.hiddens[layer]], 1)  # prompt + decode tokens of row 0
        expect = torch.sigmoid(cache.gates(layer, hidden))[0]
        for position in range(hidden.shape[1]):
            for h in range(model.config.n_kv_head):
                assert cache.arrived[layer, 0, h, position] == pytest.approx(float(expect[position, h]), abs=1e-5)


def test_attention_gate_inference_matches_training_forward(model: Transformer) -> None:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 96, (1, 40), generator=g)
    answer = 28
    gates = mixed_gates(model)
    sink, window = 2, 3
    with torch.no_grad():
        trained_logits, flags = gated_forward(model, gates, ids, answer, sink, window)
        full_logits, _ = gated_forward(model, None, ids, answer)
        cache = gate_cache(model, sink=sink, window=window)
        out = [model(ids[:, :answer], cache=cache)[0, -1]]
        for i in range(answer, 40):
            out.append(model(ids[:, i : i + 1], cache=cache, positions=torch.tensor([[i]]))[0, -1])
    served = torch.stack(out)  # predictions for positions answer..40
    assert torch.allclose(served, trained_logits[0, answer - 1 :], atol=1e-4)
    assert not torch.allclose(served[1:], full_logits[0, answer:], atol=1e-3)  # eviction did change them
    assert set(flags.unique().tolist()) <= {0.0, 1.0}
    protected = (torch.arange(40) < sink) | (torch.arange(40) > 39 - window)
    stored = sum(int(cache.tokens_per_head(layer).sum()) for layer in range(model.config.n_layer))
    assert stored == int((flags.bool() | protected).sum())


def test_attention_gate_straight_through_gradients_reach_the_gates() -> None:
    model = tiny_model("llama").requires_grad_(False)
    gates = Gates(model.config)
    for out in gates.out:
        nn.init.zeros_(out.bias)
    ids = torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    logits, flags = gated_forward(model, gates, ids, 16)
    assert set(flags.detach().unique().tolist()) <= {0.0, 1.0}  # hard flags in the forward pass
    ((flags.mean() - 0.2) ** 2).backward(retain_graph=True)  # the eviction loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
    gates.zero_grad()
    F.cross_entropy(logits[0, 15:-1], ids[0, 16:]).backward()  # the task loss reaches them through the mask
    assert sum(float(p.grad.abs().sum()) for p in gates.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.parameters())


def test_attention_gate_with_budget_keeps_the_highest_gates(model: Transformer) -> None:
    ids, mask = batch()
    budget = 12
    cache = gate_cache(model, budget)
    before: dict = {}

    def check(step: int) -> None:
        for layer in range(model.config.n_layer):
            kept = kept_positions(cache, layer)
            for b in range(2):
                for h in range(model.config.n_kv_head):
                    seen = {p: g for (lay, r, hh, p), g in cache.arrived.items() if (lay, r, hh) == (layer, b, h)}
                    newest = int(mask[b].sum()) + step - 1
                    candidates = set(seen) if step == 0 else before[layer, b, h] | {newest}
                    scores = {p: seen[p] for p in candidates}
                    assert_top_set(kept[b][h], scores, set(), min(budget, len(candidates)))
                    before[layer, b, h] = kept[b][h]

    run(model, cache, ids, mask, steps=4, on_step=check)


# --------------------------------------------------------------------------- EMS
def test_ems_mean_alignment() -> None:
    g = torch.Generator().manual_seed(0)
    glob, local = torch.rand(2, 3, 10, generator=g), torch.rand(2, 3, 10, generator=g) * 7
    valid = torch.rand(2, 3, 10, generator=g) > 0.3
    aligned = mean_align(glob, local, valid)
    for b in range(2):
        for h in range(3):
            v = valid[b, h]
            assert float(aligned[b, h][v].mean()) == pytest.approx(float(glob[b, h][v].mean()), rel=1e-5)
            assert torch.allclose(aligned[b, h] / local[b, h], (aligned[b, h] / local[b, h])[0].expand(10))


@pytest.mark.parametrize("threshold", [-1.0, 0.2, 1.0])
def test_ems_evict_then_merge(threshold: float) -> None:
    g = torch.Generator().manual_seed(4)
    b_, h_, length, d = 2, 3, 20, 8
    keys, values = torch.randn(b_, h_, length, d, generator=g), torch.randn(b_, h_, length, d, generator=g)
    keys[:, :, 10:14] = keys[:, :, 0:4] + 0.05 * torch.randn(b_, h_, 4, d, generator=g)  # near-duplicates
    values[:, :, 10:14] = values[:, :, 0:4] + 0.05 * torch.randn(b_, h_, 4, d, generator=g)
    valid = torch.ones(b_, h_, length, dtype=torch.bool)
    valid[1, :, -3:] = False
    weight = torch.rand(b_, h_, length, generator=g)
    weight[:, :, 10:14] = 0.9 + 0.1 * weight[:, :, 10:14]  # rank high among the rest
    centre = torch.zeros_like(valid)
    centre[:, :, [0, 1, 2, 3, 5, 7]] = True
    new_k, new_v, target, tbm = evict_then_merge(keys, values, valid, weight, centre, threshold)
    for b in range(b_):
        for h in range(h_):
            rest = [i for i in range(length) if valid[b, h, i] and not centre[b, h, i]]
            share = float(weight[b, h, centre[b, h]].sum() / weight[b, h, valid[b, h]].sum())
            n_tbm = round(len(rest) * (1 - share))
            chosen = set(tbm[b, h].nonzero().flatten().tolist())
            irrelevant = set(rest) - chosen
            assert len(chosen) == n_tbm and chosen <= set(rest)
            assert 6 + len(chosen) + len(irrelevant) == int(valid[b, h].sum())  # N_imp + N_tbm + N_irr = n
            assert_top_set(chosen, {i: float(weight[b, h, i]) for i in rest}, set(), n_tbm)
            centres = centre[b, h].nonzero().flatten().tolist()
            members: dict[int, list[int]] = {c: [] for c in centres}
            for t in range(length):
                if t not in chosen:
                    assert target[b, h, t] == -1
                    continue
                sims = {
                    c: float(F.cosine_similarity(keys[b, h, t], keys[b, h, c], 0))
                    * float(F.cosine_similarity(values[b, h, t], values[b, h, c], 0))
                    for c in centres
                }
                best = max(sims, key=sims.get)
                if sims[best] >= threshold:
                    assert target[b, h, t] == best
                    members[best].append(t)
                else:
                    assert target[b, h, t] == -1  # the zero class
            for c, group in members.items():
                if not group:  # untouched centres stay bit-identical
                    assert torch.equal(new_k[b, h, c], keys[b, h, c]) and torch.equal(new_v[b, h, c], values[b, h, c])
                    continue
                w = weight[b, h, [c, *group]]
                expect = (w[:, None] * keys[b, h, [c, *group]]).sum(0) / w.sum()
                assert torch.allclose(new_k[b, h, c], expect, atol=1e-5)
                expect = (w[:, None] * values[b, h, [c, *group]]).sum(0) / w.sum()
                assert torch.allclose(new_v[b, h, c], expect, atol=1e-5)
    joined = int((target >= 0).sum())
    assert joined == (int(tbm.sum()) if threshold == -1.0 else joined)
    if threshold == 1.0:
        assert joined == 0
    if threshold == 0.2:
        assert 0 < joined < int(tbm.sum())


@pytest.mark.parametrize("combine", ["sum", "max"])
def test_ems_keeps_top_global_local_score_and_merges_into_it(model: Transformer, combine: str) -> None:
    ids, mask = batch()
    budget, window = 12, 8
    plain = spy(EMS, model, budget, window=window, combine=combine, merge=False)
    run(model, plain, ids, mask, steps=0)
    merged = EMS.from_model(model, budget, window=window, combine=combine, min_similarity=-1.0)
    run(model, merged, ids, mask, steps=0)
    any_merge = False
    for layer, seen in enumerate(plain.seen):
        snap = seen[0]
        probs = manual_probs(snap["q"], snap["keys"], positions_of(mask), snap["pos"], snap["valid"])
        probs = probs * mask[:, None, None, :, None]  # padding queries give nothing
        glob, local = probs.sum((2, 3)), probs[:, :, :, -window:].sum((2, 3))
        local = mean_align(glob, local, snap["valid"])
        score = glob + local if combine == "sum" else torch.maximum(glob, local)
        kept, kept_merged = kept_positions(plain, layer), kept_positions(merged, layer)
        for row in range(2):
            for head in range(model.config.n_kv_head):
                valid = snap["valid"][row, head]
                pos = snap["pos"][row, head][valid].tolist()
                scores = dict(zip(pos, score[row, head][valid].tolist(), strict=True))
                assert_top_set(kept[row][head], scores, set(pos[-window:]), budget, tol=1e-4)
                assert kept_merged[row][head] == kept[row][head]  # the centres are the top-k set
                entry, old = merged.layers[layer], snap["keys"][row, head][valid]
                for slot in range(budget):
                    p = int(entry.positions[row, head, slot])
                    any_merge |= not torch.equal(entry.keys[row, head, slot], old[pos.index(p)])
    assert any_merge  # with every to-be-merged token accepted, some centre changed


# ----------------------------------------------------------------------- EpiCache
def test_kmeans_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 6, generator=g) * 10
    truth = torch.randint(0, 3, (40,), generator=g)
    x = centres[truth] + 0.1 * torch.randn(40, 6, generator=g)
    found, labels = kmeans(x, 3, seed=42)
    pairs = set(zip(truth.tolist(), labels.tolist(), strict=True))
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a one-to-one relabelling
    assert torch.allclose(found[labels], centres[truth], atol=0.2)
    again, labels_again = kmeans(x, 3, seed=42)
    assert torch.equal(labels, labels_again) and torch.equal(found, again)
    with pytest.raises(ValueError, match="k-means"):
        kmeans(x[:2], 3, seed=0)


def test_epicache_plan_routes_the_question_and_patches_its_medoids() -> None:
    g = torch.Generator().manual_seed(1)
    topics = torch.randn(3, 16, generator=g)
    order = [0, 1, 2, 0, 1, 2, 2, 0, 1, 2]  # ten 5-token segments, then a 4-token question on topic 2
    hidden = torch.cat([topics[t] + 0.3 * torch.randn(5, 16, generator=g) for t in order])
    hidden = torch.cat([hidden, topics[2] + 0.3 * torch.randn(4, 16, generator=g)])
    plan = plan_episodes(hidden, segment_size=5, n_episodes=3, n_medoid=2, question_tokens=4, seed=42)
    segments = F.normalize(hidden[:50].view(10, 5, 16).mean(1), dim=-1)
    question = F.normalize(hidden[50:].mean(0), dim=-1)
    assert plan.episode == int((plan.centroids @ question).argmax())
    members = [i for i in range(10) if plan.labels[i] == plan.episode]
    assert members == [i for i, t in enumerate(order) if t == 2]  # the question's topic
    closeness = {i: float(segments[i] @ plan.centroids[plan.episode]) for i in members}
    medoids = sorted(sorted(members, key=closeness.get, reverse=True)[:2])
    assert plan.patched.tolist() == [t for i in medoids for t in range(5 * i, 5 * i + 5)]


def test_epicache_layer_budgets() -> None:
    budget = torch.tensor([40, 9])
    assert allocate_layer_budget(torch.tensor([0.9, 0.5, 0.7, 0.99]), budget, 0.0).tolist() == [[40] * 4, [9] * 4]
    sim = torch.tensor([0.9, 0.5, 0.7, 0.99, 0.8])
    split = allocate_layer_budget(sim, budget, 1.1)
    order = sim.argsort()
    for row, m in enumerate(budget.tolist()):
        assert split[row, order].tolist() == sorted(split[row].tolist(), reverse=True)  # less similar, more budget
        assert int(split[row].min()) >= max(1, m // 4)
        assert 5 * m - 5 <= int(split[row].sum()) <= 5 * m + m // 4  # floor and clamp errors only


def test_epicache_scores_by_patched_prompt_attention(model: Transformer) -> None:
    ids, mask = batch()
    budget, question = 12, 8
    knobs = {"segment_size": 8, "n_medoid": 2, "question_tokens": question, "split": "uniform"}
    cache = hidden_spy(EpiCache, model, budget, **knobs)
    run(model, cache, ids, mask, steps=0)
    first = layer_input(model, ids, positions_of(mask))
    for row, plan in enumerate(cache.plans):  # routing: the question's embedding, nearest centroid by dot product
        tokens = first[row][mask[row].bool()]
        q_emb = F.normalize(tokens[-question:].mean(0), dim=-1)
        assert plan.episode == int((plan.centroids @ q_emb).argmax())
    for layer, seen in enumerate(cache.seen):
        snap, attn = seen[0], model.blocks[layer].attn
        kept = kept_positions(cache, layer)
        for row, plan in enumerate(cache.plans):
            h = cache.hiddens[layer][0][row][mask[row].bool()][plan.patched]  # the medoid tokens' layer inputs
            n = int(mask[row].sum())
            q = attn.q_proj(h).view(1, -1, attn.n_head, attn.head_dim).transpose(1, 2)
            qpos = torch.arange(n, n + len(plan.patched))[None]  # placed after the context
            if model.config.family == "llama":
                q = apply_rope(q, qpos, attn.inv_freq)
            probs = manual_probs(
                q, snap["keys"][row : row + 1], qpos, snap["pos"][row : row + 1], snap["valid"][row : row + 1]
            )
            score = probs.amax((2, 3))[0]  # [Hkv, L]: max over the group's heads and the patched queries
            for head in range(model.config.n_kv_head):
                valid = snap["valid"][row, head]
                pos = snap["pos"][row, head][valid].tolist()
                scores = dict(zip(pos, score[head][valid].tolist(), strict=True))
                assert_top_set(kept[row][head], scores, set(pos[-question:]), budget, tol=1e-5)
                top = max((p for p in pos[:-question]), key=scores.get)
                assert top in kept[row][head]  # the best-scored token is never evicted


@pytest.mark.parametrize("split", ["global", "uniform"])
def test_epicache_block_prefill_bounds_memory(model: Transformer, split: str) -> None:
    ids, mask = batch()
    budget, block = 12, 10
    cache = EpiCache.from_model(model, budget, segment_size=8, n_medoid=2, question_tokens=4, split=split)
    hkv = model.config.n_kv_head
    peaks, after = [], []
    update, compress = cache.update, cache.compress

    def spy_update(layer, keys, values, positions, valid):
        entry = update(layer, keys, values, positions, valid)
        peaks.append(entry.valid.sum(-1))
        return entry

    def spy_compress(layer, queries, query_positions):
        compress(layer, queries, query_positions)
        after.append(cache.layers[layer].valid.sum(-1))

    cache.update, cache.compress = spy_update, spy_compress
    episodic_prefill(model, ids, cache, block, mask)
    assert len(after) == model.config.n_layer * 5  # every layer, after every block
    for held in after:
        assert bool((held.sum(-1) <= budget * hkv).all())
        if split == "uniform":
            assert bool((held <= budget).all())
    assert all(bool((p.sum(-1) <= (budget + block) * hkv).all()) for p in peaks)
    for plan in cache.plans:  # whole segments of the routed episode, at most two
        assert len(plan.patched) in (8, 16) and bool((plan.labels[plan.patched // 8] == plan.episode).all())


def test_epicache_layer_similarity_profile() -> None:
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (1, 60), generator=torch.Generator().manual_seed(0))
    whole = layer_similarity(model, ids, block=64, sink=4, window=10)
    assert whole == pytest.approx([1.0] * 3, abs=1e-5)  # one block: the block pass is the full pass
    blocked = layer_similarity(model, ids, block=12, sink=2, window=10)
    assert blocked[0] == pytest.approx(1.0, abs=1e-5)  # first-layer keys never see attention
    assert all(s < 0.9999 for s in blocked[1:])


def test_batch_b_knobs_are_validated() -> None:
    from mpcache.methods import make_policy

    for name, knobs in [
        ("locret", {"stabilizers": -1}),
        ("ems", {"window": 0}),
        ("ems", {"combine": "mean"}),
        ("ems", {"min_similarity": 2.0}),
        ("attention_gate", {"threshold": 1.0}),
        ("epicache", {"segment_size": 0}),
        ("epicache", {"n_episodes": 0}),
        ("epicache", {"alpha": -1.0}),
        ("epicache", {"layer_similarity": [0.9, 1.5]}),
    ]:
        with pytest.raises(ValueError):
            make_policy(name, 8, **knobs)
    for name, knobs in [("locret", {"window": 4}), ("epicache", {"window": 4}), ("attention_gate", {"gates": 3})]:
        with pytest.raises(TypeError):
            make_policy(name, 8, **knobs)
    with pytest.raises(ValueError, match="budget"):
        make_policy("locret")  # only attention_gate may run without a budget
    make_policy("attention_gate")
    with pytest.raises(ValueError, match="layer_similarity"):
        make_policy("epicache", 8, layer_similarity=[0.9, 0.8])(tiny_model("llama"))  # 3 layers
    make_policy("epicache", 8, layer_similarity=[0.9, 0.8, 0.7])(tiny_model("llama"))
