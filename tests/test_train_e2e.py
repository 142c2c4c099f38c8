"""End-to-end training on real text (slow): loss falls; a SIGKILLed deepy.py run resumes bit-exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megatron.training import pretrain
from train_helpers import make_tiny_corpus, tiny_config, tiny_sepllm_keys

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pg19_dir, neox_tokenizer_file):
    out = tmp_path_factory.mktemp("corpus")
    return make_tiny_corpus(out, sorted(pg19_dir.glob("*.txt"))[1], neox_tokenizer_file, chars=200_000)


@pytest.mark.slow
def test_loss_falls_on_a_pg19_book(corpus, neox_tokenizer_file, tmp_path):
    cfg = tiny_config(corpus, neox_tokenizer_file, tmp_path, train_iters=40, micro=4, seq=64,
                      training__eval_interval=20, training__eval_iters=4)
    result = pretrain(cfg)
    losses = [result.train_losses[i] for i in range(1, 41)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 10.0                      # ~ln(50k): an untrained model
    assert last < first - 2.0, (first, last)
    assert result.valid_losses[40] < result.valid_losses[20] < first


def _run_cfg(corpus: str, tok: Path, run: Path) -> Path:
    cfg = tiny_sepllm_keys(corpus, tok, run, **{
        "lr-decay-iters": 8, "gradient_accumulation_steps": 2, "train-iters": 8, "hidden-dropout": 0.1,
        "num_workers": 1, "eval-interval": 4, "eval-iters": 2, "save": str(run / "ckpt"), "checkpoint-factor": 4,
        "tensorboard-dir": str(run / "tb")})
    path = run / "cfg.yml"
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(l) for l in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in rows if "lm_loss" in r}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_killed_deepy_run_resumes_bit_exactly(corpus, neox_tokenizer_file, tmp_path):
    full = tmp_path / "full"
    cfg = _run_cfg(corpus, neox_tokenizer_file, full)
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(cfg)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (full / "logs" / "loss.png").is_file() and list((full / "tb").glob("events.out.tfevents.*"))
    reference = _losses(full / "logs")
    assert sorted(reference) == list(range(1, 9))

    killed = tmp_path / "killed"
    cfg = _run_cfg(corpus, neox_tokenizer_file, killed)
    victim = subprocess.Popen([sys.executable, "deepy.py", "train.py", str(cfg)], cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    step4 = killed / "ckpt" / "global_step4"
    deadline = time.time() + 500
    while not step4.is_dir() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if victim.poll() is None:
        os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    assert step4.is_dir()

    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(cfg), "--load", str(step4),
                           "--log-dir", str(killed / "logs2")], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    resumed = _losses(killed / "logs2")
    assert sorted(resumed) == [5, 6, 7, 8]
    for it in (5, 6, 7, 8):
        assert resumed[it] == reference[it], (it, resumed[it], reference[it])


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_zero1_run_through_the_deepspeed_launcher_resumes_exactly(corpus, neox_tokenizer_file, tmp_path):
    from megatron.training.distributed import find_free_port

    run = tmp_path / "dp2"
    cfg = _run_cfg(corpus, neox_tokenizer_file, run)
    common = ["--num-gpus", "2", "--zero_optimization.stage", "1"]
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(cfg), *common,
                           "--master-port", str(find_free_port())], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    step4 = run / "ckpt" / "global_step4"
    assert {p.name for p in step4.glob("*_rank*.pt")} == {"optim_rank0.pt", "optim_rank1.pt", "rng_rank0.pt",
                                                          "rng_rank1.pt"}
    reference = _losses(run / "logs")
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(cfg), *common,
                           "--master-port", str(find_free_port()), "--load", str(step4), "--save",
                           str(run / "ckpt2"), "--log-dir", str(run / "logs2")],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = _losses(run / "logs2")
    assert sorted(resumed) == [5, 6, 7, 8]
    assert all(resumed[i] == reference[i] for i in resumed), (resumed, reference)
