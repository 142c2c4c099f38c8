"""Graceful stop on SIGINT / SIGTERM: finish the current iteration, save, exit 130.

Ctrl-C reaches every rank (the terminal signals the whole process group) and DeepSpeed's launcher follows it with
SIGTERM to each rank, giving them 30 s before SIGKILL. :class:`StopRequest` turns both signals into a flag; the loop
asks :meth:`StopRequest.agreed` once per iteration, which all-reduces the flag so that every rank stops after the
same iteration and the checkpoint it then writes is collective-safe. A second signal while the flag is set aborts at
once (KeyboardInterrupt), for a user who does not want to wait for the save; the launcher's SIGTERM that follows the
terminal's SIGINT is not a second request.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after a clean iteration boundary; ``exit_code`` is 128 + the signal number
    (130 for SIGINT, 143 for SIGTERM), what a shell reports for a process ended by that signal. A KeyboardInterrupt,
    so callers that treat Ctrl-C specially (benchmarks, ``except Exception`` blocks) keep doing so."""

    def __init__(self, message: str, exit_code: int = 128 + int(signal.SIGINT)) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    """Context manager installing the handlers (main thread only; elsewhere it is inert and never stops)."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
        elif name == self.signal_name:  # the same signal again (Ctrl-C twice): the user will not wait for the save
            raise KeyboardInterrupt(f"second {name}: abort without saving")
        # a different one (the launcher's SIGTERM right after the terminal's SIGINT): already stopping

    @property
    def exit_code(self) -> int:
        return 128 + int(signal.SIGTERM if self.signal_name == "SIGTERM" else signal.SIGINT)

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def agreed(self, device: str) -> bool:
        """Collective: True on every rank when any rank has been signalled (one tiny all-reduce per call)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signal_name is None:
            self.signal_name = "a signal on another rank"
        return bool(flag.item() > 0)
