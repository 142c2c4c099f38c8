"""The layout-free optimizer state of a checkpoint: what lets a run resume under any DP x TP x PP layout, ZeRO stage
and precision.

DeepSpeed's own optimizer state (``optim_rank{R}.pt``) is a flat fp32 partition per rank: it only fits the layout
that wrote it. Next to it every save writes, per tensor-parallel rank ``T`` and pipeline stage ``S``, one file
``optim_full_tpTT_ppSS.pt`` (written by data-parallel rank 0 of that slot) holding, for each parameter of the slot
under its ``GPTModel`` state-dict name, the whole fp32 master weight and the whole optimizer moments (ZeRO
partitions gathered over the data-parallel group), in the tensor-parallel shard layout of
``mp_rank_TT_model_states.pt`` (:mod:`megatron.parallel.reshard`'s table), plus the optimizer step count and the
fp16 loss scaler. A reader merges the TP shards of the names it needs and re-splits them for its own TP size.

One file (``torch.save``, ``weights_only``-loadable)::

    {"format": "layout_free_optimizer/1", "tp_rank": T, "tp_size": N, "pp_stage": S,
     "step": 12 | None,                 # optimizer steps applied (Adam's bias correction); None: no step count
     "loss_scaler": {...} | None,       # fp16 dynamic loss scaler (cur_scale, cur_iter, ...)
     "states": {"fp32": {name: tensor}, "exp_avg": {...}, "exp_avg_sq": {...}}}   # every elementwise state

``states`` holds only ``fp32`` for a checkpoint taken before the first optimizer step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from megatron.checkpoint.format import CheckpointError, load_file

LAYOUT_FREE_FORMAT = "layout_free_optimizer/1"
MASTER = "fp32"
_FILE_RE = re.compile(r"^optim_full_tp(\d+)_pp(\d+)\.pt$")


def optim_full_file(tp_rank: int, pp_stage: int) -> str:
    """The layout-free optimizer file of one (TP rank, pipeline stage) slot."""
    return f"optim_full_tp{tp_rank:02d}_pp{pp_stage:02d}.pt"


def find_optim_full_files(ckpt: Path) -> dict[tuple[int, int], Path]:
    """``{(tp_rank, pp_stage): path}`` of a checkpoint folder's layout-free optimizer files."""
    return {(int(m.group(1)), int(m.group(2))): p for p in ckpt.iterdir() if (m := _FILE_RE.match(p.name))}


@dataclass
class FullOptimizerState:
    """Whole (unpartitioned) optimizer state of some parameters, by ``GPTModel`` name: ``states[kind][name]``."""

    states: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    step: int | None = None
    loss_scaler: dict[str, Any] | None = None

    def to_file(self, tp_rank: int, tp_size: int, pp_stage: int) -> dict[str, Any]:
        return {"format": LAYOUT_FREE_FORMAT, "tp_rank": tp_rank, "tp_size": tp_size, "pp_stage": pp_stage,
                "step": self.step, "loss_scaler": self.loss_scaler, "states": self.states}


def _read_slot_files(ckpt: Path) -> dict[int, list[dict[str, Any]]]:
    files = find_optim_full_files(ckpt)
    if not files:
        raise CheckpointError(f"checkpoint {ckpt} has no layout-free optimizer files (optim_full_tp*_pp*.pt)")
    tp_sizes = set()
    by_tp: dict[int, list[dict[str, Any]]] = {}
    for (tp_rank, _), path in sorted(files.items()):
        data = load_file(path)
        if not isinstance(data, dict) or data.get("format") != LAYOUT_FREE_FORMAT:
            raise CheckpointError(f"checkpoint file {path} is not a layout-free optimizer state "
                                  f"(expected format {LAYOUT_FREE_FORMAT!r})")
        tp_sizes.add(int(data["tp_size"]))
        by_tp.setdefault(tp_rank, []).append(data)
    if len(tp_sizes) != 1 or sorted(by_tp) != list(range(next(iter(tp_sizes)))):
        raise CheckpointError(f"checkpoint {ckpt}: layout-free optimizer files for TP ranks {sorted(by_tp)} of TP "
                              f"size(s) {sorted(tp_sizes)}; a file is missing")
    return by_tp


def read_full_optimizer_state(ckpt: Path, names: Iterable[str], tp_rank: int, tp_size: int) -> FullOptimizerState:
    """The optimizer state of parameters ``names`` as TP rank ``tp_rank`` of ``tp_size`` holds them (shards merged
    and re-split with :mod:`megatron.parallel.reshard`'s table). Every other name is dropped before merging, so a
    pipeline stage materialises only its own parameters."""
    from megatron.parallel.reshard import ReshardError, merge_tp_state_dicts, split_tp_state_dict

    wanted = set(names)
    by_tp = _read_slot_files(ckpt)
    first = by_tp[0][0]
    kinds = sorted({kind for files in by_tp.values() for data in files for kind in data["states"]})
    out = FullOptimizerState(step=first.get("step"), loss_scaler=first.get("loss_scaler"))
    for kind in kinds:
        shards: list[dict[str, Tensor]] = []
        for t in sorted(by_tp):
            merged: dict[str, Tensor] = {}
            for data in by_tp[t]:  # pipeline stages hold disjoint names (a tied copy: the first one)
                for name, tensor in data["states"].get(kind, {}).items():
                    if name in wanted:
                        merged.setdefault(name, tensor)
            shards.append(merged)
        missing = sorted(wanted - set(shards[0]))
        if missing:
            raise CheckpointError(f"checkpoint {ckpt}: the layout-free optimizer state has no {kind!r} for "
                                  f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        try:
            full = merge_tp_state_dicts(shards, check_replicated=False) if len(shards) > 1 else shards[0]
            out.states[kind] = split_tp_state_dict(full, tp_size)[tp_rank] if tp_size > 1 else full
        except (ReshardError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {ckpt}: cannot convert the optimizer state {kind!r} from "
                                  f"{len(shards)} tensor-parallel shard(s) to {tp_size}: {exc}") from exc
    return out


def summarize_optim_full(ckpt: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """``(file, kind, shape, numel)`` rows of the layout-free optimizer files (for inspection tools)."""
    rows = []
    for (t, s), path in sorted(find_optim_full_files(ckpt).items()):
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for kind, tensors in data["states"].items():
            for name, tensor in tensors.items():
                rows.append((path.name, f"{kind}:{name}", tuple(tensor.shape), tensor.numel()))
    return rows


__all__ = ["LAYOUT_FREE_FORMAT", "MASTER", "FullOptimizerState", "find_optim_full_files", "optim_full_file",
           "read_full_optimizer_state", "summarize_optim_full"]
