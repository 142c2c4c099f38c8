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
window; band: causal, inside the window, valid or the diagonal). Rows are online-softmax accumulated in float32;
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


def visited_tiles(layout: FlexCompactLayout, block_m: int = DEFAULT_BLOCK,
                  block_n: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``[B]`` tiles the forward kernel computes (its loop bounds, written on the host): slot tiles plus band tiles
    per query tile. Without padding every one of them holds a kept entry, so this is also the non-empty count."""
    s, w = layout.seq_len, layout.window
    nq = -(-s // block_m)
    q_lo = torch.arange(nq) * block_m
    band_lo = torch.clamp(q_lo - w + 1, min=0) // block_n
    band_hi = (torch.clamp(q_lo + block_m, max=s) - 1) // block_n
    band = int((band_hi - band_lo + 1).sum())
    return slot_tiles(layout, block_m, block_n).to(torch.long).sum(dim=1).cpu() + band


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
    def _kept(offs_m, idx, keep, is_slot, in_kv, S, WINDOW):
        """The predicate of ``FlexCompactLayout.mask_mod`` for queries ``offs_m`` and one key tile."""
        qi = offs_m[:, None]
        ki = idx[None, :]
        in_slot = is_slot[None, :] & keep[None, :] & (ki <= qi - WINDOW)
        in_band = (~is_slot)[None, :] & (ki <= qi) & (qi - ki < WINDOW) & (keep[None, :] | (ki == qi))
        return (in_slot | in_band) & (offs_m < S)[:, None] & in_kv[None, :]

    @triton.jit
    def _walk(SLOT_TILES, b, m, NQ, S, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Key tiles of query tile ``m``: ``(n_slot, band_lo, count)``; tile ``t`` is ``_kv_tile(t, ...)``."""
        n_slot = tl.load(SLOT_TILES + b * NQ + m)
        band_lo = tl.maximum(m * BLOCK_M - WINDOW + 1, 0) // BLOCK_N
        band_hi = (tl.minimum(m * BLOCK_M + BLOCK_M, S) - 1) // BLOCK_N
        return n_slot, band_lo, n_slot + band_hi - band_lo + 1

    @triton.jit
    def _kv_tile(q, K, V, t, n_slot, band_lo, b, qpos, offs_m, offs_d, slope, KV_INDEX, KV_KEEP, KV_POS,
                 S, L, N_PAD, WINDOW, scale, HAS_ALIBI: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                 IEEE: tl.constexpr, sks):
        """Tile ``t`` of a query tile's walk: scores ``[BM, BN]`` (masked entries -inf), its K and V."""
        kv_lo = tl.where(t < n_slot, t * BLOCK_N, N_PAD + (band_lo + t - n_slot) * BLOCK_N)
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
        ok = _kept(offs_m, idx, keep, offs_n < N_PAD, in_kv, S, WINDOW)
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
    def _fwd_kernel(Q, K, V, O, LSE, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES, SLOT_TILES,
                    sqb, sqh, sqs, skb, skh, sks,
                    H, GROUP, S, L, N_PAD, WINDOW, NQ, scale,
                    HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
        m, bh, b, offs_m, offs_d, row_ok, q_mask, q_off, q, qpos, slope, kv_base = _query_tile(
            Q, Q_POS, SLOPES, sqb, sqh, sqs, skb, skh, H, GROUP, S, HAS_ALIBI, BLOCK_M, BLOCK_D, HEAD_DIM)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_slot, band_lo, count = _walk(SLOT_TILES, b, m, NQ, S, WINDOW, BLOCK_M, BLOCK_N)
        for t in range(0, count):
            s, _k, v = _kv_tile(q, K + kv_base, V + kv_base, t, n_slot, band_lo, b, qpos, offs_m, offs_d, slope,
                                KV_INDEX, KV_KEEP, KV_POS, S, L, N_PAD, WINDOW, scale, HAS_ALIBI, BLOCK_N, HEAD_DIM,
                                IEEE, sks)
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
    def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES, SLOT_TILES,
                       sqb, sqh, sqs, skb, skh, sks,
                       H, GROUP, S, L, N_PAD, WINDOW, NQ, scale,
                       HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
        m, bh, b, offs_m, offs_d, row_ok, q_mask, q_off, q, qpos, slope, kv_base = _query_tile(
            Q, Q_POS, SLOPES, sqb, sqh, sqs, skb, skh, H, GROUP, S, HAS_ALIBI, BLOCK_M, BLOCK_D, HEAD_DIM)
        do = tl.load(DO + q_off, mask=q_mask, other=0.0)                          # DO and DQ have Q's layout
        lse = tl.load(LSE + bh * S + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * S + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        n_slot, band_lo, count = _walk(SLOT_TILES, b, m, NQ, S, WINDOW, BLOCK_M, BLOCK_N)
        for t in range(0, count):
            s, k, v = _kv_tile(q, K + kv_base, V + kv_base, t, n_slot, band_lo, b, qpos, offs_m, offs_d, slope,
                               KV_INDEX, KV_KEEP, KV_POS, S, L, N_PAD, WINDOW, scale, HAS_ALIBI, BLOCK_N, HEAD_DIM,
                               IEEE, sks)
            ds = tl.exp(s - lse[:, None]) * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _bwd_dkv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, KV_INDEX, KV_KEEP, Q_POS, KV_POS, SLOPES,
                        sqb, sqh, sqs, skb, skh, sks,
                        H, HKV, GROUP, S, L, N_PAD, WINDOW, NQ, scale,
                        HAS_ALIBI: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr):
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
                ok = _kept(offs_m, idx, keep, is_slot, in_kv, S, WINDOW)
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
    slot_tiles: torch.Tensor        # [B, nq] int32 slot tiles per query tile

    @property
    def num_q_tiles(self) -> int:
        return self.slot_tiles.shape[1]


def build_triton_layout(layout: FlexCompactLayout, block_m: int = DEFAULT_BLOCK,
                        block_n: int = DEFAULT_BLOCK) -> TritonCompactLayout:
    """The kernels' view of ``layout`` with ``block_m x block_n`` tiles (``block_n`` must divide the slot count)."""
    if layout.num_slots % block_n:
        raise ValueError(f"key tile {block_n} must divide the layout's slot count {layout.num_slots} "
                         f"(a multiple of its block {layout.block})")
    return TritonCompactLayout(layout=layout, block_m=int(block_m), block_n=int(block_n),
                               kv_index=layout.kv_index.to(torch.int32).contiguous(),
                               kv_keep=layout.kv_keep.to(torch.int8).contiguous(),
                               slot_tiles=slot_tiles(layout, block_m, block_n))


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
    return dict(
        kv_index=tl_layout.kv_index, kv_keep=tl_layout.kv_keep, q_pos=lay.q_pos, kv_pos=lay.kv_pos, slopes=slopes,
        slot_tiles=tl_layout.slot_tiles, H=hq, HKV=hkv, GROUP=hq // hkv, S=s, L=lay.kv_len, N_PAD=lay.num_slots,
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
            q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
            a["H"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], float(scale),
            HAS_ALIBI=a["HAS_ALIBI"], BLOCK_M=a["BLOCK_M"], BLOCK_N=a["BLOCK_N"], BLOCK_D=a["BLOCK_D"],
            HEAD_DIM=a["HEAD_DIM"], IEEE=a["IEEE"])
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
        common = (a["kv_index"], a["kv_keep"], a["q_pos"], a["kv_pos"], a["slopes"])
        strides = (q.stride(0), q.stride(1), q.stride(2), kc.stride(0), kc.stride(1), kc.stride(2))
        meta = dict(HAS_ALIBI=a["HAS_ALIBI"], BLOCK_M=a["BLOCK_M"], BLOCK_N=a["BLOCK_N"], BLOCK_D=a["BLOCK_D"],
                    HEAD_DIM=a["HEAD_DIM"], IEEE=a["IEEE"])
        _bwd_dq_kernel[(a["NQ"], b * hq)](
            q, kc, vc, do, dq, lse, delta, *common, a["slot_tiles"], *strides,
            a["H"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], scale, **meta)
        _bwd_dkv_kernel[(-(-a["L"] // a["BLOCK_N"]), b * a["HKV"])](
            q, kc, vc, do, dkc, dvc, lse, delta, *common, *strides,
            a["H"], a["HKV"], a["GROUP"], a["S"], a["L"], a["N_PAD"], a["WINDOW"], a["NQ"], scale, **meta)
        return dq, dkc, dvc, None, None, None


def triton_compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tl_layout: TritonCompactLayout, *,
                             scale: float, alibi_slopes: Optional[torch.Tensor] = None,
                             dropout_p: float = 0.0) -> torch.Tensor:
    """SepLLM attention for ``q [B, Hq, S, D]``, ``k, v [B, Hkv, S, D]`` over ``tl_layout`` with the Triton kernels
    (differentiable; K/V re-laid out by one gather whose backward is a scatter-add)."""
    check_triton_call(q, dropout_p)
    kc, vc = relayout_kv(k, tl_layout.layout), relayout_kv(v, tl_layout.layout)
    return _TritonCompact.apply(q, kc, vc, tl_layout, scale, alibi_slopes)
