"""Checks run before the model and data are built, so that a run does not fail at its first checkpoint.

``check_output_dirs`` creates ``save`` / ``log_dir`` / ``tensorboard_dir`` and writes, fsyncs and removes a small
probe file in each: an unwritable path, a read-only mount or a full disk is reported as one line naming the key,
the path and the OS error (exit 2 in ``train.py``) instead of a traceback after minutes of training.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any

PROBE_BYTES = 64 * 1024  # enough to hit a full disk (a 1-byte file can fit in an already allocated block)


class OutputPathError(ValueError):
    """An output folder named in the config cannot be created or written."""


def probe_writable(path: str | os.PathLike, key: str) -> None:
    """Create ``path`` (with parents) and write / fsync / delete a probe file in it; raise OutputPathError."""
    folder = Path(path)
    probe = folder / f".write-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * PROBE_BYTES)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or -1)
        reason = (exc.strerror or str(exc)) + (f" ({name})" if name else "")
        raise OutputPathError(f"{key}: cannot write to {folder}: {reason}; expected a writable folder with free "
                              "space") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass


def check_output_dirs(cfg: Any, rank: int) -> None:
    """Probe every output folder this rank will write: ``save`` on every rank (each writes its own files), the log
    folders on rank 0 only (the only writer)."""
    targets = []
    if cfg.checkpoint.save:
        targets.append(("checkpoint.save", cfg.checkpoint.save))
    if rank == 0:
        if cfg.logging.log_dir:
            targets.append(("logging.log_dir", cfg.logging.log_dir))
        if cfg.logging.tensorboard_dir:
            targets.append(("logging.tensorboard_dir", cfg.logging.tensorboard_dir))
    for key, path in targets:
        probe_writable(path, key)
