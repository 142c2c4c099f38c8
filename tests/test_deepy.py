"""deepy.py: config errors, launch decision and the DeepSpeed command line (pure functions, nothing launched)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from megatron.config import LauncherConfig
from megatron.training.launch import build_deepspeed_command, needs_launcher, plan_launch

RUNNER = [sys.executable, "-m", "deepspeed.launcher.runner"]  # the launcher of THIS interpreter, not PATH's

REPO = Path(__file__).resolve().parents[1]


def test_single_process_runs_in_place():
    assert not needs_launcher(LauncherConfig(), visible_gpus=0)
    assert not needs_launcher(LauncherConfig(num_gpus=1), visible_gpus=8)
    plan = plan_launch(LauncherConfig(), "train.py", ["cfg.yml"], visible_gpus=0)
    assert plan.mode == "inplace" and plan.command[1:] == ("train.py", "cfg.yml")


def test_all_visible_gpus_by_default_like_gpt_neox():
    assert needs_launcher(LauncherConfig(), visible_gpus=4)


def test_local_multi_process_command():
    cmd = build_deepspeed_command(LauncherConfig(num_gpus=2, master_port=29600), "train.py", ["r.yml"])
    assert cmd == RUNNER + ["--num_gpus", "2", "--master_port", "29600", "train.py", "r.yml"]


def test_hostfile_multi_node_command():
    lc = LauncherConfig(hostfile="/etc/hosts.ds", num_nodes=2, num_gpus=8, master_addr="10.0.0.1",
                        launcher="pdsh", master_port=29500)
    cmd = build_deepspeed_command(lc, "train.py", ["r.yml"])
    assert cmd == RUNNER + ["--hostfile", "/etc/hosts.ds", "--num_nodes", "2", "--num_gpus", "8",
                   "--master_port", "29500", "--master_addr", "10.0.0.1", "--launcher", "pdsh", "train.py", "r.yml"]


def test_include_exclude_drop_num_gpus_and_no_ssh_passes_through():
    lc = LauncherConfig(hostfile="hf", include="worker-0:0,1@worker-1", num_gpus=8, no_ssh=True)
    cmd = build_deepspeed_command(lc, "train.py", ["r.yml"])
    assert "--num_gpus" not in cmd and cmd[cmd.index("--include") + 1] == "worker-0:0,1@worker-1"
    assert "--no_ssh" in cmd


def test_command_is_accepted_by_the_deepspeed_launcher_parser():
    from deepspeed.launcher.runner import parse_args

    lc = LauncherConfig(hostfile="hf", num_nodes=2, num_gpus=8, master_addr="10.0.0.1", no_ssh=True)
    cmd = build_deepspeed_command(lc, "train.py", ["r.yml"])
    args = parse_args(cmd[len(RUNNER):])
    assert (args.hostfile, args.num_nodes, args.num_gpus, args.master_addr, args.no_ssh) == (
        "hf", 2, 8, "10.0.0.1", True)
    assert args.user_script == "train.py" and args.user_args == ["r.yml"]


def _deepy(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "deepy.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_bad_config_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("num-layers: 2\nhiden-size: 64\n")
    proc = _deepy("train.py", str(bad))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "hiden" in lines[0] and "Traceback" not in proc.stderr


def test_dry_run_resolves_and_plans(tmp_path):
    proc = _deepy("train.py", "configs/tiny-cpu.yml", "--log-dir", str(tmp_path / "logs"), "--num-gpus", "2",
                  "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "mode: deepspeed" in proc.stdout
    assert (f"{sys.executable} -m deepspeed.launcher.runner --num_gpus 2 --master_port 29500 train.py "
            f"{tmp_path / 'logs' / 'resolved_config.yml'}") in proc.stdout
    assert "layout: world size 2 = dp 2 x tp 1 x pp 1 | global batch 8 = micro 4 x accum 1 x dp 2" in proc.stdout
    from megatron.config import load_config

    resolved = load_config(str(tmp_path / "logs" / "resolved_config.yml"))
    assert resolved.model.num_layers == 4 and resolved.launcher.num_gpus == 2


def test_missing_script_is_a_clear_error():
    proc = _deepy("nope.py", "configs/tiny-cpu.yml")
    assert proc.returncode == 2 and "script" in proc.stderr
