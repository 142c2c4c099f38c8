"""Positional encodings: rotary (partial, rotate-half), ALiBi slopes, learned absolute.

Rotary follows Hugging Face GPT-NeoX exactly (so HF export needs no permutation): the first
``rotary_ndims = int(head_dim * rotary_pct)`` dims of every head are rotated, split into two halves
(``rotate_half``), with ``inv_freq = base^(-arange(0, rotary_ndims, 2)/rotary_ndims)``. cos/sin are computed from the
``[B, S]`` position ids of each micro-batch in fp32 (no cached buffer that a ``.to(bf16)`` could degrade), which is
what lets BiPE feed its inter-segment ids per row.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from megatron.kernels.rope import fused_rope


def rotary_ndims(head_dim: int, rotary_pct: float) -> int:
    """Number of rotated dims per head (GPT-NeoX / HF: ``int(head_dim * rotary_pct)``; must be even)."""
    n = int(head_dim * rotary_pct)
    if n % 2 != 0:
        raise ValueError(f"model config key 'rotary_pct' = {rotary_pct}: head_dim {head_dim} x rotary_pct gives "
                         f"{n} rotary dims, expected an even number")
    return n


def rotary_inv_freq(ndims: int, base: float, device: Optional[torch.device] = None) -> Tensor:
    """``[ndims/2]`` inverse frequencies in fp32 (same expression as HF so results are bit-identical)."""
    return 1.0 / (base ** (torch.arange(0, ndims, 2, dtype=torch.int64, device=device).to(torch.float32) / ndims))


def rotary_cos_sin(position_ids: Tensor, ndims: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, 1, S, ndims]`` for per-row positions ``[B, S]`` (broadcast over heads)."""
    inv_freq = rotary_inv_freq(ndims, base, device=position_ids.device)
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dim (GPT-NeoX / Llama convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of ``x`` ``[B, H, S, D]``; the rest pass through unchanged."""
    nd = cos.shape[-1]
    if nd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :nd], x[..., nd:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def apply_rotary_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, fused: bool) -> tuple[Tensor, Tensor]:
    """:func:`apply_rotary` on q and k ``[B, H, S, D]``, or with ``fused`` the one-pass ``megatron::rope`` op
    (``rope_fusion``; same formula, float32 math, see ``megatron.kernels.rope``)."""
    if fused:
        return fused_rope(q, k, cos, sin, layout="bhsd")
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi head slopes (Press et al.): geometric ``2^(-8/n)`` for a power-of-two ``n``; otherwise the slopes of
    the closest lower power of two followed by every other slope of the next power of two."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    if num_heads < 1:
        raise ValueError(f"ALiBi needs at least one head, got {num_heads}")
    if math.log2(num_heads).is_integer():
        slopes = power_of_two(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def default_position_ids(input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """``0..S-1`` per row, or with a 2-D padding mask the count of real tokens before each position (HF convention),
    so a left-padded row gets the same positions as the unpadded sequence. Padding positions get 0."""
    batch, seq = input_ids.shape
    if attention_mask is None:
        return torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, seq)
    mask = attention_mask.to(torch.long)
    return ((mask.cumsum(dim=-1) - 1) * mask).clamp(min=0)
