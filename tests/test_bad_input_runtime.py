"""Faults found at run time (issue 9, section 3): each ends in one clear line and an exit code, and loses nothing.

One table: every case starts from a copy of the same finished 2-iteration run (checkpoint ``global_step2``,
``latest`` naming it), applies a fault, runs ``train.py``'s body (in-process; the SIGINT case as a real subprocess)
and checks the exit code, the one error line, and that the previous checkpoint still loads with the same weights,
``latest`` is unchanged (or advanced to the checkpoint the case is expected to write) and no temp folder is left.
Then ZeRO-3 save / exact resume, metrics.jsonl after a resume, and text the writers cannot encode.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from megatron.checkpoint.format import read_meta, resolve_checkpoint_dir
from megatron.training import checkpointing, pretrain
from megatron.training.logging import RunLogger
from megatron.training.plotting import read_metrics, series
from train_helpers import run_training, tiny_config, tiny_sepllm_keys

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus, neox_tokenizer_file):
    """A finished 2-iteration run: ``ckpt/global_step2`` + ``latest``; its weights for the nothing-lost check."""
    root = tmp_path_factory.mktemp("base")
    cfg = tiny_config(corpus, neox_tokenizer_file, root, train_iters=2, checkpoint__save=str(root / "ckpt"))
    pretrain(cfg)
    weights = torch.load(root / "ckpt" / "global_step2" / "model_states.pt", weights_only=True)
    return root / "ckpt", weights


@dataclass
class Ctx:
    """What a case gets: its own copy of the base checkpoint and helpers to build the config it runs."""

    tmp: Path
    save: Path
    corpus: str
    tokenizer: Path
    monkeypatch: pytest.MonkeyPatch
    expect_latest: str = "global_step2"
    extra: dict = field(default_factory=dict)

    def cfg(self, **kw):
        kw.setdefault("checkpoint__save", str(self.save))
        kw.setdefault("checkpoint__load", str(self.save))
        # the cases resume the 2-iteration base run with train_iters 3: a longer schedule, which GPT-NeoX accepts
        # only with override_lr_scheduler
        kw.setdefault("lr_schedule__override_lr_scheduler", True)
        return tiny_config(self.corpus, self.tokenizer, self.tmp / "run", train_iters=kw.pop("train_iters", 3), **kw)


def _in_process(cfg_fn: Callable[[Ctx], object]) -> Callable[[Ctx, pytest.CaptureFixture], tuple[int, str, str]]:
    def run(ctx: Ctx, capsys) -> tuple[int, str, str]:
        cfg = cfg_fn(ctx)
        capsys.readouterr()
        rc = run_training(cfg, plot=False)
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def _not_a_folder(ctx: Ctx, key: str):
    blocker = ctx.tmp / "a-file"
    blocker.write_text("a file where a folder is expected\n")
    return ctx.cfg(**{key: str(blocker / "sub")})


def _disk_full_mid_save(ctx: Ctx):
    real = checkpointing._torch_save
    calls = []

    def write(obj, path):
        calls.append(Path(path).name)
        if Path(path).name.startswith("optim_rank"):  # model_states.pt is already on disk: a truly partial folder
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(obj, path)

    ctx.monkeypatch.setattr(checkpointing, "_torch_save", write)
    ctx.extra["calls"] = calls
    return ctx.cfg(train_iters=3)


def _disk_too_small(ctx: Ctx):
    real = shutil.disk_usage

    def usage(path):  # the write probe passes (64 KiB), one checkpoint (26 MB of fp32 weights) cannot fit
        return real(path)._replace(free=1 << 20) if Path(path) == ctx.save else real(path)

    ctx.monkeypatch.setattr(shutil, "disk_usage", usage)
    return ctx.cfg(train_iters=3)


def _binary_latest(ctx: Ctx):
    garbage = b"\x89PNG\r\n\x1a\n\xff\xfe\x00garbage"
    (ctx.save / "latest").write_bytes(garbage)
    ctx.extra["latest"] = garbage  # the fault itself: the run must leave it as it found it
    return ctx.cfg()


def _sigint_subprocess(ctx: Ctx, capsys) -> tuple[int, str, str]:
    keys = tiny_sepllm_keys(ctx.corpus, ctx.tokenizer, ctx.tmp / "run", **{
        "train-iters": 10_000, "save": str(ctx.save), "load": str(ctx.save), "checkpoint-factor": 100_000,
        "override_lr_scheduler": True})  # a longer schedule than the base run's: GPT-NeoX needs the override
    cfg_file = ctx.tmp / "run.yml"
    cfg_file.write_text(yaml.safe_dump(keys))
    metrics = ctx.tmp / "run" / "logs" / "metrics.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(cfg_file)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # wait until it has trained past the checkpoint
        if metrics.exists() and any(json.loads(line).get("iteration", 0) >= 4
                                    for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    trained = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines() if "lm_loss" in line]
    ctx.expect_latest = f"global_step{trained[-1]}"  # the stop is at the boundary after the last logged iteration
    return proc.returncode, out, err


def _deepy_log_dir_blocked(ctx: Ctx, capsys) -> tuple[int, str, str]:
    blocker = ctx.tmp / "a-file"
    blocker.write_text("a file where a folder is expected\n")
    keys = tiny_sepllm_keys(ctx.corpus, ctx.tokenizer, ctx.tmp / "run", **{
        "save": str(ctx.save), "load": str(ctx.save), "log_dir": str(blocker / "logs")})
    cfg_file = ctx.tmp / "run.yml"
    cfg_file.write_text(yaml.safe_dump(keys))
    proc = subprocess.run([sys.executable, str(REPO / "deepy.py"), "train.py", str(cfg_file)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stdout, proc.stderr


def _already_done(ctx: Ctx):
    return ctx.cfg(train_iters=2)


# id, how to run it, exit code, substring of the one message line (stderr for errors, stdout for success)
CASES = [
    ("save-not-writable", _in_process(lambda c: _not_a_folder(c, "checkpoint__save")), 2,
     "error: checkpoint.save: cannot write to"),
    ("log-dir-not-writable", _in_process(lambda c: _not_a_folder(c, "logging__log_dir")), 2,
     "error: logging.log_dir: cannot write to"),
    ("deepy-log-dir-not-writable", _deepy_log_dir_blocked, 2, "error: logging.log_dir: cannot write to "),
    ("disk-full-mid-save", _in_process(_disk_full_mid_save), 1,
     "error: saving checkpoint global_step3 in {save} failed: No space left on device (ENOSPC)"),
    ("disk-too-small", _in_process(_disk_too_small), 2,
     "error: checkpoint.save: {save} has 0.00 GiB free, less than the 0.02 GiB of one checkpoint's weights alone"),
    ("binary-latest", _in_process(_binary_latest), 2,
     "error: {save}/latest is not a text file (binary content, 18 bytes); expected one line naming a global_stepN"),
    ("already-done", _in_process(_already_done), 0,
     "checkpoint at iteration 2 already reached train_iters 2: nothing to train; raise --train-iters to continue"),
    ("sigint", _sigint_subprocess, 130, "interrupted: stopped by SIGINT after iteration "),
]


@pytest.mark.parametrize("name,run,code,message", CASES, ids=[c[0] for c in CASES])
def test_fault_ends_in_one_line_and_loses_nothing(name, run, code, message, base_run, corpus, neox_tokenizer_file,
                                                  tmp_path, monkeypatch, capsys):
    base_ckpt, base_weights = base_run
    save = tmp_path / "ckpt"
    shutil.copytree(base_ckpt, save)
    latest_before = (save / "latest").read_bytes()
    ctx = Ctx(tmp_path, save, corpus, neox_tokenizer_file, monkeypatch)

    rc, out, err = run(ctx, capsys)

    message = message.format(save=save)
    assert rc == code, (out, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 0:
        assert message in out and not err.strip()
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], err
    if name.endswith("not-writable"):
        assert "model:" not in out  # found before the model (and data) were built
    if name == "disk-too-small":
        assert "iteration 3" not in out and "resumed from" not in out  # before the checkpoint load and training
    if name == "disk-full-mid-save":
        assert ctx.extra["calls"][-2:] == ["model_states.pt", "optim_rank0.pt"]  # failed half-way through the save
    if name == "sigint":
        assert f"saved; resume with --load {save}" in err
        assert int(ctx.expect_latest.removeprefix("global_step")) >= 4

    # nothing lost: latest unchanged (or advanced to the checkpoint this case writes), no temp folder, and the
    # previous checkpoint loads with its original weights
    if ctx.expect_latest == "global_step2":
        assert (save / "latest").read_bytes() == ctx.extra.get("latest", latest_before)
    else:
        assert (save / "latest").read_text() == ctx.expect_latest + "\n"
        assert read_meta(resolve_checkpoint_dir(save))["iteration"] == int(ctx.expect_latest[len("global_step"):])
    assert not [p.name for p in save.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    expected_dirs = {"global_step2", ctx.expect_latest}
    assert {p.name for p in save.iterdir() if p.is_dir()} == expected_dirs
    previous = save / "global_step2"
    assert read_meta(previous)["iteration"] == 2
    weights = torch.load(previous / "model_states.pt", weights_only=True)
    assert weights.keys() == base_weights.keys()
    assert all(torch.equal(weights[k], base_weights[k]) for k in weights)


def test_zero3_saves_and_resumes_on_the_uninterrupted_loss_curve(corpus, neox_tokenizer_file, tmp_path,
                                                                    base_run):
    kw = dict(training__zero_optimization={"stage": 3}, training__zero_stage=3, model__hidden_dropout=0.1)
    full = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "a", train_iters=4,
                                checkpoint__save=str(tmp_path / "ck"), checkpoint__checkpoint_factor=2, **kw))
    assert [Path(p).name for p in full.checkpoints] == ["global_step2", "global_step4"]
    meta = read_meta(tmp_path / "ck" / "global_step2")
    assert meta["zero_stage"] == 3
    # the module state is the full model: the keys and shapes of a ZeRO-0 checkpoint, not a partition
    saved = torch.load(tmp_path / "ck" / "global_step2" / "model_states.pt", weights_only=True)
    shapes = {k: list(v.shape) for k, v in base_run[1].items()}
    assert {k: list(v.shape) for k, v in saved.items()} == shapes == meta["param_shapes"]
    from megatron.checkpoint.trained import load_trained_model  # converts like any other checkpoint

    trained = load_trained_model(tmp_path / "ck", iteration=2)
    assert all(torch.equal(v, saved[k]) for k, v in trained.model.state_dict().items())

    resumed = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "b", train_iters=4,
                                   checkpoint__load=str(tmp_path / "ck" / "global_step2"), **kw))
    assert sorted(resumed.train_losses) == [3, 4]
    assert {i: resumed.train_losses[i] for i in (3, 4)} == {i: full.train_losses[i] for i in (3, 4)}

    # weights only (no_load_optim): the gathered module state goes into the partitions (iteration 3 sees the same
    # weights, data and dropout as the full run) and into the fp32 master copy: the first step of a fresh AdamW moves
    # each weight by the LR (2.325e-3 at iteration 3: cosine after n = 2 of 4 steps, warmup 1) times 1 + weight
    # decay x |w| (< 2 %), whereas a stale master (the initial weights) would land two steps (3e-3 + 3e-3) away from
    # global_step2
    ft = pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "c", train_iters=3,
                              checkpoint__load=str(tmp_path / "ck" / "global_step2"), checkpoint__no_load_optim=True,
                              checkpoint__save=str(tmp_path / "ck3"), lr_schedule__lr_decay_iters=4, **kw))
    assert ft.train_losses == {3: full.train_losses[3]}
    after = torch.load(tmp_path / "ck3" / "global_step3" / "model_states.pt", weights_only=True)
    step = max(float((saved[k] - after[k]).abs().max()) for k in saved)
    assert 2.325e-3 <= step <= 2.325e-3 * 1.02


def test_metrics_rows_replayed_after_resume_are_dropped(corpus, neox_tokenizer_file, tmp_path):
    ck, logs = tmp_path / "ck", tmp_path / "run" / "logs"
    pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "run", train_iters=4, checkpoint__save=str(ck),
                         checkpoint__checkpoint_factor=2, training__eval_interval=2))
    first = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    pretrain(tiny_config(corpus, neox_tokenizer_file, tmp_path / "run", train_iters=4, checkpoint__save=str(ck),
                         checkpoint__load=str(ck / "global_step2"), training__eval_interval=2))
    rows = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
    train_its = [r["iteration"] for r in rows if "lm_loss" in r]
    assert train_its == [1, 2, 3, 4]  # 3 and 4 of the first run were dropped, then logged again
    assert [r["iteration"] for r in rows if "valid_lm_loss" in r] == [2, 4]
    assert rows[:3] == first[:3]  # rows up to the resumed iteration are kept as written


def test_plot_reads_one_curve_from_an_appended_file(tmp_path):
    logger = RunLogger(tmp_path)
    for it in (1, 2, 3, 4):  # the first run: crashed after 4, checkpoint at 2
        logger.log({"iteration": it, "lm_loss": 10.0 - it}, console=False)
    logger.log({"iteration": 4, "valid_lm_loss": 7.5}, console=False)
    for it in (3, 4, 5):  # resumed at 2 by an older trainer that appended without dropping
        logger.log({"iteration": it, "lm_loss": 20.0 - it}, console=False)
    logger.close()
    rows = read_metrics(tmp_path)
    assert series(rows, "lm_loss") == ([1, 2, 3, 4, 5], [9.0, 8.0, 17.0, 16.0, 15.0])
    assert series(rows, "valid_lm_loss") == ([], [])  # belonged to the abandoned continuation


def test_text_the_writers_cannot_encode(tmp_path, neox_tokenizer_file, capsys):
    # metrics.jsonl stays valid UTF-8 JSON whatever string a caller logs
    logger = RunLogger(tmp_path)
    logger.log({"iteration": 1, "note": "a\ud800b", "lm_loss": 1.0}, console=False)
    logger.close()
    raw = (tmp_path / "metrics.jsonl").read_bytes()
    assert json.loads(raw.decode("utf-8", errors="strict"))["note"] == "a\ufffdb"
    # a JSONL input with a lone surrogate escape: one line naming file, line and key (was a TypeError)
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine."}\n{"text": "bad \\ud800 text"}\n', encoding="utf-8")
    from megatron.data.cli_utils import run_cli
    from megatron.data.preprocess import tokenize_to_indexed

    rc = run_cli(lambda argv: tokenize_to_indexed(str(src), str(tmp_path / "out"), tokenizer_type="HFTokenizer",
                                                  vocab_file=str(neox_tokenizer_file), progress=False) and 0,
                 "prepare_data.py", [])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (f"prepare_data.py: error: {src}:2: key 'text' holds a lone UTF-16 surrogate \\ud800 at "
                      "character 4, which is not text; fix or drop the record")
    assert not list(tmp_path.glob("out*"))


def _two_rank_faults(rank: int, world_size: int, cfgs: dict, out: str) -> None:
    """Per rank: ZeRO-3 save/resume, ENOSPC on rank 1 only, SIGINT to rank 1 only; results as JSON per rank."""
    from megatron.training import steppers
    from megatron.training.checkpointing import CheckpointSaveError
    from megatron.training.interrupt import TrainingInterrupted

    result: dict = {"full": pretrain(cfgs["full"]).train_losses, "resumed": pretrain(cfgs["resumed"]).train_losses}

    real_save = checkpointing._torch_save

    def full_disk_on_rank1(obj, path):
        if rank == 1 and Path(path).name.startswith("optim_rank"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_save(obj, path)

    checkpointing._torch_save = full_disk_on_rank1
    try:
        pretrain(cfgs["disk_full"])
    except CheckpointSaveError as exc:
        result["disk_full"] = str(exc)
    finally:
        checkpointing._torch_save = real_save

    real_step = steppers.train_step
    steps = [0]

    def signal_rank1_in_iteration_2(*args, **kwargs):
        steps[0] += 1
        if rank == 1 and steps[0] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-iteration, on one rank only
        return real_step(*args, **kwargs)

    steppers.train_step = signal_rank1_in_iteration_2
    try:
        pretrain(cfgs["sigint"])
    except TrainingInterrupted as exc:
        result["sigint"] = [str(exc), exc.exit_code]
    finally:
        steppers.train_step = real_step
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.distributed
def test_two_ranks_zero3_resume_and_faults_on_one_rank(corpus, neox_tokenizer_file, tmp_path):
    """DP=2 under ZeRO-3: the resumed run repeats the uninterrupted losses; a full disk on rank 1 only and a SIGINT
    to rank 1 only end both ranks the same way (no hang), with the same checkpoints left behind."""
    from parallel_spawn import run_distributed

    z3 = dict(training__zero_optimization={"stage": 3}, training__zero_stage=3, micro=1)
    ck, ck2 = tmp_path / "ck", tmp_path / "ck2"
    cfgs = {
        "full": tiny_config(corpus, neox_tokenizer_file, tmp_path / "full", train_iters=4, checkpoint__save=str(ck),
                            checkpoint__checkpoint_factor=2, **z3),
        "resumed": tiny_config(corpus, neox_tokenizer_file, tmp_path / "res", train_iters=4,
                               checkpoint__load=str(ck / "global_step2"), **z3),
        "disk_full": tiny_config(corpus, neox_tokenizer_file, tmp_path / "df", train_iters=5, checkpoint__load=str(ck),
                                 checkpoint__save=str(ck), lr_schedule__override_lr_scheduler=True, **z3),
        "sigint": tiny_config(corpus, neox_tokenizer_file, tmp_path / "sig", train_iters=50,
                              checkpoint__save=str(ck2), checkpoint__checkpoint_factor=100, **z3),
    }
    run_distributed(_two_rank_faults, 2, cfgs, str(tmp_path), timeout=300)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    full = {int(k): v for k, v in results[0]["full"].items()}
    resumed = {int(k): v for k, v in results[0]["resumed"].items()}
    assert sorted(resumed) == [3, 4] and resumed == {i: full[i] for i in (3, 4)}
    assert read_meta(ck / "global_step4")["world_size"] == 2
    assert sorted(p.name for p in (ck / "global_step4").glob("optim_rank*.pt")) == ["optim_rank0.pt",
                                                                                    "optim_rank1.pt"]
    for res in results:  # both ranks fail the same save with rank 1's error
        assert res["disk_full"].startswith(f"saving checkpoint global_step5 in {ck} failed: rank 1: No space left on "
                                           "device (ENOSPC)")
    assert (ck / "latest").read_text() == "global_step4\n"
    assert sorted(p.name for p in ck.iterdir()) == ["global_step2", "global_step4", "latest"]
    msgs = [res["sigint"] for res in results]
    assert msgs[1] == [f"stopped by SIGINT after iteration 2: checkpoint {ck2 / 'global_step2'} saved; resume with "
                       f"--load {ck2}", 130]
    assert msgs[0][0].startswith("stopped by a signal on another rank after iteration 2: ")
    assert (ck2 / "latest").read_text() == "global_step2\n" and read_meta(ck2 / "global_step2")["iteration"] == 2


def test_checkpoint_space_estimate_and_warning(tmp_path, monkeypatch):
    from megatron.training.preflight import OutputPathError, check_checkpoint_space, checkpoint_bytes

    # weights + two fp32 moments, then the layout-free copy (fp32 masters + moments) any layout resumes from
    assert checkpoint_bytes(1000, "fp32", 0, "AdamW") == (4000, 12_000 + 12_000)
    assert checkpoint_bytes(1000, "bf16", 1, "Adam") == (2000, 14_000 + 12_000)    # + the fp32 master copy
    assert checkpoint_bytes(1000, "fp32", 3, "SGD", momentum=0.9) == (4000, 12_000 + 8000)
    assert checkpoint_bytes(1000, "fp32", 0, "SGD") == (4000, 4000 + 4000)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=3 * 1024 ** 3))
    assert check_checkpoint_space(tmp_path, 2 * 1024 ** 3, 2 * 1024 ** 3) is None
    assert check_checkpoint_space(tmp_path, 2 * 1024 ** 3, 4 * 1024 ** 3) == (
        f"checkpoint.save: {tmp_path} has 3.00 GiB free, one checkpoint is expected to take about 4.00 GiB (weights "
        "+ optimizer state): the first save may fail")
    with pytest.raises(OutputPathError, match=r"has 3.00 GiB free, less than the 4.00 GiB of one checkpoint's"):
        check_checkpoint_space(tmp_path, 4 * 1024 ** 3, 8 * 1024 ** 3)


def test_stop_request_second_signal_rules():
    """Ctrl-C sets the flag; the launcher's SIGTERM that follows is no second request; Ctrl-C again aborts."""
    from megatron.training.interrupt import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed("cpu") and stop.signal_name == "SIGINT" and stop.exit_code == 130
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt, match="second SIGINT: abort without saving"):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exit_code == 143
