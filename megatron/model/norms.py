"""Normalisation layers: LayerNorm, RMSNorm and ScaleNorm (GPT-NeoX ``norm`` key).

RMSNorm follows the Llama / ``torch.nn.functional.rms_norm`` formula ``w * x / sqrt(mean(x^2) + eps)`` computed in
fp32, so that a Llama export is a weight copy. GPT-NeoX's own RMSNorm puts eps outside the root
(``x / (rms(x) + eps)``); with the default eps (1e-8) the two differ by far less than bf16 resolution.
RMSNorm and ScaleNorm carry no bias (as in GPT-NeoX); LayerNorm's bias follows ``use_bias_in_norms``.

With ``layernorm_fusion`` / ``rmsnorm_fusion`` and the kernels available (``megatron.kernels.plan``), the fused
variants below replace them: same parameters, state dict and init, and ``forward(x, residual)`` returns
``(norm(x + residual), x + residual)`` from one kernel (``fuses_residual``), which ``TransformerLayer`` uses.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from megatron.config import derived
from megatron.config.model import ModelConfig
from megatron.kernels.norms import fused_add_norm, fused_norm
from megatron.kernels.plan import fusion_plan


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned per-channel gain (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.float32)
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class FusedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed by the ``megatron::norm_fwd`` op, optionally with the residual add folded in."""

    fuses_residual = True

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if residual is None:
            return fused_norm(x, self.weight, self.bias, self.eps, rms=False)
        return fused_add_norm(x, residual, self.weight, self.bias, self.eps, rms=False)


class FusedRMSNorm(RMSNorm):
    """:class:`RMSNorm` computed by the ``megatron::norm_fwd`` op, optionally with the residual add folded in."""

    fuses_residual = True

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
        if residual is None:
            return fused_norm(x, self.weight, None, self.eps, rms=True)
        return fused_add_norm(x, residual, self.weight, None, self.eps, rms=True)


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019): ``g * x / max(||x||, eps)`` with a single learned scalar ``g``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(x.to(torch.float32), dim=-1, keepdim=True).clamp(min=self.eps)
        return (x.to(torch.float32) / norm).to(x.dtype) * self.g

    def reset_parameters(self) -> None:
        nn.init.ones_(self.g)


def build_norm(cfg: ModelConfig) -> nn.Module:
    """The norm selected by ``cfg.norm`` with its matching epsilon key (fused when the plan says so)."""
    plan = fusion_plan(cfg)
    if cfg.norm == "non_parametric_layernorm":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon, elementwise_affine=False)
    if cfg.norm == "layernorm":
        cls = FusedLayerNorm if plan.layernorm else nn.LayerNorm
        return cls(cfg.hidden_size, eps=cfg.layernorm_epsilon, bias=cfg.use_bias_in_norms)
    if cfg.norm == "rmsnorm":
        return (FusedRMSNorm if plan.rmsnorm else RMSNorm)(cfg.hidden_size, eps=cfg.rms_norm_epsilon)
    if cfg.norm == "scalenorm":
        return ScaleNorm(cfg.hidden_size, eps=cfg.scalenorm_epsilon)
    raise ValueError(f"model config key 'norm' = {cfg.norm!r}: expected one of {', '.join(map(repr, derived.NORMS))}")


class QKNorm(nn.Module):
    """GPT-NeoX's ``use_qk_layernorm``: ONE norm of the model's kind applied to the queries and to the keys, built for
    the shape ``[heads, head_dim]`` of one token. LayerNorm (with or without parameters) normalises over heads and
    head_dim together; RMSNorm and ScaleNorm normalise each head over head_dim (their gain has the full shape for
    RMSNorm, one scalar for ScaleNorm). Inputs are ``[B, heads, S, head_dim]``."""

    def __init__(self, cfg: ModelConfig, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.kind = cfg.norm
        shape = (num_heads, head_dim)
        if cfg.norm in ("layernorm", "non_parametric_layernorm"):
            affine = cfg.norm == "layernorm"
            self.norm: nn.Module = nn.LayerNorm(shape, eps=cfg.layernorm_epsilon, elementwise_affine=affine,
                                                bias=affine and cfg.use_bias_in_norms)
        elif cfg.norm == "rmsnorm":
            self.norm = RMSNorm(head_dim, eps=cfg.rms_norm_epsilon)
            self.norm.weight = nn.Parameter(torch.ones(shape))
        elif cfg.norm == "scalenorm":
            self.norm = ScaleNorm(head_dim, eps=cfg.scalenorm_epsilon)
        else:
            raise ValueError(f"model config key 'norm' = {cfg.norm!r}: no query/key norm for it")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)
