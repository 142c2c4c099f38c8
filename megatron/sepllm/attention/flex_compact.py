"""FlexAttention over the compact SepLLM layout: a GPU path whose cost scales with the kept keys.

On real text a separator falls in nearly every 128-key block, so a BlockMask over the raw ``S x S`` layout (the
``flex`` path) has no empty block below the diagonal and costs as much as causal attention. Here the keys and values
of each micro-batch and pattern are re-laid out as::

    [ global keys (initial + separators, by position, padded per row to N_pad) ] ++ [ all S keys ]

``N_pad`` is the batch's largest global-key count rounded up to the flex block size (and to a coarse ladder of at
most four sizes per doubling, so the compiled kernel sees few distinct key lengths). The predicate splits the rule of
``rules.py`` into two disjoint parts:

* slot ``kv < N_pad`` (original position ``p``): kept iff the slot holds a real (valid) global key and
  ``p <= q - w``, i.e. it lies before the query's window;
* ``kv >= N_pad`` (key ``k = kv - N_pad``): kept iff ``k <= q``, ``q - k < w`` and ``valid[k] or k == q``.

A global key inside the window is counted by the band only, so every kept key appears exactly once. The BlockMask is
then a staircase over the slot blocks plus a diagonal band of width ``w``: all other blocks are empty and skipped.
With documents (``doc_start``) both parts also require ``k >= doc_start[q]``; since document starts never decrease
along the queries, slot and band tiles wholly before the document start of a query tile's first query are empty.

The layout (one index ``[B, N_pad + S]`` of original positions, ALiBi positions, BlockMask) is built once per
micro-batch and pattern (``SepLLMBackend.prepare``) and shared by all layers and heads; per layer K and V are
re-laid out by ONE ``gather`` (autograd gives the scatter-add backward). ``flex_compact_reference`` runs the same
re-laid-out keys through SDPA with the predicate materialised densely: a debug / test route that also has a CPU
backward (torch has no FlexAttention backward on CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from megatron.sepllm.attention.flex import check_flex_call

MaskMod = Callable[[Any, Any, Any, Any], Any]


def slot_capacity(count: int, block: int) -> int:
    """Slots for ``count`` global keys: a multiple of ``block``, on a ladder of <= 4 sizes per doubling.

    Each distinct key length is a new compilation of the flex kernel; the ladder bounds how many lengths a run sees
    (under 25 % extra slots beyond the block rounding; padded slots only fill empty blocks).
    """
    if block < 1:
        raise ValueError(f"flex block size must be >= 1, got {block}")
    if count < 0:
        raise ValueError(f"global-key count must be >= 0, got {count}")
    blocks = -(-count // block)
    step = 2 ** max(0, math.ceil(math.log2(blocks)) - 3) if blocks > 8 else 1
    return -(-blocks // step) * step * block


@dataclass
class FlexCompactLayout:
    """Compact key layout of one pattern for one micro-batch (shared by all layers and heads)."""

    batch: int
    seq_len: int
    window: int
    block: int
    num_slots: int                  # N_pad: slots of gathered global keys before the S keys
    kv_index: torch.Tensor          # [B, N_pad + S] long: original position of each key slot (0 for empty slots)
    kv_keep: torch.Tensor           # [B, N_pad + S] bool: slot holds a real global key / key is not padding
    q_pos: torch.Tensor             # [B, S] float32 position ids of the queries (ALiBi)
    kv_pos: torch.Tensor            # [B, N_pad + S] float32 position ids of the key slots (ALiBi)
    global_counts: torch.Tensor     # [B] long: real global keys per row
    block_mask: Any = None          # FlexAttention BlockMask (None until ``attach_block_mask``)
    doc_start: Optional[torch.Tensor] = None   # [B, S] long first position of each query's document (None: one)

    @property
    def kv_len(self) -> int:
        return self.num_slots + self.seq_len

    def mask_mod(self) -> MaskMod:
        """The predicate over ``(b, h, q_idx, kv_idx)`` of the re-laid-out keys (see the module docstring).

        Window and slot count are captured as tensors, so all patterns and micro-batches of the same shapes share one
        traced predicate (no recompilation per window).
        """
        index, keep = self.kv_index, self.kv_keep
        w = torch.tensor(self.window, device=index.device)
        n_slots = torch.tensor(self.num_slots, device=index.device)

        def mask_mod(b, h, q_idx, kv_idx):
            k = index[b, kv_idx]
            ok = keep[b, kv_idx]
            slot = kv_idx < n_slots
            in_slots = slot & ok & (k <= q_idx - w)
            in_band = ~slot & (k <= q_idx) & (q_idx - k < w) & (ok | (k == q_idx))
            return in_slots | in_band
        if self.doc_start is None:
            return mask_mod
        ds = self.doc_start

        def doc_mask_mod(b, h, q_idx, kv_idx):
            return mask_mod(b, h, q_idx, kv_idx) & (index[b, kv_idx] >= ds[b, q_idx])
        return doc_mask_mod

    def dense_keep(self) -> torch.Tensor:
        """``[B, 1, S, N_pad + S]`` bool: ``mask_mod`` evaluated on every entry (tests, debugging)."""
        dev = self.kv_index.device
        b = torch.arange(self.batch, device=dev).view(-1, 1, 1)
        q = torch.arange(self.seq_len, device=dev).view(1, -1, 1)
        kv = torch.arange(self.kv_len, device=dev).view(1, 1, -1)
        return self.mask_mod()(b, 0, q, kv).unsqueeze(1)

    def attach_block_mask(self, create: Optional[Callable[..., Any]] = None) -> Any:
        """Build (once) the BlockMask: from the layout's tile classes (``tile_classes``, the default: O(tiles), no
        ``S x (N_pad + S)`` evaluation) or, with ``create`` (e.g. ``create_block_mask``), by evaluating
        ``mask_mod`` on every entry."""
        if self.block_mask is None:
            if create is not None:
                self.block_mask = create(self.mask_mod(), B=self.batch, H=None, Q_LEN=self.seq_len,
                                         KV_LEN=self.kv_len, device=self.kv_index.device, BLOCK_SIZE=self.block)
            else:
                from torch.nn.attention.flex_attention import BlockMask

                nonempty, full = self.tile_classes()
                partial_num, partial_idx = _ordered(nonempty & ~full)
                full_num, full_idx = _ordered(full)
                self.block_mask = BlockMask.from_kv_blocks(partial_num, partial_idx, full_num, full_idx,
                                                           BLOCK_SIZE=self.block, mask_mod=self.mask_mod(),
                                                           seq_lengths=(self.seq_len, self.kv_len))
        return self.block_mask

    def tile_classes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(nonempty, full)`` bool ``[B, 1, nq, nkv]`` of the ``block x block`` tiles, in closed form.

        Slot tile ``c`` (sorted positions, real slots first): non-empty iff its first slot is real and lies before
        the window of the tile's last query; full iff its last slot is real and lies before the window of the first
        query. Band tile: non-empty iff it meets the diagonal or holds a valid key within reach of a query; full iff
        every key is valid, causal and inside the window for every query. Tiles cut by ``S`` are never full (the
        same convention as ``create_block_mask``, which pads them with dropped entries). With documents a tile is
        also empty when its last key lies before the document start of the tile's first query, and full only when its
        first key lies at or after the document start of its last query.
        """
        bs, s, w, dev = self.block, self.seq_len, self.window, self.kv_index.device
        nq, ns = -(-s // bs), self.num_slots // bs
        q_lo = torch.arange(nq, device=dev) * bs
        q_hi = torch.clamp(q_lo + bs, max=s) - 1
        q_whole = (q_lo + bs <= s).view(1, nq, 1)
        # slots: [B, 1, ns]
        counts = self.global_counts.to(dev).view(-1, 1, 1)
        first = torch.arange(ns, device=dev) * bs
        p_first = self.kv_index[:, first].unsqueeze(1)
        p_last = self.kv_index[:, first + bs - 1].unsqueeze(1)
        slot_nonempty = (first.view(1, 1, -1) < counts) & (p_first <= (q_hi - w).view(1, -1, 1))
        slot_full = (first.view(1, 1, -1) + bs - 1 < counts) & (p_last <= (q_lo - w).view(1, -1, 1)) & q_whole
        # band: [B, nq, nb]
        valid = self.kv_keep[:, self.num_slots:].to(torch.long)
        cum = torch.cat([valid.new_zeros(self.batch, 1), valid.cumsum(dim=1)], dim=1)       # cum[:, i] = #valid < i
        k_lo = q_lo.view(1, -1)
        k_hi = q_hi.view(1, -1)
        qh, ql = q_hi.view(-1, 1), q_lo.view(-1, 1)
        diag = (k_lo <= qh) & (ql <= k_hi)
        lo = torch.maximum(k_lo, ql - w + 1)
        hi = torch.minimum(k_hi, qh)
        reach = (lo <= hi).unsqueeze(0) & (cum[:, (hi + 1).clamp(min=0)] - cum[:, lo.clamp(min=0, max=s)] > 0)
        all_valid = (cum[:, k_hi.view(-1) + 1] - cum[:, k_lo.view(-1)] == (k_hi - k_lo + 1).view(1, -1))
        band_nonempty = diag.unsqueeze(0) | reach
        band_full = ((k_hi <= ql) & (qh - k_lo <= w - 1)).unsqueeze(0) & all_valid.unsqueeze(1) \
            & q_whole & (k_lo + bs <= s).view(1, 1, -1)
        slot_nonempty, slot_full = slot_nonempty.expand(-1, nq, -1), slot_full.expand(-1, nq, -1)
        if self.doc_start is not None:
            ds_lo = self.doc_start[:, q_lo].unsqueeze(-1)                 # [B, nq, 1] start of the first query's doc
            ds_hi = self.doc_start[:, q_hi].unsqueeze(-1)                 # ... and of the last query's
            last_real = torch.minimum(first + bs, counts.view(-1, 1)) - 1                        # [B, ns]
            p_last_real = torch.gather(self.kv_index[:, : max(self.num_slots, 1)], 1,
                                       last_real.clamp(min=0)).unsqueeze(1)                       # [B, 1, ns]
            slot_nonempty = slot_nonempty & (p_last_real >= ds_lo)
            slot_full = slot_full & (p_first >= ds_hi)
            band_nonempty = band_nonempty & (k_hi.view(1, 1, -1) >= ds_lo)
            band_full = band_full & (k_lo.view(1, 1, -1) >= ds_hi)
        nonempty = torch.cat([slot_nonempty, band_nonempty], dim=2).unsqueeze(1)
        full = torch.cat([slot_full, band_full], dim=2).unsqueeze(1)
        return nonempty, full


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's sparse form of ``[B, H, nq, nkv]`` bool tiles: counts and column indices (kept ones first)."""
    num = tiles.sum(dim=-1).to(torch.int32).contiguous()
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32).contiguous()
    return num, idx


def build_flex_compact_layout(global_keys: torch.Tensor, key_valid: Optional[torch.Tensor], window: int,
                              position_ids: torch.Tensor, block: int = 128,
                              doc_start: Optional[torch.Tensor] = None) -> FlexCompactLayout:
    """Index the global keys of each row (by position) in front of the ``S`` keys; O(B * (N_pad + S)) memory.
    ``doc_start [B, S]``: documents (each query sees only keys of its own document)."""
    if global_keys.dim() != 2:
        raise ValueError(f"global_keys must be [B, S], got shape {tuple(global_keys.shape)}")
    batch, seq_len = global_keys.shape
    if window < 1:
        raise ValueError(f"local window must be >= 1, got {window}")
    for name, t in (("key_valid", key_valid), ("position_ids", position_ids), ("doc_start", doc_start)):
        if t is not None and tuple(t.shape) != (batch, seq_len):
            raise ValueError(f"{name} must be [B, S] = {(batch, seq_len)}, got {tuple(t.shape)}")
    dev = global_keys.device
    valid = (torch.ones(batch, seq_len, dtype=torch.bool, device=dev) if key_valid is None
             else key_valid.to(device=dev, dtype=torch.bool))
    g = global_keys.to(torch.bool) & valid
    counts = g.sum(dim=1)
    n_pad = slot_capacity(int(counts.max()) if counts.numel() else 0, block)
    order = torch.argsort((~g).to(torch.int8), dim=1, stable=True)[:, :n_pad]   # global positions first, in order
    if order.shape[1] < n_pad:
        order = F.pad(order, (0, n_pad - order.shape[1]))
    slot_real = torch.arange(n_pad, device=dev)[None, :] < counts[:, None]
    slot_index = torch.where(slot_real, order, torch.zeros_like(order))
    kv_index = torch.cat([slot_index, torch.arange(seq_len, device=dev).expand(batch, seq_len)], dim=1).contiguous()
    kv_keep = torch.cat([slot_real, valid], dim=1).contiguous()
    pos = position_ids.to(device=dev, dtype=torch.float32)
    return FlexCompactLayout(batch=batch, seq_len=seq_len, window=int(window), block=int(block), num_slots=n_pad,
                             kv_index=kv_index, kv_keep=kv_keep, q_pos=pos.contiguous(),
                             kv_pos=torch.gather(pos, 1, kv_index).contiguous(), global_counts=counts,
                             doc_start=None if doc_start is None else doc_start.to(dev).long().contiguous())


def relayout_kv(x: torch.Tensor, layout: FlexCompactLayout) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, H, N_pad + S, D]`` by one gather (its backward is a scatter-add)."""
    if x.dim() != 4 or x.shape[0] != layout.batch or x.shape[2] != layout.seq_len:
        raise ValueError(f"k/v must be [B, H, S, D] with B = {layout.batch}, S = {layout.seq_len}; got "
                         f"{tuple(x.shape)}")
    idx = layout.kv_index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return torch.gather(x, 2, idx)


def _alibi_score_mod(slopes: torch.Tensor, layout: FlexCompactLayout, device: torch.device) -> Callable:
    """``score - slope_h * (pos_q - pos_k)`` with the ORIGINAL position of each key slot."""
    s = slopes.to(device=device, dtype=torch.float32).contiguous()
    q_pos, kv_pos = layout.q_pos.to(device), layout.kv_pos.to(device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score - s[h] * (q_pos[b, q_idx] - kv_pos[b, kv_idx])
    return score_mod


def flex_compact_attention(kernel: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           layout: FlexCompactLayout, *, scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                           dropout_p: float = 0.0) -> torch.Tensor:
    """SepLLM attention for ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]`` through ``kernel`` (a compiled
    ``flex_attention``) over ``layout`` (its BlockMask attached). GQA stays grouped (``enable_gqa``)."""
    check_flex_call("flex_compact", q, k, v, dropout_p)
    if layout.block_mask is None:
        raise ValueError("flex_compact layout has no BlockMask: call layout.attach_block_mask() first")
    score_mod = None if alibi_slopes is None else _alibi_score_mod(alibi_slopes, layout, q.device)
    kc, vc = relayout_kv(k, layout), relayout_kv(v, layout)
    return kernel(q, kc, vc, score_mod=score_mod, block_mask=layout.block_mask, scale=scale,
                  enable_gqa=q.shape[1] != k.shape[1])


def flex_compact_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: FlexCompactLayout, *,
                           scale: float, alibi_slopes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same composition (one gather, same predicate) with the mask dense through SDPA: the test/debug route,
    differentiable on every device. Costs a ``[B, H, S, N_pad + S]`` score matrix."""
    keep = layout.dense_keep()
    kc, vc = relayout_kv(k, layout), relayout_kv(v, layout)
    if alibi_slopes is None:
        mask = keep
    else:
        diff = layout.q_pos[:, None, :, None] - layout.kv_pos[:, None, None, :]
        bias = -alibi_slopes.to(device=q.device, dtype=torch.float32).view(1, -1, 1, 1) * diff
        mask = bias.masked_fill(~keep, float("-inf")).to(q.dtype)
    return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def count_nonempty_blocks(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, block: int = 128,
                          q_chunk: int = 1024, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[B]`` non-empty ``block x block`` tiles (partial + full) of ``mask_mod``'s BlockMask, built in query
    chunks (``q_chunk`` a multiple of ``block``) so long sequences fit in memory; a diagnostic, not a hot path."""
    from torch.nn.attention.flex_attention import create_block_mask

    if q_chunk < block or q_chunk % block:
        raise ValueError(f"q_chunk ({q_chunk}) must be a positive multiple of the block size ({block})")
    total = torch.zeros(batch, dtype=torch.long)
    for start in range(0, q_len, q_chunk):
        offset = torch.tensor(start, device=device)

        def shifted(b, h, q_idx, kv_idx, _off=offset):
            return mask_mod(b, h, q_idx + _off, kv_idx)
        bm = create_block_mask(shifted, B=batch, H=None, Q_LEN=min(q_chunk, q_len - start), KV_LEN=kv_len,
                               device=device, BLOCK_SIZE=block)
        total += (bm.kv_num_blocks.sum(dim=(1, 2)) + bm.full_kv_num_blocks.sum(dim=(1, 2))).cpu().long()
    return total
