"""The SepLLM authors' Hugging Face weights and model keys (``model_type: sepllm_gpt_neox``,
``SepLLMGPTNeoXForCausalLM``, written by their ``tools/ckpts/convert_neox_to_hf.py``) read into our terms.

Their ``config.json`` is a GPT-NeoX config (transformers 4.x spellings: ``rotary_pct``, ``rotary_emb_base``) plus,
at the TOP level, ``pos_emb`` (``rotary`` or ``alibi``), ``num_layers``, ``mup_rp_embedding_mult``,
``model_parallel_size`` and every SepLLM key of the training YAML (those are read by
:mod:`megatron.sepllm.authors_config`, which the HF-side readers of the settings use without this module).

Weights: ``sepllm_gpt_neox.*`` (the transformer, with ``position_embeddings.weight`` when BiPE) and ``embed_out``
(the head), i.e. HF GPT-NeoX's names under another prefix and transformers 4.x's head name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from torch import Tensor

from megatron.checkpoint.hf.mapping import check_gpt_neox_compatible
from megatron.config.model import ModelConfig
from megatron.model.weight_names import GPT_NEOX_TABLE, from_hf_state, model_keys
from megatron.sepllm.authors_config import MODEL_TYPE
from megatron.config.sepllm import SepLLMConfig

POSITION_EMBEDDINGS = ("rotary", "alibi")           # what SepLLMGPTNeoXForCausalLM computes
WEIGHT_PREFIXES = {MODEL_TYPE + ".": "gpt_neox.", "embed_out.": "lm_head."}


def authors_model_keys(raw: Mapping[str, Any], keys: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``keys`` (our model keys from the GPT-NeoX fields of the same config) with what the authors' top-level model
    keys add: the position embedding. Raises ``ValueError`` naming the key for what ``GPTModel`` cannot compute as
    their class does."""
    pos_emb = raw.get("pos_emb", "rotary")
    if pos_emb not in POSITION_EMBEDDINGS:
        raise ValueError(f"{where}: pos_emb = {pos_emb!r}: SepLLMGPTNeoXForCausalLM computes "
                         f"{' or '.join(POSITION_EMBEDDINGS)}")
    mult = raw.get("mup_rp_embedding_mult", 1.0)
    if mult is not None and float(mult) != 1.0:
        raise ValueError(f"{where}: mup_rp_embedding_mult = {mult!r}: only 1.0 (no embedding multiplier) is "
                         f"imported; what the authors' class does with another value is not known")
    for key in ("num_layers", "Layer_num"):
        if raw.get(key) is not None and raw[key] != keys["num_layers"]:
            raise ValueError(f"{where}: {key} = {raw[key]!r} but num_hidden_layers = {keys['num_layers']}; they "
                             f"must describe the same model")
    out = {**keys, "pos_emb": pos_emb}
    if pos_emb == "alibi":     # the rotary fields their config always carries mean nothing for an ALiBi model
        out.pop("rotary_pct", None)
        out.pop("rotary_emb_base", None)
    return out


def rename_weights(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The authors' (and transformers 4.x GPT-NeoX's) weight names -> transformers 5 GPT-NeoX names."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        for old, new in WEIGHT_PREFIXES.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def from_sepllm_gpt_neox_state_dict(hf_state: Mapping[str, Any], model_cfg: ModelConfig,
                                    sepllm_cfg: Optional[SepLLMConfig] = None) -> dict[str, Tensor]:
    """``SepLLMGPTNeoXForCausalLM`` state dict -> ``GPTModel`` state dict. HF GPT-NeoX's checks hold except the
    positions (their class adds ALiBi); the BiPE table is expected exactly when ``USE_BiPE`` (an extra or a missing
    tensor is an error)."""
    cfg = model_cfg
    if cfg.pos_emb not in POSITION_EMBEDDINGS:
        raise ValueError(f"model config 'pos_emb' = {cfg.pos_emb!r}: SepLLM GPT-NeoX weights are "
                         f"{' or '.join(POSITION_EMBEDDINGS)}")
    check_gpt_neox_compatible(dataclasses.replace(cfg, pos_emb="rotary"))
    if cfg.gpt_j_tied:
        raise ValueError("model config key 'gpt_j_tied' = True cannot load HF GPT-NeoX weights (two separate norms)")
    state = rename_weights(hf_state)       # idempotent: names already renamed stay as they are
    bipe = bool(getattr(sepllm_cfg, "USE_BiPE", False))
    table = MODEL_TYPE + ".position_embeddings.weight"
    present = "gpt_neox.position_embeddings.weight" in state
    if bipe and not present:
        raise KeyError(f"SepLLM GPT-NeoX state dict: missing {table} (the BiPE position table; config.json USE_BiPE "
                       f"= True)")
    if present and not bipe:   # the table rule would drop it silently
        raise KeyError(f"SepLLM GPT-NeoX state dict: unexpected {table} (a BiPE position table) while config.json "
                       f"USE_BiPE is not True")
    if cfg.no_weight_tying and "lm_head.weight" not in state:
        raise KeyError("SepLLM GPT-NeoX state dict: missing key 'embed_out.weight' for an untied model")
    return from_hf_state(GPT_NEOX_TABLE, state, cfg, model_keys(cfg, sepllm_cfg), "SepLLM GPT-NeoX state dict")


__all__ = ["POSITION_EMBEDDINGS", "WEIGHT_PREFIXES", "authors_model_keys", "from_sepllm_gpt_neox_state_dict",
           "rename_weights"]
