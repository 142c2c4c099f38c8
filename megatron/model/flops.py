"""Model FLOPs per token, for MFU.

``flops_per_token = k * N_matmul + k * 2 * num_layers * seq_length * hidden_size``  with ``k = 6`` (forward +
backward) or ``k = 2`` (forward only), where

* ``N_matmul`` = weights that take part in a matrix multiply per token: per layer the QKV projection
  (``h * (Hq + 2 Hkv) * d_head``), the attention output projection (``h^2``) and the MLP
  (``h * ffn * (3 if gated else 2)``), plus the output head ``h * vocab_size``. Embedding lookups, norms and
  biases are not matmuls and are left out (as in the PaLM / Megatron accounting).
* the attention term counts ``QK^T`` and ``PV``: ``2 * 2 * seq * h`` forward FLOPs per token per layer for full
  (non-causal-discounted) attention, the PaLM convention ``6 N + 12 L h S`` with backward.

The attention term is the dense one even for SepLLM, so MFU stays comparable across attention modes.
"""

from __future__ import annotations

from megatron.config.model import ModelConfig
from megatron.model.attention import head_dim, kv_heads
from megatron.model.mlp import GATED, ffn_width


def matmul_params(model_cfg: ModelConfig, vocab_size: int) -> int:
    """``N_matmul`` of the module docstring."""
    h, d = model_cfg.hidden_size, head_dim(model_cfg)
    qkv = h * (model_cfg.num_attention_heads + 2 * kv_heads(model_cfg)) * d
    mlp = h * ffn_width(model_cfg) * (3 if model_cfg.activation in GATED else 2)
    return model_cfg.num_layers * (qkv + h * h + mlp) + h * vocab_size


def flops_per_token(model_cfg: ModelConfig, seq_length: int, vocab_size: int, backward: bool = True) -> float:
    """FLOPs per trained (``backward=True``) or evaluated token; see the module docstring for the formula."""
    k = 6 if backward else 2
    attention = 2 * model_cfg.num_layers * seq_length * model_cfg.hidden_size
    return float(k * matmul_params(model_cfg, vocab_size) + k * attention)
