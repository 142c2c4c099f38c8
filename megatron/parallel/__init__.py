"""Parallelism applied around the (distribution-free) model: rank layout / process groups, tensor parallelism,
TP checkpoint resharding. Imports are lazy so that ``import megatron.parallel`` stays cheap."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ParallelGroups": "megatron.parallel.mesh",
    "ParallelLayoutError": "megatron.parallel.mesh",
    "RankLayout": "megatron.parallel.mesh",
    "build_parallel_groups": "megatron.parallel.mesh",
    "rank_layout": "megatron.parallel.mesh",
    "pipeline_stages": "megatron.parallel.mesh",
    "apply_tensor_parallel": "megatron.parallel.tensor_parallel",
    "vocab_parallel_lm_loss": "megatron.parallel.tensor_parallel",
    "TensorParallelError": "megatron.parallel.tensor_parallel",
    "merge_tp_state_dicts": "megatron.parallel.reshard",
    "split_tp_state_dict": "megatron.parallel.reshard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron.parallel' has no attribute {name!r}")
