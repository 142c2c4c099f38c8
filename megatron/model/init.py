"""GPT-NeoX weight initialisation methods (``init_method`` / ``output_layer_init_method``).

Formulas (``sigma = init_method_std``, ``L = num_layers``, ``d = hidden_size``):

* ``normal``: N(0, sigma)
* ``scaled_normal``: N(0, sigma / sqrt(2 L))
* ``single_residual_scaled_normal``: N(0, sigma / sqrt(L))
* ``orthogonal``: (semi-)orthogonal with gain sqrt(2); ``scaled_orthogonal``: gain sqrt(2 / L)
* ``xavier_uniform`` / ``xavier_normal``: Glorot, from the weight's fan-in/fan-out
* ``wang_init``: N(0, 2 / (L sqrt(d)))
* ``small_init``: N(0, sqrt(2 / (5 d)))

``output_layer_init_method`` applies to the two projections that write into the residual stream (attention
``dense`` and MLP ``dense_4h_to_h``); every other matrix (QKV, MLP input, embeddings, untied output head, learned
position table) uses ``init_method``. Biases start at zero, norm gains at one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from megatron.config.model import ModelConfig
from megatron.model.norms import RMSNorm, ScaleNorm

InitFn = Callable[[Tensor], Tensor]


def _normal(std: float) -> InitFn:
    return lambda t: nn.init.normal_(t, mean=0.0, std=std)


def _orthogonal(gain: float) -> InitFn:
    def init_(t: Tensor) -> Tensor:
        # QR in fp32 (low-precision QR is unsupported), then copy back in the parameter's dtype
        tmp = torch.empty(t.shape, dtype=torch.float32, device=t.device)
        nn.init.orthogonal_(tmp, gain=gain)
        with torch.no_grad():
            return t.copy_(tmp)

    return init_


def init_method_std(name: str, cfg: ModelConfig) -> float | None:
    """The documented std of a normal-type init method (None for orthogonal/xavier, whose std depends on shape)."""
    sigma, layers, d = cfg.init_method_std, cfg.num_layers, cfg.hidden_size
    stds = {
        "normal": sigma,
        "scaled_normal": sigma / math.sqrt(2.0 * layers),
        "single_residual_scaled_normal": sigma / math.sqrt(layers),
        "wang_init": 2.0 / layers / math.sqrt(d),
        "small_init": math.sqrt(2.0 / (5.0 * d)),
    }
    return stds.get(name)


INIT_METHODS = ("normal", "scaled_normal", "single_residual_scaled_normal", "orthogonal", "scaled_orthogonal",
                "xavier_uniform", "xavier_normal", "wang_init", "small_init")


def get_init_method(name: str, cfg: ModelConfig, key: str = "init_method") -> InitFn:
    """The init function called ``name``; ``key`` only names the config key in the error message."""
    std = init_method_std(name, cfg)
    if std is not None:
        return _normal(std)
    if name == "orthogonal":
        return _orthogonal(math.sqrt(2.0))
    if name == "scaled_orthogonal":
        return _orthogonal(math.sqrt(2.0 / cfg.num_layers))
    if name == "xavier_uniform":
        return nn.init.xavier_uniform_
    if name == "xavier_normal":
        return nn.init.xavier_normal_
    raise ValueError(f"model config key {key!r} = {name!r}: unknown init method, expected one of {INIT_METHODS}")


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """(Re-)initialise every parameter of a ``GPTModel`` following the rules in the module docstring."""
    init_fn = get_init_method(cfg.init_method, cfg, "init_method")
    out_fn = get_init_method(cfg.output_layer_init_method, cfg, "output_layer_init_method")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attention.dense") or name.endswith("mlp.dense_4h_to_h")
                (out_fn if is_out else init_fn)(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                init_fn(module.weight)
            elif isinstance(module, (nn.LayerNorm, RMSNorm, ScaleNorm)):
                module.reset_parameters()
