"""Smoke test of benchmarks/model_step.py: runs at toy size and writes the documented JSON rows (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

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
    assert [(r["variant"], r["baseline"]) for r in rows] == [
        ("pythia", "HF GPTNeoXForCausalLM (sdpa)"), ("llama", "HF LlamaForCausalLM (sdpa)"),
        ("ckpt", "ours, no checkpointing"), ("padded", "ours, no padding mask")]
    for r in rows:
        assert set(r) == {"variant", "baseline", "ours_ms", "baseline_ms", "speedup", "tokens_per_s", "device",
                          "layers", "hidden", "seq", "batch"}
        assert (r["device"], r["layers"], r["hidden"], r["seq"], r["batch"]) == ("cpu", 1, 32, 16, 1)
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["speedup"] > 0 and r["tokens_per_s"] > 0
    # the printed table is the JSON: one line per variant with its measured times and ratio
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[-4:] for line in lines if line.startswith("variant ")] == [["base", "ms", "speedup", "tok/s"]]
    for r in rows:
        (line,) = [line for line in lines if line.startswith(f"{r['variant']} ")]
        assert line.split()[-4:-1] == [f"{r['ours_ms']:.1f}", f"{r['baseline_ms']:.1f}", f"{r['speedup']:.3f}"]
