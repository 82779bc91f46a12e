"""bench.mpc_decode's argument handling: method variants with knobs, ratio budgets, full / method ratios and the
accuracy match (the measurement itself runs in the slow suite and from the command line)."""

from __future__ import annotations

import pytest

from bench import mpc_decode as B


def test_method_variants_carry_their_knobs_and_label():
    got = B.parse_methods("full,mpcache:static_ratio=1.0,sink=8,similarity=bound,h2o:recent_ratio=0.25, streamingllm")
    assert got == [
        ("full", "full", {}),
        (
            "mpcache:static_ratio=1.0,sink=8,similarity=bound",
            "mpcache",
            dict(static_ratio=1.0, sink=8, similarity="bound"),
        ),
        ("h2o:recent_ratio=0.25", "h2o", {"recent_ratio": 0.25}),
        ("streamingllm", "streamingllm", {}),
    ]
    assert B.parse_methods("mpcache:share_layers=false")[0][2] == {"share_layers": False}
    for bad, match in (("sink=4,h2o", "before any method"), ("h2o:recent", "name=value"), ("snap", "unknown method")):
        with pytest.raises(ValueError, match=match):
            B.parse_methods(bad)


def test_budget_from_a_ratio_has_a_floor_of_32_tokens():
    assert [B.budget_for(n, None, 0.1) for n in (100, 512, 1024)] == [32, 51, 102]
    assert B.budget_for(1024, 64, None) == 64 and B.budget_for(1024, None, None) is None


def _row(method: str, seq_len: int, latency: float, rounds: int, nbytes: int, budget=None, ratio=None) -> dict:
    return dict(method=method, model="bundled", link="lan", seq_len=seq_len, latency_s=latency, rounds=rounds,
                bytes_per_party=nbytes, budget=budget, budget_ratio=ratio)  # fmt: skip


def test_vs_full_ratios_and_accuracy_match(tmp_path, capsys):
    rows = [
        _row("full", 512, 4.0, 1000, 800),
        _row("h2o", 512, 2.0, 1250, 200, 51, 0.1),
        _row("h2o", 1024, 2.0, 1250, 200, 102, 0.1),
        _row("mpcache:sink=8", 512, 1.0, 500, 100, 51, 0.1),
    ]
    B.add_vs_full(rows)
    assert rows[1]["vs_full"] == {"latency": 2.0, "rounds": 0.8, "bytes": 4.0}
    assert "vs_full" not in rows[0] and "vs_full" not in rows[2]  # no full row at 1024
    accuracy = [
        dict(method="h2o", task="passkey", context_len=512, budget=0.1, accuracy=1.0, samples=4),
        dict(method="h2o", task="niah", context_len=512, budget=0.1, accuracy=0.0, samples=12),
        dict(method="h2o", task="niah", context_len=512, budget=0.2, accuracy=0.5, samples=4),  # another ratio
        dict(method="h2o", task="passkey", context_len=1024, budget=102, accuracy=0.5, samples=4),  # tokens
        dict(method="full", task="passkey", context_len=512, budget=None, accuracy=0.75, samples=4),
        dict(method="mpcache", task="passkey", context_len=512, budget=0.1, accuracy=1.0, samples=4),
    ]
    B.add_accuracy(rows, accuracy)
    assert [r.get("accuracy") for r in rows] == [0.75, 0.25, 0.5, None]  # (4 x 1 + 12 x 0) / 16; a variant: blank
    assert rows[1]["accuracy_tasks"] == ["niah", "passkey"]
    B.print_tables(rows)
    out = capsys.readouterr().out
    assert "full / method" in out and "mpcache:sink=8" in out and "0.25" in out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--budget", "8", "--budget-ratio", "0.1"], "not both"),
        (["--method", "h2o", "--budget-ratio", "1.5"], "budget-ratio"),
        (["--method", "h2o:bogus=1"], "bogus"),
        (["--method", "h2o:recent_ratio=2"], "recent_ratio"),
        (["--method", "nope"], "unknown method"),
        (["--private-prefill", "--prefill-block", "0"], "must be positive"),
    ],
)
def test_bad_arguments_stop_before_any_party_starts(argv, match, capsys):
    with pytest.raises(SystemExit):
        B.main(argv)
    assert match in capsys.readouterr().err


def test_unreadable_accuracy_file_is_an_argument_error(tmp_path, capsys):
    bad = tmp_path / "acc.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        B.main(["--method", "full", "--accuracy", str(bad)])
    assert "--accuracy" in capsys.readouterr().err


def test_render_joins_saved_runs_against_their_full_rows(tmp_path):
    import json

    (tmp_path / "a.json").write_text(json.dumps([_row("full", 512, 4.0, 1000, 800)]))
    stale = {**_row("mpcache", 512, 2.0, 800, 200, 51, 0.1), "vs_full": {"latency": 9, "rounds": 9, "bytes": 9}}
    (tmp_path / "b.json").write_text(json.dumps([stale]))
    accuracy = [dict(method="mpcache", task="niah", context_len=512, budget=0.1, accuracy=0.5, samples=2)]
    (tmp_path / "acc.json").write_text(json.dumps(accuracy))
    out = tmp_path / "joined.json"
    argv = ["--render", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--json", str(out)]
    argv += ["--accuracy", str(tmp_path / "acc.json"), "--markdown", str(tmp_path / "t.md"), "--plot", "/dev/null"]
    assert B.main(argv) == 0
    rows = json.loads(out.read_text())
    assert rows[1]["vs_full"] == {"latency": 2.0, "rounds": 1.25, "bytes": 4.0} and rows[1]["accuracy"] == 0.5
    table = (tmp_path / "t.md").read_text().splitlines()
    # rows saved before the comparisons option ran CrypTen's; before dealer bytes were counted: "-"
    want = "| bundled | crypten | lan | 512 | mpcache | 51 | 800 | 0.00 | - | 2.00 | 4.00 | 1.25 | 2.00 | 0.50 |"
    assert table[3] == want


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_private_prefill_fills_the_method_cache_like_the_shortcut(tmp_path):
    """--private-prefill: two parties prefill a tiny model privately into MPCache's own cache (static eviction
    after the last block); the decode steps after it cost what they cost after the plaintext-prefill shortcut (same
    kept size, rounds and bytes), and the row carries the prefill's cost. Slow: four party processes, ~40 CPU-s
    (2-4 min of wall time on the shared 2 cores)."""
    import json

    from test_private_decoder import tiny_checkpoint

    tiny_checkpoint(tmp_path / "model", "llama", max_position=128)
    rows = {}
    for flag in ([], ["--private-prefill", "--prefill-block", "32"]):
        out = tmp_path / f"rows{len(flag)}.json"
        argv = ["--models", str(tmp_path / "model"), "--method", "mpcache", "--seq-lens", "64", "--budget", "16"]
        argv += ["--link", "loopback", "--steps", "1", "--json", str(out), "--plot", "/dev/null"]
        assert B.main(argv + flag) == 0
        rows[bool(flag)] = {r["method"]: r for r in json.loads(out.read_text())}
    short, private = rows[False]["mpcache"], rows[True]["mpcache"]
    assert short["cache"] == "plaintext prefill, then shared" and short["prefill"] is None
    assert private["cache"] == "private prefill, blocks of 32" and private["prefill"]["rounds"] > 0
    assert short["kept"] == private["kept"] == 32  # max(budget 16, static_ratio 0.5 x 64)
    assert (short["rounds"], short["bytes_per_party"]) == (private["rounds"], private["bytes_per_party"])
