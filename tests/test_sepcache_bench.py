"""benchmarks/sepcache_decode.py runs end to end on a tiny model and writes the promised JSON fields."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "sepcache_decode.py"


def test_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sepcache_decode_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    rc = bench.main(["--contexts", "64,160", "--steps", "2", "--warmup", "1", "--layers", "1", "--hidden", "32",
                     "--heads", "2", "--vocab", "128", "--init-cache-size", "2", "--sep-cache-size", "8",
                     "--local-size", "8", "--cache-size", "24", "--prefill-chunk", "32", "--threads", "1",
                     "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert {"cache", "context", "ms_per_token", "peak_mem_mb", "ratio_vs_dynamic"} <= set(rows[0])
    assert [(r["cache"], r["context"]) for r in rows] == [("dynamic", 64), ("sepcache", 64), ("dynamic", 160),
                                                          ("sepcache", 160)]
    by = {(r["cache"], r["context"]): r for r in rows}
    assert by[("dynamic", 160)]["ratio_vs_dynamic"] == 1.0
    # memory: the dynamic cache holds the whole context, SepCache at most its budget (+ one prefill chunk)
    assert by[("dynamic", 160)]["peak_mem_mb"] > 2.4 * by[("dynamic", 64)]["peak_mem_mb"]
    bound_mb = 24 * 2 * 16 * 2 * 4 / 2**20       # cache_size x heads x head_dim x (K, V) x fp32 bytes, one layer
    assert 0 < by[("sepcache", 64)]["peak_mem_mb"] <= bound_mb
    assert 0 < by[("sepcache", 160)]["peak_mem_mb"] <= bound_mb
    assert "vs dynamic" in capsys.readouterr().out
    assert bench.main(["--contexts", "a,b"]) == 2
