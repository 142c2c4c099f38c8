"""The training engine's side of our checkpoint format (:mod:`megatron.checkpoint.format`): atomic, resumable saves
of a DeepSpeed engine and resuming one from them.

Why not ``engine.save_checkpoint``: DeepSpeed writes in place (a crash mid-save corrupts the newest checkpoint and
its ``latest`` file already points at it) and its loader unpickles arbitrary objects. We write everything into
``global_stepN.tmp-XXXX/``, rename the folder only when every rank has finished, then replace ``latest`` atomically.
A crash at any point leaves the previous checkpoint and ``latest`` intact; a failed write (full disk, permissions)
on any rank removes the temp folder on every rank's behalf and raises :class:`CheckpointSaveError` on all ranks alike
(the ranks agree on the outcome, so none is left waiting in a barrier). ZeRO-1/2/3 optimizer partitions are saved
per rank from DeepSpeed's own ``state_dict`` (made pickle-free) and restored through its ``load_state_dict`` when
the run has the checkpoint's layout (the exact fast path); every save also writes the layout-free copy
(:mod:`megatron.checkpoint.layout_free`, :mod:`megatron.training.optimizer_state`), from which any other DP x TP x PP
layout, ZeRO stage or precision resumes. Under ZeRO-3 the module state is gathered with DeepSpeed's
``GatheredParameters`` one submodule at a time into the same full-model ``model_states.pt`` as any other stage, so
every checkpoint loads into any stage and converts with the same tools.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron.atomic_io import atomic_write_text
from megatron.checkpoint.format import (
    CONFIG_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    META_FILE,
    CheckpointError,
    CheckpointLayout,
    check_model_shapes,
    check_shapes,
    checkpoint_name,
    list_checkpoints,
    load_file,
    read_meta,
    resolve_checkpoint_dir,
)
from megatron.checkpoint.layout_free import optim_full_file, read_full_optimizer_state
from megatron.training.distributed import barrier, broadcast_object, capture_rng_state, restore_rng_state
from megatron.training.optimizer_state import (gather_full_optimizer_state, load_full_optimizer_state,
                                               local_parameters, supports_layout_free)
from megatron.errors import RunError

_SCALER_KEY = "__loss_scaler_state__"


class CheckpointSaveError(RunError, RuntimeError):
    """Writing a checkpoint failed (no space, permissions, ...); the previous checkpoint and ``latest`` are intact.
    The run failed (exit 1)."""


@dataclass(frozen=True)
class RunSnapshot:
    """The engine-independent part of a checkpoint: where the run stands (iteration, data position, LR schedule,
    seed), its resolved config and which optional files to write. :func:`save_checkpoint` writes the first four as
    ``meta.json``'s ``client_state`` (what a resume reads back) and the config as ``config.yml``."""

    iteration: int
    consumed_train_samples: int = 0
    lr_scheduler: dict[str, Any] | None = None    # AnnealingLR.state_dict(); None: not recorded
    seed: int | None = None                       # None: not recorded
    config_yaml: str | None = None                # the resolved config (None: no config.yml)
    save_optim: bool = True                       # False: no optim_rank*.pt (no_save_optim)
    save_rng: bool = True                         # False: no rng_rank*.pt (no_save_rng)

    def client_state(self) -> dict[str, Any]:
        """``meta.json``'s ``client_state`` (JSON): iteration, consumed samples, and the LR schedule / seed when set."""
        out: dict[str, Any] = {"iteration": self.iteration, "consumed_train_samples": self.consumed_train_samples}
        if self.lr_scheduler is not None:
            out["lr_scheduler"] = self.lr_scheduler
        if self.seed is not None:
            out["seed"] = self.seed
        return out


def should_save(iteration: int, checkpoint_factor: int | None, extra_save_iters: Iterable[int] | None = None) -> bool:
    """GPT-NeoX rule: every ``checkpoint_factor`` iterations, plus the listed extra iterations."""
    if extra_save_iters and iteration in set(extra_save_iters):
        return True
    return bool(checkpoint_factor) and iteration % int(checkpoint_factor) == 0


# ----------------------------------------------------------------------------------------------------------------
# pickle-free optimizer state (DeepSpeed ZeRO state dicts hold a LossScaler object and an enum)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_plain(v) for v in obj)
    if isinstance(obj, enum.Enum):
        return _to_plain(obj.value)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
        return obj
    if type(obj).__name__.endswith("LossScaler") and hasattr(obj, "__dict__"):
        return {_SCALER_KEY: {k: v for k, v in vars(obj).items()
                              if v is None or isinstance(v, (bool, int, float, str))}}
    raise CheckpointSaveError(f"cannot store optimizer state value of type {type(obj).__name__} without pickling")


def _restore_scaler(state: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Apply a saved loss-scaler state onto the live scaler object, which then stands in ``state`` for the saved
    one (ZeRO-3's loader requires the key; ZeRO-1/2 fall back to the live scaler without it)."""
    saved = state.get("loss_scaler")
    if isinstance(saved, dict) and _SCALER_KEY in saved:
        state = dict(state)
        del state["loss_scaler"]
        live = getattr(optimizer, "loss_scaler", None)
        if live is not None:
            for key, value in saved[_SCALER_KEY].items():
                setattr(live, key, value)
            state["loss_scaler"] = live
    return state


def _optimizer_is_partitioned(engine: Any) -> bool:
    return int(engine.zero_optimization_stage()) >= 1


def _stage_family(stage: int) -> str:
    """Optimizer-state formats: plain (ZeRO-0), flat fp32 partitions (ZeRO-1/2), parameter partitions (ZeRO-3)."""
    return "plain" if stage == 0 else ("zero12" if stage in (1, 2) else "zero3")


def _partitions_parameters(engine: Any) -> bool:
    """ZeRO-3: every rank holds only a slice of each parameter (the module's own tensors are placeholders)."""
    return int(engine.zero_optimization_stage()) >= 3


def _zero3_submodules(module: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    return module.named_modules(remove_duplicate=False)


def zero3_module_state(engine: Any, keep: bool) -> dict[str, torch.Tensor] | None:
    """Full module state dict of a ZeRO-3 engine (collective: every rank of the data-parallel group must call).

    Gathers one submodule's parameters at a time with DeepSpeed's ``GatheredParameters`` (read-only) so the peak
    extra memory is one layer; ranks with ``keep`` False take part in the gathers but return None. Keys and order
    are those of ``module.state_dict()`` (tied parameters appear under every name, as there)."""
    import deepspeed

    module = engine.module
    wanted = list(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for prefix, sub in _zero3_submodules(module):
        params = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if keep:
                dot = f"{prefix}." if prefix else ""
                for name, param in sub.named_parameters(recurse=False):
                    state[dot + name] = param.detach().to("cpu", copy=True)
                for name, buf in sub.named_buffers(recurse=False):
                    if buf is not None and name not in sub._non_persistent_buffers_set:
                        state[dot + name] = buf.detach().to("cpu", copy=True)
    if not keep:
        return None
    return {k: state[k] for k in wanted if k in state}


def zero3_param_shapes(engine: Any) -> dict[str, tuple[int, ...]]:
    """Full shapes of a ZeRO-3 module's state entries (parameters report ``ds_shape``, buffers their own shape)."""
    shapes = {}
    for name, tensor in engine.module.state_dict(keep_vars=True).items():
        shapes[name] = tuple(getattr(tensor, "ds_shape", tensor.shape))
    return shapes


def _zero3_load_module(engine: Any, state: dict[str, torch.Tensor], where: Path) -> None:
    """Copy a full module state into a ZeRO-3 engine's partitions (collective) and refresh its fp32 master copy."""
    import deepspeed

    module = engine.module
    current = zero3_param_shapes(engine)
    check_shapes({k: tuple(v.shape) for k, v in state.items()}, current, where)
    for prefix, sub in _zero3_submodules(module):
        params = list(sub.parameters(recurse=False))
        dot = f"{prefix}." if prefix else ""
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            with torch.no_grad():
                for name, param in sub.named_parameters(recurse=False):
                    param.data.copy_(state[dot + name].to(param.dtype))
        for name, buf in sub.named_buffers(recurse=False):
            if buf is not None and dot + name in state:
                with torch.no_grad():
                    buf.copy_(state[dot + name].to(buf.dtype))
    engine.optimizer._restore_from_bit16_weights()


# ----------------------------------------------------------------------------------------------------------------
# save


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _io_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC): /path/file`` -- one short phrase for the error line."""
    import errno

    name = errno.errorcode.get(exc.errno or -1)
    text = (exc.strerror or str(exc) or type(exc).__name__) + (f" ({name})" if name else "")
    return f"{text}: {exc.filename}" if getattr(exc, "filename", None) else text


def _first_error(local: str | None) -> str | None:
    """Collective: every rank learns the first failure of any rank (None when all succeeded)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local)
    return next((f"rank {r}: {e}" for r, e in enumerate(errors) if e), None)


def _precision(engine: Any) -> str:
    return "bf16" if engine.bfloat16_enabled() else ("fp16" if engine.fp16_enabled() else "fp32")


def _first_of_dp_group(rank: int, layout: CheckpointLayout) -> bool:
    """Data-parallel rank 0 of this rank's (TP rank, stage) slot: it writes the slot's layout-free optimizer file."""
    return rank == (layout.dp_group_ranks[0] if layout.dp_group_ranks is not None else 0)


def _write_rank_files(tmp: Path, engine: Any, snapshot: RunSnapshot, rank: int, world_size: int,
                      layout: CheckpointLayout, module_state: dict[str, torch.Tensor] | None,
                      optim_state: dict[str, Any] | None, writes_model: bool, rng_state: dict[str, Any] | None,
                      files: list[tuple[Any, Path]]) -> None:
    """This rank's files; ``rng_state`` was captured with the rest of the state (the write may run later)."""
    if writes_model:
        _torch_save(module_state, tmp / layout.model_file())
    if optim_state is not None:
        _torch_save(optim_state, tmp / f"optim_rank{rank}.pt")
    for obj, path in files:
        _torch_save(obj, path)
    if rng_state is not None:
        _torch_save(rng_state, tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        meta = {
            "format_version": FORMAT_VERSION,
            "iteration": snapshot.iteration,
            "world_size": world_size,
            "zero_stage": int(engine.zero_optimization_stage()),
            "tensor_parallel_size": layout.tp_size,
            "pipe_parallel_size": layout.pp_size,
            "optimizer_per_rank": layout.per_rank_optimizer,
            "has_optimizer": snapshot.save_optim,
            "optimizer_layout_free": snapshot.save_optim and supports_layout_free(engine),
            "precision": _precision(engine),
            "data_parallel_size": world_size // (layout.tp_size * layout.pp_size),
            "global_batch_size": int(engine.train_batch_size()),
            "has_rng": snapshot.save_rng,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch_version": torch.__version__,
            "param_shapes": {k: list(v.shape) for k, v in (module_state or {}).items()},
            "client_state": snapshot.client_state(),
        }
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1))
        if snapshot.config_yaml is not None:
            atomic_write_text(tmp / CONFIG_FILE, snapshot.config_yaml)


def save_checkpoint(save_dir: str | os.PathLike, engine: Any, snapshot: RunSnapshot, *, rank: int, world_size: int,
                    layout: CheckpointLayout | None = None, module_state: dict[str, torch.Tensor] | None = None,
                    keep_last_n: int | None = None, background: Callable[[SaveJob], None] | None = None) -> Path:
    """Write ``global_step{snapshot.iteration}`` atomically on every rank (collective call); returns its final path.

    ``snapshot`` is the run's engine-independent state (:class:`RunSnapshot`: counters, LR schedule, config, and
    whether the optimizer / RNG files are written, recorded in ``meta.json``). ``module_state`` replaces
    ``engine.module.state_dict()`` (a pipeline engine passes the gathered GPTModel layout); ``layout`` says which
    module/optimizer files this rank writes under TP / PP; ``keep_last_n`` prunes older checkpoints. Raises
    :class:`CheckpointSaveError` on every rank when any rank fails to write: the temp folder is removed, the
    previous checkpoint and ``latest`` stay as they were. ``background`` (``checkpoint_async``): the state is copied
    to host memory here and the :class:`SaveJob` that writes and publishes it is handed over instead of run.
    """
    layout = layout or CheckpointLayout()
    root = Path(save_dir)
    final = root / checkpoint_name(snapshot.iteration)
    tmp_name = broadcast_object(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}" if rank == 0 else None)
    tmp = root / tmp_name
    writes_model = layout.writes_model if layout.writes_model is not None else rank == 0
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            error = _io_error(exc)
    error = _first_error(error)

    job = SaveJob(root=root, final=final, tmp=tmp, rank=rank, keep_last_n=keep_last_n)
    if error is not None:
        return job.finish(error, agreed=True)
    zero3 = _partitions_parameters(engine)
    if zero3 and hasattr(engine.optimizer, "checkpoint_event_prologue"):
        engine.optimizer.checkpoint_event_prologue()  # re-partition every parameter before reading partitions
    if module_state is None and zero3:
        module_state = zero3_module_state(engine, keep=writes_model or rank == 0)
    elif module_state is None:
        module_state = engine.module.state_dict()
    if module_state is not None:
        module_state = {k: v.detach().to("cpu", copy=True) for k, v in module_state.items()}
    optim_state = None
    if snapshot.save_optim and (rank == 0 or _optimizer_is_partitioned(engine) or layout.per_rank_optimizer):
        optim_state = dict(engine.optimizer.state_dict())
        optim_state.pop("param_slice_mappings", None)  # only used by DeepSpeed's universal-checkpoint converter
        optim_state = _to_plain(optim_state)
    full_optim = None
    layout_free = snapshot.save_optim and supports_layout_free(engine)
    if layout_free:  # collective over the data-parallel group; its rank 0 keeps the slot's whole state
        full_optim = gather_full_optimizer_state(engine, layout, keep=_first_of_dp_group(rank, layout))
    if zero3 and hasattr(engine.optimizer, "checkpoint_event_epilogue"):
        engine.optimizer.checkpoint_event_epilogue()
    files: list[tuple[Any, Path]] = []
    if full_optim is not None:
        files.append((full_optim.to_file(layout.tp_rank, layout.tp_size, layout.pp_rank),
                      tmp / optim_full_file(layout.tp_rank, layout.pp_rank)))
    rng_state = capture_rng_state() if snapshot.save_rng else None
    if background is not None:  # the live tensors change with the next step: write copies of them
        optim_state, files = _host_copy(optim_state), _host_copy(files)
    job.write_files = functools.partial(_write_rank_files, tmp, engine, snapshot, rank, world_size, layout,
                                        module_state, optim_state, writes_model, rng_state, files)
    if background is not None:
        background(job)
        return final
    return job.finish(job.write())


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor cloned to the CPU (containers rebuilt), for a write that outlives the step."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


@dataclass
class SaveJob:
    """One checkpoint after its state was captured: :meth:`write` writes this rank's files into the temp folder
    (no collectives: may run in a background thread), :meth:`finish` agrees on the outcome over all ranks and
    publishes (rename + ``latest``, prune) or removes the temp folder and raises :class:`CheckpointSaveError`."""

    root: Path
    final: Path
    tmp: Path
    rank: int
    keep_last_n: int | None
    write_files: Callable[[], None] | None = None

    def write(self) -> str | None:
        """This rank's files; returns the error phrase of a failed write (None when written)."""
        try:
            if self.write_files is not None:
                self.write_files()
        except OSError as exc:
            return _io_error(exc)
        return None

    def finish(self, local: str | None, collective: bool = True, agreed: bool = False) -> Path:
        """Collective unless ``collective`` is False (one rank only: the background writer of a 1-rank run);
        ``agreed``: ``local`` is already every rank's verdict."""
        agree = _first_error if collective else (lambda x: x)
        error, published = (local if agreed else agree(local)), False
        if error is None:
            if self.rank == 0:
                try:
                    _publish(self.tmp, self.final)
                    published = True
                    atomic_write_text(self.root / LATEST_FILE, self.final.name + "\n")
                except OSError as exc:
                    local = _io_error(exc)
            error = agree(local)
        if error is not None:
            if self.rank == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
                if published:  # renamed, but `latest` could not be replaced: it still names the previous checkpoint
                    shutil.rmtree(self.final, ignore_errors=True)
            if collective:
                barrier()
            raise CheckpointSaveError(f"saving checkpoint {self.final.name} in {self.root} failed: {error}; the "
                                      f"partial folder was removed, the previous checkpoint and '{LATEST_FILE}' are "
                                      "unchanged")
        if self.rank == 0:
            _prune(self.root, self.keep_last_n, keep=self.final)
        if collective:
            barrier()
        return self.final


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp folder into place; an existing folder of the same name is moved aside first."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep_last_n: int | None, keep: Path) -> None:
    """Delete leftovers of crashed saves and all but the newest ``keep_last_n`` checkpoints."""
    for child in root.iterdir():
        if child.is_dir() and (".tmp-" in child.name or ".old-" in child.name) and child.name.startswith("global_step"):
            shutil.rmtree(child, ignore_errors=True)
    if keep_last_n is None or keep_last_n <= 0:
        return
    complete = list_checkpoints(root)
    for _, path in complete[:-keep_last_n]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# load


def _module_state_for(ckpt: Path, layout: CheckpointLayout) -> dict[str, torch.Tensor]:
    """This rank's module state: the saved TP shards merged and re-split to the run's TP size when they differ."""
    from megatron.parallel.reshard import ReshardError, find_tp_model_files, merge_tp_state_dicts, split_tp_state_dict

    try:
        files = find_tp_model_files(ckpt)
    except ReshardError as exc:
        raise CheckpointError(str(exc)) from exc
    shards = []
    for path in files:
        state = load_file(path)
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint file {path} does not hold a state dict")
        shards.append(state)
    if len(shards) == layout.tp_size:
        return shards[layout.tp_rank]
    try:
        merged = merge_tp_state_dicts(shards) if len(shards) > 1 else shards[0]
        return split_tp_state_dict(merged, layout.tp_size)[layout.tp_rank] if layout.tp_size > 1 else merged
    except (ReshardError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {ckpt}: cannot convert its {len(shards)} tensor-parallel shard(s) to "
                              f"model_parallel_size {layout.tp_size}: {exc}") from exc


def load_checkpoint(load_dir: str | os.PathLike, engine: Any, *, rank: int, world_size: int,
                    load_optim: bool = True, load_rng: bool = True, layout: CheckpointLayout | None = None,
                    load_module: Callable[[dict[str, torch.Tensor]], None] | None = None) -> dict[str, Any]:
    """Restore module, optimizer and RNG state in place; returns the checkpoint's meta (with ``client_state``).

    Module weights load under any tensor-parallel size (shards are merged / re-split); ``load_module`` replaces
    the plain ``load_state_dict`` (a pipeline engine loads the GPTModel layout into its stage)."""
    layout = layout or CheckpointLayout()
    ckpt = resolve_checkpoint_dir(load_dir)
    meta = read_meta(ckpt)
    module_state = _module_state_for(ckpt, layout)
    zero3 = _partitions_parameters(engine)
    if zero3 and hasattr(engine.optimizer, "checkpoint_event_prologue"):
        engine.optimizer.checkpoint_event_prologue()
    if zero3 and load_module is None:
        _zero3_load_module(engine, module_state, ckpt)
    elif load_module is not None:
        try:
            load_module(module_state)
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {ckpt} does not match the configured model: {exc}") from exc
    else:
        check_model_shapes(module_state, engine.module, ckpt)
        engine.module.load_state_dict(module_state, strict=True)

    if load_optim and not meta.get("has_optimizer", True):
        raise CheckpointError(f"checkpoint {ckpt} was saved without optimizer state (no_save_optim); set "
                              f"no_load_optim to resume from its weights")
    if load_rng and not meta.get("has_rng", True):
        raise CheckpointError(f"checkpoint {ckpt} was saved without RNG states (no_save_rng); set no_load_rng to "
                              f"resume from it")
    notes: list[str] = []
    if load_optim:
        mismatch = _native_optimizer_mismatch(meta, engine, layout, world_size)
        if mismatch is None:
            _load_native_optimizer(ckpt, meta, engine, layout, rank, world_size)
        elif meta.get("optimizer_layout_free") and supports_layout_free(engine):
            names = [name for name, _ in local_parameters(engine, layout)]
            state = read_full_optimizer_state(ckpt, names, layout.tp_rank, layout.tp_size)
            load_full_optimizer_state(engine, layout, state)
            notes.append(f"optimizer state converted to this layout from its layout-free copy ({mismatch})")
        else:
            raise CheckpointError(f"checkpoint {ckpt} {mismatch}; set no_load_optim to load weights only")
    if zero3 and hasattr(engine.optimizer, "checkpoint_event_epilogue"):
        engine.optimizer.checkpoint_event_epilogue()
    if load_rng:
        rng_file = ckpt / f"rng_rank{rank}.pt"
        if not rng_file.exists() and rank > 0:
            rng_file = ckpt / "rng_rank0.pt"  # resumed on more ranks than saved: reuse rank 0's streams
        restore_rng_state(load_file(rng_file))
        saved_layout = (int(meta.get("world_size", world_size)), int(meta.get("tensor_parallel_size", 1)),
                        int(meta.get("pipe_parallel_size", 1)))
        if saved_layout != (world_size, layout.tp_size, layout.pp_size):
            notes.append(f"RNG streams cannot be restored exactly under a changed layout (saved: world size "
                         f"{saved_layout[0]}, TP {saved_layout[1]}, PP {saved_layout[2]}): each rank took "
                         "the saved stream of its rank number (or rank 0's)")
    meta["path"] = str(ckpt)
    meta["resume_notes"] = notes
    return meta


def _native_optimizer_mismatch(meta: dict[str, Any], engine: Any, layout: CheckpointLayout,
                               world_size: int) -> str | None:
    """Why the checkpoint's per-rank DeepSpeed optimizer files do not fit this run (None: they do)."""
    if meta.get("optimizer_native_files") is False:
        return "holds no per-rank DeepSpeed optimizer files (converted by tools/ckpts/reshard_tp.py)"
    saved = (int(meta.get("tensor_parallel_size", 1)), int(meta.get("pipe_parallel_size", 1)))
    if saved != (layout.tp_size, layout.pp_size):
        return (f"holds optimizer state for model_parallel_size x pipe stages = {saved[0]} x {saved[1]}, the run "
                f"uses {layout.tp_size} x {layout.pp_size}")
    if meta.get("optimizer_per_rank") and int(meta["world_size"]) != world_size:
        return f"holds per-rank optimizer states for {meta['world_size']} ranks, the run has {world_size}"
    stage = int(engine.zero_optimization_stage())
    if _stage_family(int(meta.get("zero_stage", 0))) != _stage_family(stage):
        return f"was written with ZeRO stage {meta.get('zero_stage')}, the run uses stage {stage}"
    if stage >= 1 and int(meta["world_size"]) != world_size:
        return f"holds ZeRO optimizer partitions for {meta['world_size']} ranks, the run has {world_size}"
    precision = _precision(engine)
    if meta.get("precision", precision) != precision:
        return f"was written in precision {meta['precision']}, the run uses {precision}"
    return None


def _load_native_optimizer(ckpt: Path, meta: dict[str, Any], engine: Any, layout: CheckpointLayout, rank: int,
                           world_size: int) -> None:
    """The same-layout fast path: DeepSpeed's own per-rank optimizer state dicts, exact."""
    if _optimizer_is_partitioned(engine):
        ranks = layout.dp_group_ranks if layout.dp_group_ranks is not None else range(world_size)
        states = [_restore_scaler(load_file(ckpt / f"optim_rank{r}.pt"), engine.optimizer) for r in ranks]
        engine.optimizer.load_state_dict(states, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    optim_file = ckpt / (f"optim_rank{rank}.pt" if meta.get("optimizer_per_rank") else "optim_rank0.pt")
    state = _restore_scaler(load_file(optim_file), engine.optimizer)
    try:
        engine.optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state in {optim_file} does not fit the configured "
                              f"optimizer: {exc}") from exc
