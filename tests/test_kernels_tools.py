"""CPU-runnable parts of the GPU tooling: benchmarks/fused_kernels.py (help, argument checks, CPU reference rows
with the fields of the contract) and tools/gpu_check.sh (help, bad argument, dry run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "fused_kernels.py"
CHECK = REPO / "tools" / "gpu_check.sh"
FIELDS = {"kernel", "impl", "shape", "dtype", "pass", "ms", "gb_per_s", "fraction_of_peak", "speedup_vs_eager"}


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin:/usr/local/bin",
                               "CUDA_VISIBLE_DEVICES": ""})  # the CPU behaviour, also on a GPU machine


def test_benchmark_help_and_bad_arguments() -> None:
    out = run(sys.executable, str(BENCH), "--help")
    assert out.returncode == 0
    for flag in ("--device", "--dtype", "--seq-lens", "--kernels", "--impls", "--passes", "--peak-gb-s", "--json"):
        assert flag in out.stdout
    bad = run(sys.executable, str(BENCH), "--hidden", "100", "--heads", "16")
    assert bad.returncode == 2 and "--hidden 100 is not divisible by --heads 16" in bad.stderr
    bad = run(sys.executable, str(BENCH), "--rotary-pct", "0.01")
    assert bad.returncode == 2 and "rotary dims per head" in bad.stderr


def test_benchmark_cpu_rows(tmp_path: Path) -> None:
    path = tmp_path / "fk.json"
    out = run(sys.executable, str(BENCH), "--device", "cpu", "--dtype", "float32", "--seq-lens", "32",
              "--hidden", "64", "--heads", "2", "--kernels", "rope", "add_rmsnorm", "--impls", "fused",
              "--repeats", "2", "--warmup", "1", "--peak-gb-s", "100", "--json", str(path))
    assert out.returncode == 0, out.stderr
    data = json.loads(path.read_text())
    rows = data["rows"]
    assert [(r["kernel"], r["impl"], r["pass"]) for r in rows] == [
        (k, i, p) for k in ("rope", "add_rmsnorm") for p in ("fwd", "fwd+bwd") for i in ("eager", "fused-reference")]
    for r in rows:
        assert set(r) == FIELDS and r["ms"] > 0 and r["dtype"] == "float32"
        assert r["fraction_of_peak"] == pytest.approx(r["gb_per_s"] / 100, abs=1e-4)
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["impl"] == "eager")
    assert rows[0]["shape"] == "b1 s32 h2 d32 r8" and rows[4]["shape"] == "b1 s32 hidden64"
    # rope fwd moves q, k in and out (4 x 32 x 64 float32) plus the cos/sin rows (2 x 32 x 8)
    # the row is rounded to 2 decimals: allow that rounding on top of 2 %
    assert rows[0]["gb_per_s"] == pytest.approx((4 * 32 * 64 + 2 * 32 * 8) * 4 / rows[0]["ms"] / 1e6, rel=0.02,
                                                abs=0.006)
    assert "no CUDA device" in data["kernel_status"] and "fused-reference" in out.stdout


def test_benchmark_cuda_without_gpu_is_one_line_exit_2() -> None:
    out = run(sys.executable, str(BENCH), "--device", "cuda")
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --device cuda but no CUDA device")


def test_gpu_check_dry_run_help_and_bad_argument(tmp_path: Path) -> None:
    target = tmp_path / "results"
    out = run("bash", str(CHECK), "--dry-run", "--out", str(target))
    assert out.returncode == 0, out.stderr
    names = [line.split("]")[0][1:] for line in out.stdout.splitlines() if line.startswith("[")]
    assert names == ["install", "kernels", "gpu_tests", "sep_attention", "long_context", "fused_kernels",
                     "train_step"]
    assert "(budget 460s)" in out.stdout
    assert "pytest tests -m gpu" in out.stdout and "--junitxml" in out.stdout
    assert "benchmarks/fused_kernels.py --device cuda" in out.stdout
    assert "benchmarks/sep_attention.py --device cuda" in out.stdout and "train_step.py --device cuda" in out.stdout
    assert "benchmarks/long_context.py --device cuda" in out.stdout
    assert str(target) in out.stdout and not target.exists()  # a dry run writes nothing
    assert run("bash", str(CHECK), "--help").stdout.startswith("One-command GPU check")
    bad = run("bash", str(CHECK), "--nope")
    assert bad.returncode == 2 and "unknown argument '--nope'" in bad.stderr
    bad = run("bash", str(CHECK), "--budget", "soon")
    assert bad.returncode == 2 and "--budget needs a number of seconds" in bad.stderr
    assert "(budget 90s)" in run("bash", str(CHECK), "--dry-run", "--budget", "90").stdout
