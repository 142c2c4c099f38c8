"""``checkpoint_async: true``: checkpoints written by a background thread while training continues.

:func:`~megatron.training.checkpointing.save_checkpoint` copies the state to host memory on the training thread
(the step after it changes the live tensors) and hands the :class:`~megatron.training.checkpointing.SaveJob` to
:meth:`AsyncCheckpointWriter.submit`. One writer thread writes this rank's files into the temp folder; the publish
(rename + ``latest`` + prune) is the same as a synchronous save's, so a crash during the write leaves the previous
checkpoint and ``latest`` as they were.

Who publishes: in a 1-rank run the writer thread itself, right after the write. With several ranks the publish needs
every rank's verdict (a collective), which stays on the training thread: it happens in :meth:`wait`, called by the
next save, at the end of the run and on SIGINT / SIGTERM. Until then a finished write sits in
``global_stepN.tmp-*`` and ``latest`` names the previous checkpoint. One save at a time: :meth:`submit` waits for
the previous one first. A failed write surfaces from :meth:`wait` as :class:`CheckpointSaveError` (exit 1).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from megatron.training.checkpointing import CheckpointSaveError, SaveJob


class AsyncCheckpointWriter:
    """At most one checkpoint in flight; ``world_size`` decides who publishes (see the module docstring)."""

    def __init__(self, world_size: int) -> None:
        self.publish_in_thread = world_size == 1
        self._thread: threading.Thread | None = None
        self._job: SaveJob | None = None
        self._local: str | None = None
        self._failure: BaseException | None = None
        self._started = 0.0
        self._written_s = 0.0

    def submit(self, job: SaveJob) -> None:
        """Write ``job`` in the background (after the previous job's :meth:`wait`, which the caller ran)."""
        if self._job is not None:
            raise RuntimeError("AsyncCheckpointWriter.submit: the previous checkpoint was not waited for")
        self._job, self._local, self._failure = job, None, None
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name=f"checkpoint-writer-{job.final.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        job = self._job
        assert job is not None
        try:
            self._local = job.write()
            if self.publish_in_thread:
                job.finish(self._local, collective=False)
        except BaseException as exc:  # surfaced by wait() on the training thread
            self._failure = exc
        self._written_s = time.perf_counter() - self._started

    @property
    def pending(self) -> bool:
        return self._job is not None

    def wait(self) -> tuple[Path, float] | None:
        """Collective with several ranks. Wait for the checkpoint in flight and publish it; returns (its path, the
        seconds its write took), or None when none was in flight. Raises CheckpointSaveError when it failed."""
        job = self._job
        if job is None:
            return None
        self.join()
        self._job = None
        failure = self._failure
        if isinstance(failure, CheckpointSaveError):
            raise failure
        if failure is not None:
            raise CheckpointSaveError(f"saving checkpoint {job.final.name} in {job.root} failed in the background "
                                      f"writer: {type(failure).__name__}: {failure}; the previous checkpoint and "
                                      "'latest' are unchanged") from failure
        if not self.publish_in_thread:
            job.finish(self._local)
        return job.final, self._written_s

    def join(self) -> None:
        """Wait for the writer thread only (no collective): the exit path of a failed or interrupted run."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


__all__ = ["AsyncCheckpointWriter"]
