#!/usr/bin/env python
"""Resolve configs and launch a script (train.py, eval.py, ...) on 1 process, N local processes or N nodes.

usage: python deepy.py SCRIPT.py CONFIG.yml [MORE.yml ...] [--key value ...] [--dry-run]

The configs are merged and validated here (a bad config prints one line and exits 2), written once as a resolved
YAML file, and SCRIPT gets that single file. One local process (num_gpus 1, or no GPU and num_gpus unset, no
hostfile/include/exclude/num_nodes > 1) runs in this interpreter; otherwise the command is handed to the DeepSpeed
launcher (`deepspeed --num_gpus N`, `--hostfile`, `--include/--exclude`, `--num_nodes`, `--master_port`, ...).
For multi-node runs the resolved file is written to the run's log_dir, which must be on a shared filesystem.

Before launching, the hostfile (`host slots=N` lines; no duplicates, slots >= 1), include/exclude, host-name
resolution and "world size divisible by model-parallel-size x pipe stages" are checked (one line, exit 2).
Environment for the workers: `launcher.env`, WANDB_API_KEY / WANDB_BASE_URL / HF_TOKEN from this shell and, for
the openmpi / mvapich / slurm runners, MASTER_ADDR / MASTER_PORT, written to `.deepspeed_env` (DeepSpeed exports
its lines on every node).
A hostfile launch on ONE machine without ssh (e.g. a `localhost slots=2` hostfile):
  python deepy.py train.py cfg.yml --hostfile hf --no-ssh true --node-rank 0 --master-addr 127.0.0.1
With no_ssh, run the same command once per node with that node's --node-rank.

options:
  --dry-run   print the resolved-config path and the command that would run, then exit 0
  -h, --help  show this help and exit
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence


def _resolved_config_path(cfg) -> Path:
    if cfg.logging.log_dir:
        folder = Path(cfg.logging.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "resolved_config.yml"
    handle, name = tempfile.mkstemp(prefix="sepllm-config-", suffix=".yml")
    os.close(handle)
    return Path(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    dry_run = "--dry-run" in args
    args = [a for a in args if a != "--dry-run"]
    script, rest = args[0], args[1:]
    if not script.endswith(".py") or not Path(script).is_file():
        print(f"error: first argument must be the script to run (e.g. train.py), got {script!r}", file=sys.stderr)
        return 2
    split = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    files, overrides = rest[:split], rest[split:]
    if not files:
        print("error: give at least one config file after the script", file=sys.stderr)
        return 2

    from megatron.config import ConfigError, load_config
    from megatron.training.launch import (LaunchError, check_launch, plan_launch, visible_gpu_count, worker_env,
                                          write_deepspeed_env)

    try:
        cfg = load_config(*files, overrides=overrides, for_training=Path(script).name == "train.py")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        active = check_launch(cfg, visible_gpu_count())
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config_path = _resolved_config_path(cfg)
    config_path.write_text(cfg.to_yaml(), encoding="utf-8")
    plan = plan_launch(cfg.launcher, script, [str(config_path)], visible_gpu_count())
    if dry_run:
        print(f"resolved config: {config_path}")
        print(f"mode: {plan.mode}")
        print(f"command: {plan.shell()}")
        return 0
    env = dict(plan.env)
    env.update(worker_env(cfg, active, os.environ))
    os.environ.update(env)
    if plan.mode == "inplace":
        sys.argv = [script, str(config_path)]
        sys.path.insert(0, str(Path(script).resolve().parent))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        return 0
    if env:
        write_deepspeed_env(env, ".deepspeed_env")
    print(f"launching: {plan.shell()}", flush=True)
    return subprocess.call(list(plan.command))


if __name__ == "__main__":
    sys.exit(main())
