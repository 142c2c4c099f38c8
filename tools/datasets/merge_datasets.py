#!/usr/bin/env python
"""Merge several .bin/.idx datasets into one, keeping every document boundary (doc_idx) right.

Example:
  python tools/datasets/merge_datasets.py --input data/a_text_document data/b_text_document \
      --output-prefix data/ab_text_document
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron.data.cli_utils import run_cli
from megatron.data.indexed_dataset import merge_datasets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_datasets.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--input", nargs="+", required=True,
                   help="dataset prefixes (path without .bin/.idx; a .bin/.idx suffix is also accepted), in order")
    p.add_argument("--output-prefix", required=True, help="prefix of the merged .bin/.idx")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = merge_datasets(args.input, args.output_prefix)
    print(f"wrote {out.prefix}.bin/.idx: {out.num_documents} documents, {len(out)} sequences, {out.num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "merge_datasets.py"))
