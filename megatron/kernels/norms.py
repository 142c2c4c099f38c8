"""Fused LayerNorm / RMSNorm with an optional residual add: ``torch.library`` custom ops with PyTorch references.

``fused_norm(x, weight, bias, eps, rms)`` is a plain norm; ``fused_add_norm(x, residual, weight, bias, eps, rms)``
returns ``(norm(x + residual), x + residual)`` from one pass over memory (the sum is rounded to the input dtype,
as an unfused ``x + residual`` would be, and then normalised). LayerNorm: ``(h - mean) / sqrt(var + eps) * w + b``;
RMSNorm: ``h / sqrt(mean(h^2) + eps) * w`` (the Llama / ``torch.nn.functional.rms_norm`` formula).

The ops ``megatron::norm_fwd`` / ``megatron::norm_bwd`` have fake (meta) implementations and an autograd formula,
so ``torch.compile``, activation checkpointing, TP and PP see ordinary ops. On CUDA the forward and backward run the
compiled kernels when available (fp32/fp16/bf16 with weight in the input dtype); elsewhere the reference, which
computes in float32 (float64 for float64 inputs) and rounds once.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from megatron.kernels.build import extension

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _kernel_ok(*tensors: Optional[Tensor]) -> bool:
    present = [t for t in tensors if t is not None]
    return present[0].dtype in KERNEL_DTYPES and all(t.dtype == present[0].dtype for t in present)


def norm_forward_reference(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor],
                           eps: float, rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, h or empty, stats [2, N] = (mean, rstd))`` for ``x [N, D]``."""
    h = x + residual if residual is not None else x
    compute = _compute_dtype(x)
    hf = h.to(compute)
    mean = torch.zeros(hf.shape[0], dtype=compute, device=x.device) if rms else hf.mean(dim=-1)
    centred = hf if rms else hf - mean[:, None]
    rstd = torch.rsqrt(centred.pow(2).mean(dim=-1) + eps)
    y = centred * rstd[:, None] * weight.to(compute)
    if bias is not None:
        y = y + bias.to(compute)
    h_out = h if residual is not None else x.new_empty(0)
    return y.to(x.dtype), h_out, torch.stack((mean, rstd))


def norm_backward_reference(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, stats: Tensor,
                            rms: bool, has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias or empty)``; ``grad_h`` is the gradient reaching the returned sum."""
    compute = _compute_dtype(h)
    mean, rstd = stats[0].to(compute)[:, None], stats[1].to(compute)[:, None]
    xhat = (h.to(compute) - mean) * rstd
    g = grad_y.to(compute)
    gw = g * weight.to(compute)
    m1 = 0.0 if rms else gw.mean(dim=-1, keepdim=True)
    m2 = (gw * xhat).mean(dim=-1, keepdim=True)
    grad_x = rstd * (gw - m1 - xhat * m2)
    if grad_h is not None:
        grad_x = grad_x + grad_h.to(compute)
    grad_w = (g * xhat).sum(dim=0).to(weight.dtype)
    grad_b = g.sum(dim=0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return grad_x.to(h.dtype), grad_w, grad_b


@torch.library.custom_op("megatron::norm_fwd", mutates_args=())
def norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
             rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reference implementation (CPU and any device without the kernel)."""
    return norm_forward_reference(x, residual, weight, bias, eps, rms)


@norm_fwd.register_fake
def _norm_fwd_fake(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
                   rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, x.new_empty((2, x.shape[0]), dtype=_compute_dtype(x))


@norm_fwd.register_kernel("cuda")
def _norm_fwd_cuda(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], eps: float,
                   rms: bool) -> tuple[Tensor, Tensor, Tensor]:
    ext = extension()
    if ext is None or not _kernel_ok(x, residual, weight, bias):
        return norm_forward_reference(x, residual, weight, bias, eps, rms)
    return ext.norm_forward(x.contiguous(), None if residual is None else residual.contiguous(), weight.contiguous(),
                            None if bias is None else bias.contiguous(), eps, rms)


@torch.library.custom_op("megatron::norm_bwd", mutates_args=())
def norm_bwd(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, stats: Tensor, rms: bool,
             has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Reference implementation (CPU and any device without the kernel)."""
    return norm_backward_reference(grad_y, grad_h, h, weight, stats, rms, has_bias)


@norm_bwd.register_fake
def _norm_bwd_fake(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, stats: Tensor, rms: bool,
                   has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    return h.new_empty(h.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape if has_bias else 0)


@norm_bwd.register_kernel("cuda")
def _norm_bwd_cuda(grad_y: Tensor, grad_h: Optional[Tensor], h: Tensor, weight: Tensor, stats: Tensor, rms: bool,
                   has_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    ext = extension()
    if ext is None or not _kernel_ok(grad_y, grad_h, h, weight) or stats.dtype != torch.float32:
        return norm_backward_reference(grad_y, grad_h, h, weight, stats, rms, has_bias)
    return ext.norm_backward(grad_y.contiguous(), None if grad_h is None else grad_h.contiguous(), h.contiguous(),
                             weight.contiguous(), stats.contiguous(), rms, has_bias)


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: tuple) -> None:
    x, residual, weight, bias, _, rms = inputs
    _, h, stats = output
    ctx.has_residual, ctx.has_bias, ctx.rms = residual is not None, bias is not None, rms
    ctx.save_for_backward(h if residual is not None else x, weight, stats)
    ctx.mark_non_differentiable(stats)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad_y: Tensor, grad_h: Optional[Tensor],
              _grad_stats: Optional[Tensor]) -> tuple:
    h, weight, stats = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    gh = grad_h if ctx.has_residual and grad_h is not None else None
    grad_x, grad_w, grad_b = norm_bwd(grad_y, gh, h, weight, stats, ctx.rms, ctx.has_bias)
    return (grad_x, grad_x if ctx.has_residual else None, grad_w, grad_b if ctx.has_bias else None, None, None)


norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _check(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor]) -> None:
    d = x.shape[-1]
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"fused norm: weight {tuple(weight.shape)} / bias "
                         f"{None if bias is None else tuple(bias.shape)} must be [{d}] for x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"fused norm: residual {tuple(residual.shape)} {residual.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")


def fused_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float, rms: bool) -> Tensor:
    """LayerNorm (``rms=False``) or RMSNorm (no bias) over the last dim of ``x``."""
    _check(x, weight, bias, None)
    y, _, _ = norm_fwd(_rows(x), None, weight, bias, eps, rms)
    return y.view(x.shape)


def fused_add_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Optional[Tensor], eps: float,
                   rms: bool) -> tuple[Tensor, Tensor]:
    """``(norm(x + residual), x + residual)`` in one pass."""
    _check(x, weight, bias, residual)
    y, h, _ = norm_fwd(_rows(x), _rows(residual), weight, bias, eps, rms)
    return y.view(x.shape), h.view(x.shape)
