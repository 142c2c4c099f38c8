#!/usr/bin/env python
"""Tokenize text / JSONL into Megatron .bin/.idx files (GPT-NeoX ``tools/datasets/preprocess_data.py`` flags).

Output: <output-prefix>_<key>_document.{bin,idx}, one per --jsonl-keys entry; with --sft (fine-tuning JSONL)
<output-prefix>_text_document and <output-prefix>_label_document. Same implementation as prepare_data.py
(megatron.data.preprocess, megatron.data.sft).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron.data.cli_utils import add_sft_arguments, check_sft_arguments, run_cli
from megatron.data.preprocess import tokenize_to_indexed
from megatron.data.sft import prepare_sft
from megatron.tokenizer import TOKENIZER_TYPES
from megatron.errors import UserInputError, report_error


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
    neox = p.add_argument_group("GPT-NeoX compatibility")
    neox.add_argument("--dataset-impl", default="mmap", metavar="IMPL",
                      help="output format; only mmap (Megatron MMIDIDX .bin/.idx) is written (default: mmap)")
    neox.add_argument("--ftfy", action="store_true",
                      help="repair mojibake / broken Unicode with ftfy.fix_text before tokenizing (needs the ftfy "
                      "package: pip install ftfy)")
    neox.add_argument("--num-docs", type=int, default=None, metavar="N",
                      help="number of documents in the input, when known: the progress bar counts documents to N")
    add_sft_arguments(p)
    return p


def _fix_text(use_ftfy: bool):
    """``ftfy.fix_text`` for --ftfy (a one-line error when ftfy is not installed), else None."""
    if not use_ftfy:
        return None
    try:
        import ftfy
    except ImportError:
        raise UsageError("--ftfy needs the ftfy package, which is not installed: pip install ftfy (or drop "
                         "--ftfy)") from None
    return ftfy.fix_text


class UsageError(UserInputError, ValueError):
    """A flag value this tool cannot honour (exit 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.dataset_impl != "mmap":
            raise UsageError(f"--dataset-impl {args.dataset_impl}: only mmap is supported (Megatron MMIDIDX .bin/.idx, "
                             f"what GPT-NeoX and this trainer read); drop the flag or pass --dataset-impl mmap")
        if args.num_docs is not None and args.num_docs < 1:
            raise UsageError(f"--num-docs {args.num_docs}: expected a number of documents >= 1")
        fix_text = _fix_text(args.ftfy)
        check_sft_arguments(args)
        if args.sft and (args.ftfy or args.num_docs is not None):
            raise UsageError(f"{'--ftfy' if args.ftfy else '--num-docs'} does not apply to --sft data; drop it")
    except UserInputError as exc:  # a flag problem: exit 2 (run_cli reports data and tokenizer problems)
        return report_error(exc, "preprocess_data.py")
    if args.sft:
        results = prepare_sft(args.input, args.output_prefix, tokenizer_type=args.tokenizer_type,
                              vocab_file=args.vocab_file, merge_file=args.merge_file, chat_template=args.chat_template,
                              generation_role=args.generation_role, only_last=args.only_last,
                              progress=not args.no_progress)
        for r in results:
            print(f"wrote {r.prefix}.bin/.idx: {r.documents} documents, {r.tokens} tokens ({r.mb_per_s:.2f} MB/s)")
        return 0
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
        fix_text=fix_text,
        num_docs=args.num_docs,
    )
    for r in results:
        print(f"wrote {r.prefix}.bin/.idx: {r.documents} documents, {r.tokens} tokens ({r.mb_per_s:.2f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "preprocess_data.py"))
