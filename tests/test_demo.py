"""The plaintext demo, run on a tiny random model (the bundled checkpoint may still be training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mpcache import demo
from mpcache.model import ByteTokenizer, ModelConfig, Transformer
from mpcache.model.loading import load_bundled


def tiny() -> tuple[Transformer, ByteTokenizer]:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=264, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_position=2048)
    return Transformer(config).eval(), ByteTokenizer()


def test_demo_streams_and_reports(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(demo, "load_bundled", tiny)
    assert demo.main(["--task", "niah", "--length", "512", "--seed", "3", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    sample = demo.make_sample("niah", 512, 3, lambda s: len(ByteTokenizer().encode(s, add_bos=False)))
    assert lines["expected"].strip() == sample.answer
    assert lines["match"].strip() in ("yes", "no")
    assert "tok/s" in lines["speed"]
    said = out.split("model says: ", 1)[1].split("\nexpected:")[0]
    assert len(said.encode()) <= 6 * 4  # at most max-new-tokens bytes (replacement chars take 3)
    # A full cache holds the prompt and the fed-back tokens: the two sizes agree.
    kib = [part.split(" KiB")[0].split()[-1] for part in lines["KV cache"].split("KiB")[:2]]
    assert kib[0] == kib[1]


def test_demo_missing_checkpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(demo, "load_bundled", lambda: load_bundled(tmp_path))
    assert demo.main([]) == 1
    assert "bundled checkpoint is missing" in capsys.readouterr().err


def test_demo_bad_arguments(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(demo, "load_bundled", tiny)
    assert demo.main(["--length", "40"]) == 2
    assert "too short" in capsys.readouterr().err
    for argv in (["--task", "nope"], ["--max-new-tokens", "0"], ["--method", "snapkv"], ["--budget", "0"]):
        with pytest.raises(SystemExit):
            demo.main(argv)
