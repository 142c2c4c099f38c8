"""``train.py``'s body: run ``pretrain`` and turn known failures into one clear line and an exit code."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any


def run_training(cfg: Any, plot: bool = True) -> int:
    """Train; on rank 0 write ``loss.png`` next to ``metrics.jsonl``. Returns the process exit code: 0 done, 1 a run
    problem, 2 a config / user-input problem (bad config, unwritable output folder), 130 / 143 stopped by SIGINT /
    SIGTERM (after saving a checkpoint when ``save`` is set)."""
    from megatron.errors import NeoxError, report_error
    from megatron.training.interrupt import TrainingInterrupted
    from megatron.training.loop import pretrain

    try:
        result = pretrain(cfg)
    except TrainingInterrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # every rank stopped at the same iteration: one line says it
            print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C: the user chose not to wait for the checkpoint
        print("interrupted: aborted without saving a checkpoint", file=sys.stderr)
        return 130
    except NeoxError as exc:
        return report_error(exc)
    if plot and int(os.environ.get("RANK", "0")) == 0 and result.log_dir:
        from megatron.training.plotting import PlotError, plot_run

        try:
            out = plot_run(Path(result.log_dir), Path(result.log_dir) / "loss.png")
            print(f"loss curve: {out}")
        except PlotError as exc:
            print(f"warning: no loss plot: {exc}", file=sys.stderr)
    return 0
