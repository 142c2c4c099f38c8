"""How ``deepy.py`` starts a job: in this process, or N processes / N nodes through the DeepSpeed launcher.

The decision and the command line are pure functions of the resolved launcher config, so they are unit-tested
without starting anything. Before a launch, :func:`check_launch` validates the hostfile (syntax, slots, duplicate
hosts), include/exclude (known hosts and slots), host-name resolution and ``num_gpus`` against the visible CUDA
devices; each problem is one :class:`LaunchError` sentence. :func:`launch_world_size` gives config validation the
number of ranks, so the parallel layout and the batch triple are checked for the real launch. The launcher runs
from this interpreter (:func:`launcher_prefix`), never a ``deepspeed`` found on PATH.

Runners (``launcher``): ``pdsh`` (ssh to every host, DeepSpeed's per-node launcher there), ``openmpi``
(``mpirun``), ``mvapich`` (``mpirun``, MVAPICH2-GDR), ``slurm`` (``srun``); the MPI / srun runners start the script
directly, so ranks come from ``OMPI_COMM_WORLD_*`` / ``MV2_COMM_WORLD_*`` / ``SLURM_*`` (see
:func:`rank_env_from_launcher`) and ``MASTER_ADDR`` / ``MASTER_PORT`` travel in ``.deepspeed_env`` together with
``launcher.env`` and ``WANDB_API_KEY``.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence
from megatron.config.derived import LAUNCHERS
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config import LauncherConfig
    from megatron.config.neox import NeoXConfig

FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_BASE_URL", "HF_TOKEN")
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class LaunchError(UserInputError, ValueError):
    """The launch cannot start as configured (hostfile, hosts, include/exclude, world size); one sentence."""


@dataclass(frozen=True)
class LaunchPlan:
    """``inplace``: run the script in this interpreter; ``deepspeed``: exec ``command``."""

    mode: str
    command: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    def shell(self) -> str:
        return " ".join(shlex.quote(part) for part in self.command)


def needs_launcher(launcher_cfg: LauncherConfig, visible_gpus: int) -> bool:
    """One local process runs in place; more processes, a hostfile, include/exclude or several nodes need the
    DeepSpeed launcher. ``num_gpus`` None means "all visible GPUs" (GPT-NeoX), i.e. one process on CPU."""
    lc = launcher_cfg
    procs = lc.num_gpus if lc.num_gpus is not None else max(visible_gpus, 1)
    multi_node = lc.num_nodes is not None and lc.num_nodes > 1
    return bool(procs > 1 or multi_node or lc.hostfile or lc.include or lc.exclude or lc.force_multi)


def launcher_prefix() -> list[str]:
    """DeepSpeed's launcher started from THIS interpreter (``python -m deepspeed.launcher.runner``, what the
    ``deepspeed`` script runs): works from ``.venv/bin/python deepy.py ...`` without an activated venv on PATH, and
    the workers it starts run the same interpreter."""
    return [sys.executable, "-m", "deepspeed.launcher.runner"]


def build_deepspeed_command(launcher_cfg: LauncherConfig, script: str, script_args: Sequence[str],
                            launcher_bin: Optional[Sequence[str]] = None) -> list[str]:
    """The DeepSpeed launcher command line for ``script`` with ``script_args`` (flags only when set);
    ``launcher_bin`` defaults to :func:`launcher_prefix`."""
    lc = launcher_cfg
    cmd = list(launcher_prefix() if launcher_bin is None else launcher_bin)
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
        if getattr(lc, "node_rank", -1) is not None and lc.node_rank >= 0:
            cmd += ["--node_rank", str(lc.node_rank)]
    if getattr(lc, "no_ssh_check", False):
        cmd += ["--no_ssh_check"]
    if lc.force_multi:
        cmd += ["--force_multi"]
    srun_options = [f"--{name}={shlex.quote(str(getattr(lc, name)))}" for name in ("comment", "account")
                    if getattr(lc, name, None)]
    if srun_options and lc.launcher == "slurm":
        # deepspeed 0.19.8 has no --comment / --account flags: srun options travel in --launcher_args
        cmd += [f"--launcher_args={' '.join(srun_options)}"]
    return cmd + [script, *script_args]


def plan_launch(launcher_cfg: LauncherConfig, script: str, script_args: Sequence[str], visible_gpus: int) -> LaunchPlan:
    env = tuple((str(k), str(v)) for k, v in (launcher_cfg.env or {}).items())
    if not needs_launcher(launcher_cfg, visible_gpus):
        return LaunchPlan("inplace", (sys.executable, script, *script_args), env)
    return LaunchPlan("deepspeed", tuple(build_deepspeed_command(launcher_cfg, script, script_args)), env)


# ------------------------------------------------------------------------------------------------ validation
def parse_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments, blank lines)."""
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"hostfile {file}: no such file")
    pool: dict[str, int] = {}
    for number, raw in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if match is None:
            raise LaunchError(f"hostfile {file} line {number}: {raw.strip()!r}: expected 'HOST slots=N'")
        host, slots = match.group(1), int(match.group(2))
        if slots < 1:
            raise LaunchError(f"hostfile {file} line {number}: host {host} has slots={slots}; expected >= 1")
        if host in pool:
            raise LaunchError(f"hostfile {file} line {number}: host {host} is listed twice")
        pool[host] = slots
    if not pool:
        raise LaunchError(f"hostfile {file}: no 'HOST slots=N' lines")
    return pool


def _filter_hosts(pool: Mapping[str, int], spec: str, key: str) -> dict[str, list[int]]:
    """``host[:slot,slot]@host...`` of include/exclude -> ``{host: slots}`` ([] = all), naming unknown hosts/slots."""
    parsed: dict[str, list[int]] = {}
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        if host not in pool:
            raise LaunchError(f"launcher {key}={spec!r}: host {host!r} is not in the hostfile (hosts: "
                              f"{', '.join(pool)})")
        try:
            ids = [int(x) for x in slots.split(",")] if slots else []
        except ValueError:
            raise LaunchError(f"launcher {key}={spec!r}: slots of {host!r} must be integers") from None
        bad = [i for i in ids if not 0 <= i < pool[host]]
        if bad:
            raise LaunchError(f"launcher {key}={spec!r}: host {host} has slots 0..{pool[host] - 1}, not {bad}")
        parsed[host] = parsed.get(host, []) + ids
    return parsed


def select_resources(pool: Mapping[str, int], include: Optional[str] = None, exclude: Optional[str] = None,
                     num_nodes: Optional[int] = None, num_gpus: Optional[int] = None) -> dict[str, list[int]]:
    """The hosts and slots a launch uses (DeepSpeed's rules: include / exclude, then the first ``num_nodes`` hosts
    with their first ``num_gpus`` slots)."""
    if include and exclude:
        raise LaunchError("launcher include and exclude are mutually exclusive; set one")
    active = {host: list(range(n)) for host, n in pool.items()}
    if include:
        chosen = _filter_hosts(pool, include, "include")
        active = {h: (ids or list(range(pool[h]))) for h, ids in chosen.items()}
    elif exclude:
        for host, ids in _filter_hosts(pool, exclude, "exclude").items():
            active[host] = [i for i in active[host] if ids and i not in ids]
        active = {h: ids for h, ids in active.items() if ids}
    if num_nodes is not None and num_nodes > 0:
        if num_nodes > len(active):
            raise LaunchError(f"launcher num_nodes={num_nodes}, but only {len(active)} host(s) are available")
        active = dict(list(active.items())[:num_nodes])
    if num_gpus is not None and num_gpus > 0:
        active = {h: ids[:num_gpus] for h, ids in active.items()}
    if not active:
        raise LaunchError("launcher: include/exclude leave no host to run on")
    return active


def check_resolvable(hosts: Sequence[str], resolve: Callable[[str], Any] = socket.gethostbyname) -> None:
    """Every host name must resolve (an unreachable name fails here, not after a long ssh timeout)."""
    bad = []
    for host in hosts:
        try:
            resolve(host)
        except OSError:
            bad.append(host)
    if bad:
        raise LaunchError(f"hostfile host(s) {', '.join(bad)} do not resolve to an address; fix the names or DNS "
                          f"/ /etc/hosts")


def local_process_count(launcher_cfg: LauncherConfig, visible_gpus: int) -> int:
    """Processes of a launch without hostfile: ``num_gpus``, else all visible GPUs, else 1 (one CPU process).

    With CUDA devices visible, ``num_gpus`` may not exceed them (ranks would share or miss a device). Without any
    (a CPU-only machine) ``num_gpus N`` starts N CPU processes over gloo, each with its own share of the cores; the
    global batch then counts N data-parallel ranks, and ``deepy.py`` prints it before launching.
    """
    lc = launcher_cfg
    if lc.num_gpus is None:
        return max(visible_gpus, 1)
    if visible_gpus > 0 and lc.num_gpus > visible_gpus:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise LaunchError(f"launcher num_gpus={lc.num_gpus}, but only {visible_gpus} CUDA device(s) are visible"
                          + (f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else "")
                          + f"; set num_gpus <= {visible_gpus}")
    return int(lc.num_gpus)


def launch_world_size(launcher_cfg: LauncherConfig, visible_gpus: int) -> int:
    """Ranks of the launch: the selected hostfile slots, else :func:`local_process_count` (raises LaunchError)."""
    lc = launcher_cfg
    if not lc.hostfile:
        return local_process_count(lc, visible_gpus)
    active = select_resources(parse_hostfile(lc.hostfile), lc.include, lc.exclude, lc.num_nodes,
                              None if (lc.include or lc.exclude) else lc.num_gpus)
    return sum(len(ids) for ids in active.values())


def check_launch(cfg: NeoXConfig, visible_gpus: int,
                 resolve: Callable[[str], Any] = socket.gethostbyname) -> dict[str, list[int]]:
    """Validate a launch before anything starts; returns the hosts and slots it will use (``{}`` for a local run
    without a hostfile). The parallel layout of the launched world size is checked by config validation
    (``load_config(world_size=...)``, :mod:`megatron.config.layout`)."""
    lc = cfg.launcher
    if lc.launcher not in LAUNCHERS:
        raise LaunchError(f"launcher={lc.launcher!r}: expected one of {', '.join(LAUNCHERS)}")
    if lc.no_ssh and lc.hostfile and lc.node_rank < 0:
        raise LaunchError("launcher no_ssh needs node_rank (which hostfile node this invocation starts, 0-based)")
    if not lc.hostfile:
        if lc.include or lc.exclude:
            raise LaunchError("launcher include/exclude need a hostfile")
        local_process_count(lc, visible_gpus)
        return {}
    active = select_resources(parse_hostfile(lc.hostfile), lc.include, lc.exclude, lc.num_nodes,
                              None if (lc.include or lc.exclude) else lc.num_gpus)
    if lc.no_ssh and lc.node_rank >= len(active):
        raise LaunchError(f"launcher node_rank={lc.node_rank}: the launch has {len(active)} node(s)")
    check_resolvable(list(active), resolve)
    return active


def worker_env(cfg: NeoXConfig, active: Mapping[str, list[int]], environ: Mapping[str, str]) -> dict[str, str]:
    """Variables every rank needs on every node: ``launcher.env``, credentials from this shell
    (``WANDB_API_KEY``...), and for the MPI / srun runners (which start the script directly) the rendezvous."""
    lc = cfg.launcher
    env = {str(k): str(v) for k, v in (lc.env or {}).items()}
    for key in FORWARDED_ENV:
        if key in environ and key not in env:
            env[key] = environ[key]
    if active and lc.launcher in ("openmpi", "mvapich", "slurm"):
        env.setdefault("MASTER_ADDR", lc.master_addr or next(iter(active)))
        env.setdefault("MASTER_PORT", str(lc.master_port))
    return env


def rank_env_from_launcher(environ: Mapping[str, str]) -> dict[str, str]:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` from the variables mpirun (OpenMPI, MVAPICH, MPICH) or srun set,
    for scripts those runners start directly (slurm: only inside an ``srun`` step); ``{}`` when none is present or
    ``RANK`` is already set."""
    if "RANK" in environ:
        return {}
    for rank, size, local in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                              ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
                              ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                              ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")):
        if rank in environ and size in environ:
            return {"RANK": environ[rank], "WORLD_SIZE": environ[size], "LOCAL_RANK": environ.get(local, "0")}
    return {}


def launched_world_size(environ: Mapping[str, str]) -> Optional[int]:
    """The world size a launcher gave this process (``WORLD_SIZE``, or the MPI / srun variables), None if none."""
    value = environ.get("WORLD_SIZE") or rank_env_from_launcher(environ).get("WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


def write_deepspeed_env(env: dict[str, str], path: str) -> None:
    """DeepSpeed's multi-node runners export the variables listed in ``.deepspeed_env`` on every node."""
    with open(path, "w", encoding="utf-8") as handle:
        for key, value in env.items():
            handle.write(f"{key}={value}\n")


