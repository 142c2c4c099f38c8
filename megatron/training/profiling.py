"""GPT-NeoX's ``profile`` and ``memory_profiling`` keys around the training loop.

``profile``: a ``torch.profiler`` run with GPT-NeoX's schedule (wait ``profile_step_start`` steps of this run, warm
up one, record ``profile_step_stop - profile_step_start``; shapes, memory, FLOPs, modules and stacks recorded),
written by ``tensorboard_trace_handler`` to ``<log_dir>/profile/rank<R>.<time>.pt.trace.json`` (``tensorboard_dir``
when there is no log_dir, as GPT-NeoX writes it): a Chrome trace (open
in chrome://tracing or Perfetto) that TensorBoard's profiler plugin also reads (``tensorboard --logdir
<log_dir>/profile``). On CUDA, as in GPT-NeoX for nsys, ``cudaProfilerStart`` / ``Stop`` bracket the 1-based
iterations profile_step_start+1 .. profile_step_stop+1 and each profiled iteration is an NVTX range.

``memory_profiling`` (CUDA only): the allocator history is recorded from model set-up on, and rank 0 writes
``<memory_profiling_path>/mem_snapshot.pickle`` after each iteration whose 0-based number lies in
[profile_step_start, profile_step_stop] (GPT-NeoX's window), each replacing the last. On a CPU run one log line says
there is nothing to record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:
    from megatron.config import LoggingConfig

MEMORY_SNAPSHOT = "mem_snapshot.pickle"


class StepProfiler:
    """Wraps every training iteration: ``before(iteration)`` / ``after(iteration)`` (1-based), ``close()`` at the
    end. Does nothing when neither key is set."""

    def __init__(self, logging_cfg: LoggingConfig, log_dir: Optional[str], device: str, rank: int,
                 info: Callable[[str], None]) -> None:
        """``log_dir``: the run's log folder; without one the trace goes to ``tensorboard_dir`` (GPT-NeoX's place)."""
        lg = logging_cfg
        self.start, self.stop = int(lg.profile_step_start), int(lg.profile_step_stop)
        self.cuda = device == "cuda"
        self.rank = rank
        self.prof: Optional[torch.profiler.profile] = None
        self.trace_dir: Optional[Path] = None
        self.snapshot_dir = Path(lg.memory_profiling_path) if lg.memory_profiling and self.cuda else None
        if lg.memory_profiling and not self.cuda:
            info("memory_profiling: CUDA memory snapshots need a CUDA device; nothing is recorded on this cpu run")
        if self.snapshot_dir is not None:
            torch.cuda.memory._record_memory_history(max_entries=100000)
        if lg.profile:
            self.trace_dir = Path(log_dir) / "profile" if log_dir else Path(lg.tensorboard_dir or "profile")
            self.trace_dir.mkdir(parents=True, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            schedule = torch.profiler.schedule(wait=self.start, warmup=1, active=self.stop - self.start, repeat=1)
            self.prof = torch.profiler.profile(
                activities=activities, schedule=schedule, record_shapes=True, profile_memory=True, with_flops=True,
                with_modules=True, with_stack=True,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(self.trace_dir),
                                                                        worker_name=f"rank{rank}"))
            self.prof.start()
            info(f"profile: recording steps {self.start + 1}..{self.stop} of this run into {self.trace_dir}")

    def _in_window(self, iteration: int) -> bool:
        return self.start <= iteration - 1 <= self.stop

    def before(self, iteration: int) -> None:
        if self.prof is not None:
            self.prof.step()
            if self.cuda:
                if iteration - 1 == self.start:
                    torch.cuda.cudart().cudaProfilerStart()
                if self._in_window(iteration):
                    torch.cuda.nvtx.range_push(f"iteration {iteration}")

    def after(self, iteration: int) -> None:
        if self.prof is not None and self.cuda and self._in_window(iteration):
            torch.cuda.nvtx.range_pop()
            if iteration - 1 == self.stop:
                torch.cuda.cudart().cudaProfilerStop()
        if self.snapshot_dir is not None and self.rank == 0 and self._in_window(iteration):
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(os.fspath(self.snapshot_dir / MEMORY_SNAPSHOT))

    def close(self) -> None:
        """Stop the profiler (writing the trace if the recorded window closed with the run) and the history."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None
        if self.snapshot_dir is not None:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.snapshot_dir = None
