"""Feed-forward block: GELU/ReLU MLP (GPT-NeoX) or gated SwiGLU/GEGLU MLP (Llama).

Gated layout: ``dense_h_to_4h`` produces ``2 * ffn`` features, the first half is the value ("up"), the second half
the gate: ``out = dense_4h_to_h(value * act(gate))``. Llama export splits it into ``up_proj`` / ``gate_proj``.

Width (``intermediate_size``): when None, ``4 * hidden`` for gelu/relu; for swiglu/geglu Llama's rule
``256 * ceil((8/3 * hidden) / 256)`` (i.e. ``int(2 * 4h / 3)`` rounded up to a multiple of 256).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megatron.config import derived
from megatron.config.model import ModelConfig

GATED = derived.GATED_ACTIVATIONS
ACTIVATIONS = derived.ACTIVATIONS


def ffn_width(cfg: ModelConfig) -> int:
    """Hidden width of the MLP after the (optional) gating, from ``intermediate_size`` or the defaults above."""
    if cfg.intermediate_size is not None and cfg.intermediate_size < 1:
        raise ValueError(f"model config key 'intermediate_size' = {cfg.intermediate_size}: expected > 0")
    return derived.ffn_width(cfg.hidden_size, cfg.activation, cfg.intermediate_size)


class MLP(nn.Module):
    """``h -> ffn -> h`` with the activation of ``cfg.activation``: ``gelu`` is exact erf GELU (HF ``"gelu"``), or the
    tanh approximation when ``bias_gelu_fusion`` is set, as GPT-NeoX's fused kernel computes it (HF
    ``"gelu_pytorch_tanh"``); the rule is ``derived.gelu_approximation``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"model config key 'activation' = {cfg.activation!r}: expected one of {ACTIVATIONS}")
        self.activation = cfg.activation
        self.gelu_approximate = derived.gelu_approximation(cfg.activation, cfg.bias_gelu_fusion)
        self.ffn = ffn_width(cfg)
        out = 2 * self.ffn if cfg.activation in GATED else self.ffn
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, out, bias=cfg.use_bias_in_mlp)
        self.dense_4h_to_h = nn.Linear(self.ffn, cfg.hidden_size, bias=cfg.use_bias_in_mlp)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dense_h_to_4h(x)
        if self.activation == "gelu":
            h = F.gelu(h, approximate=self.gelu_approximate)
        elif self.activation == "relu":
            h = F.relu(h)
        else:
            value, gate = h.chunk(2, dim=-1)
            h = value * (F.silu(gate) if self.activation == "swiglu" else F.gelu(gate))
        return self.dense_4h_to_h(h)
