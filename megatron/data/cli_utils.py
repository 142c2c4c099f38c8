"""Shared CLI plumbing: turn expected errors into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from megatron.data.errors import DataError
from megatron.tokenizer.base import TokenizerError

#: errors that mean "bad input", reported without a traceback
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (DataError, TokenizerError, OSError)


def run_cli(main: Callable[[Sequence[str] | None], int], prog: str, argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; expected errors print ``<prog>: error: <message>`` and return 1, Ctrl-C returns 130."""
    try:
        return main(argv)
    except EXPECTED_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
