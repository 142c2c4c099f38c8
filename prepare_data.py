#!/usr/bin/env python
"""Tokenize a named corpus or local text/JSONL files into Megatron .bin/.idx files (GPT-NeoX compatible CLI).

Examples:
  python prepare_data.py pg19_sample        # the bundled GPT-NeoX-20B tokenizer (HFTokenizer) unless -v is given
  python prepare_data.py pg19_sample -t HFTokenizer -v megatron/tokenizer/assets/20B_tokenizer.json
  python prepare_data.py mybooks --input books/ -t HFTokenizer -v 20B_tokenizer.json --workers 2
  python prepare_data.py web --input a.jsonl,b.jsonl --jsonl-keys text -t GPT2BPETokenizer -v vocab.json -m merges.txt
  python prepare_data.py instructions --sft --input data/instructions_demo/train.jsonl --chat-template plain
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from megatron.data.cli_utils import add_sft_arguments, check_sft_arguments, run_cli
from megatron.data.corpus_registry import CORPORA, fetch_corpus, get_corpus
from megatron.data.preprocess import tokenize_to_indexed
from megatron.data.sft import prepare_sft
from megatron.errors import UserInputError
from megatron.tokenizer import BUNDLED_NEOX_TOKENIZER, TOKENIZER_TYPES

#: tokenizer types that read no file
NO_FILE_TOKENIZERS = ("CharLevelTokenizer",)


def build_parser() -> argparse.ArgumentParser:
    corpora = "; ".join(f"{c.name}: {c.description}" for c in CORPORA.values())
    p = argparse.ArgumentParser(
        prog="prepare_data.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dataset",
        nargs="?",
        default="pg19_sample",
        help=f"named corpus to fetch and tokenize ({corpora}); with --input, just the output name "
        "(default: pg19_sample)",
    )
    p.add_argument("-t", "--tokenizer", default="HFTokenizer", metavar="TYPE",
                   help=f"tokenizer type, one of {', '.join(TOKENIZER_TYPES)} (default: HFTokenizer)")
    p.add_argument("-d", "--data-dir", default="./data",
                   help="folder for downloads and outputs; output goes to DATA_DIR/<dataset>/ (default: ./data)")
    p.add_argument("-v", "--vocab-file", default=None,
                   help="tokenizer file: tokenizer.json (HF), vocab.json or tokenizer.json (GPT-2), .model (SPM) "
                   "(default for HFTokenizer: the bundled GPT-NeoX-20B tokenizer, "
                   "megatron/tokenizer/assets/20B_tokenizer.json)")
    p.add_argument("-m", "--merge-file", default=None, help="GPT-2 merges.txt (only with a GPT-2 vocab.json)")
    p.add_argument("-f", "--force-redownload", action="store_true",
                   help="download a remote corpus again even if it is already in DATA_DIR")
    p.add_argument("--input", default=None,
                   help="tokenize local data instead of a named corpus: a text file, a folder of .txt/.jsonl, a "
                   "JSONL file, or a comma-separated list of those; one document per file / JSONL record")
    p.add_argument("--jsonl-keys", nargs="+", default=["text"],
                   help="JSONL keys to tokenize, one output per key (default: text)")
    p.add_argument("--workers", type=int, default=1, help="parallel tokenizer workers: threads for HF/GPT-2 tokenizers (Rust, no GIL), "
                   "processes for SentencePiece / char-level (default: 1)")
    p.add_argument("--output-prefix", default=None,
                   help="output path prefix; files are <prefix>_<key>_document.{bin,idx} "
                   "(default: DATA_DIR/<dataset>/<dataset>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_sft_arguments(p)
    return p


def vocab_file_for(tokenizer_type: str, vocab_file: str | None) -> str | None:
    """``-v`` as given, else the bundled GPT-NeoX-20B tokenizer for ``HFTokenizer``; other types that read a file
    need ``-v`` (one line naming the flag)."""
    if vocab_file is not None or tokenizer_type in NO_FILE_TOKENIZERS or tokenizer_type not in TOKENIZER_TYPES:
        return vocab_file       # (an unknown type is reported by the tokenizer factory, with the known ones)
    if tokenizer_type == "HFTokenizer":
        return os.fspath(BUNDLED_NEOX_TOKENIZER)
    raise UserInputError(f"-t {tokenizer_type} reads its vocabulary from a file: give it with -v/--vocab-file")


def _missing_folders(prefix: str) -> list[Path]:
    """The folders above ``prefix`` that do not exist yet."""
    return [d for d in (Path(prefix).parent, *Path(prefix).parent.parents) if not d.exists()]


def _remove_empty(folders: Sequence[Path]) -> None:
    for folder in folders:      # deepest first; a folder with anything in it (a download) stays
        try:
            folder.rmdir()
        except OSError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_sft_arguments(args)
    if args.sft and args.input is None:
        raise UserInputError("--sft tokenizes your own JSONL: give it with --input")
    vocab_file = vocab_file_for(args.tokenizer, args.vocab_file)
    if args.vocab_file is None and vocab_file is not None:
        print(f"tokenizer: {args.tokenizer} {vocab_file} (the bundled GPT-NeoX-20B tokenizer; -v picks another)")
    name = args.dataset
    prefix = args.output_prefix or os.path.join(args.data_dir, name, name)
    created = sorted({*_missing_folders(prefix), *_missing_folders(os.path.join(args.data_dir, name, name))},
                     key=lambda folder: len(folder.parts), reverse=True)
    try:
        return _prepare(args, name, prefix, vocab_file)
    except BaseException:
        _remove_empty(created)    # a failed run leaves no empty data/<name>/ behind
        raise


def _prepare(args: argparse.Namespace, name: str, prefix: str, vocab_file: str | None) -> int:
    if args.input is not None:
        source: str = args.input
    else:
        get_corpus(name)
        source = os.fspath(fetch_corpus(name, args.data_dir, force=args.force_redownload))
    if args.sft:
        results = prepare_sft(source, prefix, tokenizer_type=args.tokenizer, vocab_file=vocab_file,
                              merge_file=args.merge_file, chat_template=args.chat_template,
                              generation_role=args.generation_role, only_last=args.only_last,
                              progress=not args.no_progress)
    else:
        results = tokenize_to_indexed(
            source,
            prefix,
            tokenizer_type=args.tokenizer,
            vocab_file=vocab_file,
            merge_file=args.merge_file,
            jsonl_keys=args.jsonl_keys,
            append_eod=True,
            workers=args.workers,
            progress=not args.no_progress,
        )
    for r in results:
        print(
            f"wrote {r.prefix}.bin/.idx: {r.documents} documents, {r.tokens} tokens, "
            f"{r.input_bytes / 1e6:.2f} MB in {r.seconds:.2f} s ({r.mb_per_s:.2f} MB/s)"
            + (f", {r.skipped_empty} empty documents skipped" if r.skipped_empty else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "prepare_data.py"))
