"""The attention interface between the GPT model and the attention implementations.

The model computes Q/K/V (rotary already applied) and hands them to an :class:`AttentionBackend`. The backend decides
*which* keys each query sees (plain causal here; SepLLM's initial + separator + window rule in
``megatron.sepllm.attention.backend``) and *how* the product is computed. ``prepare`` runs once per micro-batch, so everything
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
from megatron.data.documents import document_starts
from megatron.sepllm.attention.rules import padded_allowed_mask


@runtime_checkable
class AttentionBackend(Protocol):
    """What ``GPTModel`` needs from an attention implementation (see module docstring)."""

    def prepare(self, input_ids: Tensor, position_ids: Tensor, attention_mask_2d: Optional[Tensor],
                document_ids: Optional[Tensor] = None) -> Any:
        """Called ONCE per micro-batch by ``GPTModel.forward`` before the layers.

        ``input_ids`` ``[B,S]`` int64; ``position_ids`` ``[B,S]`` the positions used by rotary/ALiBi (BiPE: the
        inter-segment ids); ``attention_mask_2d`` ``[B,S]`` with 1 = real token, 0 = padding (None = no padding);
        ``document_ids`` ``[B,S]`` (``reset_attention_mask``): a query attends only keys of its own document.
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

    ``allowed`` is None when plain ``is_causal`` suffices (no padding or right padding only), else a ``[B,1,S,S]`` bool mask
    (True = attend). Padding queries are allowed to see themselves so that no softmax row is empty (their outputs
    are meaningless and must be ignored by the loss, as in Hugging Face). ``alibi_distance`` (ALiBi models only) is
    ``pos_q - pos_k`` as ``[B or 1, 1, S, S]`` fp32 with ``+inf`` where attention is not allowed, so each layer's
    additive mask is one multiply: ``-slope_h * distance``. It has batch size 1 when all rows share positions.
    """

    positions: Tensor
    allowed: Optional[Tensor]
    alibi_distance: Optional[Tensor] = None


class CausalSDPABackend:
    """Plain causal attention via ``scaled_dot_product_attention`` on 4-D inputs (the CPU fast path).

    Supports left/right padding through ``attention_mask_2d``, documents (``document_ids``: the dense
    document-causal mask of ``rules.padded_allowed_mask``), ALiBi, grouped-query attention and dropout.
    ``alibi=True`` (set by the factory for ``pos_emb: alibi``) precomputes the distance matrix once per micro-batch
    instead of once per layer.
    """

    def __init__(self, alibi: bool = False) -> None:
        self.alibi = alibi

    def prepare(self, input_ids: Tensor, position_ids: Tensor, attention_mask_2d: Optional[Tensor],
                document_ids: Optional[Tensor] = None) -> CausalState:
        seq = input_ids.shape[1]
        allowed = None
        if document_ids is not None:   # the document-causal mask of the rule (rules.py), padding included
            valid = None if attention_mask_2d is None else attention_mask_2d.to(torch.bool)
            doc_start = document_starts(document_ids.to(input_ids.device))
            zeros = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
            allowed = padded_allowed_mask(zeros, seq, valid, doc_start).unsqueeze(1)
        elif attention_mask_2d is not None and not only_trailing_padding(attention_mask_2d):
            causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
            diag = torch.eye(seq, dtype=torch.bool, device=input_ids.device)
            allowed = causal & (attention_mask_2d.to(torch.bool)[:, None, None, :] | diag)
        state = CausalState(positions=position_ids, allowed=allowed)
        if self.alibi:
            state.alibi_distance = _alibi_distance(position_ids, allowed)
        return state

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, layer_idx: int, state: CausalState, *, scale: float,
                 dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None) -> Tensor:
        gqa = k.shape[1] != q.shape[1]
        if alibi_slopes is None and state.allowed is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale,
                                                  enable_gqa=gqa)
        if alibi_slopes is None:
            mask: Tensor = state.allowed
        else:
            distance = state.alibi_distance
            if distance is None:
                distance = _alibi_distance(state.positions, state.allowed)
            mask = (-alibi_slopes.to(torch.float32).view(1, -1, 1, 1) * distance).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale,
                                              enable_gqa=gqa)


def only_trailing_padding(attention_mask_2d: Tensor) -> bool:
    """True when every row is ``1..1 0..0`` (no padding, or right padding only). Causal attention then never lets a
    real token see a padding key, so the fast ``is_causal`` path gives the same outputs for every real token."""
    valid = attention_mask_2d.to(torch.bool)
    return not bool((valid[:, 1:] & ~valid[:, :-1]).any())


def _alibi_distance(positions: Tensor, allowed: Optional[Tensor]) -> Tensor:
    """``pos_q - pos_k`` (fp32, ``[B|1, 1, S, S]``) with ``+inf`` at disallowed (non-causal or padding) entries."""
    seq = positions.shape[1]
    if allowed is None and bool((positions == positions[:1]).all()):
        positions = positions[:1]  # shared positions: one matrix for the whole batch
    pos = positions.to(torch.float32)
    distance = (pos.unsqueeze(-1) - pos.unsqueeze(-2)).unsqueeze(1)
    if allowed is None:
        allowed = torch.ones(seq, seq, dtype=torch.bool, device=positions.device).tril()
    return distance.masked_fill(~allowed, float("inf"))


def build_attention_backend(model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig]) -> AttentionBackend:
    """Plain causal attention for ``mode == "full"`` (or no SepLLM config), else the SepLLM backend (lazy import).

    ``sliding_window_width`` also goes to the SepLLM backend: its keep rule with no initial tokens and no separators
    is exactly the sliding window, on every execution path (dense, flex, compact, flex_compact, triton).
    """
    sliding = model_cfg.sliding_window_width is not None
    if not sliding and (sepllm_cfg is None or sepllm_cfg.mode == "full"):
        return CausalSDPABackend(alibi=model_cfg.pos_emb == "alibi")
    from megatron.sepllm.attention.backend import SepLLMBackend  # lazy: keeps plain models free of SepLLM imports

    return SepLLMBackend(sepllm_cfg if sepllm_cfg is not None else SepLLMConfig(), model_cfg)


def default_softmax_scale(head_dim: int) -> float:
    """``1/sqrt(d_head)``: GPT-NeoX's scale without query-key layer scaling."""
    return 1.0 / math.sqrt(head_dim)
