#!/usr/bin/env python
"""Tokenize text / JSONL into Megatron .bin/.idx files (GPT-NeoX ``tools/datasets/preprocess_data.py`` flags).

Output: <output-prefix>_<key>_document.{bin,idx}, one per --jsonl-keys entry. Same implementation as
prepare_data.py (megatron.data.preprocess).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron.data.cli_utils import run_cli
from megatron.data.preprocess import tokenize_to_indexed
from megatron.tokenizer import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__)
    p.add_argument("--input", required=True,
                   help="text file, folder of .txt/.jsonl, JSONL file (.jsonl/.json, optionally .gz), or a "
                   "comma-separated list of those; one document per text file / JSONL record")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"],
                   help="JSONL keys to tokenize, one output dataset per key (default: text)")
    p.add_argument("--output-prefix", required=True, help="path prefix of the output files")
    p.add_argument("--tokenizer-type", required=True, metavar="TYPE",
                   help=f"one of {', '.join(TOKENIZER_TYPES)}")
    p.add_argument("--vocab-file", default=None, help="tokenizer.json / vocab.json / SentencePiece .model")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (only with a GPT-2 vocab.json)")
    p.add_argument("--append-eod", action="store_true", help="append the end-of-document id after every document")
    p.add_argument("--workers", type=int, default=1, help="parallel tokenizer workers: threads for HF/GPT-2 tokenizers (Rust, no GIL), "
                   "processes for SentencePiece / char-level (default: 1)")
    p.add_argument("--log-interval", type=int, default=0,
                   help="without a progress bar (--no-progress), print progress every N documents (default: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = tokenize_to_indexed(
        args.input,
        args.output_prefix,
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        jsonl_keys=args.jsonl_keys,
        append_eod=args.append_eod,
        workers=args.workers,
        progress=not args.no_progress,
        log_interval=args.log_interval,
    )
    for r in results:
        print(f"wrote {r.prefix}.bin/.idx: {r.documents} documents, {r.tokens} tokens ({r.mb_per_s:.2f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "preprocess_data.py"))
