"""Activation checkpointing of the transformer layers: GPT-NeoX's full mode and torchtitan's selective modes.

* full (``checkpoint_activations``): every layer recomputed in backward, ``checkpoint_num_layers`` per chunk;
* selective ``op``: every layer under ``torch.utils.checkpoint`` with a policy that keeps the outputs of the
  matmuls and of attention (the expensive ops) and recomputes the cheap rest -- norms, activation functions,
  rotary, residual adds, dropout (its RNG state is restored, so masks match);
* selective ``N``: every N-th layer fully recomputed, the others keep all their activations.

RNG state is restored on recompute (non-reentrant checkpoint), so dropout masks equal those of the forward. The
recomputation runs whole layers (``early_stop=False``): with ``compile: true`` a compiled block cannot be stopped
halfway (checkpoint's early stop raises through the compiled frame).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_aten = torch.ops.aten
#: ops whose outputs selective ``op`` mode keeps (torchtitan's save list: matmuls and attention kernels)
_SAVED_OPS = frozenset(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention") if hasattr(_aten, name))


def _keep_matmuls_and_attention(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def run_checkpointed(layers: Sequence[torch.nn.Module], x: Tensor, run: Callable[[Sequence[torch.nn.Module], Tensor],
                     Tensor], mode: str, chunk_layers: int, selective_option: int | str) -> Tensor:
    """``x`` through ``layers`` with ``run(layers_subset, x)`` under the configured checkpointing (see above)."""
    if mode == "full":
        for start in range(0, len(layers), chunk_layers):
            x = checkpoint(run, layers[start:start + chunk_layers], x, use_reentrant=False, early_stop=False)
        return x
    if selective_option == "op":
        context = functools.partial(create_selective_checkpoint_contexts, _keep_matmuls_and_attention)
        for i in range(len(layers)):
            x = checkpoint(run, layers[i:i + 1], x, use_reentrant=False, context_fn=context, early_stop=False)
        return x
    every = int(selective_option)
    for i in range(len(layers)):
        x = (checkpoint(run, layers[i:i + 1], x, use_reentrant=False, early_stop=False) if i % every == 0
             else run(layers[i:i + 1], x))
    return x


__all__ = ["run_checkpointed"]
