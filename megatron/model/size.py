"""Parameter counts of the real model, per block: ``GPTModel`` is built on the meta device (no memory, no init cost)
and its parameters are grouped by name, so the numbers are the model's own and not a formula that could drift."""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch.overrides import TorchFunctionMode

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig
from megatron.model.gpt import GPTModel

#: per-layer parameter groups, in print order (``attention_other``: query/key norms)
LAYER_GROUPS = ("attention_qkv", "attention_dense", "attention_other", "norms", "mlp")
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerCounts:
    """Parameters of one transformer layer by group."""

    attention_qkv: int = 0
    attention_dense: int = 0
    attention_other: int = 0
    norms: int = 0
    mlp: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, g) for g in LAYER_GROUPS)


@dataclass(frozen=True)
class ParameterCounts:
    """Parameters of a ``GPTModel`` by block. Tied input/output embeddings are counted once (``output_layer`` 0)."""

    word_embeddings: int
    position_embeddings: int
    layers: tuple[LayerCounts, ...]
    final_norm: int
    output_layer: int
    names: tuple[tuple[str, int], ...]   # (parameter name, numel) of every parameter, for per-rank splits

    @property
    def tied(self) -> bool:
        return self.output_layer == 0

    @property
    def total(self) -> int:
        return (self.word_embeddings + self.position_embeddings + sum(layer.total for layer in self.layers)
                + self.final_norm + self.output_layer)

    @property
    def non_embedding(self) -> int:
        """Without the word and position embeddings and the output layer (the convention of Pythia's table)."""
        return self.total - self.word_embeddings - self.position_embeddings - self.output_layer


def _layer_group(rest: str) -> Optional[str]:
    if rest.startswith("attention.query_key_value."):
        return "attention_qkv"
    if rest.startswith("attention.dense."):
        return "attention_dense"
    if rest.startswith("attention."):
        return "attention_other"
    if rest.startswith(("input_layernorm.", "post_attention_layernorm.")):
        return "norms"
    if rest.startswith("mlp."):
        return "mlp"
    return None


class _SkipMetaInit(TorchFunctionMode):
    """Random initialisation of a meta tensor is a no-op (there are no values); skipping it avoids torch's meta
    implementation of ``normal_`` / ``uniform_``, whose first call imports ``torch._dynamo`` (seconds)."""

    RANDOM_FILLS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func in self.RANDOM_FILLS or getattr(func, "__module__", None) == "torch.nn.init":
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextmanager
def _on_meta() -> Iterator[None]:
    with torch.device("meta"), _SkipMetaInit():
        yield


def count_parameters(model_cfg: ModelConfig, sepllm_cfg: Optional[SepLLMConfig] = None) -> ParameterCounts:
    """Build ``GPTModel(model_cfg, sepllm_cfg)`` on the meta device and count its parameters by block.

    ``model_cfg.padded_vocab_size`` must be set. A parameter outside the known blocks is an error (a new module
    must be placed in the breakdown, never silently left out of it)."""
    with _on_meta():
        model = GPTModel(model_cfg, sepllm_cfg)
    blocks = {"word": 0, "position": 0, "final": 0, "output": 0}
    layers: list[dict[str, int]] = [dict.fromkeys(LAYER_GROUPS, 0) for _ in range(model_cfg.num_layers)]
    names: list[tuple[str, int]] = []
    for name, param in model.named_parameters():   # shared (tied) parameters are listed once
        n = param.numel()
        names.append((name, n))
        match = _LAYER.match(name)
        group = _layer_group(match.group(2)) if match else None
        if match and group:
            layers[int(match.group(1))][group] += n
        elif name.startswith("embed.word_embeddings."):
            blocks["word"] += n
        elif name.startswith("embed.position_embeddings."):
            blocks["position"] += n
        elif name.startswith("final_layernorm."):
            blocks["final"] += n
        elif name.startswith("output_layer."):
            blocks["output"] += n
        else:
            raise RuntimeError(f"parameter {name!r} belongs to no block of the size breakdown "
                               f"(megatron/model/size.py): add its block there")
    return ParameterCounts(word_embeddings=blocks["word"], position_embeddings=blocks["position"],
                           layers=tuple(LayerCounts(**counts) for counts in layers), final_norm=blocks["final"],
                           output_layer=blocks["output"], names=tuple(names))


__all__ = ["LAYER_GROUPS", "LayerCounts", "ParameterCounts", "count_parameters"]
