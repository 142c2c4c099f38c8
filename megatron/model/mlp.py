"""Feed-forward block with GPT-NeoX's activations and widths (``megatron.config.derived.mlp_widths``).

Gated layout: ``dense_h_to_4h`` produces ``up`` features, the first half is the value, the second half the gate:
``out = dense_4h_to_h(value * act(gate))`` (GPT-NeoX's ``Gated_Activation``). Llama export splits it into
``up_proj`` / ``gate_proj``. Plain activations apply ``act`` to all ``up`` features.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.config import derived
from megatron.config.model import ModelConfig, resolve_model_config

GATED = derived.GATED_ACTIVATIONS
ACTIVATIONS = derived.ACTIVATIONS

# The function applied to the gate (gated activations) or to every feature (plain ones), as GPT-NeoX defines it.
_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "geglu": F.gelu,
    "reglu": F.relu,
    "swiglu": F.silu,
    "glu": torch.sigmoid,
    "bilinear": lambda x: x,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "mish": F.mish,
    "softsign": F.softsign,
}


def ffn_width(cfg: ModelConfig) -> int:
    """Width of the MLP after the (optional) gating (Hugging Face's ``intermediate_size``), for readers of a config
    that may not have been resolved yet (exporters, FLOP counts)."""
    return resolve_model_config(dataclasses.replace(cfg)).mlp_widths[1]


class MLP(nn.Module):
    """``h -> up -> (gate) -> down -> h``. ``gelu`` is exact erf GELU (HF ``"gelu"``), or the tanh approximation when
    ``bias_gelu_fusion`` is set, as GPT-NeoX's fused kernel computes it (HF ``"gelu_pytorch_tanh"``). Widths and GeLU
    form come resolved in the config (``resolve_model_config``; ``ModelContext`` resolves before any layer exists)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise ValueError(f"model config key 'activation' = {cfg.activation!r}: expected one of {ACTIVATIONS}")
        self.activation = cfg.activation
        self.gated = cfg.activation in GATED
        self.gelu_approximate = cfg.gelu_approximate
        self.onnx_safe = cfg.onnx_safe  # GPT-NeoX's erf GeLU with sqrt(2) rounded to 1.41421
        up, self.ffn = cfg.mlp_widths
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, up, bias=cfg.use_bias_in_mlp)
        self.dense_4h_to_h = nn.Linear(self.ffn, cfg.hidden_size, bias=cfg.use_bias_in_mlp)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dense_h_to_4h(x)
        if self.activation == "gelu" and self.onnx_safe:
            h = h * 0.5 * (torch.erf(h / 1.41421) + 1.0)
        elif self.activation == "gelu":
            h = F.gelu(h, approximate=self.gelu_approximate)
        elif self.gated:
            value, gate = h.chunk(2, dim=-1)
            h = value * _FUNCTIONS[self.activation](gate)
        else:
            h = _FUNCTIONS[self.activation](h)
        return self.dense_4h_to_h(h)
