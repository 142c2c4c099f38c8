"""Launcher: hostfile / include / exclude validation, the exact command lines for each runner, worker env."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.config import LauncherConfig, NeoXConfig
from megatron.training.launch import (LaunchError, build_deepspeed_command, check_launch, launch_world_size,
                                      parse_hostfile, rank_env_from_launcher, select_resources, worker_env)

REPO = Path(__file__).resolve().parents[1]


def _hostfile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostfile"
    path.write_text(text)
    return path


def _cfg(**launcher) -> NeoXConfig:
    cfg = NeoXConfig()
    for key, value in launcher.items():
        setattr(cfg.launcher, key, value)
    return cfg


def _resolve_all(host: str) -> str:
    return "10.0.0.1"


def test_hostfile_parsing_and_errors(tmp_path):
    good = _hostfile(tmp_path, "# cluster\nworker-0 slots=4\n\nworker-1 slots=2  # half node\n")
    assert parse_hostfile(good) == {"worker-0": 4, "worker-1": 2}
    cases = {"worker-0 slots=4\nworker-0 slots=2\n": "line 2: host worker-0 is listed twice",
             "worker-0 slots=0\n": "line 1: host worker-0 has slots=0; expected >= 1",
             "worker-0 4\n": "line 1: 'worker-0 4': expected 'HOST slots=N'",
             "# nothing\n": "no 'HOST slots=N' lines"}
    for text, message in cases.items():
        with pytest.raises(LaunchError, match=message):
            parse_hostfile(_hostfile(tmp_path, text))
    with pytest.raises(LaunchError, match="no such file"):
        parse_hostfile(tmp_path / "missing")


def test_resource_selection_matches_deepspeed():
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    pool = {"worker-0": 4, "worker-1": 4, "worker-2": 2}
    for include, exclude in [("worker-0:0,1@worker-2", None), (None, "worker-1"), (None, "worker-0:3@worker-2:0"),
                             ("worker-1", None)]:
        ours = select_resources(pool, include, exclude)
        theirs = parse_inclusion_exclusion(dict(pool), include or "", exclude or "")
        assert ours == {h: list(s) for h, s in theirs.items()}, (include, exclude)
    assert select_resources(pool, num_nodes=2, num_gpus=1) == {"worker-0": [0], "worker-1": [0]}
    with pytest.raises(LaunchError, match="host 'worker-9' is not in the hostfile"):
        select_resources(pool, include="worker-9")
    with pytest.raises(LaunchError, match=r"host worker-2 has slots 0..1, not \[5\]"):
        select_resources(pool, exclude="worker-2:5")
    with pytest.raises(LaunchError, match="num_nodes=4, but only 3"):
        select_resources(pool, num_nodes=4)


def test_check_launch_world_size_and_resolution(tmp_path):
    hf = _hostfile(tmp_path, "worker-0 slots=3\n")
    cfg = _cfg(hostfile=str(hf))
    assert launch_world_size(cfg.launcher, 0) == 3  # the layout of 3 ranks is checked by config validation
    cfg.launcher.num_gpus = 2
    assert check_launch(cfg, 0, resolve=_resolve_all) == {"worker-0": [0, 1]}
    assert launch_world_size(cfg.launcher, 0) == 2

    def fail(host):
        raise socket.gaierror(host)

    with pytest.raises(LaunchError, match="host\\(s\\) worker-0 do not resolve"):
        check_launch(cfg, 0, resolve=fail)
    assert launch_world_size(_cfg(num_gpus=3).launcher, 0) == 3  # no CUDA device: 3 CPU processes
    with pytest.raises(LaunchError, match=r"num_gpus=3, but only 2 CUDA device\(s\) are visible"):
        check_launch(_cfg(num_gpus=3), 2)
    with pytest.raises(LaunchError, match="no_ssh needs node_rank"):
        check_launch(_cfg(hostfile=str(hf), no_ssh=True), 0, resolve=_resolve_all)
    with pytest.raises(LaunchError, match="launcher='torque'"):
        check_launch(_cfg(launcher="torque"), 0)


def _runner_cmd(lc: LauncherConfig, pool: dict, active: dict, exports: dict):
    """What DeepSpeed's multi-node runner makes of our command line (cross-check of the flags we pass)."""
    from deepspeed.launcher import multinode_runner as mr
    from deepspeed.launcher.runner import parse_args

    args = parse_args(build_deepspeed_command(lc, "train.py", ["r.yml"])[3:])
    cls = {"pdsh": mr.PDSHRunner, "openmpi": mr.OpenMPIRunner, "mvapich": mr.MVAPICHRunner,
           "slurm": mr.SlurmRunner}[args.launcher]
    runner = cls(args, "WORLD") if cls is mr.PDSHRunner else cls(args, "WORLD", pool)
    for key, value in exports.items():
        runner.add_export(key, value)
    out = runner.get_cmd({}, active)
    return args, (out[0] if isinstance(out, tuple) else out)


@pytest.mark.parametrize("launcher", ["pdsh", "openmpi", "mvapich", "slurm"])
def test_exact_command_lines_per_launcher(launcher):
    lc = LauncherConfig(hostfile="/job/hostfile", launcher=launcher, master_addr="10.0.0.1", master_port=29600,
                        comment="sepllm" if launcher == "slurm" else None)
    cmd = build_deepspeed_command(lc, "train.py", ["r.yml"])
    expected = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "/job/hostfile", "--master_port", "29600", "--master_addr", "10.0.0.1",
                "--launcher", launcher]
    assert cmd == expected + (["--launcher_args=--comment=sepllm"] if launcher == "slurm" else []) + ["train.py", "r.yml"]
    pool = {"worker-0": 2, "worker-1": 2}
    active = {"worker-0": [0, 1], "worker-1": [0, 1]}
    args, runner_cmd = _runner_cmd(lc, pool, active, {"WANDB_API_KEY": "k"})
    assert args.launcher == launcher and runner_cmd[-2:] == ["train.py", "r.yml"]
    if launcher == "pdsh":
        assert runner_cmd[:4] == ["pdsh", "-S", "-f", "1024"] and "worker-0,worker-1" in runner_cmd
        assert "export WANDB_API_KEY=k;" in " ".join(runner_cmd)
        assert "--master_addr=10.0.0.1" in runner_cmd and "--master_port=29600" in runner_cmd
    elif launcher == "openmpi":
        assert runner_cmd[:5] == ["mpirun", "-n", "4", "-hostfile", "/job/hostfile"]
        assert ["-x", "WANDB_API_KEY=k"] == runner_cmd[runner_cmd.index("WANDB_API_KEY=k") - 1:][:2]
    elif launcher == "mvapich":
        assert runner_cmd[:3] == ["mpirun", "-np", "4"]
        assert "WANDB_API_KEY=k" in " ".join(runner_cmd)
    else:
        assert runner_cmd[:3] == ["srun", "-n", "4"] and runner_cmd[3] == "--comment=sepllm"
        assert any(part.startswith("--export=ALL") and "WANDB_API_KEY=k" in part for part in runner_cmd)


def test_no_ssh_single_machine_command_and_worker_env():
    lc = LauncherConfig(hostfile="hf", no_ssh=True, node_rank=0, master_addr="127.0.0.1", master_port=29700)
    assert build_deepspeed_command(lc, "train.py", ["r.yml"]) == [
        sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", "hf", "--master_port", "29700", "--master_addr", "127.0.0.1", "--launcher",
        "pdsh", "--no_ssh", "--node_rank", "0", "train.py", "r.yml"]
    cfg = _cfg(launcher="openmpi", env={"NCCL_DEBUG": "INFO"})
    env = worker_env(cfg, {"worker-0": [0]}, {"WANDB_API_KEY": "secret", "HOME": "/root"})
    assert env == {"NCCL_DEBUG": "INFO", "WANDB_API_KEY": "secret", "MASTER_ADDR": "worker-0",
                   "MASTER_PORT": "29500"}
    assert worker_env(_cfg(), {}, {"HOME": "/root"}) == {}


def test_rank_env_from_mpi_and_srun():
    assert rank_env_from_launcher({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
                                   "OMPI_COMM_WORLD_LOCAL_RANK": "1"}) == {"RANK": "3", "WORLD_SIZE": "8",
                                                                            "LOCAL_RANK": "1"}
    assert rank_env_from_launcher({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "16", "SLURM_LOCALID": "1"}) == {
        "RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert rank_env_from_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == {}  # sbatch shell, not srun
    assert rank_env_from_launcher({"RANK": "0", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == {}


def test_deepy_bad_hostfile_is_one_line_exit_2(tmp_path):
    hf = _hostfile(tmp_path, "localhost slots=2\nlocalhost slots=2\n")
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", "configs/tiny-cpu.yml", "--hostfile", str(hf),
                           "--log-dir", str(tmp_path / "logs"), "--dry-run"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "host localhost is listed twice" in lines[0], proc.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_hostfile_launch_without_ssh_trains_two_tensor_parallel_ranks(tmp_path, pg19_dir, neox_tokenizer_file):
    """The real DeepSpeed launcher from a `localhost slots=2` hostfile (no ssh, node_rank 0) trains 2 ranks with
    model-parallel-size 2 and a SepLLM config for a few steps."""
    import json

    import yaml

    from megatron.training.distributed import find_free_port
    from train_helpers import make_tiny_corpus, tiny_sepllm_keys

    prefix = make_tiny_corpus(tmp_path / "corpus", sorted(pg19_dir.glob("*.txt"))[0], neox_tokenizer_file)
    keys = tiny_sepllm_keys(prefix, neox_tokenizer_file, tmp_path, **{"train-iters": 3, "model-parallel-size": 2})
    cfg = tmp_path / "run.yml"
    cfg.write_text(yaml.safe_dump(keys))
    hf = _hostfile(tmp_path, "localhost slots=2\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "deepy.py", "train.py", str(cfg), "--hostfile", str(hf), "--no-ssh", "true",
                           "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port", str(find_free_port())],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--no_ssh --node_rank 0" in proc.stdout
    assert "world size 2 (gloo)" in proc.stdout and "tp 2 x pp 1 (no pipeline engine) x dp 1" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "lm_loss" in r] == [1, 2, 3]
