"""``python -m megatron.config`` exit codes and output, and the generated reference being in sync."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from megatron.config import load_config
from megatron.config.docs import DEFAULT_OUTPUT, REGENERATE, render_reference, undocumented_fields

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "megatron.config", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)


def test_cli_prints_resolved_config(reference_configs_dir: Path) -> None:
    src = reference_configs_dir / "sepllm-160m-on-pythia-with-pile_deduped-n64-kernel.yml"
    proc = _run(str(src), "--train-iters", "20", "--sep_attention_impl", "compact")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["training"]["train_iters"] == 20 and printed["sepllm"]["sep_attention_impl"] == "compact"
    assert printed == load_config(src, overrides=["--train-iters", "20", "--sep_attention_impl", "compact"]).to_dict()
    assert "only selects the fastest execution path" in proc.stderr  # the log of SepLLM decisions
    quiet = _run(str(src), "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("{'num-layers': 2, 'hidden-sise': 64}\n")
    proc = _run(str(bad))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and "unknown key 'hidden-sise'" in proc.stderr
    assert "did you mean 'hidden_size'" in proc.stderr

    syntax = tmp_path / "syntax.yml"
    syntax.write_text("{'num-layers': 2,\n 'x': [1, 2\n}\n")
    proc = _run(str(syntax))
    assert proc.returncode == 2 and "syntax.yml:3:1: YAML syntax error" in proc.stderr

    assert _run(str(tmp_path / "missing.yml")).returncode == 2
    assert _run("--train-iters", "3").returncode == 2  # overrides but no file
    proc = _run(str(bad), "--for-training")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr

    late = tmp_path / "late.yml"  # forced SepLLM changes are logged before the error: still one line
    late.write_text("{'USE_ORIGINAL_FULL_ATTEN': True, 'separator_token_ids': [5], 'mode': 'sepllm'}\n")
    proc = _run(str(late))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "sepllm.mode='sepllm' is derived" in proc.stderr


def test_cli_help() -> None:
    proc = _run("--help")
    assert proc.returncode == 0
    for flag in ("--key value", "--optimizer.params.lr", "--for-training", "--quiet", "--help"):
        assert flag in proc.stdout
    assert _run().returncode == 2


def test_reference_doc_is_in_sync() -> None:
    assert undocumented_fields() == [], "add help texts (the fields' metadata)"
    current = DEFAULT_OUTPUT.read_text(encoding="utf-8") if DEFAULT_OUTPUT.is_file() else ""
    assert current == render_reference(), f"docs/config_reference.md is out of date; regenerate it with: {REGENERATE}"


def test_reference_doc_content() -> None:
    text = render_reference()
    assert "`sep_attention_impl`" in text and "--sep_attention_impl compact" in text
    for key in ("separator_token_ids", "USE_FIXED_SEP_INTERVALs", "train_micro_batch_size_per_gpu", "hostfile",
                "data_cache_dir", "peak_flops", "distributed_backend", "model_parallel_size"):
        assert f"`{key}`" in text
