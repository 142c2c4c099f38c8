#!/usr/bin/env python
"""Pretrain a GPT-NeoX-style (optionally SepLLM) model from YAML configs.

usage: python train.py CONFIG.yml [MORE.yml ...] [--key value ...]
       python deepy.py train.py CONFIG.yml [...]      (same, launching N processes when configured)

Configs merge left to right; --key value overrides any key (see `python -m megatron.config --help`). Every key is
documented in docs/config_reference.md. On a bad config, missing data or an unusable checkpoint it prints one line
naming the problem and exits 2; when the run itself fails (a save that cannot be written), 1. Under a launcher
every rank runs this file and the config is validated for the world size the launcher set (WORLD_SIZE, or the MPI /
srun variables).

options:
  -h, --help  show this help and exit
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from megatron.entry_args import load_entry

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


def main(argv: Sequence[str] | None = None, config: Optional[NeoXConfig] = None) -> int:
    """Train from the command line's configs, or from ``config`` when the caller loaded it already (``deepy.py``'s
    one-process launch); returns the exit code."""
    from megatron.training.launch import launched_world_size

    entry = load_entry(argv, __doc__, config, for_training=True, world_size=launched_world_size(os.environ))
    if isinstance(entry, int):
        return entry
    return run_training(entry.config)


def run_training(cfg: NeoXConfig, plot: bool = True) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
