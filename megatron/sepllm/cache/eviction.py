"""The SepCache keep rule (spec §3.2-§3.4): which stored slots one compression keeps, and when a layer compresses.

Every stored slot has a *kind*: ``INVALID`` (padding, or filler left of a packed row), ``INITIAL``, ``SEPARATOR``
(kept by an earlier compression) or ``LOCAL`` (every other token since). A compression keeps, per row, the initial
slots, the separators (the kept ones and the separator tokens now leaving the local window) and the last ``w`` local
slots. Rows keep their own slot sets: the result is packed to the right and left-filled with invalid slots up to the
batch maximum, so no real token is dropped for batch alignment (the reference truncates rows to the batch minimum).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from megatron.sepllm.attention import rules

INVALID, INITIAL, SEPARATOR, LOCAL = 0, 1, 2, 3

#: when a layer compresses: ``in_update`` (the reference SepCache), ``after_step`` (the streaming manager)
EVICTION_TIMINGS = ("in_update", "after_step")


@dataclass(frozen=True)
class LayerBudget:
    """The sizes of one layer that a step can change, and its compression count. The reference's no-max-sep mode
    grows the separator and cache budgets together by the excess; planners return a new budget (never write one)."""

    sep_cache_size: int
    cache_size: int
    num_compressions: int = 0

    def after_compression(self, separators_kept: int, capped: bool) -> "LayerBudget":
        """The budget after one compression that kept ``separators_kept`` separators in some row."""
        grow = 0 if capped else max(0, separators_kept - self.sep_cache_size)
        return LayerBudget(self.sep_cache_size + grow, self.cache_size + grow, self.num_compressions + 1)


class Compression(NamedTuple):
    """One compression of a layer's slots: ``keep [B, L']`` indices into them (per row, packed right; the invalid
    slots on the left point at slot 0), the kinds of the kept slots, and the layer's budget afterwards."""

    keep: torch.Tensor
    kind: torch.Tensor
    budget: LayerBudget


@dataclass(frozen=True)
class EvictionRule:
    """The eviction settings shared by every layer (the sizes ``a, s, w, c`` are per layer)."""

    #: separator token ids; ``(-1,)`` or empty: none (a StreamingLLM cache)
    separator_token_ids: tuple[int, ...]
    #: keep the separators of earlier compressions (``SEP_ACCUMULATION``), else only those leaving the window now
    accumulate: bool = True
    #: at most ``s`` separators, the most recent (``USE_MAX_SEP_CACHE``); else ``s`` and ``c`` grow by the excess
    cap_separators: bool = False
    #: trim the local region to ``w`` every step (the trained decode rule) instead of when the budget is reached
    exact_window: bool = False
    #: one of :data:`EVICTION_TIMINGS`
    eviction_timing: str = "in_update"

    def is_separator(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` bool: which token ids are separators."""
        return rules.separator_bitmap(ids, self.separator_token_ids)

    def needs_compression(self, kind: torch.Tensor, budget: LayerBudget, local_size: int, extra: int = 0) -> bool:
        """Would the stored slots ``kind [B, L]`` (plus ``extra`` tokens still to come) be compressed under ``budget``?

        ``in_update`` (the reference SepCache): when the stored length reaches ``cache_size``, so a decode query sees
        at most ``cache_size - 1`` keys. ``after_step`` (the streaming manager): when it exceeds ``cache_size``.
        ``exact_window``: as soon as a row holds more than ``local_size`` local slots."""
        if self.exact_window:
            return bool(((kind == LOCAL).sum(-1) + extra > local_size).any())
        if self.eviction_timing == "after_step":
            return kind.shape[-1] + extra > budget.cache_size
        return kind.shape[-1] + extra >= budget.cache_size

    def compress(self, ids: torch.Tensor, kind: torch.Tensor, budget: LayerBudget, window: int) -> Compression:
        """Per-row keep decision over the slots ``ids/kind [B, L]``: initial -> separators -> the last ``window``
        local slots. Pure: the new budget is returned, nothing is written."""
        s = budget.sep_cache_size
        is_local = kind == LOCAL
        local_rank = is_local.flip(-1).to(torch.long).cumsum(-1).flip(-1)      # 1 = most recent local slot
        in_window = is_local & (local_rank <= window)
        leaving = is_local & ~in_window
        new_seps = leaving & self.is_separator(ids)
        candidates = new_seps | (kind == SEPARATOR) if self.accumulate else new_seps
        if self.cap_separators:
            sep_rank = candidates.flip(-1).to(torch.long).cumsum(-1).flip(-1)   # keep the most recent s
            keep_sep = candidates & (sep_rank <= s)
            budget = budget.after_compression(s, capped=True)
        else:   # reference behaviour: the separator budget and the cache budget grow by the excess
            keep_sep = candidates
            budget = budget.after_compression(int(candidates.sum(-1).max()), capped=False)
        keep = (kind == INITIAL) | keep_sep | in_window
        new_kind = torch.where(kind == INITIAL, kind, torch.where(
            keep_sep, torch.full_like(kind, SEPARATOR), torch.where(in_window, kind, torch.zeros_like(kind))))
        n_keep = keep.sum(-1)
        l_new = int(n_keep.max())
        dest = (l_new - n_keep).unsqueeze(1) + keep.to(torch.long).cumsum(-1) - 1
        rows, cols = keep.nonzero(as_tuple=True)
        idx = torch.zeros(kind.shape[0], l_new, dtype=torch.long, device=kind.device)
        idx[rows, dest[rows, cols]] = cols
        slot = torch.arange(l_new, device=kind.device).unsqueeze(0)
        valid_new = slot >= (l_new - n_keep).unsqueeze(1)
        kind_out = torch.where(valid_new, new_kind.gather(1, idx), torch.zeros_like(idx, dtype=kind.dtype))
        return Compression(idx, kind_out, budget)


def check_sizes(layer: int, a: int, s: int, w: int, c: int, allow_equal: bool = False) -> None:
    """The budget rule ``a + s + w < c``: a compression keeps at most ``a + s + w`` slots and must leave room below
    the size that triggers it (``allow_equal``: the streaming manager's StreamingLLM, which keeps exactly ``c``)."""
    if a < 0 or s < 0 or w < 1:
        raise ValueError(f"layer {layer}: need init_cache_size >= 0, sep_cache_size >= 0, local_size >= 1; "
                         f"got a={a}, s={s}, w={w}")
    if a + s + w > c or (a + s + w == c and not allow_equal):
        raise ValueError(f"layer {layer}: cache_size={c} must be > init_cache_size + sep_cache_size + local_size = "
                         f"{a}+{s}+{w}={a + s + w} (the reference requires a + s + w < c: the cache compresses when "
                         f"it reaches c and keeps at most a + s + w)")


__all__ = ["Compression", "EVICTION_TIMINGS", "EvictionRule", "INITIAL", "INVALID", "LOCAL", "LayerBudget",
           "SEPARATOR", "check_sizes"]
