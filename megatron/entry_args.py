"""The command line shared by the entry points (``train.py``, ``eval.py``, ``generate.py``): config files, then
``--key value`` overrides. Kept free of heavy imports so that ``--help`` answers at once."""

from __future__ import annotations

import sys
from typing import Sequence, Union


def split_entry_args(argv: Sequence[str] | None, usage: str) -> Union[int, tuple[list[str], list[str]]]:
    """``(config files, overrides)``, or an exit code after printing ``usage`` (``--help`` anywhere: 0; no arguments:
    2) or a one-line error (no config file before the overrides: 2). Drops ``--local_rank`` that older launchers
    append."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(usage.strip())
        return 0 if args else 2
    args = [a for a in args if not a.startswith("--local_rank")]
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    files, overrides = args[:split], args[split:]
    if not files:
        print("error: give at least one config file before the --key value overrides", file=sys.stderr)
        return 2
    return files, overrides
