"""Compact SepLLM attention: work proportional to the kept keys (initial + separators + local window).

For a query block ``[q0, q1)`` (``Bq`` queries) the keys split into two disjoint sets:

* the **band** ``[q0 - P, q1)`` (``P`` = window rounded up to a multiple of ``Bq``): a contiguous slice, evaluated with
  the rule as a small ``[Bq, P + Bq]`` mask (causal, window, global keys inside the band, padding);
* the **compact** set: global keys (initial, separators, FixLLM positions) with position ``< q0 - P``. They are
  causal and global for every query of the block, so they need no mask at all. They are gathered ONCE per layer
  into a buffer ordered by position; block ``j`` uses a prefix of it (a view, no copy).

Both sets are combined into ONE exact softmax. On CPU the two parts run through PyTorch's flash-attention CPU kernel
(which returns the log-sum-exp) and are merged with ``logaddexp``; the backward pass calls the kernel's backward for
each part with the *merged* output and log-sum-exp, which yields exactly the gradient of the joint softmax (the same
identity ring/blockwise attention uses). Only the band carries a mask; the bulk of the work at long sequence length
(the growing separator set) is mask-free. On other devices a generic engine concatenates the two key sets per block
and calls public SDPA under autograd (same result, fewer savings).

Layouts are built once per micro-batch and distinct pattern (``build_compact_layout``) and shared by all layers
and heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.sepllm import rules

_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def default_block_size(window: int) -> int:
    """Query block size: about half a window (keeps the band mask small), clamped to [32, 128]."""
    return int(min(128, max(32, 2 ** math.ceil(math.log2(max(window, 2)) - 1))))


@dataclass
class CompactLayout:
    """Index layout of one pattern for one micro-batch (shared by all layers and heads)."""

    batch: int
    seq_len: int
    block: int                      # Bq
    pad_left: int                   # P (multiple of Bq, >= window - 1)
    num_blocks: int                 # nb
    band_keep: torch.Tensor         # [B*nb, 1, Bq, P+Bq] bool
    comp_idx: torch.Tensor          # [B, N] positions of global keys (ordered), N = max count needed
    counts: list                    # counts[b][j]: compact keys of row b visible to block j
    band_q_pos: torch.Tensor        # [B*nb, Bq] position ids of band queries (ALiBi)
    band_k_pos: torch.Tensor        # [B*nb, P+Bq] position ids of band keys (ALiBi)
    comp_pos: torch.Tensor          # [B, N] position ids of compact keys (ALiBi)
    _bias_cache: dict = field(default_factory=dict)

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block

    @property
    def band_len(self) -> int:
        return self.pad_left + self.block

    @property
    def chunks_per_band(self) -> int:
        return self.pad_left // self.block + 1

    def band_additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``0 / -inf`` float version of ``band_keep`` in the query dtype (the CPU kernel wants that); cached."""
        if dtype not in self._bias_cache:
            m = torch.zeros(self.band_keep.shape, dtype=dtype, device=self.band_keep.device)
            self._bias_cache[dtype] = m.masked_fill_(~self.band_keep, float("-inf"))
        return self._bias_cache[dtype]

    def block_calls(self) -> list[tuple[slice, int, int]]:
        """``(rows, block, n)`` compact calls: one per block when every row has the same count, else per row."""
        calls = []
        for j in range(self.num_blocks):
            col = [self.counts[b][j] for b in range(self.batch)]
            if all(c == col[0] for c in col):
                if col[0] > 0:
                    calls.append((slice(0, self.batch), j, col[0]))
            else:
                calls.extend((slice(b, b + 1), j, c) for b, c in enumerate(col) if c > 0)
        return calls


def build_compact_layout(global_keys: torch.Tensor, key_valid: Optional[torch.Tensor], window: int,
                         position_ids: torch.Tensor, block: Optional[int] = None) -> CompactLayout:
    """Evaluate the rule on every block's band and index the global keys outside it (O(B*S*(w+Bq)) memory)."""
    batch, seq_len = global_keys.shape
    dev = global_keys.device
    bq = block or default_block_size(window)
    pad_left = int(math.ceil(max(window - 1, 1) / bq) * bq)
    nb = int(math.ceil(seq_len / bq))
    sp = nb * bq
    band_len = pad_left + bq
    valid = torch.ones(batch, seq_len, dtype=torch.bool, device=dev) if key_valid is None else key_valid
    g = global_keys & valid

    # band keys of block j sit at positions j*Bq - P + [0, P+Bq): gather from zero-padded copies
    def _bands(x: torch.Tensor, fill) -> torch.Tensor:
        xp = F.pad(x, (pad_left, sp - seq_len), value=fill)
        return xp.unfold(1, band_len, bq).reshape(batch * nb, band_len)

    g_band = _bands(g.to(torch.int8), 0).bool()
    v_band = _bands(valid.to(torch.int8), 0).bool()
    # relative coordinates are identical for every block: queries at P + [0, Bq), keys at [0, P + Bq)
    q_rel = torch.arange(pad_left, pad_left + bq, device=dev)
    k_rel = torch.arange(band_len, device=dev)
    band_keep = rules.allowed_between(g_band, q_rel, k_rel, window, key_valid=v_band).unsqueeze(1)

    pos = position_ids.to(dev).to(torch.float32)
    band_q_pos = F.pad(pos, (0, sp - seq_len)).reshape(batch * nb, bq)
    band_k_pos = _bands(pos, 0.0)

    # compact keys: globals strictly before each block's band start
    cum = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=dev), torch.cumsum(g.long(), dim=1)], dim=1)
    starts = (torch.arange(nb, device=dev) * bq - pad_left).clamp(min=0, max=seq_len)
    counts_t = cum[:, starts]                                                  # [B, nb]
    n_max = int(counts_t.max()) if counts_t.numel() else 0
    order = torch.argsort((~g).to(torch.int8), dim=1, stable=True)            # global positions first, in order
    comp_idx = order[:, :n_max].contiguous()
    comp_pos = torch.gather(pos, 1, comp_idx) if n_max else pos[:, :0]
    return CompactLayout(batch=batch, seq_len=seq_len, block=bq, pad_left=pad_left, num_blocks=nb,
                         band_keep=band_keep, comp_idx=comp_idx, counts=counts_t.tolist(),
                         band_q_pos=band_q_pos, band_k_pos=band_k_pos, comp_pos=comp_pos)


# ----------------------------------------------------------------------------------------------- layout helpers
def _q_blocks(x: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B*nb, H, Bq, D]`` (right zero-padding to a whole number of blocks)."""
    b, h, s, d = x.shape
    if lay.padded_len != s:
        x = F.pad(x, (0, 0, 0, lay.padded_len - s))
    return x.view(b, h, lay.num_blocks, lay.block, d).transpose(1, 2).reshape(b * lay.num_blocks, h, lay.block, d)


def _q_unblocks(xb: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """Inverse of ``_q_blocks``."""
    h, d = xb.shape[1], xb.shape[3]
    x = xb.view(lay.batch, lay.num_blocks, h, lay.block, d).transpose(1, 2)
    return x.reshape(lay.batch, h, lay.padded_len, d)[:, :, : lay.seq_len]


def _kv_bands(x: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B*nb, H, P+Bq, D]``: block ``j``'s band is chunks ``j .. j+R-1`` of the padded keys."""
    b, h, s, d = x.shape
    r = lay.chunks_per_band
    xp = F.pad(x, (0, 0, lay.pad_left, lay.padded_len - s))
    chunks = xp.view(b, h, lay.num_blocks + r - 1, lay.block, d)
    win = chunks.unfold(2, r, 1)                                          # [B, H, nb, Bq, D, R]
    return win.permute(0, 2, 1, 5, 3, 4).reshape(b * lay.num_blocks, h, r * lay.block, d)


def _fold_bands(gb: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """Adjoint of ``_kv_bands``: sum overlapping band gradients back to ``[B, H, S, D]``."""
    h, d = gb.shape[1], gb.shape[3]
    r, nb = lay.chunks_per_band, lay.num_blocks
    g = gb.view(lay.batch, nb, h, r, lay.block, d)
    out = gb.new_zeros(lay.batch, h, nb + r - 1, lay.block, d)
    for i in range(r):
        out[:, :, i:i + nb] += g[:, :, :, i].transpose(1, 2)
    return out.view(lay.batch, h, (nb + r - 1) * lay.block, d)[:, :, lay.pad_left: lay.pad_left + lay.seq_len]


def _gather_keys(x: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, H, N, D]`` global keys in position order."""
    idx = lay.comp_idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return torch.gather(x, 2, idx)


def _scatter_keys(gc: torch.Tensor, lay: CompactLayout, like: torch.Tensor) -> torch.Tensor:
    idx = lay.comp_idx[:, None, :, None].expand(-1, gc.shape[1], -1, gc.shape[3])
    return torch.zeros_like(like).scatter_add_(2, idx, gc)


def _alibi(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``-slope_h * (pos_q - pos_k)``: ``[R, H, Q, K]`` from ``q_pos [R, Q]``, ``k_pos [R, K]``."""
    diff = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    return -slopes.to(torch.float32).view(1, -1, 1, 1) * diff


def _band_mask(lay: CompactLayout, dtype: torch.dtype, slopes: Optional[torch.Tensor]) -> torch.Tensor:
    if slopes is None:
        return lay.band_additive_mask(dtype)
    bias = _alibi(slopes, lay.band_q_pos, lay.band_k_pos)
    return bias.masked_fill(~lay.band_keep, float("-inf")).to(dtype)


def _comp_mask(lay: CompactLayout, rows: slice, j: int, n: int, dtype: torch.dtype,
               slopes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if slopes is None:
        return None
    q_pos = lay.band_q_pos.view(lay.batch, lay.num_blocks, lay.block)[rows, j]
    return _alibi(slopes, q_pos, lay.comp_pos[rows, :n]).to(dtype)


# ----------------------------------------------------------------------------------------------- CPU flash engine
class _CompactFlashCPU(torch.autograd.Function):
    """Band + compact parts through the CPU flash kernel, merged by log-sum-exp; exact forward and backward."""

    @staticmethod
    def forward(ctx, q, k, v, lay: CompactLayout, scale: float, slopes: Optional[torch.Tensor]):
        qb = _q_blocks(q, lay)
        out_b, lse = _FLASH_FWD(qb, _kv_bands(k, lay), _kv_bands(v, lay), 0.0, False,
                                attn_mask=_band_mask(lay, q.dtype, slopes), scale=scale)
        calls = lay.block_calls()
        if calls:
            kc, vc = _gather_keys(k, lay), _gather_keys(v, lay)
            b, nb, h, bq, d = lay.batch, lay.num_blocks, q.shape[1], lay.block, q.shape[3]
            out_c = out_b.new_zeros(b, nb, h, bq, d)
            lse_c = lse.new_full((b, nb, h, bq), float("-inf"))
            qv = qb.view(b, nb, h, bq, d)
            for rows, j, n in calls:
                o, l_ = _FLASH_FWD(qv[rows, j], kc[rows, :, :n], vc[rows, :, :n], 0.0, False,
                                   attn_mask=_comp_mask(lay, rows, j, n, q.dtype, slopes), scale=scale)
                out_c[rows, j] = o
                lse_c[rows, j] = l_
            lse_c = lse_c.view_as(lse)
            merged = torch.logaddexp(lse, lse_c)
            out_b = (out_b.float() * torch.exp(lse - merged).unsqueeze(-1)
                     + out_c.view_as(out_b).float() * torch.exp(lse_c - merged).unsqueeze(-1)).to(q.dtype)
            lse = merged
        ctx.save_for_backward(q, k, v, out_b, lse, slopes if slopes is not None else torch.empty(0))
        ctx.lay, ctx.scale, ctx.has_slopes = lay, scale, slopes is not None
        return _q_unblocks(out_b, lay)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out_b, lse, slopes = ctx.saved_tensors
        lay, scale = ctx.lay, ctx.scale
        slopes = slopes if ctx.has_slopes else None
        qb, gob = _q_blocks(q, lay), _q_blocks(grad_out.to(q.dtype), lay)
        gq, gk, gv = _FLASH_BWD(gob, qb, _kv_bands(k, lay), _kv_bands(v, lay), out_b, lse, 0.0, False,
                                attn_mask=_band_mask(lay, q.dtype, slopes), scale=scale)
        gk, gv = _fold_bands(gk, lay), _fold_bands(gv, lay)
        calls = lay.block_calls()
        if calls:
            kc, vc = _gather_keys(k, lay), _gather_keys(v, lay)
            gkc, gvc = torch.zeros_like(kc), torch.zeros_like(vc)
            b, nb, h, bq, d = lay.batch, lay.num_blocks, q.shape[1], lay.block, q.shape[3]
            qv, gov, gqv = qb.view(b, nb, h, bq, d), gob.view(b, nb, h, bq, d), gq.view(b, nb, h, bq, d)
            ov, lv = out_b.view(b, nb, h, bq, d), lse.view(b, nb, h, bq)
            for rows, j, n in calls:
                dq, dk, dv = _FLASH_BWD(gov[rows, j], qv[rows, j], kc[rows, :, :n], vc[rows, :, :n], ov[rows, j],
                                        lv[rows, j], 0.0, False,
                                        attn_mask=_comp_mask(lay, rows, j, n, q.dtype, slopes), scale=scale)
                gqv[rows, j] += dq
                gkc[rows, :, :n] += dk
                gvc[rows, :, :n] += dv
            gk = gk + _scatter_keys(gkc, lay, k)
            gv = gv + _scatter_keys(gvc, lay, v)
        return _q_unblocks(gq, lay), gk, gv, None, None, None


# ----------------------------------------------------------------------------------------------- generic engine
def _compact_generic(q, k, v, lay: CompactLayout, scale: float, slopes: Optional[torch.Tensor]) -> torch.Tensor:
    """Any device, plain autograd: per block, concatenate compact and band keys and run one masked SDPA."""
    qb = _q_blocks(q, lay)
    kb, vb = _kv_bands(k, lay), _kv_bands(v, lay)
    b, nb, h, bq, d = lay.batch, lay.num_blocks, q.shape[1], lay.block, q.shape[3]
    qv, kbv, vbv = qb.view(b, nb, h, bq, d), kb.view(b, nb, h, -1, d), vb.view(b, nb, h, -1, d)
    band_keep = lay.band_keep.view(b, nb, 1, bq, -1)
    kc, vc = _gather_keys(k, lay), _gather_keys(v, lay)
    counts = torch.tensor(lay.counts, device=q.device)                    # [B, nb]
    outs = []
    for j in range(nb):
        n = int(counts[:, j].max())
        keys = torch.cat([kc[:, :, :n], kbv[:, j]], dim=2)
        vals = torch.cat([vc[:, :, :n], vbv[:, j]], dim=2)
        comp_keep = (torch.arange(n, device=q.device)[None, :] < counts[:, j:j + 1])[:, None, None, :]
        keep = torch.cat([comp_keep.expand(b, 1, bq, n), band_keep[:, j]], dim=-1)
        if slopes is None:
            mask = keep
        else:
            q_pos = lay.band_q_pos.view(b, nb, bq)[:, j]
            k_pos = torch.cat([lay.comp_pos[:, :n], lay.band_k_pos.view(b, nb, -1)[:, j]], dim=1)
            mask = _alibi(slopes, q_pos, k_pos).masked_fill(~keep, float("-inf")).to(q.dtype)
        outs.append(F.scaled_dot_product_attention(qv[:, j], keys, vals, attn_mask=mask, scale=scale))
    out = torch.stack(outs, dim=1).reshape(b * nb, h, bq, d)
    return _q_unblocks(out, lay)


def compact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: CompactLayout, *, scale: float,
                      alibi_slopes: Optional[torch.Tensor] = None, engine: str = "auto") -> torch.Tensor:
    """SepLLM attention over ``lay`` for ``q, k, v [B, H, S, D]`` (k/v already expanded to H heads).

    ``engine``: ``"flash_cpu"`` (log-sum-exp merge on the CPU flash kernel), ``"generic"`` (masked SDPA per block,
    any device) or ``"auto"`` (flash_cpu on CPU, generic elsewhere).
    """
    if engine == "auto":
        engine = "flash_cpu" if q.device.type == "cpu" else "generic"
    if engine == "flash_cpu":
        return _CompactFlashCPU.apply(q, k, v, lay, scale, alibi_slopes)
    if engine == "generic":
        return _compact_generic(q, k, v, lay, scale, alibi_slopes)
    raise ValueError(f"compact engine {engine!r}: expected 'auto', 'flash_cpu' or 'generic'")
