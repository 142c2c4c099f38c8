"""Shared CLI plumbing: turn expected errors into one clear line on stderr and a non-zero exit code."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from megatron.errors import NeoxError, report_error

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
