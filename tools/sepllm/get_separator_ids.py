#!/usr/bin/env python
"""Print the SepLLM separator token ids of a tokenizer (spec section 2).

Each separator string (. , ? ! ; : space tab newline, and with --variants the same with one/two leading or trailing
spaces) is encoded without special tokens; strings that encode to exactly one id are kept, duplicates dropped.

Examples:
  python tools/sepllm/get_separator_ids.py -t HFTokenizer -v megatron/tokenizer/assets/20B_tokenizer.json
  python tools/sepllm/get_separator_ids.py --hf-name-or-path ./my_hf_model --variants --json seps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from megatron.data.cli_utils import run_cli
from megatron.tokenizer import TOKENIZER_TYPES, build_tokenizer
from megatron.tokenizer.separators import BASE_SEPARATORS, separator_table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="get_separator_ids.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-t", "--tokenizer-type", default="HFTokenizer", metavar="TYPE",
                   help=f"one of {', '.join(TOKENIZER_TYPES)} (default: HFTokenizer)")
    p.add_argument("-v", "--vocab-file", default=None, help="tokenizer file for --tokenizer-type")
    p.add_argument("-m", "--merge-file", default=None, help="GPT-2 merges.txt")
    p.add_argument("--hf-name-or-path", default=None,
                   help="use transformers.AutoTokenizer on this local folder/hub name instead of --tokenizer-type")
    p.add_argument("--chars", nargs="+", default=None,
                   help="separator strings to try (default: . , ? ! ; : space tab newline); "
                   "escapes like \\n and \\t are understood")
    p.add_argument("--variants", action="store_true",
                   help="also try each string with 1-2 leading and 1-2 trailing spaces, and 2-3 space runs")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write {'separator_token_ids': [...], 'tokens': [...]} to PATH")
    return p


def _load(args: argparse.Namespace) -> Any:
    if args.hf_name_or_path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(args.hf_name_or_path)
    return build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chars = BASE_SEPARATORS
    if args.chars:
        chars = tuple(c.encode("utf-8").decode("unicode_escape") for c in args.chars)
    tokenizer = _load(args)
    table = separator_table(tokenizer, chars, variants=args.variants)
    print(f"{'id':>8}  {'string':<8}  decoded")
    for text, idx in table:
        print(f"{idx:>8}  {text!r:<8}  {tokenizer.decode([idx])!r}")
    ids = [i for _, i in table]
    print(f"separator_token_ids: {ids}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"separator_token_ids": ids, "tokens": [t for t, _ in table]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "get_separator_ids.py"))
