"""What a SepCache layer stores, as slot bookkeeping: per batch row, which token each stored slot holds (``ids``), its
kind (initial / separator / local / invalid) and its index among the row's real tokens, plus the layer's budget,
retention counters and the plan of the current step. Keys and values are the adapters' (same slot order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron.sepllm.cache.eviction import INVALID, LayerBudget


@dataclass
class StepPlan:
    """What one layer does in the current step (made by ``plan_step``, applied by an adapter, then committed)."""

    ids_app: torch.Tensor           # [B, L_old + q] ids after appending
    kind_app: torch.Tensor          # [B, L_old + q]
    pre_gather_idx: Optional[torch.Tensor]   # eviction_timing="after_step": compression of the stored slots
    gather_idx: Optional[torch.Tensor]   # [B, L_new] indices into the appended storage (None: no compression)
    kind_new: torch.Tensor          # [B, L_new] kinds after compression (== kind_app when no compression)
    ids_new: torch.Tensor
    pos_new: torch.Tensor           # [B, L_new] token index of each slot in its row (-1 = invalid)
    attend_compressed: bool         # decode: attend the compressed storage; multi-token: attend the appended one
    attn_mask: Optional[torch.Tensor]    # bool [B, 1, q, K] for the keys attended (None: all visible, no mask)
    step_positions: torch.Tensor    # [B, q] absolute positions the model rotates new keys/queries with
    q_len: int
    # prefill_attention="stream" with segment positions: (q_start, q_end, key_positions [B, K], query_positions [B, n])
    segments: Optional[list] = None
    # a multi-token step stored what the next decode step's compression keeps (retention counts the appended slots,
    # which is what the reference holds after such a step)
    early_compression: bool = False
    kept_count: Optional[int] = None    # valid slots kept after the step (filled by the first layer's commit)
    # decode fast path (batch 1, canonical layout): the new storage is old[a:b] for each (a, b), then the new token
    keep_slices: Optional[list] = None
    budget: Optional[LayerBudget] = None    # the layer's budget after this step (None: unchanged)

    @property
    def attended_kind(self) -> torch.Tensor:
        """Kinds of the keys the step attends (the compressed storage for a decode step, else the appended one)."""
        return self.kind_new if self.attend_compressed else self.kind_app


class LayerSlots:
    """One layer's bookkeeping: its sizes ``a, w`` (and the prefill window), its budget ``s, c`` with the compression
    count, which token each stored slot holds, the current step's plan and the retention counters."""

    def __init__(self, init_cache_size: int, sep_cache_size: int, local_size: int, cache_size: int,
                 prefill_local_size: Optional[int] = None):
        self.init_cache_size, self.local_size = int(init_cache_size), int(local_size)
        # the window of a multi-token step under prefill_attention="sepllm" (a model's prefill window)
        self.prefill_local_size = self.local_size if prefill_local_size is None else int(prefill_local_size)
        self.budget = LayerBudget(int(sep_cache_size), int(cache_size))
        # layers created with equal sizes evolve identically (same ids, same rule): they share one step plan
        self.size_key = (self.init_cache_size, self.sep_cache_size, self.local_size, self.cache_size,
                         self.prefill_local_size)
        self.kept_total = 0      # sum over updates of valid kept tokens (all rows)
        self.seen_total = 0      # sum over updates of valid seen tokens (all rows)
        self.last_kept = 0
        self.clear_slots()

    def clear_slots(self) -> None:
        """Forget the stored slots and the step plan (the counters stay)."""
        self.ids: Optional[torch.Tensor] = None
        self.kind: Optional[torch.Tensor] = None
        self.pos: Optional[torch.Tensor] = None
        self.plan = None
        # batch-1 decode fast path: (n_initial, n_separator, n_local) when the stored kinds are exactly
        # INITIAL * n_initial ++ SEPARATOR * n_separator ++ LOCAL * n_local (no invalid slot); None = unknown
        self.layout: Optional[tuple[int, int, int]] = None

    @property
    def sep_cache_size(self) -> int:
        return self.budget.sep_cache_size

    @property
    def cache_size(self) -> int:
        return self.budget.cache_size

    @property
    def num_compressions(self) -> int:
        return self.budget.num_compressions

    @property
    def stored_length(self) -> int:
        return 0 if self.kind is None else int(self.kind.shape[-1])

    @property
    def valid(self) -> torch.Tensor:
        """``[B, L]`` bool: which stored slots hold a real token."""
        return self.kind != INVALID


def cat_slices(x: torch.Tensor, slices: list, tail: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``x``'s slices ``[a, b)`` along ``dim`` (-1: ids ``[B, L]``, -2: keys/values ``[B, H, L, D]``) followed by
    ``tail`` (one copy)."""
    if dim == -1:
        parts = [x[..., a:b] for a, b in slices]
    else:
        parts = [x[:, :, a:b] for a, b in slices]
    return torch.cat(parts + [tail], dim=dim)


def cache_positions(valid: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` position of each slot among the row's valid slots (``cumsum - 1``; invalid slots get 0)."""
    pos = torch.cumsum(valid.to(torch.long), dim=-1) - 1
    return pos.clamp(min=0)


__all__ = ["LayerSlots", "StepPlan", "cache_positions", "cat_slices"]
