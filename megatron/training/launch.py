"""How ``deepy.py`` starts a job: in this process, or N processes / N nodes through the DeepSpeed launcher.

The decision and the command line are pure functions of the resolved launcher config, so they are unit-tested
without starting anything.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class LaunchPlan:
    """``inplace``: run the script in this interpreter; ``deepspeed``: exec ``command``."""

    mode: str
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def shell(self) -> str:
        return " ".join(shlex.quote(part) for part in self.command)


def needs_launcher(launcher_cfg: Any, visible_gpus: int) -> bool:
    """One local process runs in place; more processes, a hostfile, include/exclude or several nodes need the
    DeepSpeed launcher. ``num_gpus`` None means "all visible GPUs" (GPT-NeoX), i.e. one process on CPU."""
    lc = launcher_cfg
    procs = lc.num_gpus if lc.num_gpus is not None else max(visible_gpus, 1)
    multi_node = lc.num_nodes is not None and lc.num_nodes > 1
    return bool(procs > 1 or multi_node or lc.hostfile or lc.include or lc.exclude or lc.force_multi)


def build_deepspeed_command(launcher_cfg: Any, script: str, script_args: Sequence[str],
                            launcher_bin: str = "deepspeed") -> list[str]:
    """The ``deepspeed`` launcher command line for ``script`` with ``script_args`` (flags only when set)."""
    lc = launcher_cfg
    cmd = [launcher_bin]
    if lc.hostfile:
        cmd += ["--hostfile", str(lc.hostfile)]
    if lc.include:
        cmd += ["--include", str(lc.include)]
    if lc.exclude:
        cmd += ["--exclude", str(lc.exclude)]
    if lc.num_nodes is not None and lc.num_nodes > 0:
        cmd += ["--num_nodes", str(lc.num_nodes)]
    if lc.num_gpus is not None and not (lc.include or lc.exclude):
        cmd += ["--num_gpus", str(lc.num_gpus)]  # DeepSpeed refuses num_gpus together with include/exclude
    if lc.master_port is not None:
        cmd += ["--master_port", str(lc.master_port)]
    if lc.master_addr:
        cmd += ["--master_addr", str(lc.master_addr)]
    if lc.hostfile or (lc.num_nodes is not None and lc.num_nodes > 1) or lc.force_multi:
        cmd += ["--launcher", str(lc.launcher)]
    if getattr(lc, "no_ssh", False):
        cmd += ["--no_ssh"]
    if getattr(lc, "no_ssh_check", False):
        cmd += ["--no_ssh_check"]
    if lc.force_multi:
        cmd += ["--force_multi"]
    if getattr(lc, "comment", None) and lc.launcher == "slurm":
        cmd += ["--comment", str(lc.comment)]
    return cmd + [script, *script_args]


def plan_launch(launcher_cfg: Any, script: str, script_args: Sequence[str], visible_gpus: int) -> LaunchPlan:
    env = tuple((str(k), str(v)) for k, v in (launcher_cfg.env or {}).items())
    if not needs_launcher(launcher_cfg, visible_gpus):
        return LaunchPlan("inplace", (sys.executable, script, *script_args), env)
    return LaunchPlan("deepspeed", tuple(build_deepspeed_command(launcher_cfg, script, script_args)), env)


def write_deepspeed_env(env: dict[str, str], path: str) -> None:
    """DeepSpeed's multi-node runners export the variables listed in ``.deepspeed_env`` on every node."""
    with open(path, "w", encoding="utf-8") as handle:
        for key, value in env.items():
            handle.write(f"{key}={value}\n")


def visible_gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:  # pragma: no cover
        return 0
