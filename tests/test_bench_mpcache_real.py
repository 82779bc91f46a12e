"""bench.mpcache_real's variant names and saved-run tables (the runs themselves are benchmarks, not tests)."""

from __future__ import annotations

import argparse
import json

import pytest

from bench.mpcache_real import VARIANTS, parse_variant, pivot, saved_rows, variant_name
from mpcache.methods.mpcache import MPCacheKnobs


def row(method: str, options: dict, task: str, length: int, accuracy: float, budget=0.1) -> dict:
    return {"method": method, "options": options, "task": task, "context_len": length, "budget": budget,
            "accuracy": accuracy, "samples": 10}  # fmt: skip


def test_variants_parse_with_their_own_budgets_and_unknown_names_are_refused() -> None:
    assert parse_variant("quest@0.1,256") == ("quest", "quest", {}, [0.1, 256])
    label, method, options, budgets = parse_variant('mpcache:{"group": "max"}')
    assert (method, options, budgets) == ("mpcache", {"group": "max"}, None)
    assert VARIANTS["mpcache:retrieval"] == ("mpcache", MPCacheKnobs.retrieval().options())
    with pytest.raises(argparse.ArgumentTypeError, match="unknown variant"):
        parse_variant("mpcache:retreival")


def test_pivot_names_rows_by_their_options_and_keeps_the_last_cell(tmp_path) -> None:
    spelled = {k: v for k, v in reversed(list(MPCacheKnobs.retrieval().options().items()))}  # another key order
    rows = [
        row("full", {}, "niah", 2048, 1.0, budget=None),
        row("mpcache:{...}", spelled, "passkey", 2048, 0.5),
        row("mpcache:{...}", spelled, "passkey", 2048, 0.9),  # a later run of the same cell wins
        row("mpcache", {}, "passkey", 4096, 0.2),
    ]
    assert variant_name(rows[1]) == "mpcache:retrieval" and variant_name(rows[3]) == "mpcache"
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({"runs": [{"rows": rows[:2]}, {"rows": rows[2:]}]}))
    assert saved_rows(path) == rows
    table = pivot(saved_rows(path), ["mpcache:retrieval", "full"]).splitlines()
    assert table[0] == "| variant | passkey 2048 | niah 2048 | passkey 4096 |"
    assert table[2:] == ["| mpcache:retrieval @0.1 | 0.90 (10) | - | - |", "| full | - | 1.00 (10) | - |"]


def test_every_method_is_a_variant_and_untrained_parts_say_so() -> None:
    from mpcache.methods import METHODS

    for name in METHODS:
        assert VARIANTS[name] == (name, {})  # its defaults
    assert VARIANTS["locret:random"] == ("locret", {"heads": "random"})
    assert VARIANTS["attention_gate:random"] == ("attention_gate", {"gates": "random"})


def test_plot_orders_budgets_by_the_tokens_they_keep_at_the_plotted_length(tmp_path, monkeypatch) -> None:
    import bench.mpcache_real as real

    seen = {}
    monkeypatch.setattr(real, "plot", lambda rows, budgets, path: seen.update(rows=rows, budgets=budgets))
    rows = [
        row("full", {}, "passkey", 2048, 1.0, budget=None),
        row("quest", {}, "passkey", 2048, 0.7, budget=0.2),
        row("quest", {}, "passkey", 2048, 0.6, budget=256),  # 256 of 2048 tokens: between 10% and 20%
        row("quest", {}, "passkey", 2048, 0.5, budget=0.1),
        row("quest", {}, "passkey", 1024, 0.1, budget=0.05),  # another length: left out
        row("snapkv", {}, "passkey", 2048, 0.0, budget=0.1),
    ]
    real.plot_saved(rows, ["quest", "full"], 2048, tmp_path / "p.png")
    assert seen["budgets"] == [0.1, 256, 0.2]
    assert [(r["method"], r["budget"]) for r in seen["rows"]] == [
        ("quest", 0.1),
        ("quest", 256),
        ("quest", 0.2),
        ("full", None),
    ]
    with pytest.raises(ValueError, match="no rows with a budget"):
        real.plot_saved(rows, ["full"], 2048, tmp_path / "p.png")
    table = real.pivot([r for r in rows if r["context_len"] == 2048], ["quest"]).splitlines()
    assert [line.split(" |")[0] for line in table[2:]] == ["| quest @0.1", "| quest @256", "| quest @0.2"]


def test_render_writes_the_plot(tmp_path) -> None:
    import bench.mpcache_real as real

    saved = tmp_path / "runs.json"
    rows = [row("full", {}, "niah", 2048, 1.0, budget=None)]
    rows += [row("h2o", {}, "niah", 2048, accuracy, budget=budget) for accuracy, budget in [(0.1, 0.05), (0.4, 0.2)]]
    saved.write_text(json.dumps(rows))
    real.main(["--render", str(saved), "--plot", str(tmp_path / "p.png"), "--markdown", str(tmp_path / "t.md")])
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert (tmp_path / "t.md").read_text().splitlines()[0] == "| variant | niah 2048 |"
    saved.write_text(json.dumps(rows + [row("h2o", {}, "niah", 4096, 0.0)]))
    real.main(["--render", str(saved), "--markdown", str(tmp_path / "t.md"), "--lengths", "4096"])  # these columns
    assert (tmp_path / "t.md").read_text().splitlines()[0] == "| variant | niah 4096 |"
    with pytest.raises(ValueError, match="no rows with a budget"):  # --tasks picks the panels: none has niah
        real.main(["--render", str(saved), "--plot", str(tmp_path / "q.png"), "--tasks", "passkey"])
