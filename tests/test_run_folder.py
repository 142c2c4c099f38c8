"""One run per folder (issue 21, item 3): the save folder's lock, what a folder with checkpoints means, and
``metrics.jsonl`` holding one run.

Every end-to-end case starts from a copy of the same finished 2-iteration run and runs ``train.py``'s body in
process: exit code, the one line, and what the folder holds afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.training import pretrain
from megatron.training.run_folder import LOCK_FILE, RunFolderError, RunLock
from train_helpers import run_training, tiny_config



@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus, neox_tokenizer_file):
    """A finished 2-iteration run: ``run/ckpt`` (global_step2 + latest) and ``run/logs/metrics.jsonl``."""
    root = tmp_path_factory.mktemp("base")
    pretrain(tiny_config(corpus, neox_tokenizer_file, root / "run", train_iters=2,
                         checkpoint__save=str(root / "run" / "ckpt")))
    return root / "run"


@pytest.fixture
def run_dir(base_run, tmp_path):
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def _train(corpus, tokenizer, run_dir, capsys, train_iters=3, **kw):
    kw.setdefault("checkpoint__save", str(run_dir / "ckpt"))
    kw.setdefault("lr_schedule__override_lr_scheduler", True)  # a longer schedule than the base run's
    cfg = tiny_config(corpus, tokenizer, run_dir, train_iters=train_iters, **kw)
    capsys.readouterr()
    rc = run_training(cfg, plot=False)
    out, err = capsys.readouterr()
    return rc, out, err


def _train_rows(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows if "lm_loss" in r]


def test_same_model_without_load_resumes_the_folder(corpus, neox_tokenizer_file, run_dir, capsys):
    rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys)
    assert rc == 0, err
    assert f"resuming {run_dir / 'ckpt'} at iteration 2 (load unset; the folder's own run)" in out
    assert (run_dir / "ckpt" / "latest").read_text() == "global_step3\n"
    assert _train_rows(run_dir) == [1, 2, 3]  # one run: the resumed one appended
    assert not (run_dir / "ckpt" / LOCK_FILE).exists()  # released at exit


def test_another_model_stops_in_one_line_naming_the_choices(corpus, neox_tokenizer_file, run_dir, capsys):
    rows_before = (run_dir / "logs" / "metrics.jsonl").read_text()
    rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys, model__hidden_size=32)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "already holds checkpoints of another model (hidden_size 64 (saved) vs 32" in lines[0]
    assert f"--load {run_dir / 'ckpt'}, choose a new --save, or replace its checkpoints with --overwrite_save true" \
        in lines[0]
    assert (run_dir / "ckpt" / "latest").read_text() == "global_step2\n"
    assert (run_dir / "logs" / "metrics.jsonl").read_text() == rows_before
    assert not (run_dir / "ckpt" / LOCK_FILE).exists()


def test_load_from_elsewhere_into_a_used_folder_stops(corpus, neox_tokenizer_file, run_dir, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run_dir / "ckpt", other)
    rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys, checkpoint__load=str(other))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"already holds the checkpoints of another run, and load names {other}" in err


def test_overwrite_replaces_the_old_run(corpus, neox_tokenizer_file, run_dir, capsys):
    rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys, train_iters=1, model__hidden_size=32,
                          checkpoint__overwrite_save=True)
    assert rc == 0, err
    assert "overwrite_save: removed 1 checkpoint folder(s) of an earlier run" in out
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.is_dir()) == ["global_step1"]
    assert _train_rows(run_dir) == [1]  # the earlier run's rows were moved aside, not mixed in
    moved = list((run_dir / "logs").glob("metrics.prev-*.jsonl"))
    assert len(moved) == 1 and [json.loads(x)["iteration"] for x in moved[0].read_text().splitlines()
                                if "lm_loss" in x] == [1, 2]


def test_a_live_lock_refuses_a_second_run(corpus, neox_tokenizer_file, run_dir, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (run_dir / "ckpt" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                              "started": "2026-01-01T00:00:00Z"}))
        rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys)
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"is in use by another run (pid {holder.pid}, since 2026-01-01T00:00:00Z)" in lines[0]
    assert (run_dir / "ckpt" / "latest").read_text() == "global_step2\n"
    assert json.loads((run_dir / "ckpt" / LOCK_FILE).read_text())["pid"] == holder.pid  # not ours to remove


def test_lock_rules(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "x"}))
    lock = RunLock(tmp_path)
    assert lock.take() == f"{tmp_path / LOCK_FILE}: took over the lock of pid {dead.pid}, which is no longer " \
                          "running (since x)"
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / LOCK_FILE).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "y"}))
    with pytest.raises(RunFolderError, match=r"in use by another run \(pid 1 on elsewhere, since y\).*if that run is "
                                             r"gone, delete"):
        RunLock(tmp_path / "b").take()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_fresh_run_moves_old_metrics_aside(corpus, neox_tokenizer_file, run_dir, capsys):
    # a new save folder, the old log_dir: the new run's metrics.jsonl starts empty
    rc, out, err = _train(corpus, neox_tokenizer_file, run_dir, capsys, train_iters=1,
                          checkpoint__save=str(run_dir / "ckpt-new"))
    assert rc == 0, err
    assert "an earlier run's rows moved to metrics.prev-" in out
    assert _train_rows(run_dir) == [1]
