"""The command line shared by the entry points (``train.py``, ``eval.py``, ``generate.py``): config files, then
``--key value`` overrides. Kept free of heavy imports so that ``--help`` answers at once; the top layer of the
package (it may import any other, lazily)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig


@dataclass(frozen=True)
class Entry:
    """An entry point's parsed command line and its loaded config."""

    config: NeoXConfig
    files: list[str]
    overrides: list[str]


def split_entry_args(argv: Sequence[str] | None, usage: str) -> Union[int, tuple[list[str], list[str]]]:
    """``(config files, overrides)``, or an exit code after printing ``usage`` (``--help`` anywhere: 0; no arguments:
    2) or a one-line error (no config file before the overrides: 2). Drops ``--local_rank`` that older launchers
    append."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(usage.strip())
        return 0 if args else 2
    args = [a for a in args if not a.startswith("--local_rank")]
    split = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    files, overrides = args[:split], args[split:]
    if not files:
        print("error: give at least one config file before the --key value overrides", file=sys.stderr)
        return 2
    return files, overrides


def load_entry(argv: Sequence[str] | None, usage: str, config: Optional[NeoXConfig] = None,
               **load_kwargs: Any) -> Union[int, Entry]:
    """Parse the command line and load its config (``load_kwargs`` go to ``load_config``), or take ``config`` when
    the caller already loaded it (``deepy.py`` running the script in its own process: the config is loaded once
    per process). A bad command line or config gives its exit code after one line."""
    parsed = split_entry_args(argv, usage)
    if isinstance(parsed, int):
        return parsed
    files, overrides = parsed
    if config is not None:
        return Entry(config=config, files=files, overrides=overrides)
    from megatron.device import quiet_accelerator_probe

    quiet_accelerator_probe()
    from megatron.config import load_config
    from megatron.errors import NeoxError, report_error

    try:
        cfg = load_config(*files, overrides=overrides, **load_kwargs)
    except NeoxError as exc:
        return report_error(exc)
    return Entry(config=cfg, files=files, overrides=overrides)
