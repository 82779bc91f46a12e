"""bench/gpu_check.py's smoke mode: the GPU check's every step on the CPU under the Triton interpreter (tiny shapes,
a tiny model), so the script a lent GPU would run is not dead code. It measures nothing (interpreter times)."""

import importlib.util
import json

import pytest

pytest.importorskip("triton")

from bench import gpu_check  # noqa: E402
from mpcache import kernels  # noqa: E402


def test_smoke_run_exercises_every_section(tmp_path):
    assert kernels.INTERPRET, "tests/conftest.py defines the kernels for the interpreter"
    out = tmp_path / "gpu_smoke.json"
    gpu_check.main(["--smoke", "--methods", "h2o", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["note"].startswith("SMOKE RUN") and report["environment"]["interpreter"]
    names = {row["kernel"] for row in report["kernels"]}
    assert len(names) == 14 and all(row["ok"] for row in report["kernels"]), report["summary"]
    assert report["bandwidth"][0]["bytes_read"] > 0 and report["bandwidth"][0]["copy_ms"] > 0
    rows = {(row["impl"], row["method"]): row for row in report["decode"]}
    assert {("mpcache", "full"), ("mpcache", "h2o")} <= set(rows)
    assert all("step_ms" in row for row in rows.values()), rows
    assert rows[("mpcache", "h2o")]["tokens_read_per_head"] < rows[("mpcache", "full")]["tokens_read_per_head"]
    if importlib.util.find_spec("transformers") is not None:
        assert ("transformers", "full") in rows
    assert report["summary"]["targets"].startswith("not measured")
    assert report["summary"]["sections_failed_or_skipped"] == []


def test_a_failing_kernel_is_recorded_not_fatal(tmp_path, monkeypatch):
    """One broken case must not stop the run: the report says which one and why."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(kernels, "merge_kv", broken)
    rows = gpu_check.check_kernels(gpu_check.torch.device("cpu"), [gpu_check.torch.float32], big=False)
    failed = [row for row in rows if not row["ok"]]
    assert [row["kernel"] for row in failed] == ["merge (scatter-add)"] and "boom" in failed[0]["error"]
