"""The attention interface between the GPT model and the attention implementations.

The model computes Q/K/V (rotary already applied) and hands them to an :class:`AttentionBackend`. The backend decides
*which* keys each query sees (plain causal here; SepLLM's initial + separator + window rule in
``megatron.sepllm.backend``) and *how* the product is computed. ``prepare`` runs once per micro-batch, so everything
that depends only on token ids / positions / padding (masks, ALiBi distances, separator bitmaps) is built once and
shared by all layers instead of being rebuilt per layer or kept in a global singleton.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig


@runtime_checkable
class AttentionBackend(Protocol):
    """What ``GPTModel`` needs from an attention implementation (see module docstring)."""

    def prepare(self, input_ids: Tensor, position_ids: Tensor, attention_mask_2d: Optional[Tensor]) -> Any:
        """Called ONCE per micro-batch by ``GPTModel.forward`` before the layers.

        ``input_ids`` ``[B,S]`` int64; ``position_ids`` ``[B,S]`` the positions used by rotary/ALiBi (BiPE: the
        inter-segment ids); ``attention_mask_2d`` ``[B,S]`` with 1 = real token, 0 = padding (None = no padding).
        Returns an opaque per-micro-batch state passed to every layer call.
        """
        ...

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer_idx: int, state: Any, *, scale: float,
                 dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tensor:
        """``q`` ``[B,Hq,S,D]``, ``k``/``v`` ``[B,Hkv,S,D]`` (``Hq % Hkv == 0``) -> ``[B,Hq,S,D]``.

        ``alibi_slopes`` ``[Hq]``: add ``-slope_h * (pos_q - pos_k)`` using the positions given to ``prepare``.
        """
        ...


def alibi_bias(slopes: Tensor, positions: Tensor) -> Tensor:
    """ALiBi bias ``[B, H, S, S]`` = ``-slope_h * (pos_q - pos_k)`` (fp32; only the causal part is ever used).

    Kept as a public function so that every backend (and the tests' explicit reference) uses one formula.
    """
    pos = positions.to(torch.float32)
    dist = pos.unsqueeze(-1) - pos.unsqueeze(-2)  # [B, S_q, S_k]
    return -slopes.to(torch.float32).view(1, -1, 1, 1) * dist.unsqueeze(1)


@dataclass
class CausalState:
    """Per-micro-batch state of :class:`CausalSDPABackend`.

    ``allowed`` is None when plain ``is_causal`` suffices (no padding), else a ``[B,1,S,S]`` bool mask
    (True = attend). Padding queries are allowed to see themselves so that no softmax row is empty (their outputs
    are meaningless and must be ignored by the loss, as in Hugging Face).
    """

    positions: Tensor
    allowed: Optional[Tensor]


class CausalSDPABackend:
    """Plain causal attention via ``scaled_dot_product_attention`` on 4-D inputs (the CPU fast path).

    Supports left/right padding through ``attention_mask_2d``, ALiBi, grouped-query attention and dropout.
    """

    def prepare(self, input_ids: Tensor, position_ids: Tensor, attention_mask_2d: Optional[Tensor]) -> CausalState:
        if attention_mask_2d is None:
            return CausalState(positions=position_ids, allowed=None)
        seq = input_ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
        diag = torch.eye(seq, dtype=torch.bool, device=input_ids.device)
        key_valid = attention_mask_2d.to(torch.bool)[:, None, None, :]
        allowed = causal & (key_valid | diag)
        return CausalState(positions=position_ids, allowed=allowed)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer_idx: int, state: CausalState, *, scale: float,
                 dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tensor:
        gqa = k.shape[1] != q.shape[1]
        if alibi_slopes is None and state.allowed is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                                  enable_gqa=gqa)
        seq = q.shape[2]
        allowed = state.allowed
        if allowed is None:
            allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
        if alibi_slopes is None:
            mask: Tensor = allowed
        else:
            bias = alibi_bias(alibi_slopes, state.positions).to(q.dtype)
            mask = bias.masked_fill(~allowed, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)


def build_attention_backend(model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig]) -> AttentionBackend:
    """Plain causal attention for ``mode == "full"`` (or no SepLLM config), else the SepLLM backend (lazy import)."""
    if sepllm_cfg is None or sepllm_cfg.mode == "full":
        return CausalSDPABackend()
    from megatron.sepllm.backend import SepLLMBackend  # lazy: keeps plain models free of SepLLM imports

    return SepLLMBackend(sepllm_cfg, model_cfg)


def default_softmax_scale(head_dim: int) -> float:
    """``1/sqrt(d_head)``: GPT-NeoX's scale without query-key layer scaling."""
    return 1.0 / math.sqrt(head_dim)
