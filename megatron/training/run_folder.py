"""One run per folder: a run owns its ``save`` folder and its ``metrics.jsonl``.

Two runs writing into one folder overwrite each other's checkpoints and interleave their metrics, and a run started
into a finished run's folder used to train from scratch and move ``latest`` without a word. So, before anything is
built, rank 0:

* takes ``<save>/.run.lock`` (created with ``O_EXCL``, holding host, pid and start time; removed at exit). A lock of
  a live process refuses the run in one line; a lock left by a dead process on this host is taken over (one line);
* decides what a folder that already holds checkpoints means: with ``load`` unset and the same model shape as the
  saved config, the run resumes it (``load`` becomes ``save``, one line says so); ``load`` naming the folder (or one
  of its ``global_stepN``) is a deliberate resume; ``overwrite_save: true`` removes the old checkpoints; anything else
  stops in one line naming the three choices;
* keeps ``metrics.jsonl`` to one run: a run that starts at iteration 0 moves an existing file aside
  (``metrics.prev-<time>.jsonl``) instead of appending to it; a resumed run appends after dropping the rows past its
  iteration (:meth:`RunLogger.drop_rows_after`).

The verdict is broadcast, so every rank fails (or resumes) alike.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron.checkpoint.format import CONFIG_FILE, LATEST_FILE, list_checkpoints, read_meta, resolve_checkpoint_dir
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig

LOCK_FILE = ".run.lock"
METRICS_FILE = "metrics.jsonl"

# model keys that decide the weights' shapes: a saved run with other values is another model, not this run
MODEL_SHAPE_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "num_kv_heads", "intermediate_size",
                    "expansion_factor", "mlp_multiple_of", "pos_emb", "norm", "activation", "gpt_j_residual",
                    "no_weight_tying", "use_bias_in_attn_linear", "use_bias_in_mlp", "use_bias_in_norms",
                    "use_qk_layernorm", "padded_vocab_size")


class RunFolderError(UserInputError, ValueError):
    """The save folder belongs to another run (locked by a live process, or holding another run's checkpoints)."""


@dataclass(frozen=True)
class FolderVerdict:
    """What rank 0 decided, sent to every rank: the ``load`` to use (None: unchanged) and lines to log."""

    load: str | None = None
    notes: tuple[str, ...] = ()
    error: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# the lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """``<save>/.run.lock``: the host and pid of the run writing into ``save``. :meth:`take` returns a line to log
    when it took over a stale lock; :meth:`release` removes the file if it is still ours."""

    def __init__(self, save: str | os.PathLike) -> None:
        self.path = Path(save) / LOCK_FILE
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.held = False

    def _record(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self._record())
        self.held = True
        return True

    def owner(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def take(self) -> str | None:
        """Create the lock; take over a stale one (a dead pid on this host). Raises RunFolderError when held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return None
        owner = self.owner()
        host, pid = (owner or {}).get("host"), (owner or {}).get("pid")
        if owner is None or not isinstance(pid, int):
            raise RunFolderError(f"checkpoint.save: {self.path} exists but does not name a run (host, pid); if no run "
                                 f"is writing into {self.path.parent}, delete it")
        if host == self.host and (pid == self.pid or not _alive(pid)):
            self.path.unlink(missing_ok=True)
            if not self._create():
                raise RunFolderError(f"checkpoint.save: {self.path.parent} was locked by another run while this one "
                                     "took over a stale lock")
            return (f"{self.path}: took over the lock of pid {pid}, which is no longer running (since "
                    f"{owner.get('started', '?')})")
        where = f"pid {pid}" + (f" on {host}" if host != self.host else "")
        raise RunFolderError(f"checkpoint.save: {self.path.parent} is in use by another run ({where}, since "
                             f"{owner.get('started', '?')}): wait for it, or choose another --save"
                             + (f"; if that run is gone, delete {self.path}" if host != self.host else ""))

    def release(self) -> None:
        if not self.held:
            return
        owner = self.owner()
        if owner is not None and owner.get("pid") == self.pid and owner.get("host") == self.host:
            self.path.unlink(missing_ok=True)
        self.held = False


# ----------------------------------------------------------------------------------------------------------------
# whose folder is it


def _holds_checkpoints(save: Path) -> bool:
    return bool(list_checkpoints(save)) or (save / LATEST_FILE).exists()


def _inside(load: Path, save: Path) -> bool:
    load, save = load.resolve(), save.resolve()
    return load == save or load.parent == save


def _shape_differences(cfg: NeoXConfig, saved_model: dict[str, Any]) -> list[str]:
    """``key saved vs configured`` for every shape key set on both sides that differs."""
    out = []
    for key in MODEL_SHAPE_KEYS:
        ours, theirs = getattr(cfg.model, key, None), saved_model.get(key)
        if ours is not None and theirs is not None and ours != theirs:
            out.append(f"{key} {theirs} (saved) vs {ours} (config)")
    return out


def _saved_model_section(ckpt: Path) -> dict[str, Any]:
    import yaml

    path = ckpt / CONFIG_FILE
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    model = data.get("model") if isinstance(data, dict) else None
    return model if isinstance(model, dict) else {}


def _choices(save: Path) -> str:
    return (f"resume it with --load {save}, choose a new --save, or replace its checkpoints with "
            "--overwrite_save true")


def decide_save_folder(cfg: NeoXConfig) -> FolderVerdict:
    """What a run into ``save`` means when the folder already holds checkpoints (see the module docstring)."""
    ck = cfg.checkpoint
    save = Path(ck.save)
    if not _holds_checkpoints(save):
        return FolderVerdict()
    if getattr(ck, "overwrite_save", False):
        removed = [p for p in save.iterdir() if p.is_dir() and p.name.startswith("global_step")]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        (save / LATEST_FILE).unlink(missing_ok=True)
        load = ck.load if ck.load and not _inside(Path(ck.load), save) else None
        return FolderVerdict(load=load, notes=(f"overwrite_save: removed {len(removed)} checkpoint folder(s) of an "
                                               f"earlier run from {save}",))
    if ck.load:
        if _inside(Path(ck.load), save):
            return FolderVerdict(load=ck.load)  # a deliberate resume of the folder's own run
        return FolderVerdict(error=f"checkpoint.save: {save} already holds the checkpoints of another run, and load "
                                   f"names {ck.load}: {_choices(save)}")
    ckpt = resolve_checkpoint_dir(save)
    differences = _shape_differences(cfg, _saved_model_section(ckpt))
    if differences:
        return FolderVerdict(error=f"checkpoint.save: {save} already holds checkpoints of another model ("
                                   f"{'; '.join(differences[:3])}): {_choices(save)}")
    iteration = read_meta(ckpt).get("iteration", ckpt.name[len("global_step"):])
    return FolderVerdict(load=str(save), notes=(f"resuming {save} at iteration {iteration} (load unset; the folder's "
                                                "own run)",))


def rotate_metrics(log_dir: str | os.PathLike | None) -> str | None:
    """A run starting at iteration 0 moves an earlier run's ``metrics.jsonl`` aside; returns the line to log."""
    if not log_dir:
        return None
    path = Path(log_dir) / METRICS_FILE
    try:
        if not path.is_file() or path.stat().st_size == 0:
            return None
    except OSError:
        return None
    target = path.with_name(f"metrics.prev-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.jsonl")
    n = 1
    while target.exists():
        target = target.with_name(f"{target.stem.split('+')[0]}+{n}.jsonl")
        n += 1
    os.replace(path, target)
    return f"{path}: an earlier run's rows moved to {target.name} (this run starts at iteration 0)"


def starts_fresh(cfg: NeoXConfig) -> bool:
    """Whether the run begins at iteration 0 (no ``load``, ``finetune``, or ``load`` = ``save`` with nothing in it)."""
    ck = cfg.checkpoint
    if not ck.load or ck.finetune:
        return True
    load = Path(ck.load)
    return bool(ck.save) and load.resolve() == Path(ck.save).resolve() and not _holds_checkpoints(load)


class RunFolder:
    """The run's claim on its folders, taken by rank 0 in :func:`claim`; released in :meth:`release`."""

    def __init__(self, lock: RunLock | None) -> None:
        self.lock = lock

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()


def claim(cfg: NeoXConfig, rank: int) -> tuple[RunFolder, FolderVerdict]:
    """Rank 0: lock ``save``, decide what its checkpoints mean, keep ``metrics.jsonl`` to one run. Other ranks get
    an empty claim; the caller broadcasts the verdict. Errors come back in the verdict (after the lock is
    released), so every rank can raise them together."""
    if rank != 0:
        return RunFolder(None), FolderVerdict()
    notes: list[str] = []
    lock = RunLock(cfg.checkpoint.save) if cfg.checkpoint.save else None
    try:
        if lock is not None:
            took_over = lock.take()
            if took_over:
                notes.append(took_over)
            verdict = decide_save_folder(cfg)
            if verdict.error:
                lock.release()
                return RunFolder(None), verdict
            notes.extend(verdict.notes)
            load = verdict.load
        else:
            load = None
    except (RunFolderError, UserInputError) as exc:
        if lock is not None:
            lock.release()
        return RunFolder(None), FolderVerdict(error=str(exc))
    probe = cfg if load is None else _with_load(cfg, load)
    if starts_fresh(probe):
        moved = rotate_metrics(cfg.logging.log_dir)
        if moved:
            notes.append(moved)
    return RunFolder(lock), FolderVerdict(load=load, notes=tuple(notes))


def _with_load(cfg: NeoXConfig, load: str) -> NeoXConfig:
    import copy

    out = copy.copy(cfg)
    out.checkpoint = copy.copy(cfg.checkpoint)
    out.checkpoint.load = load
    return out


__all__ = ["LOCK_FILE", "FolderVerdict", "RunFolder", "RunFolderError", "RunLock", "claim", "decide_save_folder",
           "rotate_metrics", "starts_fresh"]
