#!/usr/bin/env python
"""Pretrain a GPT-NeoX-style (optionally SepLLM) model from YAML configs.

usage: python train.py CONFIG.yml [MORE.yml ...] [--key value ...]
       python deepy.py train.py CONFIG.yml [...]      (same, launching N processes when configured)

Configs merge left to right; --key value overrides any key (see `python -m megatron.config --help`). Every key is
documented in docs/config_reference.md. On a bad config, missing data or an unusable checkpoint it prints one line
naming the problem and exits non-zero (2 for a config error). Under a launcher every rank runs this file and the
config is validated for the world size the launcher set (WORLD_SIZE, or the MPI / srun variables).

options:
  -h, --help  show this help and exit
"""

from __future__ import annotations

import sys
from typing import Sequence

from megatron.entry_args import split_entry_args


def main(argv: Sequence[str] | None = None) -> int:
    parsed = split_entry_args(argv, __doc__)
    if isinstance(parsed, int):
        return parsed
    files, overrides = parsed

    import os

    from megatron.config import load_config
    from megatron.errors import NeoxError, report_error
    from megatron.training.launch import launched_world_size

    try:
        cfg = load_config(*files, overrides=overrides, for_training=True, world_size=launched_world_size(os.environ))
    except NeoxError as exc:
        return report_error(exc)

    from megatron.training.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
