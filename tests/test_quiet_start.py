"""What a user reads when a command starts: no DeepSpeed accelerator / op-build lines, no lm_eval warnings about our
own task files, the first training loss at once, and MFU only against a peak that means something (a configured
``peak_flops`` or a GPU's datasheet; never a matmul rate re-measured per run)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megatron.device import quiet_accelerator_probe
from megatron.training import pretrain
from megatron.training.flops import default_peak_flops
from train_helpers import make_tiny_corpus, tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe only acts without a visible GPU")
def test_the_accelerator_probe_says_cpu_without_a_gpu_and_keeps_a_choice():
    env: dict = {}
    quiet_accelerator_probe(env)
    assert env == {"DS_ACCELERATOR": "cpu"}
    chosen = {"DS_ACCELERATOR": "cuda"}
    quiet_accelerator_probe(chosen)
    assert chosen == {"DS_ACCELERATOR": "cuda"}


def test_deepspeed_starts_without_its_start_up_lines():
    """Importing DeepSpeed and creating its communication layer (what every training process does) prints
    nothing: neither 'Setting accelerator to CPU' nor the shm op's 'built successfully'."""
    code = ("from megatron.device import quiet_accelerator_probe\n"
            "quiet_accelerator_probe()\n"
            "from megatron.training.distributed import init_distributed\n"
            "init_distributed('cpu')\n"
            "import deepspeed.comm\n"
            "assert deepspeed.comm.is_initialized()\n"
            "print('ready')\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "ready\n"
    assert "Setting accelerator" not in proc.stderr and "built successfully" not in proc.stderr, proc.stderr


def test_our_eval_tasks_spell_out_every_metric():
    """lm_eval warns for each metric without ``aggregation`` / ``higher_is_better``: ours give both."""
    for path in sorted((REPO / "eval_tasks").glob("*.yaml")):
        text = "\n".join(l for l in path.read_text().splitlines() if "!function" not in l)
        for metric in yaml.safe_load(text)["metric_list"]:
            assert {"aggregation", "higher_is_better"} <= set(metric), (path.name, metric)


def test_lm_evals_custom_dataset_note_is_dropped_and_nothing_else():
    from megatron.evaluation.runner import _CustomDatasetNote

    note = _CustomDatasetNote()

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("lm_eval.api.task", logging.WARNING, __file__, 1, message, None, None)

    assert not note.filter(record("pg19_local_ppl: Custom kwargs can be passed to `--metadata` in console (as json "
                                  "string) or to the TaskManager."))
    assert note.filter(record("[Task: x] metric acc is defined, but aggregation is not."))


def test_no_mfu_on_cpu_without_a_configured_peak():
    peak, why = default_peak_flops("cpu")
    assert peak is None and "peak_flops" in why


def test_first_iteration_is_printed_at_once_and_the_rows_stay_gpt_neox(tmp_path, neox_tokenizer_file, pg19_books,
                                                                         capsys):
    """log_interval 3: the console shows iteration 1 at once; metrics.jsonl keeps one row per interval (its loss
    the mean of iterations 1-3), and without peak_flops on CPU the row's mfu is null, not a guess."""
    corpus = make_tiny_corpus(tmp_path / "data", pg19_books[0], neox_tokenizer_file, chars=20_000)
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=3, logging__log_interval=3,
                      logging__peak_flops=None)
    result = pretrain(cfg)
    out = capsys.readouterr().out
    first = [line for line in out.splitlines() if line.startswith("iteration 1/3")]
    assert len(first) == 1 and first[0].endswith("(first iteration; then every 3)")
    assert f"lm_loss {result.train_losses[1]:.4f}" in first[0] and "MFU peak: n/a" in out
    rows = [json.loads(l) for l in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "lm_loss" in r]
    assert [r["iteration"] for r in train_rows] == [3] and train_rows[0]["mfu"] is None
    assert train_rows[0]["lm_loss"] == pytest.approx(sum(result.train_losses.values()) / 3, rel=1e-6)
