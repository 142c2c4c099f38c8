"""Smoke test of benchmarks/model_step.py: runs at toy size and writes the documented JSON rows (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"


def test_model_step_benchmark_writes_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("model_step_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    rc = module.main(["--layers", "1", "--hidden", "32", "--heads", "4", "--seq", "16", "--batch", "1", "--vocab",
                      "64", "--repeats", "1", "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["pythia", "llama", "ckpt", "padded"]
    for r in rows:
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_ms"] / r["ours_ms"], rel=0.02)
    assert "speedup" in capsys.readouterr().out
