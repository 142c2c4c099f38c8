"""The SepLLM authors' Hugging Face format (``model_type: sepllm_gpt_neox``, ``SepLLMGPTNeoXForCausalLM``, written by
their ``tools/ckpts/convert_neox_to_hf.py``) read into our terms: the model keys, the SepLLM keys and the weights.

Their ``config.json`` is a GPT-NeoX config (transformers 4.x spellings: ``rotary_pct``, ``rotary_emb_base``) plus,
at the TOP level, ``pos_emb`` (``rotary`` or ``alibi``), ``num_layers``, ``mup_rp_embedding_mult``,
``model_parallel_size`` and every SepLLM key of the training YAML under its reference spelling
(``separator_token_ids``, ``PADDING_ID``, windows and per-layer lists, ``init_tok_max_idx``,
``USE_ORIGINAL_FULL_ATTEN``, ``streamingLLM``, ``USE_BiPE``, ``BiPE_seps``, the SA keys, ``EXCLUDE_DIAGONAL``, ...).
Their converter writes every one of those keys; a key a hand-made ``config.json`` lacks takes the value that
converter falls back to (:data:`TOP_LEVEL_FALLBACKS`), which is what their model class would run with.

Weights: ``sepllm_gpt_neox.*`` (the transformer, with ``position_embeddings.weight`` when BiPE) and ``embed_out``
(the head), i.e. HF GPT-NeoX's names under another prefix and transformers 4.x's head name.

Nothing here imports from ``import_hf`` or ``sepllm_block`` (both read this module), and the weight code is
imported when used, so the HF-side readers of the settings stay light.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from torch import Tensor

from megatron.config.model import ModelConfig
from megatron.config.sepllm import SepLLMConfig

MODEL_TYPE = "sepllm_gpt_neox"
ARCHITECTURE = "SepLLMGPTNeoXForCausalLM"
PYTHIA_SEPARATORS = [15, 13, 32, 2, 28, 27, 209, 186, 187]
#: the authors' converter's value for every SepLLM key its YAML lacks (spec §5.3); config.json keys in their spelling
TOP_LEVEL_FALLBACKS: dict[str, Any] = {
    "separator_token_ids": PYTHIA_SEPARATORS, "PADDING_ID": 0,
    "prefill_local_window_size": 128, "generate_local_window_size": 128,
    "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS": False, "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS": False,
    "prefill_loc_win_size_list": [128] * 12, "generate_win_loc_size_list": [128] * 12,
    "init_tok_max_idx": 2, "USE_ORIGINAL_FULL_ATTEN": False, "streamingLLM": False,
    "PRINT_KV_RATIO": False, "print_ratio_intervals": 100, "EXCLUDE_DIAGONAL": True,
    "USE_BiPE": False, "BiPE_seps": PYTHIA_SEPARATORS,
    "USE_SA_SOFTMAX": False, "USE_SA_SOFTMAX_NO_DENO": False, "SA_Numerator_Bias": 0.0, "SA_Denominator_Bias": 1e-10,
    "BATCH_ADAPTIVE_INIT_POS": False,
}
# SepLLMConfig fields that are ours (derived, or our own switch), never read from the authors' config.json
_OURS_ONLY = ("mode", "prefill_windows", "generate_windows", "sep_attention_impl", "Layer_num")
#: every SepLLM key read from the top level of a config.json: the fallback table plus any other reference key there
SEPLLM_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SepLLMConfig) if f.name not in _OURS_ONLY)
POSITION_EMBEDDINGS = ("rotary", "alibi")           # what SepLLMGPTNeoXForCausalLM computes
WEIGHT_PREFIXES = {MODEL_TYPE + ".": "gpt_neox.", "embed_out.": "lm_head."}


def is_authors_format(raw: Mapping[str, Any]) -> bool:
    """True for a ``config.json`` (dict) written for ``SepLLMGPTNeoXForCausalLM``."""
    return raw.get("model_type") == MODEL_TYPE or ARCHITECTURE in (raw.get("architectures") or ())


def carries_top_level_settings(raw: Mapping[str, Any]) -> bool:
    """True when SepLLM settings sit at the top level of the config (the authors' format, or any config that has
    one of their SepLLM keys there)."""
    return is_authors_format(raw) or any(key in raw for key in TOP_LEVEL_FALLBACKS)


def sepllm_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The SepLLM keys (reference spellings, which are ours too) of a config with top-level settings: the value in
    ``raw`` when present, else the authors' converter fallback. Values are not checked here: the config loader does
    that and names the key."""
    out: dict[str, Any] = {}
    for key in SEPLLM_KEYS:
        if key in raw:
            value = raw[key]
        elif key in TOP_LEVEL_FALLBACKS:
            value = TOP_LEVEL_FALLBACKS[key]
        else:
            continue
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


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
                                    sepllm_cfg: Any = None) -> dict[str, Tensor]:
    """``SepLLMGPTNeoXForCausalLM`` state dict -> ``GPTModel`` state dict. HF GPT-NeoX's checks hold except the
    positions (their class adds ALiBi); the BiPE table is expected exactly when ``USE_BiPE`` (an extra or a missing
    tensor is an error)."""
    from megatron.model.convert.hf import check_gpt_neox_compatible
    from megatron.model.convert.tables import GPT_NEOX_TABLE, from_hf_state, model_keys

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


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "SEPLLM_KEYS", "TOP_LEVEL_FALLBACKS", "authors_model_keys",
           "carries_top_level_settings", "from_sepllm_gpt_neox_state_dict", "is_authors_format", "rename_weights",
           "sepllm_keys"]
