"""Applying a layer's :class:`~megatron.sepllm.cache.slots.StepPlan` to its key/value tensors ``[B, H, L, D]``:
the planner decides on slot ids only, so both adapters (HF ``SepCache``, our ``SepKVCache``) store through here."""

from __future__ import annotations

from typing import Optional

import torch

from megatron.sepllm.cache.slots import StepPlan, cat_slices

#: ``(keys, values, attended_keys, attended_values)``
StoredStep = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def store_step(keys: Optional[torch.Tensor], values: Optional[torch.Tensor], new_keys: torch.Tensor,
               new_values: torch.Tensor, plan: StepPlan) -> StoredStep:
    """Append the step's ``new_keys/new_values [B, H, q, D]`` to the stored ones (None: nothing stored yet) and
    compress per ``plan``; returns ``(keys, values, attended_keys, attended_values)``: what the layer stores after the
    step, and what the step's queries attend (a decode step the compressed storage, a multi-token step the appended
    one). A plain tuple: this runs once per layer and decode step."""
    if plan.keep_slices is not None:     # decode fast path: one copy, straight into the new storage
        keys = cat_slices(keys, plan.keep_slices, new_keys, dim=-2)
        values = cat_slices(values, plan.keep_slices, new_values, dim=-2)
        return keys, values, keys, values
    if keys is None:
        keys, values = new_keys[:, :, :0], new_values[:, :, :0]
    elif plan.pre_gather_idx is not None:     # after_step timing: the previous step's overflow goes first
        keys, values = gather_slots(keys, plan.pre_gather_idx), gather_slots(values, plan.pre_gather_idx)
    keys_app = torch.cat([keys, new_keys], dim=-2)
    values_app = torch.cat([values, new_values], dim=-2)
    if plan.gather_idx is not None:
        keys, values = gather_slots(keys_app, plan.gather_idx), gather_slots(values_app, plan.gather_idx)
    else:
        keys, values = keys_app, values_app
    if plan.attend_compressed:
        return keys, values, keys, values
    return keys, values, keys_app, values_app


def gather_slots(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, H, L, D]`` gathered along L with per-row indices ``idx [B, L']``."""
    if idx.shape[0] == 1:   # batch 1: a plain index_select is cheaper than gather
        return x.index_select(2, idx[0])
    return x.gather(2, idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


__all__ = ["StoredStep", "gather_slots", "store_step"]
