"""Shared CLI plumbing: turn expected errors into one clear line on stderr and a non-zero exit code; the fine-tuning
flags both tokenizing tools take."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from megatron.errors import NeoxError, UserInputError, report_error

#: errors reported without a traceback: the project's family (data, tokenizer, usage) and unreadable files
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (NeoxError, OSError)


def run_cli(main: Callable[[Sequence[str] | None], int], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; expected errors print ``<prog>: error: <message>`` and return the error's exit code
    (``megatron/errors.py``: bad input data, a tokenizer or a flag: 2; a failed download or a file system error while
    reading or writing: 1), Ctrl-C returns 130."""
    try:
        return main(argv)
    except EXPECTED_ERRORS as exc:
        return report_error(exc, prog)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def add_sft_arguments(parser: argparse.ArgumentParser) -> None:
    """The fine-tuning flags shared by ``prepare_data.py`` and ``tools/datasets/preprocess_data.py``."""
    from megatron.data.chat_templates import NAMED_TEMPLATES, TOKENIZER_TEMPLATE

    group = parser.add_argument_group(
        "supervised fine-tuning",
        "--sft reads JSONL records {\"prompt\", \"completion\"} or {\"messages\": [{\"role\", \"content\"},\n"
        "...]} and writes <prefix>_text_document.{bin,idx} plus <prefix>_label_document.{bin,idx}: the same\n"
        "lengths, the token id where the loss counts (completion / assistant turns and the end-of-document after\n"
        "them), -100 elsewhere (docs/finetuning.md)")
    group.add_argument("--sft", action="store_true", help="write a fine-tuning text + label dataset pair")
    group.add_argument("--chat-template", default=None, metavar="NAME",
                       help=f"how chat records (and, when given, prompt/completion pairs) become text: "
                       f"{', '.join(NAMED_TEMPLATES)} (written here) or {TOKENIZER_TEMPLATE} (the chat_template of "
                       f"the tokenizer_config.json beside the tokenizer file); default: the tokenizer's own when it "
                       f"has one (prompt/completion pairs are then concatenated as they are)")
    group.add_argument("--generation-role", default="assistant", metavar="ROLE",
                       help="GPT-NeoX: the role whose turns are trained on (default: assistant)")
    group.add_argument("--only-last", action="store_true",
                       help="GPT-NeoX: train on the last turn of each conversation only")


def check_sft_arguments(args: argparse.Namespace, keys_default: Sequence[str] = ("text",)) -> None:
    """The fine-tuning flags need ``--sft``, and ``--sft`` reads fixed record keys (no ``--jsonl-keys``)."""
    if not args.sft:
        used = [flag for flag, on in (("--chat-template", args.chat_template is not None),
                                      ("--generation-role", args.generation_role != "assistant"),
                                      ("--only-last", args.only_last)) if on]
        if used:
            raise UserInputError(f"{used[0]} only applies to fine-tuning data: add --sft")
        return
    if list(args.jsonl_keys) != list(keys_default):
        raise UserInputError("--sft reads the record keys prompt/completion or messages; drop --jsonl-keys")
    if args.workers != 1:
        raise UserInputError("--sft tokenizes in one process (fine-tuning sets are small); drop --workers")
