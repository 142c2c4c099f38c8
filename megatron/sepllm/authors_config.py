"""The SepLLM authors' ``config.json`` (``model_type: sepllm_gpt_neox``, ``SepLLMGPTNeoXForCausalLM``, written by
their ``tools/ckpts/convert_neox_to_hf.py``): which configs carry SepLLM settings at the top level and what those
settings are.

Their ``config.json`` is a GPT-NeoX config plus, at the TOP level, every SepLLM key of the training YAML under its
reference spelling (``separator_token_ids``, ``PADDING_ID``, windows and per-layer lists, ``init_tok_max_idx``,
``USE_ORIGINAL_FULL_ATTEN``, ``streamingLLM``, ``USE_BiPE``, ``BiPE_seps``, the SA keys, ``EXCLUDE_DIAGONAL``, ...).
Their converter writes every one of those keys; a key a hand-made ``config.json`` lacks takes the value that
converter falls back to (:data:`TOP_LEVEL_FALLBACKS`), which is what their model class would run with.

Read by the ``sepllm`` block of an HF config (:mod:`megatron.sepllm.config_block`) and by the HF import
(:mod:`megatron.checkpoint.hf.import_hf`; the weights are :mod:`megatron.checkpoint.hf.sepllm_gpt_neox`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "PYTHIA_SEPARATORS", "SEPLLM_KEYS", "TOP_LEVEL_FALLBACKS",
           "carries_top_level_settings", "is_authors_format", "sepllm_keys"]
