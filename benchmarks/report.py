"""What every benchmark does at the end and at the start: a ratio table on stdout, the rows as JSON, and the size
flags of its model. One place, so the tables and files of all benchmarks read alike."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron.atomic_io import atomic_write_text  # noqa: E402

#: a table column: (row key, header, format spec such as ">9.2f"; a trailing "x" prints a ratio as "1.23x")
Column = tuple[str, str, str]


def print_table(rows: Sequence[dict], columns: Sequence[Column]) -> None:
    """One header line and one line per row, right-aligned to the header's width (missing values left blank)."""
    def cell(value: Any, header: str, spec: str) -> str:
        width = max(len(header), 6)
        if value is None:
            return " " * width
        suffix = "x" if spec.endswith("x") else ""
        text = format(value, spec.rstrip("x").lstrip("<>")) + suffix
        return text.ljust(width) if spec.startswith("<") else text.rjust(width)

    print(" ".join(h.ljust(max(len(h), 6)) if s.startswith("<") else h.rjust(max(len(h), 6))
                   for _, h, s in columns))
    for row in rows:
        print(" ".join(cell(row.get(key), header, spec) for key, header, spec in columns))


def write_json(path: Optional[Any], payload: Any, announce: bool = True) -> None:
    """Write ``payload`` as indented JSON to ``path`` (parents created, temp file + rename); nothing for None.
    ``announce=False`` for the partial saves a long benchmark makes after each configuration."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=1) + "\n")
    if announce:
        print(f"wrote {path}")


def add_model_size_args(parser: argparse.ArgumentParser, *, layers: int, hidden: int, heads: int = 4,
                        vocab: Optional[int] = None) -> None:
    """``--layers/--hidden/--heads`` (and ``--vocab`` when a default is given) of the benchmark's model."""
    parser.add_argument("--layers", type=int, default=layers, help=f"model layers (default {layers})")
    parser.add_argument("--hidden", type=int, default=hidden, help=f"hidden size (default {hidden})")
    parser.add_argument("--heads", type=int, default=heads, help=f"attention heads (default {heads})")
    if vocab is not None:
        parser.add_argument("--vocab", type=int, default=vocab, help=f"vocabulary size (default {vocab})")
