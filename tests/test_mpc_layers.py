"""Private layers (mpcache/mpc/nn/layers.py) against the plaintext model, in simulation and in 2PC.

Simulation (the layers on float tensors) must match the plaintext modules up to the approximations' bounds;
MPC must match the plaintext modules and the simulator up to fixed-point error, for both model families.
"""

from __future__ import annotations

import pytest
import torch

from mpcache.kernels import cached_attention as plain_attention
from mpcache.model.cache import KVCache
from mpcache.model.config import ModelConfig
from mpcache.model.transformer import Transformer, rope_inverse_frequencies
from mpcache.model.transformer import apply_rope as plain_rope
from mpcache.mpc.arith import numerics as N
from mpcache.mpc.nn import layers as L
from mpcache.mpc.transport.local import LocalParties

SIM = lambda t: t  # noqa: E731  (identity share: the simulator)


def tiny(family: str, **overrides) -> Transformer:
    torch.manual_seed(0)
    kw = dict(family=family, vocab_size=40, n_layer=1, n_head=4, n_kv_head=2 if family == "llama" else 4,
              d_model=32, d_ff=64, max_position=64, activation="silu" if family == "llama" else "gelu_new")  # fmt: skip
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).double().eval()


@pytest.fixture(scope="module")
def parties():
    with LocalParties(setup=N.install, timeout=600) as p:
        yield p


# -------------------------------------------------------------------------------------------------- simulation


def test_rope_on_values_matches_plaintext():
    cfg = tiny("llama").config
    x = torch.randn(2, 4, 5, cfg.head_dim, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 9, 20, 21, 22]])
    inv_freq = rope_inverse_frequencies(cfg)
    # cos/sin are public constants on the 2^-16 grid, as in MPC
    assert (L.apply_rope(x, pos, inv_freq) - plain_rope(x, pos, inv_freq)).abs().max() < 4 * 2**-16


def test_simulated_attention_matches_plaintext_with_gaps_and_window():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k, v = k[:, :2].repeat(1, 1, 3, 1), v[:, :2].repeat(1, 1, 3, 1)  # 2 KV heads, 9 slots
    qpos = torch.tensor([[6, 7, 8]])
    kpos = torch.arange(9).expand(1, 2, 9).clone()
    valid = torch.rand(1, 2, 9, generator=g) > 0.3
    for window in (None, 3):
        ref = plain_attention(q, k, v, qpos, kpos, valid, window)
        out = L.cached_attention(q / 8**0.5, k, v, qpos, kpos, valid, window)  # queries arrive pre-scaled
        assert (out - ref).abs().max() < 1e-4, window


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_simulated_layers_match_plaintext_layers(family):
    m = tiny(family)
    cfg = m.config
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64) * 2
    with torch.no_grad():
        for plain in (m.blocks[0].attn_norm, m.norm):
            assert (L.make_norm(plain, SIM, L.PrivateOptions())(x) - plain(x)).abs().max() < 1e-4
        mlp = m.blocks[0].mlp
        assert (L.MLP.from_plain(mlp, SIM)(x) - mlp(x)).abs().max() < 1e-3
        assert (L.Linear.from_plain([m.lm_head], SIM)(x) - m.lm_head(x)).abs().max() < 1e-12


@pytest.mark.parametrize(
    "family,overrides",
    [("llama", {}), ("llama", dict(n_layer=2, sliding_window=4, qkv_bias=True)), ("gpt2", dict(n_layer=2))],
)
def test_simulated_model_matches_plaintext_prefill_decode_and_eviction(family, overrides):
    m = tiny(family, **overrides)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0  # left padding in the second row
    pm = L.PrivateTransformer.from_plain(m, SIM)
    cache, pcache = KVCache(m.config.n_layer), L.PrivateKVCache(m.config.n_layer)
    with torch.no_grad():
        ref = m(ids, cache, attention_mask=mask)
        out = pm(L.one_hot(ids, 40), pcache, attention_mask=mask)
        assert (out - ref).abs().max() < 1e-3
        # evict the same public slots in both caches, then decode greedily
        keep = torch.tensor([0, 2, 3, 5, 6]).expand(2, m.config.n_kv_head, 5)
        for layer in range(m.config.n_layer):
            cache.keep(layer, keep)
            pcache.keep(layer, keep)
        for _ in range(2):
            token = L.greedy_token(out)
            assert torch.equal(token.argmax(-1), ref[:, -1:].argmax(-1))
            ref = m(ref[:, -1:].argmax(-1), cache)
            out = pm(token, pcache)
            assert (out - ref).abs().max() < 1e-3


def test_cache_hooks_are_called_as_in_the_plaintext_model():
    calls = {"plain": [], "private": []}

    def recorder(base, name):
        class Recording(base):
            def observe_hidden(self, layer, hidden):
                calls[name].append(("observe_hidden", layer))

            def observe(self, layer, queries, query_positions):
                calls[name].append(("observe", layer, tuple(queries.shape)))

            def attention_view(self, layer):
                calls[name].append(("attention_view", layer))
                return super().attention_view(layer)

            def after_attention(self, layer, queries, query_positions):
                calls[name].append(("after_attention", layer))

        return Recording

    m = tiny("llama", n_layer=2)
    ids = torch.randint(0, 40, (1, 4), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        m(ids, recorder(KVCache, "plain")(2))
        L.PrivateTransformer.from_plain(m, SIM)(L.one_hot(ids, 40), recorder(L.PrivateKVCache, "private")(2))
    assert calls["plain"] == calls["private"] and len(calls["plain"]) == 8


def test_keep_with_counts_matches_plaintext():
    m = tiny("llama")
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(6))
    pm = L.PrivateTransformer.from_plain(m, SIM)
    cache, pcache = KVCache(1), L.PrivateKVCache(1)
    with torch.no_grad():
        m(ids, cache)
        pm(L.one_hot(ids, 40), pcache)
        index = torch.tensor([[[0, 2, 5, 1], [1, 3, 4, 0]]])
        count = torch.tensor([[3, 2]])  # per-head budgets: only the first count slots stay valid
        cache.keep(0, index, count)
        pcache.keep(0, index, count)
        assert torch.equal(cache.tokens_per_head(0), pcache.tokens_per_head(0))
        nxt = torch.tensor([[7]])
        assert (pm(L.one_hot(nxt, 40), pcache) - m(nxt, cache)).abs().max() < 1e-3


def test_bad_inputs_are_value_errors():
    m = tiny("llama")
    pm = L.PrivateTransformer.from_plain(m, SIM)
    with pytest.raises(ValueError, match="token ids"):
        L.one_hot(torch.tensor([[0, 40]]), 40)
    with pytest.raises(ValueError, match="one-hot"):
        pm(torch.zeros(1, 3, 39, dtype=torch.float64), L.PrivateKVCache(1))
    cache = L.PrivateKVCache(1)
    with pytest.raises(ValueError, match="no cache"):
        cache.keep(0, torch.zeros(1, 2, 1, dtype=torch.long))
    pm(L.one_hot(torch.tensor([[1, 2, 3]]), 40), cache)
    with pytest.raises(ValueError, match="slots"):
        cache.keep(0, torch.full((1, 2, 1), 3))
    with pytest.raises(ValueError, match="count"):
        cache.keep(0, torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[1, 3]]))
    with pytest.raises(NotImplementedError, match="tanh"):
        L.activation(torch.zeros(2), "tanh")


# ------------------------------------------------------------------------------------------------------- MPC


def _private_layers(family: str) -> dict:
    """Every layer of a tiny model on the same random input, privately; outputs and this party's costs."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    m = tiny(family)
    share = lambda t: crypten.cryptensor(t, src=0)  # noqa: E731  the server owns the weights
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, m.config.d_model, generator=g, dtype=torch.float64) * 2
    ex = crypten.cryptensor(x, src=1)  # the client's activations
    ids = torch.randint(0, 40, (1, 4), generator=g)
    tokens = crypten.cryptensor(L.one_hot(ids, 40), src=1, precision=0)
    blk = m.blocks[0]
    layers = {
        "embedding": (L.Embedding(share(m.tok_emb.weight.detach().double())), tokens),
        "linear": (L.Linear.from_plain([blk.attn.o_proj], share), ex),
        "norm": (L.make_norm(blk.attn_norm, share, L.PrivateOptions()), ex),
        "mlp": (L.MLP.from_plain(blk.mlp, share), ex),
        "lm_head": (L.Linear.from_plain([m.lm_head], share), ex),
    }
    out = {}
    for name, (layer, inp) in layers.items():
        crypten.reset_communication_stats()
        y = layer(inp)
        stats = crypten.communicator.get().get_communication_stats()
        out[name] = (N.decode(y), stats["rounds"], stats["bytes"])
    attn = L.Attention.from_plain(blk.attn, share, L.PrivateOptions())
    cache = L.PrivateKVCache(1)
    positions = torch.arange(4)[None]
    crypten.reset_communication_stats()
    y = attn(ex, positions, torch.ones(1, 4, dtype=torch.bool), cache)  # prefill
    stats = crypten.communicator.get().get_communication_stats()
    out["attention"] = (N.decode(y), stats["rounds"], stats["bytes"])
    crypten.reset_communication_stats()
    y = attn(ex[:, :1], torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.bool), cache)  # one decode step
    stats = crypten.communicator.get().get_communication_stats()
    out["attention_decode"] = (N.decode(y), stats["rounds"], stats["bytes"])
    out["inputs"] = (N.decode(ex), ids)
    crypten.cfg.communicator.verbose = False
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_private_layers_match_plaintext_and_simulator(parties, family):
    got = parties.run(_private_layers, family)[0]
    m = tiny(family)
    blk = m.blocks[0]
    x, ids = got["inputs"]
    with torch.no_grad():
        plain = {
            "embedding": m.tok_emb(ids).double(),
            "linear": blk.attn.o_proj(x),
            "norm": blk.attn_norm(x),
            "mlp": blk.mlp(x),
            "lm_head": m.lm_head(x),
        }
        cache = KVCache(1)
        plain["attention"] = blk.attn(x, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), cache)
        plain["attention_decode"] = blk.attn(x[:, :1], torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.bool), cache)
        sim_cache = L.PrivateKVCache(1)
        sim_attn = L.Attention.from_plain(blk.attn, SIM, L.PrivateOptions())
        sim = {
            "norm": L.make_norm(blk.attn_norm, SIM, L.PrivateOptions())(x),
            "mlp": L.MLP.from_plain(blk.mlp, SIM)(x),
            "attention": sim_attn(x, torch.arange(4)[None], torch.ones(1, 4, dtype=torch.bool), sim_cache),
            "attention_decode": sim_attn(x[:, :1], torch.tensor([[4]]), torch.ones(1, 1, dtype=torch.bool), sim_cache),
        }
    for name, ref in plain.items():
        out, rounds, _ = got[name]
        assert (out - ref).abs().max() < 2e-3, name
        if name in sim:
            assert (out - sim[name]).abs().max() < 1e-3, name
    assert got["linear"][1] == 2 and got["embedding"][1] == 1  # one Beaver round (+ one truncation for reals)
    # the linear layer's weight was opened against a fixed mask at sharing time: only x - A and the
    # truncation of y travel (16 bytes per element each); the embedding (plain Beaver) re-sends its table
    assert got["linear"][2] == 16 * (x.numel() + plain["linear"].numel())
    assert got["embedding"][2] == 16 * (ids.numel() * 40 + m.tok_emb.weight.numel())


def _tensor_bytes(x: object) -> int:
    """Bytes of a tensor or of an MPCTensor's share (0 for anything else)."""
    t = x.share if N.is_private(x) else x
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _private_tied_model(ids: torch.Tensor) -> dict:
    """Party 0 shares a tied tiny model; party 1 passes the meta architecture (decoder.architecture_only)."""
    from mpcache.mpc.nn import decoder

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    rank = crypten.communicator.get().get_rank()
    m = tiny("llama", tie_embeddings=True)
    model = m if rank == 0 else decoder.architecture_only(m.config)
    pm = decoder.share_model(model, N.share_owned, consume=True)  # party 0 drops each plaintext layer once shared
    table = pm.tok_emb.table
    held = [pm.tok_emb.table] + [lin.weight_t for blk in pm.blocks for lin in (blk.attn.qkv, blk.mlp.up)]
    tokens = crypten.cryptensor(L.one_hot(ids, m.config.vocab_size), src=1, precision=0)
    logits = N.decode(pm(tokens, L.PrivateKVCache(1)))
    crypten.cfg.communicator.verbose = False
    return {
        "logits": logits,
        "head_reads_table": pm.lm_head.weight_t.w is table,
        "table": N.decode(table.value),
        "bytes_held": [sum(_tensor_bytes(t) for t in vars(op).values()) for op in held],
        "numel": [op.shape.numel() for op in held],
        "plaintext_left": [name for name, t in model.state_dict().items() if not t.is_meta],
    }


@pytest.mark.timeout(300)
def test_tied_head_reads_the_embedding_operand_and_party1_holds_no_weights(parties):
    ids = torch.randint(0, 40, (1, 5), generator=torch.Generator().manual_seed(6))
    got = parties.run(_private_tied_model, ids)
    m = tiny("llama", tie_embeddings=True)
    with torch.no_grad():
        ref = m(ids)
    for rank in (0, 1):
        out = got[rank]
        assert out["head_reads_table"]  # one operand (one sharing, one mask) for the lookup and the LM head
        # measured 1.5e-3 .. 2.1e-3 over runs (random carries and stochastic truncation), with the ladder inverse
        # square root and with the table one alike
        assert (out["logits"] - ref).abs().max() < 3e-3
        assert (out["table"] - m.tok_emb.weight).abs().max() <= 2**-16  # W's share rebuilt from B's and W - B
        # a weight-stationary operand holds B's share and W - B, 16 bytes per element, not W's share too
        assert out["bytes_held"] == [16 * n for n in out["numel"]]
        assert out["plaintext_left"] == []  # consumed at party 0, never allocated at party 1


def _private_norms(x: torch.Tensor, options: L.PrivateOptions) -> dict:
    crypten = N.crypten
    out = {}
    for family in ("llama", "gpt2"):
        norm = L.make_norm(tiny(family).norm, lambda t: crypten.cryptensor(t, src=0), options)
        out[family] = N.decode(norm(crypten.cryptensor(x, src=1)))
    return out


@pytest.mark.timeout(300)
def test_private_norms_keep_precision_for_small_and_large_activations(parties):
    # rows with RMS 0.01 (mean(x^2) = 1e-4, a few units of the 2^-16 grid) up to RMS 100
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, generator=g, dtype=torch.float64) * torch.tensor([[0.01], [0.1], [10.0], [100.0]])
    x = x + torch.tensor([[0.0], [0.0], [0.0], [50.0]])  # a large mean for LayerNorm
    options = L.PrivateOptions(norm_range=(2.0**-14, 2.0**14))
    got = parties.run(_private_norms, N.on_grid(x), options)[0]
    with torch.no_grad():
        for family in ("llama", "gpt2"):
            ref = tiny(family).norm(N.on_grid(x))
            assert ((got[family] - ref).abs() / ref.abs().amax(-1, keepdim=True)).max() < 2e-3, family


def _private_generation(family: str, ids: torch.Tensor, steps: int, keep: torch.Tensor) -> tuple[list, list, list]:
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    m = tiny(family)
    pm = L.PrivateTransformer.from_plain(m, lambda t: crypten.cryptensor(t, src=0))
    cache = L.PrivateKVCache(m.config.n_layer)
    tokens = crypten.cryptensor(L.one_hot(ids, 40), src=1, precision=0)
    logits_out, tokens_out, costs = [], [], []
    for step in range(steps + 1):
        crypten.reset_communication_stats()
        logits = pm(tokens, cache, last_only=step > 0)
        tokens = L.greedy_token(logits)
        stats = crypten.communicator.get().get_communication_stats()
        logits_out.append(N.decode(logits))
        tokens_out.append(N.decode(tokens))
        costs.append((stats["rounds"], stats["bytes"]))
        if step == 0:
            cache.keep(0, keep)
    crypten.cfg.communicator.verbose = False
    return logits_out, tokens_out, costs


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_private_greedy_generation_matches_plaintext(parties, family):
    m = tiny(family)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(4))
    keep = torch.tensor([0, 1, 3, 4, 5]).expand(1, m.config.n_kv_head, 5)
    logits, tokens, costs = parties.run(_private_generation, family, ids, 2, keep)[0]
    cache = KVCache(1)
    with torch.no_grad():
        ref = m(ids, cache)
        cache.keep(0, keep)
        for step in range(3):
            last = ref if step == 0 else ref[:, -1:]
            assert (logits[step] - last).abs().max() < 2e-3, step
            assert torch.equal(tokens[step].argmax(-1), last[:, -1:].argmax(-1)), step
            assert torch.equal(tokens[step].sum(-1), torch.ones(1, 1, dtype=torch.float64))  # a one-hot
            ref = m(last[:, -1:].argmax(-1), cache)
    assert costs[1][1] < costs[0][1]  # a decode step moves fewer bytes than the prefill


def _private_bundled_greedy(prompt: torch.Tensor, steps: int) -> tuple[list[int], list[tuple[int, int]]]:
    from mpcache.model.loading import load_bundled

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    model, _ = load_bundled(dtype=torch.float64)
    pm = L.PrivateTransformer.from_plain(model, lambda t: crypten.cryptensor(t, src=0))
    cache = L.PrivateKVCache(model.config.n_layer)
    tokens = crypten.cryptensor(L.one_hot(prompt, model.config.vocab_size), src=1, precision=0)
    out, costs = [], []
    for _ in range(steps):
        crypten.reset_communication_stats()
        tokens = L.greedy_token(pm(tokens, cache, last_only=True))
        stats = crypten.communicator.get().get_communication_stats()
        out.append(int(N.decode(tokens).argmax(-1)))
        costs.append((stats["rounds"], stats["bytes"]))
    crypten.cfg.communicator.verbose = False
    return out, costs


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_private_bundled_model_decodes_like_plaintext(parties):
    from mpcache.model.loading import load_bundled

    try:
        model, tok = load_bundled(dtype=torch.float64)
    except FileNotFoundError:
        pytest.skip("no bundled model")
    prompt = torch.tensor([tok.encode("The pass key is 60754. Remember it. What is the pass key? The pass key is")])
    want, cache = [], KVCache(model.config.n_layer)
    with torch.no_grad():
        logits = model(prompt, cache)
        for _ in range(6):
            want.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([[want[-1]]]), cache)
    got, _ = parties.run(_private_bundled_greedy, prompt, 6)[0]
    assert got == want


# ------------------------------------------------------------------ cached keys/values opened once per row (2PC)


def _growing_operand() -> dict:
    """A GrowingOperand against plain products: values, the cost of a product after an append, the limits."""
    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    comm = crypten.communicator.get()
    g = torch.Generator().manual_seed(8)
    v = torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64)
    xs = [torch.randn(1, 2, 3, n, generator=g, dtype=torch.float64) for n in (5, 7)]
    out = {"v": v, "xs": xs}
    op = N.GrowingOperand(crypten.cryptensor(v[:, :, :5], src=0), -2, 8)
    out["first"] = N.decode(N.matmul(crypten.cryptensor(xs[0], src=1), op))
    ex = crypten.cryptensor(xs[1], src=1)
    crypten.reset_communication_stats()
    op.append(crypten.cryptensor(v[:, :, 5:], src=0))  # staged: no traffic until the next product
    out["append_bytes"] = comm.get_communication_stats()["bytes"]
    y = N.matmul(ex, op)
    stats = comm.get_communication_stats()
    out["second"], out["rounds"], out["bytes"] = N.decode(y), stats["rounds"], stats["bytes"]
    out["public_x"] = N.decode(N.matmul(xs[1], op))  # a public left operand: the rows' shares, no tuple
    for name, fn in {
        "over_capacity": lambda: op.append(crypten.cryptensor(v[:, :, :2], src=0)),  # 7 + 2 > 8
        "bad_block": lambda: crypten.mpc.get_default_provider().fixed_triple(op.key, (1, 2, 3, 9), "matmul",
                                                                             block=(1, 2, 9, 4)),
    }.items():  # fmt: skip
        try:
            fn()
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    crypten.cfg.communicator.verbose = False
    return out


@pytest.mark.timeout(300)
def test_growing_operand_matches_products_and_opens_only_new_rows(parties):
    got = parties.run(_growing_operand)[0]
    v, (x5, x7) = got["v"], got["xs"]
    assert (got["first"] - x5 @ v[:, :, :5]).abs().max() < 1e-3
    assert (got["second"] - x7 @ v).abs().max() < 1e-3
    assert (got["public_x"] - x7 @ v).abs().max() < 1e-3
    # one round opens x - A and the two new rows (16 bytes per element: sent and received), one truncates
    assert got["append_bytes"] == 0 and got["rounds"] == 2
    assert got["bytes"] == 16 * (x7.numel() + v[:, :, 5:].numel() + (x7 @ v).numel())
    assert "capacity" in got["over_capacity"] and "not a leading block" in got["bad_block"]
    # the simulator: a growing float tensor, the same products in value
    sim = N.GrowingOperand(v[:, :, :5], -2, 8)
    assert torch.equal(N.matmul(x5, sim), x5 @ v[:, :, :5])
    sim.append(v[:, :, 5:])
    assert torch.equal(N.matmul(x7, sim), x7 @ v) and sim.shape == v.shape


class _BeaverCache(L.PrivateKVCache):
    """The cache without held operands: both attention products are plain Beaver over the whole cache."""

    def kv_operands(self, layer, entry):
        return None


def _held_decode(ids: torch.Tensor, steps: list[int], keep: torch.Tensor, held: bool) -> dict:
    """Prefill, then decode steps fed the given tokens, of a 2-layer model with a tiny operand capacity (n + 2, so
    it runs out every few steps) and layer 0 compacted after the first decode step; per decode step and layer:
    cache length, whether the operands were fresh (new masks), the attention products' bytes."""
    from mpcache.mpc.arith.accounting import Ledger

    crypten = N.crypten
    crypten.cfg.communicator.verbose = True
    m = tiny("llama", n_layer=2)
    pm = L.PrivateTransformer.from_plain(m, lambda t: crypten.cryptensor(t, src=0))
    cache = (L.PrivateKVCache if held else _BeaverCache)(2)
    out = {"logits": [], "rounds": [], "steps": []}
    capacity, N.growing_capacity = N.growing_capacity, lambda n: n + 2
    masks = [None, None]
    try:
        with Ledger(N.counters) as ledger:
            for step, token_ids in enumerate([ids] + [torch.tensor([[t]]) for t in steps]):
                tokens = crypten.cryptensor(L.one_hot(token_ids, 40), src=1, precision=0)
                ledger.begin_step("decode")
                logits = pm(tokens, cache, last_only=True)
                record = ledger.end_step()
                out["logits"].append(N.decode(logits))
                out["rounds"].append(record["rounds"])
                row = []
                for i, entry in enumerate(cache.layers):
                    key = entry.operands.keys.key if entry.operands is not None else None
                    cells = [c for c in record["cells"] if c["layer"] == str(i) and c["op"] == "attention"]
                    row.append(
                        {"length": entry.capacity, "fresh": key != masks[i], "bytes": sum(c["bytes"] for c in cells)}
                    )
                    masks[i] = key
                out["steps"].append(row)
                if step == 1:
                    cache.keep(0, keep)
    finally:
        N.growing_capacity = capacity
        crypten.cfg.communicator.verbose = False
    return out


@pytest.mark.timeout(600)
def test_decode_with_held_cache_operands_matches_beaver_and_opens_only_new_rows(parties):
    m = tiny("llama", n_layer=2)
    ids = torch.randint(0, 40, (1, 6), generator=torch.Generator().manual_seed(9))
    keep = torch.tensor([0, 2, 3, 5, 6]).expand(1, m.config.n_kv_head, 5)
    # plaintext and simulator, greedy, with the same compaction; the private runs are fed the same tokens
    cache, sim_cache = KVCache(2), L.PrivateKVCache(2)
    pm = L.PrivateTransformer.from_plain(m, SIM)
    refs, sims, tokens = [], [], []
    with torch.no_grad():
        ref, sim = m(ids, cache), pm(L.one_hot(ids, 40), sim_cache)
        for step in range(6):
            refs.append(ref[:, -1:])
            sims.append(sim[:, -1:])
            tokens.append(int(sim[0, -1].argmax()))
            assert tokens[-1] == int(ref[0, -1].argmax())
            if step == 1:
                cache.keep(0, keep)
                sim_cache.keep(0, keep)
            nxt = torch.tensor([[tokens[-1]]])
            ref, sim = m(nxt, cache), pm(L.one_hot(nxt, 40), sim_cache)
    held = parties.run(_held_decode, ids, tokens[:5], keep, True)[0]
    beaver = parties.run(_held_decode, ids, tokens[:5], keep, False)[0]
    for step in range(6):
        got = held["logits"][step]
        assert (got - beaver["logits"][step]).abs().max() < 1e-3, step
        assert (got - sims[step]).abs().max() < 2e-3, step
        assert (got - refs[step]).abs().max() < 3e-3, step
    assert held["rounds"] == beaver["rounds"]  # the new rows travel with the query's opening: no extra round
    # fresh masks exactly when needed: layer 0 after its compaction (step 2) and when 5 + 2 rows are used up
    # (step 5); layer 1 when 6 + 2 rows are used up (step 3)
    fresh = [[s for s in range(1, 6) if held["steps"][s][i]["fresh"]] for i in range(2)]
    assert fresh == [[2, 5], [3]]
    hq, hkv, d = m.config.n_head, m.config.n_kv_head, m.config.head_dim
    for step in range(1, 6):
        for i in range(2):
            n = held["steps"][step][i]["length"]
            # q - A, the new key row and the scores' truncation; probs - A, the new value row and out's truncation
            new_rows = 16 * (hq * d + hkv * d + hq * n) + 16 * (hq * n + hkv * d + hq * d)
            reopen = 16 * 2 * hkv * (n - 1) * d  # the other n - 1 rows of keys and values
            assert beaver["steps"][step][i]["bytes"] == new_rows + reopen, (step, i)
            assert held["steps"][step][i]["bytes"] == new_rows + reopen * held["steps"][step][i]["fresh"], (step, i)


def test_kv_operands_belong_to_the_stored_entry_only():
    m = tiny("llama")
    pm = L.PrivateTransformer.from_plain(m, SIM)
    cache = L.PrivateKVCache(1)
    pm(L.one_hot(torch.tensor([[1, 2, 3]]), 40), cache)
    entry = cache.layers[0]
    ops = cache.kv_operands(0, entry)
    assert ops is entry.operands and ops.length == 3 and torch.equal(ops.values.value, entry.values)
    assert torch.equal(ops.keys.value, entry.keys.transpose(-1, -2))
    view = L.PrivateLayerKV(
        entry.keys[:, :, 1:], entry.values[:, :, 1:], entry.positions[..., 1:], entry.valid[..., 1:]
    )
    assert cache.kv_operands(0, view) is None  # a gathered subset (an eviction policy's view): plain products
    pm(L.one_hot(torch.tensor([[4]]), 40), cache)
    assert cache.layers[0].operands is ops and ops.length == 4  # an append hands the operands on
    cache.keep(0, torch.tensor([[[0, 2, 3]] * 2]))
    assert cache.layers[0].operands is None  # compaction: a new entry, new operands made at the next step
    pm(L.one_hot(torch.tensor([[5]]), 40), cache)
    assert cache.layers[0].operands is not ops and cache.layers[0].operands.length == 4
    with pytest.raises(ValueError, match="operands hold"):
        L.cached_attention(
            torch.zeros(1, 4, 1, 8), entry.keys, entry.values, torch.tensor([[9]]), entry.positions, entry.valid,
            operands=cache.layers[0].operands,
        )  # fmt: skip


def _opened_shared_cache(ids: torch.Tensor, batch_bytes: int) -> dict:
    """A plaintext prefill's cache shared by party 0 (decoder.share_cache) and opened in batches of at most
    `batch_bytes` of shares; then one decode step. Rounds of the opening, the step's logits."""
    from mpcache.mpc.nn import decoder

    crypten = N.crypten
    m = tiny("llama", n_layer=3)
    plain = KVCache(3)
    with torch.no_grad():
        m(ids, plain)
    shapes = [tuple(entry.keys.shape) for entry in plain.layers]
    pm = L.PrivateTransformer.from_plain(m, lambda t: crypten.cryptensor(t, src=0))
    limit, L.PrivateKVCache.OPEN_BATCH_BYTES = L.PrivateKVCache.OPEN_BATCH_BYTES, batch_bytes
    crypten.cfg.communicator.verbose = True  # CrypTen counts rounds only then
    try:
        before = N.counters()["rounds"]
        cache = decoder.share_cache(plain, m.config, shapes, lambda t: crypten.cryptensor(t, src=0))
        rounds = N.counters()["rounds"] - before
    finally:
        L.PrivateKVCache.OPEN_BATCH_BYTES = limit
        crypten.cfg.communicator.verbose = False
    token = torch.tensor([[7]])
    logits = N.decode(pm(crypten.cryptensor(L.one_hot(token, 40), src=0, precision=0), cache, last_only=True))
    return {"rounds": rounds, "logits": logits}


def test_shared_cache_opens_in_bounded_batches_and_decodes_like_plaintext(parties):
    """open_operands splits its opening so no message outgrows the transport's limit (SmolLM2 at 4096 tokens
    was a 377 MB message): one layer per round with a tiny limit, one round for all with the default."""
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(4))
    m, plain = tiny("llama", n_layer=3), KVCache(3)
    with torch.no_grad():
        m(ids, plain)
        want = m(torch.tensor([[7]]), plain)[:, -1:]
    split = parties.run(_opened_shared_cache, ids, 1)[0]
    whole = parties.run(_opened_shared_cache, ids, L.PrivateKVCache.OPEN_BATCH_BYTES)[0]
    assert (split["rounds"], whole["rounds"]) == (3, 1)
    for out in (split, whole):
        assert (out["logits"] - want).abs().max() < 3e-3
