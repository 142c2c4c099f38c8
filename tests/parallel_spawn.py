"""Run a function in N gloo processes (torch.multiprocessing, spawn) for the parallelism tests.

The function runs as ``fn(rank, world_size, *args)`` after ``init_process_group``; an assertion failing in any rank
fails the test with that rank's traceback. A hard deadline kills hung ranks.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron.training.distributed import find_free_port, spawn_and_wait


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """Spawn ``world_size`` ranks running ``fn``; raise if any fails or the deadline passes."""
    spawn_and_wait(_entry, world_size, (fn, world_size, find_free_port(), args), timeout, "distributed test")
