"""Load weights saved by the original GPT-NeoX library (and the SepLLM fork of it) into ``GPTModel``.

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
from megatron.model.hf_export import _pad_rows, _plain, _Reader

_IGNORED = re.compile(r"(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")
_LAYER_KEYS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
               "post_attention_layernorm.bias", "attention.query_key_value.weight", "attention.query_key_value.bias",
               "attention.dense.weight", "attention.dense.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
               "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")


def neox_pipeline_to_sequential(layer_states: Mapping[int, Mapping[str, Any]]) -> dict[str, Tensor]:
    """``{module_index: state of layer_<idx>-model_00-model_states.pt}`` -> ``sequential.<idx>.<name>`` keys."""
    return {f"sequential.{idx}.{name}": value for idx, state in layer_states.items() for name, value in state.items()}


def from_neox_state_dict(neox_state: Mapping[str, Any], model_cfg: ModelConfig) -> dict[str, Tensor]:
    """GPT-NeoX Sequential-format module state (``sequential.<idx>.<name>``; a DeepSpeed ``{"module": ...}`` wrapper
    is unwrapped) -> ``GPTModel`` state dict. Unknown or missing keys raise ``KeyError`` naming them."""
    cfg = model_cfg
    state = neox_state.get("module", neox_state) if isinstance(neox_state.get("module"), Mapping) else neox_state
    flat = {k: _plain(v) for k, v in state.items() if not _IGNORED.search(k)}
    if any(re.search(r"\.(w1|w2|w3)\.weight$|layernorm\.scale$|norm\.scale$", k) for k in flat):
        raise ValueError("this GPT-NeoX checkpoint uses the Llama-style layout (w1/w2/w3, RMSNorm .scale); only the "
                         "plain GPT-NeoX layout (query_key_value, dense_h_to_4h, LayerNorm) can be imported")
    src = _Reader(flat, "GPT-NeoX checkpoint")
    layers = cfg.num_layers
    out: dict[str, Tensor] = {"embed.word_embeddings.weight": _pad_rows(src.pop("sequential.0.word_embeddings.weight"),
                                                                        cfg)}
    pos = src.pop_optional("sequential.0.position_embeddings.weight")
    if pos is not None:
        out["embed.position_embeddings.weight"] = pos
    for i in range(layers):
        p, q = f"layers.{i}.", f"sequential.{i + 2}."
        for name in _LAYER_KEYS:
            if cfg.gpt_j_tied and name.startswith("post_attention_layernorm"):
                src.pop_optional(q + name)  # GPT-NeoX builds it even when tied; it is unused
                continue
            value = src.pop_optional(q + name)
            if value is None:
                if name.endswith(".bias"):
                    continue  # bias-free configs
                raise KeyError(f"GPT-NeoX checkpoint: missing key {q + name!r} (layer {i})")
            out[p + name] = value
    for name in ("weight", "bias"):
        value = src.pop_optional(f"sequential.{layers + 3}.norm.{name}")
        if value is None and name == "weight":
            raise KeyError(f"GPT-NeoX checkpoint: missing key 'sequential.{layers + 3}.norm.weight' (final norm)")
        if value is not None:
            out[f"final_layernorm.{name}"] = value
    head = src.pop_optional(f"sequential.{layers + 4}.final_linear.weight")
    src.pop_optional(f"sequential.{layers + 4}.word_embeddings.weight")  # tied head stored again by pipeline saves
    if cfg.no_weight_tying:
        if head is None:
            raise KeyError(f"GPT-NeoX checkpoint: missing key 'sequential.{layers + 4}.final_linear.weight' "
                           f"(no_weight_tying = True)")
        out["output_layer.weight"] = _pad_rows(head, cfg)
    src.finish()
    return out
