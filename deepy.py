#!/usr/bin/env python
"""Resolve configs and launch a script (train.py, eval.py, ...) on 1 process, N local processes or N nodes.

usage: python deepy.py SCRIPT.py CONFIG.yml [MORE.yml ...] [--key value ...] [--dry-run] [--help]

The configs are merged and validated here (a bad config prints one line and exits 2), written once as a resolved
YAML file, and SCRIPT gets that single file (a temporary file when the config has no log_dir, removed when SCRIPT
ends). One local process (num_gpus 1, or no GPU and num_gpus unset, no
hostfile/include/exclude/num_nodes > 1) runs in this interpreter; otherwise the command is handed to the DeepSpeed
launcher (`deepspeed --num_gpus N`, `--hostfile`, `--include/--exclude`, `--num_nodes`, `--master_port`, ...).
For multi-node runs the resolved file is written to the run's log_dir, which must be on a shared filesystem.

Before launching, the hostfile (`host slots=N` lines; no duplicates, slots >= 1), include/exclude, host-name
resolution and num_gpus against the visible CUDA devices are checked, and the config is validated for the world
size of the launch (hostfile slots, num_gpus, else all visible GPUs, else 1): world size divisible by
model-parallel-size x pipe stages, heads / KV heads / MLP width divisible by model-parallel-size, ZeRO 0-1 with a
pipeline, and the batch triple for data-parallel size = world / (TP x PP) (a given train_batch_size that does not
fit is an error). One line, exit 2. The layout and the global batch actually used are printed before launching.
On a machine without CUDA devices, num_gpus N starts N CPU processes (gloo).
The DeepSpeed launcher runs from this interpreter (python -m deepspeed.launcher.runner), so
`.venv/bin/python deepy.py ...` works without an activated venv.
Environment for the workers: `launcher.env`, WANDB_API_KEY / WANDB_BASE_URL / HF_TOKEN from this shell and, for
the openmpi / mvapich / slurm runners, MASTER_ADDR / MASTER_PORT, written to `.deepspeed_env` (DeepSpeed exports
its lines on every node).
A hostfile launch on ONE machine without ssh (e.g. a `localhost slots=2` hostfile):
  python deepy.py train.py cfg.yml --hostfile hf --no-ssh true --node-rank 0 --master-addr 127.0.0.1
With no_ssh, run the same command once per node with that node's --node-rank.

options:
  --dry-run   print the resolved-config path, the layout and the command that would run, then exit 0
  -h, --help  show this help and exit (also after SCRIPT and the configs)

Every config key (and --key override) is documented in docs/config_reference.md; `python -m megatron.config
CONFIG.yml` prints a resolved config.
"""

from __future__ import annotations

import ast
import os
import runpy
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig
    from megatron.training.launch import LaunchPlan


def _resolved_config_path(cfg: NeoXConfig) -> tuple[Path, bool]:
    """Where the resolved config goes: ``<log_dir>/resolved_config.yml``, else a temp file (second value True)."""
    if cfg.logging.log_dir:
        folder = Path(cfg.logging.log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / "resolved_config.yml", False
    handle, name = tempfile.mkstemp(prefix="sepllm-config-", suffix=".yml")
    os.close(handle)
    return Path(name), True


def describe_layout(cfg: NeoXConfig) -> str:
    """One line: the launched world size split into DP x TP x PP and the global batch actually used."""
    p, t = cfg.parallel, cfg.training
    stages = max(int(p.pipe_parallel_size or 0), 1)
    return (f"layout: world size {p.world_size} = dp {p.data_parallel_size} x tp {p.model_parallel_size} x pp "
            f"{stages} | global batch {t.train_batch_size} = micro {t.train_micro_batch_size_per_gpu} x accum "
            f"{t.gradient_accumulation_steps} x dp {p.data_parallel_size}")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
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

    from megatron.config import load_config
    from megatron import device
    from megatron.errors import NeoxError, report_error
    from megatron.training.launch import check_launch, launch_world_size, plan_launch

    device.quiet_accelerator_probe()     # before anything imports DeepSpeed; inherited by the launcher and its workers

    visible = device.visible_gpu_count()
    try:
        cfg = load_config(*files, overrides=overrides, for_training=Path(script).name == "train.py",
                          world_size=lambda launcher: launch_world_size(launcher, visible))
        active = check_launch(cfg, visible)
        print(describe_layout(cfg), flush=True)
        from megatron.training.preflight import check_output_dirs

        # an unwritable or full save / log folder: one line now, not a traceback or a failed first checkpoint
        check_output_dirs(cfg, rank=0)
    except NeoxError as exc:
        return report_error(exc)
    config_path, temporary = _resolved_config_path(cfg)
    try:
        config_path.write_text(cfg.to_yaml(), encoding="utf-8")
        plan = plan_launch(cfg.launcher, script, [str(config_path)], visible)
        if dry_run:
            print(f"resolved config: {config_path}" + (" (temporary, removed on exit; set log_dir to keep it)"
                                                       if temporary else ""))
            print(f"mode: {plan.mode}")
            print(f"command: {plan.shell()}")
            return 0
        return _run(plan, cfg, active, script, config_path)
    finally:
        if temporary:
            config_path.unlink(missing_ok=True)


def _main_takes_config(script: str) -> bool:
    """Whether ``script`` defines ``main(argv, config)`` (read, not run): then a one-process launch calls it with the
    config loaded here instead of letting the script load the resolved file again."""
    tree = ast.parse(Path(script).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == "main"
               and "config" in {a.arg for a in node.args.args + node.args.kwonlyargs} for node in tree.body)


def _run(plan: LaunchPlan, cfg: NeoXConfig, active: dict[str, list[int]], script: str, config_path: Path) -> int:
    """Run ``script`` in this interpreter or through the DeepSpeed launcher; returns its exit code."""
    from megatron.training.launch import worker_env, write_deepspeed_env

    env = dict(plan.env)
    env.update(worker_env(cfg, active, os.environ))
    os.environ.update(env)
    if plan.mode == "inplace":
        sys.argv = [script, str(config_path)]
        sys.path.insert(0, str(Path(script).resolve().parent))
        try:
            if _main_takes_config(script):  # the config is loaded once per process: hand it over
                return runpy.run_path(script, run_name="__deepy_script__")["main"]([str(config_path)], config=cfg)
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        return 0
    if env:
        write_deepspeed_env(env, ".deepspeed_env")
    print(f"launching: {plan.shell()}", flush=True)
    proc = subprocess.Popen(list(plan.command))
    # Ctrl-C reaches every process of the terminal's group: the ranks stop after the same iteration, save and exit
    # 130, and the launcher reports it. This process only waits for them (no KeyboardInterrupt traceback here, and
    # no kill of the launcher while the ranks are saving).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
