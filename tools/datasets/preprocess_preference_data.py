#!/usr/bin/env python
"""Preference JSONL ({"prompt", "chosen", "rejected"} per line) -> the four .bin/.idx datasets DPO reads.

Writes <output-prefix>_chosen_document, _chosen_label_document, _rejected_document and _rejected_label_document
(GPT-NeoX's pairwise layout: record i is document i of each; labels are -100 on the prompt). Point
pos_train_data_paths / pos_train_label_data_paths at the chosen pair and neg_* at the rejected pair
(docs/finetuning.md, "Preference training (DPO)").
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from megatron.data.cli_utils import run_cli
from megatron.data.preference_prep import prepare_preference_data
from megatron.tokenizer import TOKENIZER_TYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess_preference_data.py", description=__doc__)
    p.add_argument("--input", required=True, help="JSONL file, one {\"prompt\", \"chosen\", \"rejected\"} per line")
    p.add_argument("--output-prefix", required=True, help="path prefix of the four output datasets")
    p.add_argument("--tokenizer-type", required=True, metavar="TYPE", help=f"one of {', '.join(TOKENIZER_TYPES)}")
    p.add_argument("--vocab-file", default=None, help="tokenizer.json / vocab.json / SentencePiece .model")
    p.add_argument("--merge-file", default=None, help="GPT-2 merges.txt (only with a GPT-2 vocab.json)")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="render the prompt as a user turn and each response as the assistant's reply with this "
                        "template (chatml, plain, or tokenizer: the tokenizer's own), as for SFT data; default: the "
                        "prompt and response text as they are")
    p.add_argument("--no-append-eod", action="store_true",
                   help="do not end each response with the end-of-document id (default: appended, and counted)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = prepare_preference_data(args.input, args.output_prefix, args.tokenizer_type, args.vocab_file,
                                     args.merge_file, append_eod=not args.no_append_eod,
                                     chat_template=args.chat_template)
    for name, prefix in result.prefixes.items():
        print(f"wrote {prefix}.bin/.idx ({name})")
    print(f"{result.pairs} pairs, {result.tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, "preprocess_preference_data.py"))
