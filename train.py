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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(__doc__.strip())
        return 0 if args else 2
    args = [a for a in args if not a.startswith("--local_rank")]  # older launchers append --local_rank=N
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    files, overrides = args[:split], args[split:]
    if not files:
        print("error: give at least one config file before the --key value overrides", file=sys.stderr)
        return 2

    import os

    from megatron.config import ConfigError, load_config
    from megatron.training.launch import launched_world_size

    try:
        cfg = load_config(*files, overrides=overrides, for_training=True, world_size=launched_world_size(os.environ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron.training.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
