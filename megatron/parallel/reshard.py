"""How each ``GPTModel`` parameter is split across tensor-parallel ranks, and checkpoint conversion between TP sizes.

One table (:func:`shard_spec`) is used both by :func:`megatron.parallel.tensor_parallel.apply_tensor_parallel` (to
cut the live model) and by :func:`merge_tp_state_dicts` / :func:`split_tp_state_dict` (to convert checkpoints), so a
TP=N checkpoint is exactly the per-rank state dicts of the TP=N model.

* column-parallel (split output features, dim 0): ``attention.query_key_value`` (whole KV groups per rank, because
  the fused layout is group-major), ``mlp.dense_h_to_4h`` (gated MLPs: value and gate halves split separately, so a
  rank holds ``[value_r, gate_r]``: ``stride`` 2), ``embed.word_embeddings`` and ``output_layer`` (vocab rows);
* row-parallel (split input features, dim 1): ``attention.dense`` and ``mlp.dense_4h_to_h`` weights (their biases
  are replicated and added once, after the reduction);
* everything else (norms, position table, row biases) is replicated.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.model.mlp import GATED
from megatron.errors import UserInputError


class ReshardError(UserInputError, ValueError):
    """A state dict that cannot be merged/split as asked; the message names the key and the shapes."""


@dataclass(frozen=True)
class ShardSpec:
    """Split ``dim`` into ``stride`` equal blocks, each block into TP chunks; rank r holds chunk r of every block."""

    dim: int
    stride: int = 1


_COLUMN = re.compile(r"(^|\.)(attention\.query_key_value|mlp\.dense_h_to_4h)\.(weight|bias)$")
_ROW = re.compile(r"(^|\.)(attention\.dense|mlp\.dense_4h_to_h)\.weight$")
_VOCAB = re.compile(r"(^|\.)(embed\.word_embeddings|output_layer)\.weight$")


def is_gated(model_cfg: ModelConfig) -> bool:
    """Whether the MLP input projection holds ``[value, gate]`` halves (SwiGLU / GEGLU)."""
    return model_cfg.activation in GATED


def infer_gated(state: Mapping[str, Tensor]) -> bool:
    """Gated MLP read off a (full or TP-shard) state dict: ``dense_h_to_4h`` has twice the rows of
    ``dense_4h_to_h``'s columns. Lets checkpoint conversion work without the run's config."""
    for key, value in state.items():
        if key.endswith("mlp.dense_h_to_4h.weight"):
            down = state.get(key.replace("dense_h_to_4h", "dense_4h_to_h"))
            if down is None:
                raise ReshardError(f"{key} has no matching dense_4h_to_h weight in the state dict")
            if value.shape[0] == 2 * down.shape[1]:
                return True
            if value.shape[0] == down.shape[1]:
                return False
            raise ReshardError(f"{key}: {tuple(value.shape)} does not fit dense_4h_to_h {tuple(down.shape)} (expected "
                               f"equal or double MLP width)")
    return False


def shard_spec(name: str, gated: bool) -> Optional[ShardSpec]:
    """How parameter ``name`` (a ``GPTModel`` state-dict key) is split across TP ranks; None = replicated.
    ``gated``: the model's MLP is SwiGLU/GEGLU (:func:`is_gated`)."""
    col = _COLUMN.search(name)
    if col:
        return ShardSpec(0, 2 if gated and col.group(2) == "mlp.dense_h_to_4h" else 1)
    if _ROW.search(name):
        return ShardSpec(1)
    if _VOCAB.search(name):
        return ShardSpec(0)
    return None


def shard_tensor(full: Tensor, spec: ShardSpec, rank: int, size: int, name: str = "tensor") -> Tensor:
    """Rank ``rank``'s piece of ``full`` (a copy, contiguous)."""
    length = full.shape[spec.dim]
    if length % (spec.stride * size):
        raise ReshardError(f"{name}: dim {spec.dim} of shape {tuple(full.shape)} is not divisible by "
                           f"{spec.stride} x tensor-parallel size {size}")
    blocks = full.chunk(spec.stride, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim).clone().contiguous()


def merge_tensors(shards: Sequence[Tensor], spec: ShardSpec) -> Tensor:
    """Inverse of :func:`shard_tensor` over all ranks."""
    per_rank = [s.chunk(spec.stride, dim=spec.dim) for s in shards]
    return torch.cat([torch.cat([p[j] for p in per_rank], dim=spec.dim) for j in range(spec.stride)], dim=spec.dim)


def merge_tp_state_dicts(shards: Sequence[Mapping[str, Tensor]], model_cfg: Optional[ModelConfig] = None,
                         check_replicated: bool = True) -> dict[str, Tensor]:
    """Per-rank state dicts of a TP=N ``GPTModel`` (rank order) -> the TP=1 state dict.

    ``model_cfg`` only tells whether the MLP is gated; without it that is read off the tensor shapes.
    Replicated tensors are taken from rank 0; with ``check_replicated`` they must be equal on every rank (a mismatch
    means the shards do not belong together, e.g. files from different steps).
    """
    if not shards:
        raise ReshardError("merge_tp_state_dicts: no shards given")
    keys = list(shards[0].keys())
    gated = is_gated(model_cfg) if model_cfg is not None else infer_gated(shards[0])
    for r, sd in enumerate(shards[1:], start=1):
        if set(sd.keys()) != set(keys):
            diff = sorted(set(sd.keys()) ^ set(keys))
            raise ReshardError(f"TP shard {r} has different keys from shard 0: {diff[:5]}")
    out: dict[str, Tensor] = {}
    for key in keys:
        values = [sd[key] for sd in shards]
        if not isinstance(values[0], Tensor):
            out[key] = values[0]
            continue
        spec = shard_spec(key, gated)
        if spec is None:
            if check_replicated:
                for r, v in enumerate(values[1:], start=1):
                    if v.shape != values[0].shape or not torch.equal(v, values[0]):
                        raise ReshardError(f"{key}: replicated tensor differs between TP shard 0 and shard {r}; the "
                                           f"shards do not come from one checkpoint")
            out[key] = values[0].clone()
            continue
        others = [i for i in range(values[0].dim()) if i != spec.dim]
        for r, v in enumerate(values[1:], start=1):
            if v.shape != values[0].shape:
                raise ReshardError(f"{key}: TP shard {r} has shape {tuple(v.shape)}, shard 0 has "
                                   f"{tuple(values[0].shape)} (other dims {others} must agree)")
        out[key] = merge_tensors(values, spec)
    return out


def split_tp_state_dict(state: Mapping[str, Tensor], tp: int,
                        model_cfg: Optional[ModelConfig] = None) -> list[dict[str, Tensor]]:
    """A TP=1 ``GPTModel`` state dict -> the ``tp`` per-rank state dicts of the TP=``tp`` model."""
    if tp < 1:
        raise ReshardError(f"split_tp_state_dict: tp = {tp}: expected >= 1")
    gated = is_gated(model_cfg) if model_cfg is not None else infer_gated(state)
    out: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for key, value in state.items():
        spec = shard_spec(key, gated) if isinstance(value, Tensor) else None
        for r in range(tp):
            if spec is None:
                out[r][key] = value.clone() if isinstance(value, Tensor) else value
            else:
                out[r][key] = shard_tensor(value, spec, r, tp, name=key)
    return out


def reshard_state_dicts(shards: Sequence[Mapping[str, Tensor]], tp: int,
                        model_cfg: Optional[ModelConfig] = None) -> list[dict[str, Tensor]]:
    """TP=len(shards) per-rank state dicts -> TP=``tp`` per-rank state dicts (merge, then split)."""
    merged = merge_tp_state_dicts(shards, model_cfg) if len(shards) > 1 else dict(shards[0])
    return split_tp_state_dict(merged, tp, model_cfg) if tp > 1 else [merged]


# ------------------------------------------------------------------------------------------------ checkpoint files
TP1_MODEL_FILE = "model_states.pt"
_TP_FILE_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def tp_model_file(tp_rank: int, tp_size: int) -> str:
    """File name of TP rank ``tp_rank``'s module state inside a ``global_stepN`` folder: ``model_states.pt`` for
    TP=1 (the trainer's format), DeepSpeed / GPT-NeoX's ``mp_rank_XX_model_states.pt`` per TP rank otherwise."""
    return TP1_MODEL_FILE if tp_size == 1 else f"mp_rank_{tp_rank:02d}_model_states.pt"


def find_tp_model_files(ckpt_dir: Path) -> list[Path]:
    """The module-state files of a checkpoint folder in TP-rank order (one file = TP=1)."""
    ranked = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _TP_FILE_RE.match(p.name)))
    if ranked:
        ranks = [r for r, _ in ranked]
        if ranks != list(range(len(ranks))):
            raise ReshardError(f"{ckpt_dir}: TP shard files for ranks {ranks}; expected ranks 0..{len(ranks) - 1} "
                               f"(a shard is missing)")
        return [p for _, p in ranked]
    single = ckpt_dir / TP1_MODEL_FILE
    if single.is_file():
        return [single]
    raise ReshardError(f"{ckpt_dir}: no {TP1_MODEL_FILE} and no mp_rank_XX_model_states.pt files")


def load_state_file(path: Path) -> dict[str, Tensor]:
    """A module state dict from ``path`` (``weights_only``; a DeepSpeed ``{"module": ...}`` wrapper is unwrapped)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise ReshardError(f"{path}: not a readable torch state dict ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if isinstance(state, dict) and isinstance(state.get("module"), dict):
        state = state["module"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ReshardError(f"{path}: expected a dict of tensors (a module state dict)")
    return state


def _resolve(load: Path) -> Path:
    """A save folder with a ``latest`` file -> the step folder it names; anything else as is."""
    latest = load / "latest"
    if latest.is_file():
        return load / latest.read_text(encoding="utf-8").strip()
    return load


def reshard_checkpoint(load: Path, save: Path, tp: int, check_replicated: bool = True) -> Path:
    """Convert the checkpoint at ``load`` to TP=``tp`` under ``save``; returns the written ``global_stepN`` folder."""
    if tp < 1:
        raise ReshardError(f"target tensor-parallel size {tp}: expected >= 1")
    src = _resolve(load)
    if not src.is_dir():
        raise ReshardError(f"--load {load}: no checkpoint folder at {src}")
    files = find_tp_model_files(src)
    shards = [load_state_file(f) for f in files]
    merged = merge_tp_state_dicts(shards, check_replicated=check_replicated) if len(shards) > 1 else shards[0]
    out_shards = split_tp_state_dict(merged, tp) if tp > 1 else [merged]
    dst = save / src.name
    if dst.exists():
        raise ReshardError(f"--save {save}: {dst} already exists; choose an empty folder")
    dst.mkdir(parents=True)
    for rank, state in enumerate(out_shards):
        torch.save(state, dst / tp_model_file(rank, tp))
    meta_file = src / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta["param_shapes"] = {k: list(v.shape) for k, v in out_shards[0].items()}
        meta["tensor_parallel_size"] = tp
        meta["resharded_from"] = {"path": str(src), "tensor_parallel_size": len(shards)}
        meta["optimizer_native_files"] = False  # DeepSpeed's per-rank files fit only the old layout: not copied
        (dst / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    layout_free = sorted(src.glob("optim_full_tp*_pp*.pt"))  # whole optimizer state: any TP size resumes it
    for extra in list(src.glob("rng_rank*.pt")) + [src / "config.yml"] + layout_free:
        if extra.is_file():
            shutil.copy2(extra, dst / extra.name)
    (save / "latest").write_text(dst.name + "\n", encoding="utf-8")
    return dst
