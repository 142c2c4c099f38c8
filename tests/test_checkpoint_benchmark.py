"""Smoke test of benchmarks/checkpoint.py: the three modes run through the real loop, the JSON contract, the ratio
baselines, and that the saving modes really wrote checkpoints (the no-save baseline did not)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_checkpoint_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import checkpoint as bench

    out, work = tmp_path / "rows.json", tmp_path / "work"
    rows = bench.main(["--layers", "2", "--hidden", "32", "--heads", "2", "--seq", "16", "--micro", "1", "--iters",
                       "4", "--every", "2", "--warmup", "1", "--rounds", "1", "--workdir", str(work), "--json",
                       str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["mode"] for r in rows] == ["nosave", "sync", "async"]
    assert set(rows[0]) == {"mode", "save_every", "ms_per_iter", "ratio_vs_nosave", "ratio_vs_sync"}
    assert rows[0]["ratio_vs_nosave"] == 1.0 and rows[1]["ratio_vs_sync"] == 1.0 and rows[2]["ms_per_iter"] > 0
    for mode, saved in (("nosave", False), ("sync", True), ("async", True)):
        assert (work / "round0" / mode / "ckpt" / "latest").is_file() == saved, mode
    with pytest.raises(SystemExit):
        bench.main(["--iters", "2", "--warmup", "2"])  # nothing left to time
