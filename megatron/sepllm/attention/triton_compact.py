"""Triton kernels for SepLLM attention over the compact key layout: forward and backward skip every empty tile.

The keys are laid out as in ``flex_compact`` (``[gathered global keys, padded] ++ [S keys]``, one gather per layer,
see ``FlexCompactLayout``). Instead of a BlockMask, each program walks two contiguous ranges of key tiles that it
computes from the layout in closed form:

* query tile ``m`` (forward and dQ): the first ``slot_tiles[b, m]`` tiles of global-key slots (those whose slots
  hold a global key before the window of the tile's last query), then the band tiles ``[m*BM - w + 1, m*BM + BM)``
  of the S keys;
* key tile ``n`` (dK/dV): a slot tile is read by query tiles from the one holding ``position(first slot) + w`` to
  the end; a band tile by query tiles ``[n*BN, n*BN + BN - 1 + w - 1]``.

Inside a tile the predicate is the one of ``FlexCompactLayout.mask_mod`` (slot: real and before the query's
window; band: causal, inside the window, valid or the diagonal; with documents also ``k >= doc_start[q]``).

Documents: document starts never decrease along the queries, so query tile ``m`` starts its slot walk at the first
slot tile holding a global key at or after the document start of its first query (``slot_lo``) and its band walk
at that start (``band_lo``); key tile ``n`` stops at the last query tile whose first query's document starts at or
before the tile's last key (``dkv_m_hi``). Tiles wholly before a document start are never visited. Rows are online-softmax accumulated in float32;
fp32 inputs use IEEE products (``tl.dot`` would otherwise use TF32), so the kernels agree with the float64
reference to fp32 rounding. GQA stays grouped (the dK/dV program sums its group's query heads); ALiBi uses the
original positions. The backward is the FlashAttention-2 recurrence (``delta = rowsum(dO * O)``) with separate dQ
and dK/dV programs, so no atomics. Batch and head offsets are 64-bit (``B * H * S * D`` may pass 2**31).

Runs on CUDA; on CPU only under ``TRITON_INTERPRET=1`` (the tests), where it is exact but slow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron.sepllm.attention.checks import TRITON_MISSING, SepAttentionConfigError
from megatron.sepllm.attention.flex_compact import FlexCompactLayout, relayout_kv

try:  # optional accelerator: the path fails loudly (below) without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

DEFAULT_BLOCK = 64      # query / key tile of the kernels
LAYOUT_BLOCK = 128      # the layout pads its slots to a multiple of this (every tile size up to it divides it)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_triton_ready(device: torch.device) -> None:
    """Fail at ``prepare`` (before any step) when the kernels cannot run on ``device``."""
    if triton is None:
        raise SepAttentionConfigError(TRITON_MISSING)
    if torch.device(device).type != "cuda" and not interpreting():
        raise SepAttentionConfigError(
            f"sep_attention_impl='triton' runs on CUDA (the batch is on {torch.device(device).type}); on CPU use "
            "'compact' (TRITON_INTERPRET=1 runs the kernels on CPU, for testing only)")


def check_triton_call(q: torch.Tensor, dropout_p: float) -> None:
    """What this path cannot do, said in the user's terms."""
    check_triton_ready(q.device)
    if dropout_p > 0.0:
        raise SepAttentionConfigError(
            f"attention dropout {dropout_p} is not supported by sep_attention_impl='triton'; set attention_dropout "
            "to 0 or use sep_attention_impl='dense'")


def slot_tiles(layout: FlexCompactLayout, block_m: int, block_n: int) -> torch.Tensor:
    """``[B, nq]`` int32: slot tiles query tile ``m`` must read (its last query's out-of-window global keys)."""
    s, w = layout.seq_len, layout.window
    nq = -(-s // block_m)
    real = layout.kv_keep[:, : layout.num_slots]
    pos = layout.kv_index[:, : layout.num_slots]
    q_last = torch.clamp(torch.arange(nq, device=pos.device) * block_m + block_m, max=s) - 1
    # slots are sorted by position, real ones first: count those at or before q_last - w
    visible = (real[:, None, :] & (pos[:, None, :] <= (q_last - w)[None, :, None])).sum(dim=-1)
    return (-(-visible // block_n)).to(torch.int32).contiguous()


def walk_starts(layout: FlexCompactLayout, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(slot_lo, band_lo)`` ``[B, nq]`` int32: the first slot tile and the first band tile query tile ``m`` reads.
    Without documents ``0`` and the tile of ``m*BM - w + 1``; with documents neither starts before the document
    start of the tile's first query (slots are sorted by position)."""
    s, w, dev = layout.seq_len, layout.window, layout.kv_index.device
    nq = -(-s // block_m)
    q_lo = torch.arange(nq, device=dev) * block_m
    first_key = torch.clamp(q_lo - w + 1, min=0).unsqueeze(0).expand(layout.batch, nq)
    if layout.doc_start is None:
        return (torch.zeros(layout.batch, nq, dtype=torch.int32, device=dev),
                (first_key // block_n).to(torch.int32).contiguous())
    ds = layout.doc_start[:, q_lo]                                                       # [B, nq]
    real = layout.kv_keep[:, : layout.num_slots]
    pos = layout.kv_index[:, : layout.num_slots]
    before = (real[:, None, :] & (pos[:, None, :] < ds[:, :, None])).sum(dim=-1)      # global keys before the doc
    return ((before // block_n).to(torch.int32).contiguous(),
            (torch.maximum(first_key, ds) // block_n).to(torch.int32).contiguous())


def dkv_last_query_tiles(layout: FlexCompactLayout, block_m: int, block_n: int) -> torch.Tensor:
    """``[B, n_kv_tiles]`` int32 (documents only): the last query tile that may read key tile ``n``, i.e. the last
    one whose first query's document starts at or before the tile's last real key."""
    s, dev = layout.seq_len, layout.kv_index.device
    nq = -(-s // block_m)
    n_tiles = -(-layout.kv_len // block_n)
    last = torch.clamp(torch.arange(n_tiles, device=dev) * block_n + block_n, max=layout.kv_len) - 1
    slots = layout.num_slots
    counts = layout.global_counts.to(dev).view(-1, 1)
    # slot tile: its last real slot (tiles with none are never read); band tile: its last key
    slot_last = torch.clamp(torch.minimum(last.view(1, -1), counts - 1), min=0)
    idx = torch.where(last.view(1, -1) < slots, slot_last, last.view(1, -1).expand(layout.batch, -1))
    p_last = torch.gather(layout.kv_index, 1, idx)
    ds_first = layout.doc_start[:, torch.arange(nq, device=dev) * block_m].contiguous()      # nondecreasing
    return (torch.searchsorted(ds_first, p_last.contiguous(), right=True) - 1).to(torch.int32).contiguous()


def visited_tiles(layout: FlexCompactLayout, block_m: int = DEFAULT_BLOCK,
                  block_n: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``[B]`` tiles the forward kernel computes (its loop bounds, written on the host): slot tiles plus band tiles
    per query tile. Without padding every one of them holds a kept entry, so this is also the non-empty count."""
    s = layout.seq_len
    nq = -(-s // block_m)
    q_lo = torch.arange(nq, device=layout.kv_index.device) * block_m
    slot_lo, band_lo = walk_starts(layout, block_m, block_n)
    band_hi = ((torch.clamp(q_lo + block_m, max=s) - 1) // block_n).unsqueeze(0)
    slot = torch.clamp(slot_tiles(layout, block_m, block_n).long() - slot_lo.long(), min=0)
    return (slot + band_hi - band_lo.long() + 1).sum(dim=1).cpu()


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` in fp32; exact IEEE products for fp32 inputs (``tl.dot`` would use TF32)."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _slope(SLOPES, h, HAS_ALIBI: tl.constexpr):
        if HAS_ALIBI:
            return tl.load(SLOPES + h)
        return 0.0

    @triton.jit
    def _kept(offs_m, idx, keep, is_slot, in_kv, S, WINDOW, qds, HAS_DOCS: tl.constexpr):
        """The predicate of ``FlexCompactLayout.mask_mod`` for queries ``offs_m`` and one key tile (``qds``: the
        queries' document starts, read only with ``HAS_DOCS``)."""
        qi = offs_m[:, None]
        ki = idx[None, :]
        in_slot = is_slot[None, :] & keep[None, :] & (ki <= qi - WINDOW)
        in_band = (~is_slot)[None, :] & (ki <= qi) & (qi - ki < WINDOW) & (keep[None, :] | (ki == qi))
        ok = (in_slot | in_band) & (offs_m < S)[:, None] & in_kv[None, :]
        if HAS_DOCS:
            ok = ok & (ki >= qds[:, None])
        return ok

    @triton.jit
    def _doc_starts(DOC_START, b, offs_m, row_ok, S, HAS_DOCS: tl.constexpr):
        if HAS_DOCS:
            return tl.load(DOC_START + b * S + offs_m, mask=row_ok, other=0)
        return offs_m * 0

    @triton.jit
    def _walk(SLOT_TILES, SLOT_LO, BAND_LO, b, m, NQ, S, WINDOW, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
        """Key tiles of query tile ``m``: ``(slot_lo, n_slot, band_lo, count)``; tile ``t`` is ``_kv_tile(t, ...)``:
        slot tile ``slot_lo + t`` for ``t < n_slot``, then band tiles from ``band_lo`` (with documents both starts
        come from ``walk_starts``)."""
        n_slot = tl.load(SLOT_TILES + b * NQ + m)
        if HAS_DOCS:
            slot_lo = tl.load(SLOT_LO + b * NQ + m)
            n_slot = tl.maximum(n_slot - slot_lo, 0)
            band_lo = tl.load(BAND_LO + b * NQ + m)
        else:
            slot_lo = n_slot * 0
            band_lo = tl.maximum(m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N
        band_hi = (tl.minimum(m * BLOCK_M + BLOCK_M, S) - 1) // BLOCK_N
        return slot_lo, n_slot, band_lo, n_slot + band_hi - band_lo + 1

    @triton.jit
    def _kv_tile(q, K, V, t, slot_lo, n_slot, band_lo, b, qpos, qds, offs_m, offs_d, slope, KV_INDEX, KV_KEEP,
                 KV_POS, S, L, N_PAD, WINDOW, scale, HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, sks):
        """Tile ``t`` of a query tile's walk: scores ``[BM, BN]`` (masked entries -inf), its K and V."""
        kv_lo = tl.where(t < n_slot, (slot_lo + t) * BLOCK_N, N_PAD + (band_lo + t - n_slot) * BLOCK_N)
        offs_n = kv_lo + tl.arange(0, BLOCK_N)
        in_kv = offs_n < L
        kv_mask = in_kv[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * sks + offs_d[None, :], mask=kv_mask, other=0.0)
        idx = tl.load(KV_INDEX + b * L + offs_n, mask=in_kv, other=0)
        keep = tl.load(KV_KEEP + b * L + offs_n, mask=in_kv, other=0) != 0
        s = _dot(q, tl.trans(k), IEEE) * scale
        if HAS_ALIBI:
            kpos = tl.load(KV_POS + b * L + offs_n, mask=in_kv, other=0.0)
            s = s - slope * (qpos[:, None] - kpos[None, :])
        ok = _kept(offs_m, idx, keep, offs_n < N_PAD, in_kv, S, WINDOW, qds, HAS_DOCS)
        return tl.where(ok, s, float("-inf")), k, v

    @triton.jit
    def _query_tile(Q, Q_POS, SLOPES, sqb, sqh, sqs, skb, skh, H, GROUP, S, HAS_ALIBI: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        """This program's query tile: indices, masks, the Q rows, their positions, the head's ALiBi slope and the
        offset of its K/V head (GQA). Tiles are issued last-first: later query tiles walk more key tiles, and
        starting the long programs first shortens the tail."""
        m = tl.num_programs(0) - 1 - tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < S
        q_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        q_off = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqs + offs_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        qpos = tl.load(Q_POS + b * S + offs_m, mask=row_ok, other=0.0)
        return m, bh, b, offs_m, offs_d, row_ok, q_mask, q_off, q, qpos, _slope(SLOPES, h, HAS_ALIBI), \
            b.to(tl.int64) * skb + (h // GROUP).to(tl.int64) * skh

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES, SLOT_TILES, SLOT_LO, BAND_LO,
                    DOC_START, sqb, sqh, sqs, skb, skh, sks,
                    H, GROUP, S, L, N_PAD, WINDOW, NQ, scale,
                    HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
        m, bh, b, offs_m, offs_d, row_ok, q_mask, q_off, q, qpos, slope, kv_base = _query_tile(
            Q, Q_POS, SLOPES, sqb, sqh, sqs, skb, skh, H, GROUP, S, HAS_ALIBI, BLOCK_M, BLOCK_D, HEAD_DIM)
        qds = _doc_starts(DOC_START, b, offs_m, row_ok, S, HAS_DOCS)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        slot_lo, n_slot, band_lo, count = _walk(SLOT_TILES, SLOT_LO, BAND_LO, b, m, NQ, S, WINDOW, HAS_DOCS, BLOCK_M,
                                                BLOCK_N)
        for t in range(0, count):
            s, _k, v = _kv_tile(q, K + kv_base, V + kv_base, t, slot_lo, n_slot, band_lo, b, qpos, qds, offs_m,
                                offs_d, slope, KV_INDEX, KV_KEEP, KV_POS, S, L, N_PAD, WINDOW, scale, HAS_ALIBI,
                                HAS_DOCS, BLOCK_N, HEAD_DIM, IEEE, sks)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(O + q_off, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=q_mask)   # O: Q's layout
        tl.store(LSE + bh * S + offs_m, m_i + tl.log(l_safe), mask=row_ok)

    @triton.jit
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES, DOC_START,
                       SLOT_TILES, SLOT_LO, BAND_LO, sqb, sqh, sqs, skb, skh, sks,
                       H, GROUP, S, L, N_PAD, WINDOW, NQ, scale,
                       HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
        m, bh, b, offs_m, offs_d, row_ok, q_mask, q_off, q, qpos, slope, kv_base = _query_tile(
            Q, Q_POS, SLOPES, sqb, sqh, sqs, skb, skh, H, GROUP, S, HAS_ALIBI, BLOCK_M, BLOCK_D, HEAD_DIM)
        qds = _doc_starts(DOC_START, b, offs_m, row_ok, S, HAS_DOCS)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)                          # DO and DQ have Q's layout
        lse = tl.load(LSE + bh * S + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * S + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        slot_lo, n_slot, band_lo, count = _walk(SLOT_TILES, SLOT_LO, BAND_LO, b, m, NQ, S, WINDOW, HAS_DOCS, BLOCK_M,
                                                BLOCK_N)
        for t in range(0, count):
            s, k, v = _kv_tile(q, K + kv_base, V + kv_base, t, slot_lo, n_slot, band_lo, b, qpos, qds, offs_m,
                               offs_d, slope, KV_INDEX, KV_KEEP, KV_POS, S, L, N_PAD, WINDOW, scale, HAS_ALIBI,
                               HAS_DOCS, BLOCK_N, HEAD_DIM, IEEE, sks)
            ds = tl.exp(s - lse[:, None]) * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES, DOC_START,
                        DKV_M_HI, sqb, sqh, sqs, skb, skh, sks,
                        H, HKV, GROUP, S, L, N_PAD, WINDOW, NQ, NKV, scale,
                        HAS_ALIBI: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
        n = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        kv_lo = n * BLOCK_N
        offs_n = kv_lo + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_kv = offs_n < L
        d_ok = offs_d < HEAD_DIM
        kv_mask = in_kv[:, None] & d_ok[None, :]
        kv_off = b.to(tl.int64) * skb + hk.to(tl.int64) * skh + offs_n[:, None] * sks + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_off, mask=kv_mask, other=0.0)
        idx = tl.load(KV_INDEX + b * L + offs_n, mask=in_kv, other=0)
        keep = tl.load(KV_KEEP + b * L + offs_n, mask=in_kv, other=0) != 0
        kpos = tl.load(KV_POS + b * L + offs_n, mask=in_kv, other=0.0)
        is_slot = offs_n < N_PAD
        # query tiles that can see this key tile (see the module docstring)
        first_pos = tl.load(KV_INDEX + b * L + kv_lo)
        first_real = tl.load(KV_KEEP + b * L + kv_lo) != 0
        slot_tile = kv_lo < N_PAD
        k0 = tl.maximum(kv_lo - N_PAD, 0)
        m_lo = tl.where(slot_tile, tl.where(first_real, tl.minimum((first_pos + WINDOW) // BLOCK_M, NQ), NQ),
                        k0 // BLOCK_M)
        m_hi = tl.where(slot_tile, NQ - 1, tl.minimum(NQ - 1, (k0 + BLOCK_N + WINDOW - 2) // BLOCK_M))
        if HAS_DOCS:   # query tiles whose documents all start after this tile's last key see none of it
            m_hi = tl.minimum(m_hi, tl.load(DKV_M_HI + b * NKV + n))
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            bh = b * H + h
            slope = _slope(SLOPES, h, HAS_ALIBI)
            for m in range(m_lo, m_hi + 1):
                offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
                row_ok = offs_m < S
                q_mask = row_ok[:, None] & d_ok[None, :]
                q_off = b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqs + offs_d[None, :]
                q = tl.load(Q + q_off, mask=q_mask, other=0.0)
                do = tl.load(DO + q_off, mask=q_mask, other=0.0)
                lse = tl.load(LSE + bh * S + offs_m, mask=row_ok, other=0.0)
                delta = tl.load(DELTA + bh * S + offs_m, mask=row_ok, other=0.0)
                s = _dot(q, tl.trans(k), IEEE) * scale
                if HAS_ALIBI:
                    qpos = tl.load(Q_POS + b * S + offs_m, mask=row_ok, other=0.0)
                    s = s - slope * (qpos[:, None] - kpos[None, :])
                qds = _doc_starts(DOC_START, b, offs_m, row_ok, S, HAS_DOCS)
                ok = _kept(offs_m, idx, keep, is_slot, in_kv, S, WINDOW, qds, HAS_DOCS)
                p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
                ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)


@dataclass
class TritonCompactLayout:
    """What the kernels read besides Q/K/V, built once per micro-batch and pattern (shared by all layers)."""

    layout: FlexCompactLayout       # the key layout (gather index, ALiBi positions)
    block_m: int                    # query tile
    block_n: int                    # key tile (divides the slot count)
    kv_index: torch.Tensor          # [B, N_pad + S] int32 original position of each key slot
    kv_keep: torch.Tensor           # [B, N_pad + S] int8 real slot / valid key
    slot_tiles: torch.Tensor        # [B, nq] int32 slot tiles per query tile (end of its slot walk)
    doc_start: Optional[torch.Tensor] = None   # [B, S] int32 document starts (None: no documents)
    slot_lo: Optional[torch.Tensor] = None     # [B, nq] int32 first slot tile per query tile (documents)
    band_lo: Optional[torch.Tensor] = None     # [B, nq] int32 first band tile per query tile (documents)
    dkv_m_hi: Optional[torch.Tensor] = None    # [B, n_kv_tiles] int32 last query tile per key tile (documents)

    @property
    def num_q_tiles(self) -> int:
        return self.slot_tiles.shape[1]


def build_triton_layout(layout: FlexCompactLayout, block_m: int = DEFAULT_BLOCK,
                        block_n: int = DEFAULT_BLOCK) -> TritonCompactLayout:
    """The kernels' view of ``layout`` with ``block_m x block_n`` tiles (``block_n`` must divide the slot count)."""
    if layout.num_slots % block_n:
        raise ValueError(f"key tile {block_n} must divide the layout's slot count {layout.num_slots} "
                         f"(a multiple of its block {layout.block})")
    tl_layout = TritonCompactLayout(layout=layout, block_m=int(block_m), block_n=int(block_n),
                                    kv_index=layout.kv_index.to(torch.int32).contiguous(),
                                    kv_keep=layout.kv_keep.to(torch.int8).contiguous(),
                                    slot_tiles=slot_tiles(layout, block_m, block_n))
    if layout.doc_start is not None:       # documents: where each walk starts and where each dK/dV walk ends
        tl_layout.doc_start = layout.doc_start.to(torch.int32).contiguous()
        tl_layout.slot_lo, tl_layout.band_lo = walk_starts(layout, block_m, block_n)
        tl_layout.dkv_m_hi = dkv_last_query_tiles(layout, block_m, block_n)
    return tl_layout


def _launch_args(tl_layout: TritonCompactLayout, q: torch.Tensor, kc: torch.Tensor,
                 alibi_slopes: Optional[torch.Tensor]) -> dict:
    """Everything the three kernels share (validated once per call)."""
    b, hq, s, d = q.shape
    hkv = kc.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    dev = q.device
    lay = tl_layout.layout
    has_alibi = alibi_slopes is not None
    slopes = (alibi_slopes.to(device=dev, dtype=torch.float32).contiguous() if has_alibi
              else torch.zeros(1, device=dev, dtype=torch.float32))
    has_docs = tl_layout.doc_start is not None
    unused = torch.zeros(1, device=dev, dtype=torch.int32)
    return dict(
        kv_index=tl_layout.kv_index, kv_keep=tl_layout.kv_keep, q_pos=lay.q_pos, kv_pos=lay.kv_pos, slopes=slopes,
        slot_tiles=tl_layout.slot_tiles, slot_lo=tl_layout.slot_lo if has_docs else unused,
        band_lo=tl_layout.band_lo if has_docs else unused, doc_start=tl_layout.doc_start if has_docs else unused,
        dkv_m_hi=tl_layout.dkv_m_hi if has_docs else unused, HAS_DOCS=has_docs, NKV=-(-lay.kv_len // tl_layout.block_n),
        H=hq, HKV=hkv, GROUP=hq // hkv, S=s, L=lay.kv_len, N_PAD=lay.num_slots,
        WINDOW=lay.window, NQ=tl_layout.num_q_tiles, HAS_ALIBI=has_alibi, BLOCK_M=tl_layout.block_m,
        BLOCK_N=tl_layout.block_n, BLOCK_D=max(16, triton.next_power_of_2(d)), HEAD_DIM=d,
        IEEE=q.dtype == torch.float32)


class _TritonCompact(torch.autograd.Function):
    """Forward and backward of SepLLM attention over the re-laid-out keys ``kc, vc [B, Hkv, N_pad + S, D]``."""

    @staticmethod
    def forward(ctx, q, kc, vc, tl_layout: TritonCompactLayout, scale: float, alibi_slopes):
        q, kc, vc = q.contiguous(), kc.contiguous(), vc.contiguous()
        a = _launch_args(tl_layout, q, kc, alibi_slopes)
        b, hq, s, _ = q.shape
        out = torch.empty_like(q)
        lse = torch.empty(b, hq, s, device=q.device, dtype=torch.float32)
        _fwd_kernel[(a["NQ"], b * hq)](
            q, kc, vc, out, lse, a["kv_index"], a["kv_keep"], a["q_pos"], a["kv_pos"], a["slopes"], a["slot_tiles"],
            a["slot_lo"], a["band_lo"], a["doc_start"],
            q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            a["H"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], float(scale),
            HAS_ALIBI=a["HAS_ALIBI"], HAS_DOCS=a["HAS_DOCS"], BLOCK_M=a["BLOCK_M"], BLOCK_N=a["BLOCK_N"],
            BLOCK_D=a["BLOCK_D"], HEAD_DIM=a["HEAD_DIM"], IEEE=a["IEEE"])
        ctx.save_for_backward(q, kc, vc, out, lse)
        ctx.args, ctx.scale = a, float(scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kc, vc, out, lse = ctx.saved_tensors
        a, scale = ctx.args, ctx.scale
        do = grad_out.contiguous()
        delta = (out.float() * do.float()).sum(dim=-1).contiguous()
        dq = torch.empty_like(q)
        dkc, dvc = torch.empty_like(kc), torch.empty_like(vc)
        b, hq = q.shape[0], q.shape[1]
        common = (a["kv_index"], a["kv_keep"], a["q_pos"], a["kv_pos"], a["slopes"], a["doc_start"])
        strides = (q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2))
        meta = dict(HAS_ALIBI=a["HAS_ALIBI"], HAS_DOCS=a["HAS_DOCS"], BLOCK_M=a["BLOCK_M"], BLOCK_N=a["BLOCK_N"],
                    BLOCK_D=a["BLOCK_D"], HEAD_DIM=a["HEAD_DIM"], IEEE=a["IEEE"])
        _bwd_dq_kernel[(a["NQ"], b * hq)](
            q, kc, vc, do, dq, lse, delta, *common, a["slot_tiles"], a["slot_lo"], a["band_lo"], *strides,
            a["H"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], scale, **meta)
        _bwd_dkv_kernel[(a["NKV"], b * a["HKV"])](
            q, kc, vc, do, dkc, dvc, lse, delta, *common, a["dkv_m_hi"], *strides,
            a["H"], a["HKV"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], a["NKV"], scale, **meta)
        return dq, dkc, dvc, None, None, None


def triton_compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tl_layout: TritonCompactLayout, *,
                             scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """SepLLM attention for ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]`` over ``tl_layout`` with the Triton kernels
    (differentiable; K/V re-laid out by one gather whose backward is a scatter-add)."""
    check_triton_call(q, dropout_p)
    kc, vc = relayout_kv(k, tl_layout.layout), relayout_kv(v, tl_layout.layout)
    return _TritonCompact.apply(q, kc, vc, tl_layout, scale, alibi_slopes)
