"""benchmarks/train_step.py runs and writes the promised JSON rows (tiny shapes; no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_step_benchmark_json(tmp_path, neox_tokenizer_file):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_step.py"), "--layers", "1", "--hidden",
                           "32", "--heads", "2", "--seq", "16", "--micro", "2", "--steps", "1", "--rounds", "2",
                           "--warmup", "1", "--tokenizer", str(neox_tokenizer_file), "--json", str(out),
                           "--methods", "minimal", "ours", "hf_eager", "ours_ac_op"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["minimal", "ours", "hf_eager", "ours_ac_op"]
    for r in rows:
        assert {"method", "tokens_per_sec", "ratio_vs_minimal", "ratio_vs_hf_eager", "ratio_vs_ours", "mfu",
                "step_mem_mib", "mem_vs_ours"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["mfu"] > 0 and r["step_mem_mib"] >= 0
    assert rows[0]["ratio_vs_minimal"] == 1.0 and rows[2]["ratio_vs_hf_eager"] == 1.0
    assert "ratio_vs_minimal" in proc.stdout
