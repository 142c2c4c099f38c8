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
from typing import Any, Sequence

from megatron.entry_args import run_entry


def main(argv: Sequence[str] | None = None) -> int:
    from megatron.training.launch import launched_world_size

    return run_entry(argv, __doc__, _train, for_training=True, world_size=launched_world_size(os.environ))


def _train(cfg: Any, files: list[str], overrides: list[str]) -> int:
    from megatron.training.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
