"""``checkpoint_async: true`` (issue 21, item 5): the same checkpoints as synchronous saves, a failed background write
ends the run in one line (exit 1), and a process killed mid-write keeps the previous checkpoint loadable."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from megatron.checkpoint.format import read_meta, resolve_checkpoint_dir
from megatron.training import checkpointing, pretrain
from train_helpers import run_training, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _cfg(corpus, tokenizer, root: Path, name: str, asynchronous: bool, **kw):
    return tiny_config(corpus, tokenizer, root / name, train_iters=kw.pop("train_iters", 4),
                       checkpoint__save=str(root / name / "ckpt"), checkpoint__checkpoint_factor=2,
                       checkpoint__checkpoint_async=asynchronous, **kw)


def test_async_saves_equal_sync_saves(corpus, neox_tokenizer_file, tmp_path, capsys):
    sync = pretrain(_cfg(corpus, neox_tokenizer_file, tmp_path, "sync", False))
    capsys.readouterr()
    asyn = pretrain(_cfg(corpus, neox_tokenizer_file, tmp_path, "async", True))
    out = capsys.readouterr().out
    assert "checkpoint global_step2: state copied in" in out and "written in the background in" in out
    assert [Path(p).name for p in asyn.checkpoints] == [Path(p).name for p in sync.checkpoints] == \
        ["global_step2", "global_step4"]
    assert asyn.train_losses == sync.train_losses
    for step in ("global_step2", "global_step4"):  # the state of the save iteration, not of a later step
        for name in ("model_states.pt", "optim_rank0.pt", "rng_rank0.pt"):
            a = torch.load(tmp_path / "async" / "ckpt" / step / name, weights_only=True)
            b = torch.load(tmp_path / "sync" / "ckpt" / step / name, weights_only=True)
            assert _equal(a, b), (step, name)
    assert (tmp_path / "async" / "ckpt" / "latest").read_text() == "global_step4\n"


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_a_failed_background_write_ends_the_run_in_one_line(corpus, neox_tokenizer_file, tmp_path, monkeypatch,
                                                             capsys):
    real = checkpointing._torch_save

    def write(obj, path):
        if Path(path).parent.name.startswith("global_step4.tmp-") and Path(path).name == "optim_rank0.pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    monkeypatch.setattr(checkpointing, "_torch_save", write)
    cfg = _cfg(corpus, neox_tokenizer_file, tmp_path, "run", True)
    capsys.readouterr()
    rc = run_training(cfg, plot=False)
    out, err = capsys.readouterr()
    save = tmp_path / "run" / "ckpt"
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: saving checkpoint global_step4 in {save} failed: No "
                                                   "space left on device (ENOSPC)"), err
    assert (save / "latest").read_text() == "global_step2\n"
    assert sorted(p.name for p in save.iterdir()) == ["global_step2", "latest"]  # no temp folder, lock released


CRASH = """
import os, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from megatron.training import checkpointing, pretrain
from train_helpers import tiny_config
real = checkpointing._torch_save
def write(obj, path):
    if Path(path).parent.name.startswith("global_step4.tmp-") and Path(path).name == "optim_rank0.pt":
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        os._exit(17)  # the process dies in the middle of the background write
    real(obj, path)
checkpointing._torch_save = write
pretrain(tiny_config({corpus!r}, Path({tokenizer!r}), Path({run!r}), train_iters=6,
                     checkpoint__save={save!r}, checkpoint__checkpoint_factor=2, checkpoint__checkpoint_async=True))
"""


def test_a_crash_during_the_background_write_keeps_the_previous_checkpoint(corpus, neox_tokenizer_file, tmp_path):
    save = tmp_path / "run" / "ckpt"
    script = CRASH.format(tests=str(REPO / "tests"), corpus=corpus, tokenizer=str(neox_tokenizer_file),
                          run=str(tmp_path / "run"), save=str(save))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 17, proc.stderr[-3000:]
    assert (save / "latest").read_text() == "global_step2\n"
    assert any(p.name.startswith("global_step4.tmp-") for p in save.iterdir())  # the half-written checkpoint
    assert read_meta(resolve_checkpoint_dir(save))["iteration"] == 2
    # the next run into the folder takes over the dead run's lock, resumes global_step2 and prunes the leftover
    result = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "run", train_iters=6,
                                  checkpoint__save=str(save), checkpoint__checkpoint_factor=2))
    assert sorted(result.train_losses) == [3, 4, 5, 6]
    assert (save / "latest").read_text() == "global_step6\n"
    assert not [p.name for p in save.iterdir() if ".tmp-" in p.name]


def _two_ranks(rank: int, world_size: int, cfgs: dict) -> None:
    for cfg in cfgs.values():
        pretrain(cfg)


@pytest.mark.distributed
def test_two_ranks_async_saves_equal_sync_saves(corpus, neox_tokenizer_file, tmp_path):
    """DP=2 under ZeRO-1: every rank writes its optimizer partition in the background, the publish waits for both."""
    from parallel_spawn import run_distributed

    z1 = dict(training__zero_optimization={"stage": 1}, training__zero_stage=1, micro=1)
    cfgs = {mode: _cfg(corpus, neox_tokenizer_file, tmp_path, mode, mode == "async", **z1) for mode in ("sync", "async")}
    run_distributed(_two_ranks, 2, cfgs, timeout=300)
    for step in ("global_step2", "global_step4"):
        names = sorted(p.name for p in (tmp_path / "sync" / "ckpt" / step).iterdir() if p.suffix == ".pt")
        assert {"optim_rank0.pt", "optim_rank1.pt"} <= set(names)
        assert names == sorted(p.name for p in (tmp_path / "async" / "ckpt" / step).iterdir() if p.suffix == ".pt")
        for name in names:
            a = torch.load(tmp_path / "async" / "ckpt" / step / name, weights_only=True)
            b = torch.load(tmp_path / "sync" / "ckpt" / step / name, weights_only=True)
            assert _equal(a, b), (step, name)
    assert (tmp_path / "async" / "ckpt" / "latest").read_text() == "global_step4\n"
    assert not [p.name for p in (tmp_path / "async" / "ckpt").iterdir() if ".tmp-" in p.name or p.name.startswith(".")]


SIGTERM = """
import runpy, sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from megatron.training import checkpointing
from train_helpers import tiny_config
real = checkpointing._torch_save
def write(obj, path):
    if Path(path).parent.name.startswith("global_step2.tmp-"):
        time.sleep(1.0)  # a slow disk: the write outlasts the next iterations and the signal
    real(obj, path)
checkpointing._torch_save = write
run_training = runpy.run_path({train!r}, run_name="train_script")["run_training"]
sys.exit(run_training(tiny_config({corpus!r}, Path({tokenizer!r}), Path({run!r}), train_iters=10_000,
                                  checkpoint__save={save!r}, checkpoint__checkpoint_factor=2,
                                  checkpoint__checkpoint_async=True), plot=False))
"""


def test_sigterm_waits_for_the_background_write(corpus, neox_tokenizer_file, tmp_path):
    save = tmp_path / "run" / "ckpt"
    script = SIGTERM.format(tests=str(REPO / "tests"), train=str(REPO / "train.py"), corpus=corpus,
                            tokenizer=str(neox_tokenizer_file), run=str(tmp_path / "run"), save=str(save))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in proc.stdout:  # the signal arrives while global_step2 is being written
        if line.startswith("checkpoint global_step2: state copied"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    assert "saved checkpoint" in out and f"{save / 'global_step2'} (written in the background" in out
    stopped = err.strip().splitlines()[-1]
    assert stopped.startswith("interrupted: stopped by SIGTERM after iteration "), err
    step = int(stopped.split("after iteration ")[1].split(":")[0])
    assert (save / "latest").read_text() == f"global_step{step}\n"
    assert read_meta(save / "global_step2")["iteration"] == 2 and read_meta(save / f"global_step{step}")
    assert not [p.name for p in save.iterdir() if ".tmp-" in p.name]
