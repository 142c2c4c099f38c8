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

import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.model.mlp import GATED


class ReshardError(ValueError):
    """A state dict that cannot be merged/split as asked; the message names the key and the shapes."""


@dataclass(frozen=True)
class ShardSpec:
    """Split ``dim`` into ``stride`` equal blocks, each block into TP chunks; rank r holds chunk r of every block."""

    dim: int
    stride: int = 1


_COLUMN = re.compile(r"(^|\.)(attention\.query_key_value|mlp\.dense_h_to_4h)\.(weight|bias)$")
_ROW = re.compile(r"(^|\.)(attention\.dense|mlp\.dense_4h_to_h)\.weight$")
_VOCAB = re.compile(r"(^|\.)(embed\.word_embeddings|output_layer)\.weight$")


def shard_spec(name: str, model_cfg: ModelConfig) -> Optional[ShardSpec]:
    """How parameter ``name`` (a ``GPTModel`` state-dict key) is split across TP ranks; None = replicated."""
    col = _COLUMN.search(name)
    if col:
        gated = col.group(2) == "mlp.dense_h_to_4h" and model_cfg.activation in GATED
        return ShardSpec(0, 2 if gated else 1)
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


def merge_tp_state_dicts(shards: Sequence[Mapping[str, Tensor]], model_cfg: ModelConfig,
                         check_replicated: bool = True) -> dict[str, Tensor]:
    """Per-rank state dicts of a TP=N ``GPTModel`` (rank order) -> the TP=1 state dict.

    Replicated tensors are taken from rank 0; with ``check_replicated`` they must be equal on every rank (a mismatch
    means the shards do not belong together, e.g. files from different steps).
    """
    if not shards:
        raise ReshardError("merge_tp_state_dicts: no shards given")
    keys = list(shards[0].keys())
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
        spec = shard_spec(key, model_cfg)
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


def split_tp_state_dict(state: Mapping[str, Tensor], model_cfg: ModelConfig, tp: int) -> list[dict[str, Tensor]]:
    """A TP=1 ``GPTModel`` state dict -> the ``tp`` per-rank state dicts of the TP=``tp`` model."""
    if tp < 1:
        raise ReshardError(f"split_tp_state_dict: tp = {tp}: expected >= 1")
    out: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for key, value in state.items():
        spec = shard_spec(key, model_cfg) if isinstance(value, Tensor) else None
        for r in range(tp):
            if spec is None:
                out[r][key] = value.clone() if isinstance(value, Tensor) else value
            else:
                out[r][key] = shard_tensor(value, spec, r, tp, name=key)
    return out


def reshard_state_dicts(shards: Sequence[Mapping[str, Tensor]], model_cfg: ModelConfig,
                        tp: int) -> list[dict[str, Tensor]]:
    """TP=len(shards) per-rank state dicts -> TP=``tp`` per-rank state dicts (merge, then split)."""
    merged = merge_tp_state_dicts(shards, model_cfg) if len(shards) > 1 else dict(shards[0])
    return split_tp_state_dict(merged, model_cfg, tp) if tp > 1 else [merged]
