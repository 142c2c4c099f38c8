#!/usr/bin/env python
"""Pretrain a GPT-NeoX-style (optionally SepLLM) model from YAML configs.

usage: python train.py CONFIG.yml [MORE.yml ...] [--key value ...]
       python deepy.py train.py CONFIG.yml [...]      (same, launching N processes when configured)

Configs merge left to right; --key value overrides any key (see `python -m megatron.config --help`). On a bad
config, missing data or an unusable checkpoint it prints one line naming the problem and exits non-zero (2 for a
config error). Under the DeepSpeed launcher every rank runs this file.
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    args = [a for a in args if not a.startswith("--local_rank")]  # older launchers append --local_rank=N
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    files, overrides = args[:split], args[split:]
    if not files:
        print("error: give at least one config file before the --key value overrides", file=sys.stderr)
        return 2

    from megatron.config import ConfigError, load_config

    try:
        cfg = load_config(*files, overrides=overrides, for_training=True)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from megatron.training.cli import run_training

    return run_training(cfg)


if __name__ == "__main__":
    sys.exit(main())
