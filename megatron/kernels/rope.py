"""Fused rotary position embedding of q and k: a ``torch.library`` custom op with a PyTorch reference.

``fused_rope(q, k, cos, sin, layout=..., interleaved=...)`` rotates the first ``R = cos.shape[-1]`` dims of every
head of q and k (partial rotary: the other dims pass through) with per-element tables:
``y = x * cos + rot(x) * sin``. The tables come from the position ids (:func:`rotary_tables`), so any base, per-token
positions, KV-cache offsets and left padding are all just different tables. ``rot`` is rotate-half
(``[x1, x2] -> [-x2, x1]``: GPT-NeoX, Hugging Face GPT-NeoX and Llama) or, with ``interleaved=True``, pairwise
(``(x0, x1) -> (-x1, x0)``: GPT-J and Meta's original Llama code).

The op ``megatron::rope`` has a fake (meta) implementation and an autograd formula (the backward is the same op with
the transposed rotation), so ``torch.compile``, activation checkpointing, TP and PP see an ordinary op. On CUDA it
runs the compiled kernel when available (fp32/fp16/bf16); everywhere else, and for float64, it runs the reference,
which computes in float32 (float64 for float64 inputs) and rounds once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.kernels.build import extension

LAYOUTS: dict[str, tuple[int, int, int, int]] = {  # permutation to the logical [batch, seq, heads, dim] order
    "bshd": (0, 1, 2, 3),
    "sbhd": (1, 0, 2, 3),
    "bhsd": (0, 2, 1, 3),  # the model's own: q/k are [B, H, S, D] views of the fused QKV projection
}
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rotary_tables(position_ids: Tensor, ndims: int, base: float, interleaved: bool = False,
                  dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """cos/sin ``[B, S, ndims]`` for ``position_ids [B, S]`` (angles in float32, as Hugging Face computes them):
    halves ``[f, f]`` for rotate-half, pairs ``[f0, f0, f1, f1, ...]`` for the interleaved convention."""
    if ndims % 2:
        raise ValueError(f"rotary dims must be even, got {ndims}")
    inv_freq = 1.0 / (base ** (torch.arange(0, ndims, 2, dtype=torch.int64, device=position_ids.device)
                               .to(torch.float32) / ndims))
    freqs = position_ids[..., None].to(torch.float32) * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rot(x: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        pairs = x.unflatten(-1, (-1, 2))
        return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool, backward: bool) -> Tensor:
    """One tensor through the rotation (``backward``: its transpose ``g*cos - rot(g*sin)``); contiguous output in
    ``layout``. ``cos``/``sin`` are ``[B or 1, S, R]``."""
    perm = LAYOUTS[layout]
    xl = x.permute(perm)
    compute = torch.float64 if torch.float64 in (x.dtype, cos.dtype) else torch.float32
    r = cos.shape[-1]
    c = cos[:, :, None, :].to(compute)
    s = sin[:, :, None, :].to(compute)
    xr = xl[..., :r].to(compute)
    y = xr * c - _rot(xr * s, interleaved) if backward else xr * c + _rot(xr, interleaved) * s
    out = torch.cat((y.to(x.dtype), xl[..., r:]), dim=-1) if r < xl.shape[-1] else y.to(x.dtype)
    return out.permute(perm).contiguous()


@torch.library.custom_op("megatron::rope", mutates_args=())
def rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool,
            backward: bool) -> tuple[Tensor, Tensor]:
    """Reference implementation (CPU and any device without the kernel)."""
    return (rope_reference(q, cos, sin, layout, interleaved, backward),
            rope_reference(k, cos, sin, layout, interleaved, backward))


@rope_op.register_fake
def _rope_fake(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool,
               backward: bool) -> tuple[Tensor, Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape)


@rope_op.register_kernel("cuda")
def _rope_cuda(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, layout: str, interleaved: bool,
               backward: bool) -> tuple[Tensor, Tensor]:
    ext = extension()
    if ext is None or q.dtype not in KERNEL_DTYPES or cos.dtype not in KERNEL_DTYPES:
        return (rope_reference(q, cos, sin, layout, interleaved, backward),
                rope_reference(k, cos, sin, layout, interleaved, backward))
    perm = LAYOUTS[layout]
    out_q, out_k = q.new_empty(q.shape), k.new_empty(k.shape)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    ext.rope(q.permute(perm), k.permute(perm), cos, sin, out_q.permute(perm), out_k.permute(perm), interleaved,
             backward)
    return out_q, out_k


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    _, _, cos, sin, layout, interleaved, backward = inputs
    ctx.save_for_backward(cos, sin)
    ctx.layout, ctx.interleaved, ctx.backward = layout, interleaved, backward


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_q: Optional[Tensor],
              grad_k: Optional[Tensor]) -> tuple:
    cos, sin = ctx.saved_tensors
    gq, gk = rope_op(grad_q, grad_k, cos, sin, ctx.layout, ctx.interleaved, not ctx.backward)
    return gq, gk, None, None, None, None, None


rope_op.register_autograd(_backward, setup_context=_setup_context)


def _canonical_table(t: Tensor, name: str, layout: str, q: Tensor) -> Tensor:
    """``[S, R]``, ``[B|1, S, R]`` or a 4-D tensor broadcastable in ``layout`` with one head -> ``[B|1, S, R]``."""
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 4:
        t = t.permute(LAYOUTS[layout])
        if t.shape[2] != 1:
            raise ValueError(f"fused_rope: {name} {tuple(t.shape)} must have size 1 on the heads dim")
        t = t[:, :, 0]
    if t.dim() != 3:
        raise ValueError(f"fused_rope: {name} must be [S, R], [B, S, R] or 4-D in layout {layout!r}, got "
                         f"{t.dim()}-D")
    ql = q.permute(LAYOUTS[layout])
    if t.shape[1] != ql.shape[1] or t.shape[0] not in (1, ql.shape[0]):
        raise ValueError(f"fused_rope: {name} {tuple(t.shape)} does not match q {tuple(q.shape)} in layout "
                         f"{layout!r} (batch {ql.shape[0]}, seq {ql.shape[1]})")
    return t


def fused_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, layout: str = "bhsd",
               interleaved: bool = False) -> tuple[Tensor, Tensor]:
    """Rotate q and k (``layout`` one of ``bshd``, ``sbhd``, ``bhsd``; k may have fewer heads) in one pass.

    Returns new contiguous tensors in ``layout``. cos/sin carry no gradient (they come from position ids)."""
    if layout not in LAYOUTS:
        raise ValueError(f"fused_rope: layout {layout!r} is not one of {sorted(LAYOUTS)}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"fused_rope: q and k must be 4-D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("fused_rope: cos/sin must not require grad (the op gives no gradient for the tables)")
    cos_c = _canonical_table(cos, "cos", layout, q)
    sin_c = _canonical_table(sin, "sin", layout, q)
    if cos_c.shape != sin_c.shape:
        raise ValueError(f"fused_rope: cos {tuple(cos_c.shape)} and sin {tuple(sin_c.shape)} differ")
    ql, kl = q.permute(LAYOUTS[layout]), k.permute(LAYOUTS[layout])
    if ql.shape[:2] != kl.shape[:2]:
        raise ValueError(f"fused_rope: q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or sequence")
    r, d = cos_c.shape[-1], q.shape[-1]
    if r % 2 or r > d or k.shape[-1] != d:
        raise ValueError(f"fused_rope: rotated dims {r} must be even and <= head dim {d} (k head dim {k.shape[-1]})")
    return rope_op(q, k, cos_c, sin_c, layout, interleaved, False)
