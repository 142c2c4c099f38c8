"""Smoke test of benchmarks/generate.py at toy size: the documented rows, and our greedy tokens equal HF generate's
on the converted weights (the benchmark's numerics check). No timing asserts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate.py"


@pytest.mark.slow
def test_generate_benchmark_rows(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("generate_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    assert module.main(["--new-tokens", "8,24", "--prompt-len", "12", "--layers", "1", "--hidden", "32", "--heads",
                        "4", "--vocab", "128", "--window", "4", "--sep-cache-size", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["model"], r["runner"], r["new_tokens"]) for r in rows] == [
        (m, r, n) for n in (8, 24) for m, r in [("full", "hf_generate"), ("full", "ours_plain"),
                                                ("sepllm", "hf_generate"), ("sepllm", "hf_sepcache"),
                                                ("sepllm", "ours_compressed")]]
    for r in rows:
        assert r["ms_per_token"] > 0 and r["tokens_per_sec"] > 0 and "ratio_vs_hf" in r
    plain = [r for r in rows if r["runner"] == "ours_plain"]
    assert [r["same_tokens_as_hf"] for r in plain] == [8, 24]
    # compressed cache: 4 initial + 2 separators + 4 window slots, K and V, 1 layer, 32 wide, fp32
    comp = [r for r in rows if r["runner"] == "ours_compressed"]
    assert comp[-1]["kv_mb"] * 2 ** 20 == (4 + 2 + 4) * 2 * 32 * 4
    assert "ratio_vs_first_n" in capsys.readouterr().out
