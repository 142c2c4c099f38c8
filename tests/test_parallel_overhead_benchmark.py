"""Smoke test of benchmarks/parallel_overhead.py: the JSON contract and the baseline of the ratios."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_parallel_overhead_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))  # kept: the spawned ranks import the module by name too
    import parallel_overhead as bench

    out = tmp_path / "rows.json"
    rows = bench.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--micro", "1", "--iters",
                       "2", "--warmup", "1", "--rounds", "1", "--modes", "single,tp2", "--workdir",
                       str(tmp_path / "work"), "--json", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["mode"] for r in rows] == ["single", "tp2"] and [r["processes"] for r in rows] == [1, 2]
    assert set(rows[0]) == {"mode", "processes", "global_batch", "step_ms", "ratio_vs_single"}
    assert rows[0]["ratio_vs_single"] == 1.0 and rows[1]["step_ms"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--modes", "tp2"])  # no baseline
