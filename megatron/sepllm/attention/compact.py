"""Compact SepLLM attention: work proportional to the kept keys (initial + separators + local window).

For a query block ``[q0, q1)`` (``Bq`` queries) the keys split into two disjoint sets:

* the **band** ``[q0 - P, q1)`` (``P`` = window rounded up to a multiple of ``Bq``): a contiguous slice, evaluated with
  the rule as a small ``[Bq, P + Bq]`` mask (causal, window, global keys inside the band, padding);
* the **compact** set: global keys (initial, separators, FixLLM positions) with position ``< q0 - P``. They are
  causal and global for every query of the block. They are gathered ONCE per layer into a buffer ordered by
  position; block ``j`` uses a prefix of it (a view, no copy). Several consecutive blocks (a "super block" of
  ~1024 queries) share one kernel call over the prefix of their last block, with a cheap staircase mask: long query
  runs keep the CPU kernel's tiles large, which measured faster than one call per block.

Both sets are combined into ONE exact softmax. On CPU the two parts run through PyTorch's flash-attention CPU kernel
(which returns the log-sum-exp) and are merged with ``logaddexp``; the backward pass calls the kernel's backward for
each part with the *merged* output and log-sum-exp, which yields exactly the gradient of the joint softmax (the same
identity ring/blockwise attention uses). The bulk of the work at long sequence length (the growing separator set)
runs without any per-entry rule evaluation. On other devices a generic engine concatenates the two key sets per
block and calls public SDPA under autograd (same result, fewer savings).

Layouts are built once per micro-batch and distinct pattern (``build_compact_layout``) and shared by all layers
and heads.

Documents (``doc_start``): the band mask gets the rule's per-query lower bound ``k >= doc_start[q]``; compact keys
are sorted by position, so the ones in the query's document are a suffix of its prefix: query ``q`` sees compact
keys ``[comp_lo[q], counts[block])`` with ``comp_lo[q]`` = global keys before its document start.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from megatron.sepllm.attention import rules

_FLASH_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@contextmanager
def _num_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (restored after)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kernel(op, threads: int, *args, **kwargs):
    """One flash-kernel call on ``threads`` threads. The engine runs its small memory-bound ops (copies, merges,
    folds) on one thread: each parallel region costs a thread wake-up, which on a loaded machine measured
    milliseconds per op, more than the op itself; only the kernel calls are worth the second thread."""
    with _num_threads(threads):
        return op(*args, **kwargs)


DEFAULT_SUPER_BLOCK = 1024  # queries per compact call (>= 768 gets the kernel's large query tiles; measured
#                             better than 512 and 2048 at S=4096-8192, w=256, 2 threads)


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
    counts_t: torch.Tensor          # [B, nb] the same counts as a tensor
    super_blocks: int = 8           # query blocks per compact call (large calls keep the CPU kernel efficient)
    comp_lo: Optional[torch.Tensor] = None  # [B, Sp] documents: first compact key each query may see (None: 0)
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

    def super_calls(self) -> list[tuple[int, int, int]]:
        """``(j0, j1, n)``: queries of blocks ``[j0, j1)`` attend compact keys ``[0, n)`` (``n`` = largest count).

        The calls start at the first block with a compact key (earlier blocks would be computed and thrown away)
        and split the rest into runs of about ``super_blocks`` blocks of equal length (no short last call: a
        short query run drops the kernel to small tiles). Cached."""
        if "calls" not in self._bias_cache:
            first = [next((j for j, c in enumerate(row) if c > 0), self.num_blocks) for row in self.counts]
            j_first = min(first) if first else self.num_blocks
            todo = self.num_blocks - j_first
            parts = max(1, round(todo / self.super_blocks)) if todo else 0
            calls, j0 = [], j_first
            for i in range(parts):
                j1 = j0 + todo // parts + (1 if i < todo % parts else 0)
                calls.append((j0, j1, max(self.counts[b][j1 - 1] for b in range(self.batch))))
                j0 = j1
            self._bias_cache["calls"] = calls
        return self._bias_cache["calls"]

    def staircase_keep(self, j0: int, j1: int, n: int) -> torch.Tensor:
        """``[B, 1, (j1-j0)*Bq, n]`` bool: compact key ``c`` is visible to block ``j`` iff ``c < counts[b][j]``
        (and, with documents, ``c >= comp_lo[b, q]``)."""
        counts = self.counts_t[:, j0:j1].repeat_interleave(self.block, dim=1)          # [B, Q]
        c = torch.arange(n, device=counts.device)[None, None, :]
        keep = c < counts[:, :, None]
        if self.comp_lo is not None:
            keep = keep & (c >= self.comp_lo[:, j0 * self.block: j1 * self.block, None])
        return keep.unsqueeze(1)

    def staircase_additive(self, j0: int, j1: int, n: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``0 / -inf`` staircase in ``dtype`` (None when every query sees all ``n`` keys); cached."""
        key = (j0, j1, n, dtype)
        if key not in self._bias_cache:
            keep = self.staircase_keep(j0, j1, n)
            self._bias_cache[key] = None if bool(keep.all()) else torch.zeros(
                keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        return self._bias_cache[key]

    def compact_empty_rows(self, j0: int, j1: int) -> Optional[torch.Tensor]:
        """``[B, 1, (j1-j0)*Bq]`` bool: rows of blocks ``[j0, j1)`` with no compact key (their compact log-sum-exp
        must be -inf); None when there are none. Cached."""
        key = ("empty", j0, j1)
        if key not in self._bias_cache:
            counts = self.counts_t[:, j0:j1].repeat_interleave(self.block, dim=1)
            if self.comp_lo is None:
                empty = (counts == 0).unsqueeze(1)
            else:
                empty = (counts <= self.comp_lo[:, j0 * self.block: j1 * self.block]).unsqueeze(1)
            self._bias_cache[key] = empty if bool(empty.any()) else None
        return self._bias_cache[key]


def build_compact_layout(global_keys: torch.Tensor, key_valid: Optional[torch.Tensor], window: int,
                         position_ids: torch.Tensor, block: Optional[int] = None,
                         super_block: int = DEFAULT_SUPER_BLOCK,
                         doc_start: Optional[torch.Tensor] = None) -> CompactLayout:
    """Evaluate the rule on every block's band and index the global keys outside it (O(B*S*(w+Bq)) memory);
    ``doc_start [B, S]``: documents (see the module docstring)."""
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
    band_start = None
    if doc_start is not None:   # each query's document start in its block's band coordinates (key j*Bq - P + r)
        shift = (torch.arange(nb, device=dev) * bq - pad_left).repeat_interleave(bq)
        band_start = (F.pad(doc_start.to(dev), (0, sp - seq_len)) - shift).reshape(batch * nb, bq)
    band_keep = rules.allowed_between(g_band, q_rel, k_rel, window, key_valid=v_band,
                                      key_start=band_start).unsqueeze(1)

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
    comp_lo = None
    if doc_start is not None:   # global keys before each query's document start (padded queries: none)
        comp_lo = F.pad(torch.gather(cum, 1, doc_start.to(dev).long()), (0, sp - seq_len))
    return CompactLayout(batch=batch, seq_len=seq_len, block=bq, pad_left=pad_left, num_blocks=nb,
                         band_keep=band_keep, comp_idx=comp_idx, counts=counts_t.tolist(),
                         band_q_pos=band_q_pos, band_k_pos=band_k_pos, comp_pos=comp_pos, counts_t=counts_t,
                         super_blocks=max(1, super_block // bq), comp_lo=comp_lo)


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


def _gather_keys(x: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B, H, N, D]`` global keys in position order."""
    idx = lay.comp_idx[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])
    return torch.gather(x, 2, idx)


def _alibi(slopes: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """``-slope_h * (pos_q - pos_k)``: ``[R, H, Q, K]`` from ``q_pos [R, Q]``, ``k_pos [R, K]``."""
    diff = q_pos[:, None, :, None] - k_pos[:, None, None, :]
    return -slopes.to(torch.float32).view(1, -1, 1, 1) * diff


def _band_mask(lay: CompactLayout, dtype: torch.dtype, slopes: Optional[torch.Tensor]) -> torch.Tensor:
    if slopes is None:
        return lay.band_additive_mask(dtype)
    bias = _alibi(slopes, lay.band_q_pos, lay.band_k_pos)
    return bias.masked_fill(~lay.band_keep, float("-inf")).to(dtype)


# ----------------------------------------------------------------------------------------------- CPU flash engine
class _CompactFlashCPU(torch.autograd.Function):
    """Band + compact parts through the CPU flash kernel, merged by log-sum-exp; exact forward and backward.

    Everything lives in a sequence-major ``[rows, H, D]`` buffer, so the kernel reads query blocks, overlapping key
    bands and compact prefixes as strided views (no per-block copies). The band runs as one batched call over all
    query blocks. The compact part runs per *super block* (several query blocks, ~``DEFAULT_SUPER_BLOCK`` queries)
    against the prefix of the gathered global keys that its last block may see, with a staircase mask for the
    earlier blocks: long query runs keep the kernel's tiles large.
    """

    @staticmethod
    def forward(ctx, q, k, v, lay: CompactLayout, scale: float, slopes: Optional[torch.Tensor]):
        threads = torch.get_num_threads()
        with _num_threads(1):
            out = _CompactFlashCPU._forward(ctx, q, k, v, lay, scale, slopes, threads)
        ctx.threads = threads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        with _num_threads(1):
            return _CompactFlashCPU._backward(ctx, grad_out, ctx.threads)

    @staticmethod
    def _forward(ctx, q, k, v, lay: CompactLayout, scale: float, slopes: Optional[torch.Tensor], threads: int):
        qs, ks, vs = _seq_major(q, lay, 0), _seq_major(k, lay, lay.pad_left), _seq_major(v, lay, lay.pad_left)
        out_b, lse_b = _kernel(_FLASH_FWD, threads, _block_view(qs, lay), _band_view(ks, lay), _band_view(vs, lay),
                               0.0, False, attn_mask=_band_mask(lay, q.dtype, slopes), scale=scale)
        out = _unblock_out(out_b, lay)                                          # [B, Sp, H, D]
        lse = _unblock_lse(lse_b, lay)                                          # [B, H, Sp]
        calls = lay.super_calls()
        kc = vc = torch.empty(0)
        if calls:
            kc, vc = _gather_rows(ks, lay), _gather_rows(vs, lay)              # [B, N, H, D]
            _compact_forward(qs, kc, vc, out, lse, lay, calls, scale, slopes, threads)
        ctx.save_for_backward(qs, ks, vs, kc, vc, out, lse, slopes if slopes is not None else torch.empty(0))
        ctx.lay, ctx.scale, ctx.has_slopes = lay, scale, slopes is not None
        return out[:, : lay.seq_len].transpose(1, 2)

    @staticmethod
    def _backward(ctx, grad_out, threads: int):
        qs, ks, vs, kc, vc, out, lse, slopes = ctx.saved_tensors
        lay, scale = ctx.lay, ctx.scale
        slopes = slopes if ctx.has_slopes else None
        b, _, h, d = out.shape
        gos = _seq_major(grad_out.to(qs.dtype), lay, 0)
        outs = out.reshape(b * lay.padded_len, h, d)
        lse_b = lse.view(b, h, lay.num_blocks, lay.block).transpose(1, 2).reshape(b * lay.num_blocks, h, lay.block)
        gq_b, gk_b, gv_b = _kernel(_FLASH_BWD, threads, _block_view(gos, lay), _block_view(qs, lay),
                                   _band_view(ks, lay), _band_view(vs, lay), _block_view(outs, lay), lse_b, 0.0, False,
                                   attn_mask=_band_mask(lay, qs.dtype, slopes), scale=scale)
        gq = _unblock_out(gq_b, lay)                                            # [B, Sp, H, D]
        gks, gvs = _fold_band_grads(gk_b, lay), _fold_band_grads(gv_b, lay)    # [B, Sp, H, D]
        calls = lay.super_calls()
        if calls:
            gkc, gvc = _compact_backward(gos, qs, kc, vc, out, lse, gq, lay, calls, scale, slopes, threads)
            idx = lay.comp_idx[:, :, None, None].expand(-1, -1, h, d)
            gks.scatter_add_(1, idx, gkc)
            gvs.scatter_add_(1, idx, gvc)
        s = lay.seq_len
        return (gq[:, :s].transpose(1, 2), gks[:, :s].transpose(1, 2), gvs[:, :s].transpose(1, 2), None, None, None)


def _compact_forward(qs: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                     lay: CompactLayout, calls: list, scale: float, slopes: Optional[torch.Tensor],
                     threads: int) -> None:
    """Compact part of every call, merged into the band's ``out`` / ``lse`` rows in place right after its kernel
    call (no suffix-sized buffer: small allocations are reused, large ones cost page faults every step)."""
    qv = qs.view(lay.batch, lay.padded_len, *qs.shape[1:])
    for j0, j1, n in calls:
        sl = slice(j0 * lay.block, j1 * lay.block)
        o, l_ = _kernel(_FLASH_FWD, threads, qv[:, sl].transpose(1, 2), kc[:, :n].transpose(1, 2),
                        vc[:, :n].transpose(1, 2), 0.0, False,
                        attn_mask=_super_mask(lay, j0, j1, n, qs.dtype, slopes), scale=scale)
        empty = lay.compact_empty_rows(j0, j1)
        if empty is not None:                                    # the kernel reports 0 for rows with no key
            l_.masked_fill_(empty, float("-inf"))
        _merge_rows(out[:, sl], lse[:, :, sl], o.transpose(1, 2), l_)


def _merge_rows(o_s: torch.Tensor, l_s: torch.Tensor, out_c: torch.Tensor, lse_c: torch.Tensor) -> None:
    """Merge a compact part into band rows in place (one joint softmax over both key sets).

    ``out = (e^lse out + e^lse_c out_c) / (e^lse + e^lse_c) = lerp(out, out_c, sigmoid(lse_c - lse))``; the band
    always holds the diagonal, so ``lse`` is finite.
    """
    w_c = torch.sigmoid(lse_c - l_s).transpose(1, 2).unsqueeze(-1)            # [B, Q, H, 1]
    if o_s.dtype in (torch.float32, torch.float64):
        o_s.lerp_(out_c, w_c.to(o_s.dtype))
    else:
        o_s.copy_(torch.lerp(o_s.float(), out_c.float(), w_c))
    torch.logaddexp(l_s, lse_c, out=l_s)


def _compact_backward(gos, qs, kc, vc, out, lse, gq, lay: CompactLayout, calls: list, scale: float,
                      slopes: Optional[torch.Tensor], threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the compact part: ``dq`` added into ``gq`` call by call, and ``dk, dv`` of the gathered keys
    ``[B, N, H, D]``. The last call sees all ``N`` keys, so it runs first and its key gradients become the
    accumulators (no zero buffers)."""
    b, _, h, d = out.shape
    qv, gov = qs.view(b, lay.padded_len, h, d), gos.view(b, lay.padded_len, h, d)
    gkc = gvc = None
    for j0, j1, n in reversed(calls):
        sl = slice(j0 * lay.block, j1 * lay.block)
        dq, dk, dv = _kernel(_FLASH_BWD, threads, gov[:, sl].transpose(1, 2), qv[:, sl].transpose(1, 2),
                             kc[:, :n].transpose(1, 2), vc[:, :n].transpose(1, 2), out[:, sl].transpose(1, 2),
                             lse[:, :, sl], 0.0, False, attn_mask=_super_mask(lay, j0, j1, n, qs.dtype, slopes),
                             scale=scale)
        gq[:, sl] += dq.transpose(1, 2)
        if gkc is None:
            gkc, gvc = dk.transpose(1, 2), dv.transpose(1, 2)
        else:
            gkc[:, :n] += dk.transpose(1, 2)
            gvc[:, :n] += dv.transpose(1, 2)
    return gkc, gvc


def _seq_major(x: torch.Tensor, lay: CompactLayout, lead: int) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[lead + B*Sp, H, D]``: rows of each batch padded to ``Sp``, ``lead`` zero rows first."""
    b, h, s, d = x.shape
    if b == 1:  # one op: pad the single row in front (lead) and behind (to Sp)
        return F.pad(x.transpose(1, 2), (0, 0, 0, 0, lead, lay.padded_len - s)).view(lead + lay.padded_len, h, d)
    out = x.new_empty(lead + b * lay.padded_len, h, d)
    out[:lead].zero_()
    rows = out[lead:].view(b, lay.padded_len, h, d)
    rows[:, :s] = x.transpose(1, 2)
    rows[:, s:].zero_()
    return out


def _block_view(xs: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B*Sp, H, D]`` -> ``[B*nb, H, Bq, D]`` view (query blocks)."""
    h, d = xs.shape[1], xs.shape[2]
    return xs.view(lay.batch * lay.num_blocks, lay.block, h, d).transpose(1, 2)


def _band_view(xs: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[P + B*Sp, H, D]`` -> ``[B*nb, H, P+Bq, D]`` overlapping strided view: block ``t`` reads rows
    ``[t*Bq, t*Bq + P + Bq)``, i.e. positions ``j*Bq - P ..`` of its row (rows before a row's start belong to the
    previous row or the zero lead and are masked out by ``band_keep``)."""
    h, d = xs.shape[1], xs.shape[2]
    view = xs.as_strided((lay.batch * lay.num_blocks, lay.band_len, h, d), (lay.block * h * d, h * d, d, 1))
    return view.transpose(1, 2)


def _unblock_out(ob: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B*nb, H, Bq, D]`` -> ``[B, Sp, H, D]``."""
    h, d = ob.shape[1], ob.shape[3]
    return ob.transpose(1, 2).reshape(lay.batch, lay.padded_len, h, d)


def _unblock_lse(lb: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """``[B*nb, H, Bq]`` -> ``[B, H, Sp]``."""
    h = lb.shape[1]
    return lb.view(lay.batch, lay.num_blocks, h, lay.block).transpose(1, 2).reshape(lay.batch, h, lay.padded_len)


def _fold_band_grads(gb: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """Adjoint of ``_band_view``: ``[B*nb, H, P+Bq, D]`` -> ``[B, Sp, H, D]`` (overlaps summed, lead dropped)."""
    h, d = gb.shape[1], gb.shape[3]
    t, r, bq = lay.batch * lay.num_blocks, lay.chunks_per_band, lay.block
    chunks = gb.transpose(1, 2).reshape(t, r, bq, h, d)
    acc = gb.new_empty((t + r - 1) * bq, h, d)
    acc[: t * bq].view(t, bq, h, d).copy_(chunks[:, 0])
    acc[t * bq:].zero_()
    for i in range(1, r):
        acc[i * bq: i * bq + t * bq].view(t, bq, h, d).add_(chunks[:, i])
    return acc[lay.pad_left:].view(lay.batch, lay.padded_len, h, d)


def _gather_rows(xs: torch.Tensor, lay: CompactLayout) -> torch.Tensor:
    """Global keys of each row in position order: ``[P + B*Sp, H, D]`` -> ``[B, N, H, D]``."""
    h, d = xs.shape[1], xs.shape[2]
    rows = xs[lay.pad_left:].view(lay.batch, lay.padded_len, h, d)
    return torch.gather(rows, 1, lay.comp_idx[:, :, None, None].expand(-1, -1, h, d))


def _super_mask(lay: CompactLayout, j0: int, j1: int, n: int, dtype: torch.dtype,
                slopes: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if slopes is None:
        return lay.staircase_additive(j0, j1, n, dtype)
    q_pos = lay.band_q_pos.view(lay.batch, -1)[:, j0 * lay.block: j1 * lay.block]
    bias = _alibi(slopes, q_pos, lay.comp_pos[:, :n])
    return bias.masked_fill(~lay.staircase_keep(j0, j1, n), float("-inf")).to(dtype)


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
        comp_keep = comp_keep.expand(b, 1, bq, n)
        if lay.comp_lo is not None:
            comp_keep = comp_keep & (torch.arange(n, device=q.device)[None, None, None, :]
                                     >= lay.comp_lo[:, j * bq:(j + 1) * bq, None].unsqueeze(1))
        keep = torch.cat([comp_keep, band_keep[:, j]], dim=-1)
        if slopes is None:
            mask = keep
        else:
            q_pos = lay.band_q_pos.view(b, nb, bq)[:, j]
            k_pos = torch.cat([lay.comp_pos[:, :n], lay.band_k_pos.view(b, nb, -1)[:, j]], dim=1)
            mask = _alibi(slopes, q_pos, k_pos).masked_fill(~keep, float("-inf")).to(q.dtype)
        outs.append(F.scaled_dot_product_attention(qv[:, j], keys, vals, attn_mask=mask, scale=scale))
    out = torch.stack(outs, dim=1).reshape(b * nb, h, bq, d)
    return _q_unblocks(out, lay)


@torch.compiler.disable(reason="the compact engine drives its own kernels and threads (compile: true keeps it eager)")
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
