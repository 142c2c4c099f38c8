"""benchmarks/streaming.py end to end on a tiny model: rows per run and length, exact full-attention KV bytes, the
budget stop, chunked feeding equal to per-token feeding, flat SepLLM KV, and the JSON it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from test_streaming_ppl import _byte_tokenizer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "streaming.py"


@pytest.mark.slow
def test_streaming_benchmark_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("streaming_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokenizer = _byte_tokenizer(tmp_path / "bytes.json")
    kv_per_token = 2 * 1 * 16 * 4                     # K and V x 1 layer x hidden 16 x fp32
    budget_mb = 250 * kv_per_token / 2**20             # full attention may hold 250 tokens
    out = tmp_path / "rows.json"
    rc = bench.main(["--lengths", "150,300", "--methods", "sepllm,full", "--layers", "1", "--hidden", "16",
                     "--heads", "2", "--tokenizer", str(tokenizer), "--init-cache-size", "2", "--sep-cache-size",
                     "8", "--local-size", "16", "--cache-size", "32", "--chunk-size", "64", "--full-kv-budget-mb",
                     str(budget_mb), "--no-progress", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["full_max_tokens"] == 250 and data["vocab"] == 257 and data["output_layer_tokens_per_s"] > 0
    rows = {(r["method"], r["feeding"], r["tokens"]): r for r in data["rows"]}
    assert sorted(rows) == sorted([("sepllm", f, n) for f in ("chunked", "per-token") for n in (150, 300)]
                                  + [("full", f, 150) for f in ("chunked", "per-token")])   # full stops at 250
    for feeding in ("chunked", "per-token"):
        assert rows[("full", feeding, 150)]["kv_mb"] == round(150 * kv_per_token / 2**20, 4)
        sep150, sep300 = rows[("sepllm", feeding, 150)], rows[("sepllm", feeding, 300)]
        assert sep150["peak_kv_mb"] == sep300["peak_kv_mb"] <= round(33 * kv_per_token / 2**20, 4)
        assert sep300["kv_vs_full"] is None and sep150["kv_vs_full"] is not None
        assert all(r["tokens_per_s"] > 0 and r["rss_mb"] > 0 for r in (sep150, sep300))
    for n in (150, 300):     # chunked feeding gives every query what per-token feeding gives it
        assert rows[("sepllm", "chunked", n)]["ppl"] == pytest.approx(rows[("sepllm", "per-token", n)]["ppl"],
                                                                       rel=1e-4)
    assert rows[("sepllm", "per-token", 300)]["vs_output_bound"] is not None
    assert rows[("sepllm", "chunked", 300)]["vs_output_bound"] is None
    printed = capsys.readouterr().out
    assert "output layer alone" in printed and "speed/full" in printed
    with pytest.raises(SystemExit, match="--methods"):
        bench.main(["--methods", "sepllm,dense"])
