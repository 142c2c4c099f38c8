"""``train.py``'s body: run ``pretrain`` and turn known failures into one clear line and an exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def _known_errors() -> tuple[type[BaseException], ...]:
    from megatron.config import ConfigError
    from megatron.data.errors import DataError
    from megatron.tokenizer import TokenizerError
    from megatron.training.checkpointing import CheckpointError
    from megatron.training.data_setup import DataSetupError
    from megatron.training.engine import DeviceConfigError
    from megatron.training.loop import TrainingError
    from megatron.training.lr_schedules import LRScheduleError
    from megatron.training.optimizer import OptimizerConfigError

    return (ConfigError, DataError, TokenizerError, CheckpointError, DataSetupError, DeviceConfigError,
            TrainingError, LRScheduleError, OptimizerConfigError)


def run_training(cfg: Any, plot: bool = True) -> int:
    """Train; on rank 0 write ``loss.png`` next to ``metrics.jsonl``. Returns the process exit code."""
    from megatron.config import ConfigError
    from megatron.training.loop import pretrain

    try:
        result = pretrain(cfg)
    except _known_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    if plot and int(os.environ.get("RANK", "0")) == 0 and result.log_dir:
        from megatron.training.plotting import PlotError, plot_run

        try:
            out = plot_run(Path(result.log_dir), Path(result.log_dir) / "loss.png")
            print(f"loss curve: {out}")
        except PlotError as exc:
            print(f"warning: no loss plot: {exc}", file=sys.stderr)
    return 0
