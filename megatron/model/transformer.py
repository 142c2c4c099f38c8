"""One transformer layer: pre-norm attention + MLP with sequential or parallel (GPT-J) residual.

* sequential: ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``
* parallel (``gpt_j_residual``, Pythia): ``out = x + attn(ln1(x)) + mlp(ln2(x))``
* parallel tied (``gpt_j_tied``): ``out = x + attn(ln1(x)) + mlp(ln1(x))`` -- one norm, no ``post_attention_layernorm``.

Hidden dropout is applied to each branch output before the residual add (as HF GPT-NeoX). With a fused norm
(``layernorm_fusion`` / ``rmsnorm_fusion``) the sequential block computes ``h`` and ``ln2(h)`` in one kernel.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from megatron.config.model import ModelConfig
from megatron.model.attention import SelfAttention
from megatron.model.attention_backend import AttentionBackend
from megatron.model.mlp import MLP
from megatron.model.norms import build_norm


class TransformerLayer(nn.Module):
    """Pre-norm block; ``layer_idx`` (0-based) is what the backend uses to pick per-layer SepLLM windows."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        if cfg.gpt_j_tied and not cfg.gpt_j_residual:
            raise ValueError("model config key 'gpt_j_tied' = True needs 'gpt_j_residual' = True (the tied norm is "
                             "shared by the two parallel branches)")
        self.layer_idx = layer_idx
        self.parallel = cfg.gpt_j_residual
        self.tied = cfg.gpt_j_tied
        self.input_layernorm = build_norm(cfg)
        self.post_attention_layernorm = None if self.tied else build_norm(cfg)
        self.attention = SelfAttention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.attn_dropout = nn.Dropout(cfg.hidden_dropout)
        self.mlp_dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor, rotary: Optional[tuple[Tensor, Tensor]], backend: AttentionBackend,
                state: Any, kv_cache: Any = None) -> Tensor:
        h1 = self.input_layernorm(x)
        attn = self.attn_dropout(self.attention(h1, rotary, backend, state, kv_cache))
        if self.parallel:
            h2 = h1 if self.post_attention_layernorm is None else self.post_attention_layernorm(x)
            return x + attn + self.mlp_dropout(self.mlp(h2))
        if getattr(self.post_attention_layernorm, "fuses_residual", False):
            normed, h = self.post_attention_layernorm(attn, residual=x)
            return h + self.mlp_dropout(self.mlp(normed))
        h = x + attn
        return h + self.mlp_dropout(self.mlp(self.post_attention_layernorm(h)))
