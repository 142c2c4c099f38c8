"""Self-attention block: fused QKV projection, rotary, the pluggable attention backend, output projection.

Fused QKV layout (one layout for MHA and GQA, chosen so that MHA is exactly Hugging Face GPT-NeoX's):
the output features of ``query_key_value`` are ``num_kv_heads`` groups, each group holding the ``r = Hq / Hkv`` query
heads of that group followed by its key head and its value head, every head ``head_dim`` wide::

    [q_{g0,0} .. q_{g0,r-1}, k_{g0}, v_{g0}, q_{g1,0} .. , k_{g1}, v_{g1}, ...]

With ``r = 1`` (no GQA) this is HF GPT-NeoX's per-head interleaving ``[q_h, k_h, v_h]`` so export is a plain copy;
Llama export slices the groups into ``q_proj`` / ``k_proj`` / ``v_proj``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from megatron.config.model import ModelConfig
from megatron.model.attention_backend import AttentionBackend, default_softmax_scale
from megatron.kernels.plan import fusion_plan
from megatron.model.norms import QKNorm
from megatron.model.positional import alibi_slopes, apply_rotary_qk


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads (``num_kv_heads`` or all heads), validated against the query heads."""
    hkv = cfg.num_kv_heads if cfg.num_kv_heads is not None else cfg.num_attention_heads
    if hkv < 1 or cfg.num_attention_heads % hkv != 0:
        raise ValueError(f"model config key 'num_kv_heads' = {cfg.num_kv_heads}: expected a divisor of "
                         f"num_attention_heads = {cfg.num_attention_heads}")
    return hkv


def head_dim(cfg: ModelConfig) -> int:
    """Per-head width ``hidden_size / num_attention_heads`` (must divide exactly)."""
    if cfg.hidden_size % cfg.num_attention_heads != 0:
        raise ValueError(f"model config key 'hidden_size' = {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads = {cfg.num_attention_heads}")
    return cfg.hidden_size // cfg.num_attention_heads


class SelfAttention(nn.Module):
    """Causal self-attention of one layer; the backend (shared by all layers) decides the key pattern."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = kv_heads(cfg)
        self.head_dim = head_dim(cfg)
        self.group = self.num_heads // self.num_kv_heads
        self.scale = default_softmax_scale(self.head_dim)
        self.attention_dropout = cfg.attention_dropout
        self.use_alibi = cfg.pos_emb == "alibi"
        self.rope_fused = fusion_plan(cfg).rope  # rope_fusion with the kernels available
        # index of the first query head this module computes: 0 unless its heads were split off a larger set
        # (tensor parallelism shards query_key_value by whole KV groups; the local head count is read from the
        # projected tensor, so the only other thing that must know is the ALiBi slope table)
        self.head_offset = 0
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.use_bias_in_attn_linear)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias_in_attn_linear)
        # GPT-NeoX use_qk_layernorm: one norm shared by queries and keys, applied before the rotary embedding
        self.qk_layernorm = QKNorm(cfg, self.num_heads, self.head_dim) if cfg.use_qk_layernorm else None

    def split_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, S, h]`` -> q ``[B, Hq, S, D]``, k/v ``[B, Hkv, S, D]`` using the grouped layout above."""
        qkv = self.query_key_value(x)
        b, s = qkv.shape[:2]  # from the projection: a sequence-sharded x is gathered inside it
        hkv = qkv.shape[-1] // ((self.group + 2) * self.head_dim)  # num_kv_heads, or fewer on a column shard
        qkv = qkv.view(b, s, hkv, self.group + 2, self.head_dim)
        q = qkv[:, :, :, : self.group].reshape(b, s, hkv * self.group, self.head_dim)
        k = qkv[:, :, :, self.group]
        v = qkv[:, :, :, self.group + 1]
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], backend: AttentionBackend,
                state: Any, kv_cache: Any = None) -> Tensor:
        """``x`` ``[B, S, h]``; ``rotary`` the ``(cos, sin)`` of this micro-batch or None; ``backend``/``state`` the
        model's attention backend and what its ``prepare`` returned (the backend is passed, not stored, so that it is
        not registered once per layer). ``kv_cache`` (inference, ``megatron.inference.kv_cache``): this step's keys
        and values are stored there and the cache decides which stored keys the queries attend."""
        q, k, v = self.split_qkv(x)
        b, s = q.shape[0], q.shape[2]
        if self.qk_layernorm is not None:
            q, k = self.qk_layernorm(q), self.qk_layernorm(k)
        if rotary is not None:
            cos, sin = rotary
            q, k = apply_rotary_qk(q, k, cos, sin, self.rope_fused)
        slopes = None
        if self.use_alibi:
            slopes = alibi_slopes(self.num_heads)[self.head_offset: self.head_offset + q.shape[1]].to(x.device)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_idx, q.contiguous(), k.contiguous(), v.contiguous(), backend, state,
                                  scale=self.scale, alibi_slopes=slopes)
        else:
            out = backend(q.contiguous(), k.contiguous(), v.contiguous(), self.layer_idx, state, scale=self.scale,
                          dropout_p=self.attention_dropout if self.training else 0.0, alibi_slopes=slopes)
        return self.dense(out.transpose(1, 2).reshape(b, s, q.shape[1] * self.head_dim))
