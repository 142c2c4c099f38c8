"""What one training run holds: its parts (:class:`Run`), where it is (:class:`RunState`) and what it reports
(:class:`TrainResult`). The loop builds one ``Run`` after set-up and passes it instead of long argument lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig
    from megatron.training.data_setup import SplitDatasets
    from megatron.training.distributed import DistInfo
    from megatron.training.interrupt import StopRequest
    from megatron.training.batches import BatchRules
    from megatron.training.logging import RunLogger
    from megatron.training.lr_schedules import AnnealingLR
    from megatron.training.parallel_setup import ParallelPlan
    from megatron.training.steppers import Stepper


@dataclass
class TrainResult:
    """What a finished run reports back (used by tests, benchmarks and train.py's summary)."""

    iteration: int
    train_losses: dict[int, float] = field(default_factory=dict)
    valid_losses: dict[int, float] = field(default_factory=dict)
    test_loss: float | None = None
    checkpoints: list[str] = field(default_factory=list)
    log_dir: str | None = None
    tokens_per_sec: float | None = None
    wall_time_s: float = 0.0


@dataclass
class RunState:
    """Where the run is: read by the step hooks, the log, checkpoints and the stop handler."""

    iteration: int = 0
    consumed: int = 0
    start_iteration: int = 0
    last_saved: int | None = None
    forward_calls: int = 0


@dataclass
class Run:
    """One set-up training run: the resolved config (this run's own copy) and everything built from it."""

    config: NeoXConfig
    info: DistInfo
    device: str
    logger: RunLogger
    plan: ParallelPlan
    stepper: Stepper
    scheduler: AnnealingLR
    datasets: SplitDatasets
    micro_batch: int            # per rank and micro-step
    gas: int                    # micro-batches per optimizer step
    global_batch: int           # samples per optimizer step, all data-parallel ranks
    train_iters: int
    batch_rules: BatchRules     # eod id, eod_mask_loss, reset_position_ids, reset_attention_mask
    stop: StopRequest
    started: float              # time.perf_counter() when pretrain began
    state: RunState = field(default_factory=RunState)
    result: TrainResult = field(default_factory=lambda: TrainResult(iteration=0))
    checkpoint_writer: Any = None  # AsyncCheckpointWriter with checkpoint_async, else None (saves block)

    @property
    def engine(self) -> Any:
        """The DeepSpeed engine (plain or pipeline) the stepper drives."""
        return self.stepper.engine


__all__ = ["Run", "RunState", "TrainResult"]
