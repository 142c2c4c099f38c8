"""Process-group set-up, seeding, RNG state capture/restore (what an exact resume needs) and small collectives.

``init_distributed`` works in three situations: under a launcher (``deepspeed``/``torchrun`` set RANK, WORLD_SIZE,
MASTER_ADDR/PORT), as a plain ``python train.py`` (we create a 1-rank group on a free local port), or when a group
already exists (tests calling the loop twice in one process).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


_SELF_INIT = "SEPLLM_SELF_INIT_PROCESS_GROUP"  # marks env variables we set ourselves (children must not reuse)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits; passed explicitly instead of living in module globals."""

    rank: int
    world_size: int
    local_rank: int
    backend: str


def find_free_port() -> int:
    """Ask the OS for an unused TCP port on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_and_wait(fn: Any, nprocs: int, args: tuple, timeout: float, what: str) -> None:
    """Start ``nprocs`` spawned processes running ``fn(rank, *args)`` and wait for all of them; a failing rank
    raises (torch's ProcessRaisedException), and past ``timeout`` seconds every live one is killed and
    ``TimeoutError`` names ``what``."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{what} did not finish within {timeout} s")


def _attach_deepspeed_comm(backend: str) -> None:
    """DeepSpeed's communication layer over our process group, made now and quietly: its creation prints "DeepSpeed
    deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" on CPU in every process, which says nothing to a
    user. Only that line is dropped; anything else DeepSpeed prints passes through. Idempotent (DeepSpeed keeps one
    backend per process; ``deepspeed.initialize`` and the pipeline engine reuse it)."""
    import deepspeed

    from megatron.training.engine import quiet_deepspeed_logs

    quiet_deepspeed_logs()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        deepspeed.init_distributed(dist_backend=backend, dist_init_required=False)
    kept = [line for line in printed.getvalue().splitlines()
            if not (line.startswith("DeepSpeed ") and line.endswith(" built successfully"))]
    if kept:
        print("\n".join(kept), flush=True)


def init_distributed(device_type: str, backend: str | None = None, deepspeed_comm: bool = True) -> DistInfo:
    """Initialise torch.distributed (gloo on CPU, nccl on CUDA unless told otherwise); idempotent.
    ``deepspeed_comm``: also set up DeepSpeed's communication layer (training; see ``_attach_deepspeed_comm``)."""
    if backend is None or (device_type == "cpu" and backend == "nccl"):
        backend = "nccl" if device_type == "cuda" else "gloo"
    if not dist.is_initialized():
        from megatron.training.launch import rank_env_from_launcher

        os.environ.update(rank_env_from_launcher(os.environ))  # started by mpirun / srun: ranks from their variables
        inherited_self_init = os.environ.get(_SELF_INIT) == "1" and os.environ.get("WORLD_SIZE") == "1"
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or inherited_self_init:
            # no launcher (or env copied from a parent that made its own 1-rank group): make ours on a free port
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(find_free_port())
            os.environ[_SELF_INIT] = "1"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]))
    if deepspeed_comm:
        _attach_deepspeed_comm(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=dist.get_backend())


def set_seed(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices). Every rank gets the same seed so that model initialisation is
    identical across data-parallel ranks (dropout masks may then match across ranks, as in GPT-NeoX)."""
    del rank  # same seed on every rank: DeepSpeed also broadcasts rank 0's weights, but identical init is cheaper
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA generator states as plain tensors/lists/ints (``weights_only`` loadable)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, info: DistInfo) -> float:
    """The mean of a scalar tensor over every rank (the logged loss must be the same number on all of them)."""
    if info.world_size > 1:
        value = value.detach().clone().float()
        dist.all_reduce(value)
        value /= info.world_size
    return float(value)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a small picklable object from ``src`` to every rank (identity without a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
