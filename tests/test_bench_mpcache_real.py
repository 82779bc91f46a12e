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
