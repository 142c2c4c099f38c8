"""Load weights saved by the original GPT-NeoX library (and the SepLLM fork of it) into ``GPTModel``, through the
``neox`` column of the GPT-NeoX key table (:data:`megatron.model.weight_names.GPT_NEOX_TABLE`).

GPT-NeoX numbers its modules as one flat sequence: ``0`` embedding (``word_embeddings``, ``position_embeddings``),
``1`` a parameter-free pre-transformer block, ``2 .. L+1`` the transformer layers, ``L+2`` a parameter-free
post-transformer block, ``L+3`` the final norm (``norm.*``), ``L+4`` the output head (``final_linear.weight``,
untied models only). A Sequential checkpoint (``pipe-parallel-size: 0``, ``mp_rank_00_model_states.pt``) stores
``module["sequential.<idx>.<name>"]``; a PipelineModule checkpoint stores one file per module index
(``layer_<idx>-model_00-model_states.pt``) holding ``<name>`` keys. :func:`neox_pipeline_to_sequential` turns the
latter into the former so that one mapping serves both.

Only GPT-NeoX's plain architecture (fused per-head ``[q, k, v]`` QKV, ``dense_h_to_4h``/``dense_4h_to_h`` MLP,
LayerNorm) is mapped: its layer key names and QKV layout are ours, so this is a rename. Tensor-parallel shards must be
merged by the caller first (one shard = ``model-parallel-size: 1``); Llama-style NeoX checkpoints (``w1/w2/w3``,
``.scale`` norms) are refused with a clear error rather than guessed.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.model.weight_names import GPT_NEOX_TABLE, from_hf_state, model_keys

_LLAMA_STYLE = re.compile(r"\.(w1|w2|w3)\.weight$|layernorm\.scale$|norm\.scale$")


def neox_pipeline_to_sequential(layer_states: Mapping[int, Mapping[str, Any]]) -> dict[str, Tensor]:
    """``{module_index: state of layer_<idx>-model_00-model_states.pt}`` -> ``sequential.<idx>.<name>`` keys."""
    return {f"sequential.{idx}.{name}": value for idx, state in layer_states.items() for name, value in state.items()}


def from_neox_state_dict(neox_state: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """GPT-NeoX Sequential-format module state (``sequential.<idx>.<name>``; a DeepSpeed ``{"module": ...}`` wrapper
    is unwrapped) -> ``GPTModel`` state dict. Unknown or missing keys raise ``KeyError`` naming them."""
    cfg = model_cfg
    state = neox_state.get("module", neox_state) if isinstance(neox_state.get("module"), Mapping) else neox_state
    if any(_LLAMA_STYLE.search(k) for k in state):
        raise ValueError("this GPT-NeoX checkpoint uses the Llama-style layout (w1/w2/w3, RMSNorm .scale); only the "
                         "plain GPT-NeoX layout (query_key_value, dense_h_to_4h, LayerNorm) can be imported")
    state = dict(state)
    state.pop(f"sequential.{cfg.num_layers + 4}.word_embeddings.weight", None)  # tied head stored again by pipelines
    expected = model_keys(cfg)
    if "sequential.0.position_embeddings.weight" in state and "embed.position_embeddings.weight" not in expected:
        expected.append("embed.position_embeddings.weight")  # BiPE: the table exists only with the SepLLM config
    return from_hf_state(GPT_NEOX_TABLE, state, cfg, expected, "GPT-NeoX checkpoint", column="neox")


__all__ = ["from_neox_state_dict", "neox_pipeline_to_sequential"]
