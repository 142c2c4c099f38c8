"""The one error family of the project, and the one place that turns an error into a printed line and an exit code.

Every expected failure derives from :class:`NeoxError` through one of two branches, and every tool (train, eval,
generate, the converters, the data tools) follows the same rule:

* :class:`UserInputError` (exit 2): what the user gave cannot be used: a config key or value, a flag, or a file or
  folder the config or command line names (a data prefix, a checkpoint to load, a tokenizer, input text) that is
  missing, corrupt or does not fit. Every rank sees the same input and fails the same way, so only rank 0 prints.
* :class:`RunError` (exit 1): the run went wrong after its inputs were accepted: writing a checkpoint or an output
  failed (a full disk), the loss or a rank failed, a download broke. It may hit one rank only, so the failing rank
  prints (with its rank when several run).

The cases, tool by tool, are one table in ``tests/test_exit_codes.py``.

Library classes keep their old builtin base (``ValueError`` / ``RuntimeError``) next to the branch, so code that
catches those keeps working. Entry points catch :class:`NeoxError` once and call :func:`report_error`.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, TextIO


class NeoxError(Exception):
    """Root of every expected failure; ``exit_code`` is what a command-line tool exits with."""

    exit_code: int = 1


class UserInputError(NeoxError):
    """A config / flag / input-file problem the user can fix: exit 2."""

    exit_code = 2


class RunError(NeoxError):
    """A failure while running with accepted inputs: exit 1."""

    exit_code = 1


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def report_error(exc: BaseException, prog: Optional[str] = None, *,
                 input_kinds: tuple[type[BaseException], ...] = (), exit_code: Optional[int] = None,
                 stream: Optional[TextIO] = None) -> int:
    """Print ``[prog: ]error: <message>`` once and return the exit code (1 for an error outside the family).

    ``input_kinds``: further classes a tool treats as user input (exit 2). ``exit_code`` forces one code for the
    whole tool (the converters: everything they refuse is their input). The rule itself lives in the classes (module
    docstring)."""
    own = exc.exit_code if isinstance(exc, NeoxError) else 1
    code = exit_code if exit_code is not None else (2 if isinstance(exc, input_kinds) else own)
    rank, world = _rank()
    if rank != 0 and isinstance(exc, UserInputError):
        return code  # rank 0 says it for everyone
    head = f"{prog}: error: " if prog else "error: "
    where = f"rank {rank}: " if world > 1 and rank != 0 else ""
    print(f"{head}{where}{exc}", file=stream if stream is not None else sys.stderr)
    return code


__all__ = ["NeoxError", "RunError", "UserInputError", "report_error"]
