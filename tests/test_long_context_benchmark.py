"""benchmarks/long_context.py: the promised rows and fields, the ideal-ratio formula on the run's own numbers, an
instrumented attention call that computes exactly what the plain one does, and the budget mode's curves and PNG."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "long_context.py"
TINY = ["--layers", "2", "--hidden", "32", "--heads", "2", "--window", "16", "--threads", "1"]


def _bench():
    spec = importlib.util.spec_from_file_location("long_context_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(tmp_path, tokenizer, *extra):
    return subprocess.run([sys.executable, str(BENCH), *TINY, "--tokenizer", str(tokenizer), *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_timed_backend_is_exact_and_times_forward_and_backward():
    from megatron.config.model import ModelConfig
    from megatron.config.sepllm import SepLLMConfig
    from megatron.sepllm.attention.backend import SepLLMBackend

    bench = _bench()
    cfg = SepLLMConfig(separator_token_ids=[5], mode="sepllm", prefill_windows=[8], generate_windows=[8],
                       init_tok_max_idx=0, sep_attention_impl="compact")
    inner = SepLLMBackend(cfg, ModelConfig(num_layers=1))
    ids = torch.randint(0, 10, (2, 40), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)[None].expand(2, 40)
    gen = torch.Generator().manual_seed(1)
    q, k, v, g = (torch.randn(2, 2, 40, 8, generator=gen, dtype=torch.float64) for _ in range(4))

    def grads(backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        state = backend.prepare(ids, pos, None)
        out = backend(*leaves, 0, state, scale=0.3)
        out.backward(g)
        return out.detach(), [x.grad for x in leaves]

    clock = bench._Clock("cpu")
    timed = bench.TimedBackend(inner, clock)
    timed.enabled = True
    out_t, grads_t = grads(timed)
    assert clock.totals["plan"] > 0 and clock.totals["attention"] > 0
    out_p, grads_p = grads(inner)
    assert torch.equal(out_t, out_p)
    for a, b in zip(grads_t, grads_p):
        assert torch.equal(a, b)
    assert timed.retention is inner.retention          # attributes pass through to the wrapped backend


def test_throughput_rows_fields_and_ideal_formula(tmp_path, neox_tokenizer_file):
    out = tmp_path / "rows.json"
    proc = _run(tmp_path, neox_tokenizer_file, "--seq-lens", "64", "128", "--steps", "1", "--rounds", "2",
                "--warmup", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["attention"], r["seq"]) for r in rows] == [(k, s) for s in (64, 128)
                                                           for k in ("full", "sepllm", "streamingllm")]
    for r in rows:
        assert set(_bench().ROW_FIELDS) <= set(r)
        share, ratio = r["attention_share_full"], r["attention_ratio"]
        assert 0 < share < 1
        assert r["ideal_ratio_vs_full"] == pytest.approx(1.0 / (1.0 - share * (1.0 - ratio)), rel=1e-12)
        assert r["fraction_of_ideal"] == pytest.approx(r["ratio_vs_full"] / r["ideal_ratio_vs_full"], rel=1e-12)
        assert r["tokens_per_sec"] == statistics.median(r["rounds_tokens_per_sec"])
        assert len(r["rounds_tokens_per_sec"]) == 2
        assert 0 < r["attention_ms"] < r["step_ms"] and r["other_ms"] > 0
    for s in (64, 128):
        full, sep, stream = (next(r for r in rows if r["seq"] == s and r["attention"] == k)
                             for k in ("full", "sepllm", "streamingllm"))
        assert full["ratio_vs_full"] == 1.0 and full["attention_ratio"] == 1.0 and full["ideal_ratio_vs_full"] == 1.0
        assert full["plan_ms"] >= 0 and full["impl"] == "sdpa_causal" and sep["impl"] == "compact"
        assert sep["attention_share_full"] == full["attention_share_full"]      # one share per sequence length
        # kept fraction of the causal map: full 1, StreamingLLM (a + w keys) below SepLLM (plus separators)
        assert full["density"] == 1.0 and 0 < stream["density"] < sep["density"] < 1
    assert "ideal" in proc.stdout and "attn_share" in proc.stdout


def test_bad_arguments_exit_2(tmp_path, neox_tokenizer_file):
    proc = _run(tmp_path, neox_tokenizer_file, "--steps", "0")
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --steps must be >= 1, got 0"
    proc = _run(tmp_path, tmp_path / "missing.json")
    assert proc.returncode == 2 and "missing.json: no such file" in proc.stderr


@pytest.mark.slow
def test_budget_mode_curves_and_png(tmp_path, neox_tokenizer_file):
    out, png = tmp_path / "curves.json", tmp_path / "budget.png"
    proc = _run(tmp_path, neox_tokenizer_file, "--seq-lens", "64", "--budget-minutes", "0.03", "--budget-points",
                "2", "--eval-iters", "1", "--plot", str(png), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = json.loads(out.read_text())
    assert [c["attention"] for c in curves] == ["full", "sepllm", "streamingllm"]
    for c in curves:
        assert c["time_s"][-1] >= 0.03 * 60 and c["steps"] >= 1
        assert c["final_valid_loss"] == c["valid_loss"][-1] and math.isfinite(c["final_valid_loss"])
        assert all(b > a for a, b in zip(c["flops"], c["flops"][1:]))
        assert f"{c['attention']:<13} steps" in proc.stdout
    full, sep, stream = curves
    # same tokens cost fewer FLOPs with fewer attention entries
    per_tok = [c["flops"][-1] / c["tokens"][-1] for c in (full, sep, stream)]
    assert per_tok[0] > per_tok[1] > per_tok[2]
