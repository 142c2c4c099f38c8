"""Our checkpoint format and how it is read: folder and file names, ``latest``, ``meta.json``, shape checks.

Layout of ``<save>/``::

    latest                        text file naming the newest complete checkpoint ("global_step100")
    global_step100/
        meta.json                 iteration, consumed samples, world size, ZeRO stage, LR schedule, parameter shapes
        config.yml                the resolved config of the run that wrote it
        model_states.pt           full module state dict (rank 0); under tensor parallelism instead one
        mp_rank_XX_model_states.pt  per TP rank (written by data-parallel rank 0 of the first stage; the split of
                                  every parameter is megatron.parallel.reshard's table, so any TP size loads it)
        optim_rank{R}.pt          optimizer state: rank 0 only for ZeRO-0 without TP/PP; every rank's partition
                                  for ZeRO-1/2/3 and every rank's own state under TP or PP (this layout only)
        optim_full_tpTT_ppSS.pt   the layout-free optimizer state of one TP rank and stage: any layout resumes it
                                  (megatron.checkpoint.layout_free)
        rng_rank{R}.pt            python / numpy / torch (CPU, CUDA) generator states of rank R

Every file is read with ``torch.load(weights_only=True)`` (:func:`load_file`). The training engine writes and
resumes this format (:mod:`megatron.training.checkpointing`); :mod:`megatron.checkpoint.trained` reads it as one
model, :mod:`megatron.checkpoint.hf.import_hf` writes it from a Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron.errors import UserInputError

FORMAT_VERSION = 1
LATEST_FILE = "latest"
META_FILE = "meta.json"
CONFIG_FILE = "config.yml"
STEP_DIR_RE = re.compile(r"^global_step(\d+)$")


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint to read (``load``, a converter's ``--input_dir``, eval's / generate's checkpoint) is missing,
    incomplete, corrupt or does not fit the current model/run: input the user named (exit 2)."""


@dataclass(frozen=True)
class CheckpointLayout:
    """Where this rank sits for checkpoint I/O under tensor / pipeline parallelism (defaults: plain data parallel).

    ``writes_model``: whether this rank writes its module-state file (None: global rank 0 only);
    ``dp_group_ranks``: the global ranks of this rank's data-parallel group, whose ZeRO partitions it loads (None:
    all ranks, the pure data-parallel case); ``pp_size``: pipeline stages (1 = no pipeline engine), ``pp_rank``
    this rank's stage.
    """

    tp_rank: int = 0
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    writes_model: bool | None = None
    dp_group_ranks: tuple[int, ...] | None = None

    @property
    def per_rank_optimizer(self) -> bool:
        """TP shards / pipeline stages hold different optimizer states on every rank."""
        return self.tp_size > 1 or self.pp_size > 1

    def model_file(self) -> str:
        from megatron.parallel.reshard import tp_model_file

        return tp_model_file(self.tp_rank, self.tp_size)


def checkpoint_name(iteration: int) -> str:
    """The folder of the checkpoint taken after ``iteration``."""
    return f"global_step{iteration}"


def list_checkpoints(save_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed ``global_stepN`` folders) sorted by iteration."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def read_latest(latest: Path) -> str:
    """The folder name held by a ``latest`` file; a clear error for an empty, binary or path-like content."""
    try:
        raw = latest.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {latest}: {exc.strerror or exc}") from exc
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{latest} is not a text file (binary content, {len(raw)} bytes); expected one line "
                              "naming a global_stepN folder, e.g. 'global_step100'") from None
    if not name:
        raise CheckpointError(f"{latest} is empty; expected the name of a global_stepN folder")
    if "\n" in name or "/" in name or "\\" in name or name in (".", "..") or not name.isprintable():
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise CheckpointError(f"{latest} holds {shown!r}; expected one line naming a global_stepN folder "
                              "inside the same directory, e.g. 'global_step100'")
    return name


def resolve_checkpoint_dir(load_dir: str | os.PathLike) -> Path:
    """``load_dir`` may be a run folder (uses ``latest``) or one ``global_stepN`` folder. Clear errors otherwise."""
    path = Path(load_dir)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory")
    if (path / META_FILE).exists():
        return path
    latest = path / LATEST_FILE
    if latest.exists():
        name = read_latest(latest)
        target = path / name
        if not (target / META_FILE).is_file():
            raise CheckpointError(f"{latest} points to {target}, which is not a complete checkpoint "
                                  f"(missing {META_FILE})")
        return target
    steps = list_checkpoints(path)
    if not steps:
        raise CheckpointError(f"no checkpoint found in {path}: expected a '{LATEST_FILE}' file or global_stepN "
                              f"folders containing {META_FILE}")
    newest = steps[-1][1]
    if not (newest / META_FILE).is_file():
        raise CheckpointError(f"checkpoint {newest} is incomplete (missing {META_FILE})")
    return newest


def load_file(path: Path) -> Any:
    """One checkpoint file, read with ``weights_only=True``; :class:`CheckpointError` naming it when it is missing or
    corrupt."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt archives
        raise CheckpointError(f"checkpoint file {path} is corrupt or unreadable: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """``meta.json`` of one ``global_stepN`` folder (it must name its iteration)."""
    path = ckpt_dir / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {path} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {path} is corrupt: {exc}") from exc
    if not isinstance(meta, dict) or "iteration" not in meta:
        raise CheckpointError(f"checkpoint file {path} has no 'iteration' entry")
    return meta


def check_model_shapes(saved: dict[str, torch.Tensor], module: torch.nn.Module, where: Path) -> None:
    """Raise naming every missing, unexpected or differently shaped key."""
    check_shapes({k: tuple(v.shape) for k, v in saved.items()},
                 {k: tuple(v.shape) for k, v in module.state_dict().items()}, where)


def check_shapes(saved: dict[str, tuple[int, ...]], current: dict[str, tuple[int, ...]], where: Path) -> None:
    """Raise naming every missing, unexpected or differently shaped key (``name -> shape`` on both sides)."""
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    differing = [f"{k}: checkpoint {saved[k]} vs model {current[k]}"
                 for k in sorted(set(saved) & set(current)) if saved[k] != current[k]]
    if missing or unexpected or differing:
        parts = []
        if differing:
            parts.append("shape mismatch: " + "; ".join(differing[:8]) + (" ..." if len(differing) > 8 else ""))
        if missing:
            parts.append("missing in checkpoint: " + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            parts.append("not in model: " + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"checkpoint {where} does not match the configured model ({' | '.join(parts)})")


__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "LATEST_FILE", "META_FILE", "STEP_DIR_RE", "CheckpointError",
           "CheckpointLayout", "check_model_shapes", "check_shapes", "checkpoint_name", "list_checkpoints", "load_file",
           "read_latest", "read_meta", "resolve_checkpoint_dir"]
