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
from typing import TYPE_CHECKING, Any
from megatron.errors import UserInputError

if TYPE_CHECKING:
    from megatron.config.neox import NeoXConfig

PROBE_BYTES = 64 * 1024  # enough to hit a full disk (a 1-byte file can fit in an already allocated block)


class OutputPathError(UserInputError, ValueError):
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


def check_output_dirs(cfg: NeoXConfig, rank: int) -> None:
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


def checkpoint_bytes(n_params: int, precision: str, zero_stage: int, optimizer_type: str,
                     momentum: float = 0.0, save_optim: bool = True) -> tuple[int, int]:
    """(certain, expected) size of one checkpoint on disk, all ranks together.

    ``certain``: the module state alone (2 bytes per parameter in bf16/fp16, else 4), which every save writes;
    ``expected``: plus the optimizer state (Adam/AdamW/cpu_adam: two fp32 moments; Lion: one; SGD: one with
    momentum) and the fp32 master copy that mixed precision and ZeRO-1/2/3 store with the optimizer partitions,
    plus the layout-free copy of the optimizer state that lets any layout resume (fp32 masters and moments, once
    per model; neither with ``no_save_optim``)."""
    module = n_params * (2 if precision in ("bf16", "fp16") else 4)
    if not save_optim:
        return module, module
    kind = optimizer_type.lower()
    moments = 2 if kind in ("adam", "adamw", "cpu_adam") else (1 if kind == "lion" or momentum else 0)
    master = 1 if precision in ("bf16", "fp16") or zero_stage >= 1 else 0
    layout_free = n_params * 4 * (moments + 1)
    return module, module + n_params * 4 * (moments + master) + layout_free


def check_checkpoint_space(save: str | os.PathLike, certain: int, expected: int) -> str | None:
    """Raise OutputPathError when ``save`` has less free space than one module state (every checkpoint would
    fail); return a warning line when it has less than the expected size of one checkpoint; None when it fits."""
    import shutil

    free = shutil.disk_usage(save).free
    gib = 1024 ** 3
    if free < certain:
        raise OutputPathError(f"checkpoint.save: {save} has {free / gib:.2f} GiB free, less than the "
                              f"{certain / gib:.2f} GiB of one checkpoint's weights alone; free space or choose "
                              "another folder")
    if free < expected:
        return (f"checkpoint.save: {save} has {free / gib:.2f} GiB free, one checkpoint is expected to take about "
                f"{expected / gib:.2f} GiB (weights + optimizer state): the first save may fail")
    return None


# ----------------------------------------------------------------------------------------------------------------
# limits known before the run: memory and sequence length (issue 21, item 4)


class RunLimitError(UserInputError, ValueError):
    """The configured run cannot fit the machine (memory) or its data (sequence length)."""


def available_memory(device: str) -> tuple[int, str] | None:
    """(bytes this process may still use, what was measured): free GPU memory on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on CPU (psutil elsewhere); None when it cannot be measured."""
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free on GPU {torch.cuda.current_device()}"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM"
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available), "available RAM"
    except ImportError:
        return None


def check_memory_fits(needed: int, processes: int, available: tuple[int, str] | None, what: str) -> None:
    """Refuse a run whose ``--summary`` estimate (``needed`` bytes per process, ``processes`` of them sharing the
    measured memory: the local ranks on CPU, one per GPU) is over what the machine has. The estimate leaves out
    framework overhead, so only a run that is clearly over is refused; one that is close may still fail later."""
    if available is None:
        return
    have, source = available
    total = needed * processes
    if total <= have:
        return
    gib = 1024 ** 3
    share = f" x {processes} processes" if processes > 1 else ""
    raise RunLimitError(f"memory: the run needs about {needed / gib:.2f} GiB per process{share} ({what}; the "
                        f"--summary estimate) but this machine has {have / gib:.2f} GiB {source}: lower seq_length or "
                        "train_micro_batch_size_per_gpu, set checkpoint_activations, or spread the model over more "
                        "GPUs (ZeRO, model / pipe parallel)")


def _token_datasets(dataset: Any) -> list[Any]:
    """The ``GPTDataset`` parts of a split (a blend holds several)."""
    if dataset is None:
        return []
    if hasattr(dataset, "tokens_per_epoch"):
        return [dataset]
    return [part for inner in getattr(dataset, "datasets", ()) for part in _token_datasets(inner)]


def check_sequence_fits_data(datasets: Any, seq_length: int) -> None:
    """One sample reads ``seq_length + 1`` tokens: a split with fewer tokens in all would repeat itself inside every
    sample (and an epoch would hold less than one sample), so the run is refused before training. Whole-document
    samples (``pack_impl`` pack_until_overflow / unpacked) are padded instead, so any split size fits them."""
    for split in ("train", "valid", "test"):
        for part in _token_datasets(getattr(datasets, split, None)):
            tokens = int(part.tokens_per_epoch)
            if 0 < tokens < seq_length + 1 and getattr(part, "pack_impl", "packed") == "packed":
                where = getattr(getattr(part, "indexed", None), "prefix", None) or getattr(part, "name", split)
                raise RunLimitError(f"model.seq_length {seq_length} is longer than the whole {split} split of "
                                    f"{where} ({tokens:,} tokens; a sample needs seq_length + 1): lower seq_length, "
                                    "add data or change split")
