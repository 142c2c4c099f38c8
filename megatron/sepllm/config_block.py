"""The ``sepllm`` block of an exported ``config.json``: the SepLLM settings a model was trained with, so that
``apply_sepllm(model)`` and ``custom_generate=megatron.sepllm.generate`` find them on the HF model alone.

Layout (``config.json["sepllm"]``)::

    {"mode": "sepllm",                          # full | sepllm | streamingllm | fixllm (as trained)
     "separator_token_ids": [...], "PADDING_ID": 0, "init_tok_max_idx": 2, "Layer_num": 12,
     "prefill_local_window_size": 64, "generate_local_window_size": 64, ... every training-free SepLLM key ...,
     "sep_cache": {"init_cache_size": 3, "sep_cache_size": 64, "local_size": [...], "cache_size": [...]}}

Everything except ``mode`` and ``sep_cache`` is a valid training-free SepLLM config (``megatron.sepllm.hf.config``).
``sep_cache`` holds the SepCache defaults: ``a`` initial tokens, the decode window of every layer as the local size,
the SepCache default separator budget, and ``cache_size = a + s + 2w`` (a compression every ``w`` tokens).

A config without the block but with SepLLM keys at its top level (the SepLLM authors' ``sepllm_gpt_neox`` format,
``megatron.sepllm.authors_config``) is read as the block those keys describe (:func:`top_level_block`).
When both exist, the block wins: it is what our exporter resolved from the training config.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping, Optional

from megatron.config.errors import ConfigError
from megatron.config.sepllm_settings import WINDOW_KEYS, settings_of, window_values
from megatron.sepllm import authors_config as authors
from megatron.config.sepllm import SepLLMConfig

BLOCK_KEY = "sepllm"
SEP_CACHE_KEY = "sep_cache"
DEFAULT_SEP_CACHE_SIZE = 64
#: how a model trained with SepLLM / StreamingLLM decodes (spec §1.3): the same defaults as generate.py's cache
TRAINED_DECODE = {"exact_window": True, "USE_MAX_SEP_CACHE": True, "prefill_attention": "sepllm"}
# SepLLMConfig keys the training-free HF path reads (the rest are training-only switches)
TRAININGFREE_KEYS = ("separator_token_ids", "PADDING_ID", "prefill_local_window_size", "generate_local_window_size",
                     "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS", "USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS",
                     "prefill_loc_win_size_list", "generate_win_loc_size_list", "init_tok_max_idx",
                     "USE_ORIGINAL_FULL_ATTEN", "streamingLLM", "BATCH_ADAPTIVE_INIT_POS", "EXCLUDE_DIAGONAL",
                     "USE_FIXED_SEP_INTERVALs", "fixed_sep_intervals_list")
UNEXPORTABLE = {"USE_BiPE": "BiPE positions (a learned intra-segment table and inter-segment rotary ids)",
                "USE_SA_SOFTMAX": "self-adjusting softmax", "USE_SA_SOFTMAX_NO_DENO": "self-adjusting softmax"}


def check_exportable(sepllm_cfg: SepLLMConfig) -> None:
    """Raise ``ValueError`` naming the key when the attention was trained with something HF attention lacks."""
    for key, what in UNEXPORTABLE.items():
        if getattr(sepllm_cfg, key, False):
            raise ValueError(f"SepLLM config key '{key}' = True: {what} has no Hugging Face equivalent, so the "
                             f"exported model would compute a different function")


def build_block(sepllm_cfg: SepLLMConfig, num_layers: int, *, own_attention: bool = False) -> dict[str, Any]:
    """The ``sepllm`` block for a model trained with ``sepllm_cfg`` (a resolved ``SepLLMConfig``).

    ``own_attention``: the exported model computes BiPE and the self-adjusting softmax itself (the ``sepllm_neox``
    export), so they are carried instead of refused; the SA switches go into the block, where ``apply_sepllm``
    refuses them by name (SA is not a mask it could apply)."""
    if not own_attention:
        check_exportable(sepllm_cfg)
    block: dict[str, Any] = {"mode": settings_of(sepllm_cfg, num_layers).mode}
    for key in TRAININGFREE_KEYS:
        value = getattr(sepllm_cfg, key)
        block[key] = list(value) if isinstance(value, (list, tuple)) else value
    if own_attention:
        block.update({key: True for key in ("USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO") if getattr(sepllm_cfg, key)})
    block["Layer_num"] = num_layers
    settings = settings_of(sepllm_cfg, num_layers)
    if settings.mode in ("sepllm", "streamingllm"):  # FixLLM has no cache eviction rule
        a, windows = settings.num_initial, list(settings.generate_windows)
        s = DEFAULT_SEP_CACHE_SIZE if settings.mode == "sepllm" else 0
        block[SEP_CACHE_KEY] = {"init_cache_size": a, "sep_cache_size": s, "local_size": windows,
                                "cache_size": [a + s + 2 * w for w in windows]}
    return block


def top_level_block(config: Any) -> Optional[dict[str, Any]]:
    """The block equivalent to the SepLLM keys at the top level of an HF config (the authors' ``sepllm_gpt_neox``
    format; a key it lacks takes their converter's fallback), or None when it has none. Raises ``ValueError``
    naming the ``config.json`` key for settings HF attention cannot run (BiPE, self-adjusting softmax)."""
    from megatron.config import load_config

    raw = config.to_dict() if hasattr(config, "to_dict") else dict(getattr(config, "__dict__", {}))
    if not authors.carries_top_level_settings(raw):
        return None
    if not isinstance(raw.get("num_hidden_layers"), int):
        raise ValueError(f"config.json carries top-level SepLLM keys but num_hidden_layers = "
                         f"{raw.get('num_hidden_layers')!r}: expected the model's layer count")
    num_layers = raw["num_hidden_layers"]
    keys = {**authors.sepllm_keys(raw), "Layer_num": num_layers,    # kernel switches: training only
            "USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False}
    for key, what in UNEXPORTABLE.items():     # full attention switches these off (the reference's rewrite)
        if keys.get(key) and not keys.get("USE_ORIGINAL_FULL_ATTEN"):
            raise ValueError(f"config.json key '{key}' = True: {what} cannot run on Hugging Face attention "
                             f"(apply_sepllm / SepCache); import the model with tools/ckpts/convert_hf_to_neox.py")
    try:
        sepllm_cfg = load_config(keys).sepllm
    except ConfigError as exc:
        raise ValueError(f"config.json top-level SepLLM keys: {exc}") from exc
    return build_block(sepllm_cfg, num_layers)


def model_block(model_or_config: Any) -> Optional[dict[str, Any]]:
    """The ``sepllm`` block of an HF model (or its config); else the block its top-level SepLLM keys describe
    (:func:`top_level_block`); None when it has neither."""
    config = getattr(model_or_config, "config", model_or_config)
    block = getattr(config, BLOCK_KEY, None)
    if block is None:
        return top_level_block(config)
    if not isinstance(block, Mapping) or "mode" not in block:
        raise ValueError(f"config.json key '{BLOCK_KEY}' must be a mapping with a 'mode' entry, got {block!r}")
    return dict(block)


def sepllm_settings(block: Mapping[str, Any]) -> dict[str, Any]:
    """The training-free SepLLM keys of a block (what ``sepllm_config_from_mapping`` reads)."""
    return {k: v for k, v in block.items() if k not in ("mode", SEP_CACHE_KEY)}


def sep_cache_defaults(block: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """SepCache keyword defaults from a block ({} if none): sizes, ``separator_token_ids``, ``PADDING_ID`` and the
    decode rule the model was trained with, which is also ``generate.py``'s default (``TRAINED_DECODE``): the window
    trimmed every step, at most ``sep_cache_size`` separators (the most recent), the prompt under the SepLLM mask
    with the model's prefill windows. So both decoders give the same greedy tokens on the same weights."""
    if not block or SEP_CACHE_KEY not in block:
        return {}
    out = dict(block[SEP_CACHE_KEY])
    out["separator_token_ids"] = list(block.get("separator_token_ids") or []) if block["mode"] == "sepllm" else [-1]
    out["PADDING_ID"] = block.get("PADDING_ID")
    out.update(TRAINED_DECODE)
    switch, scalar, listed = WINDOW_KEYS["prefill"]
    keys = SimpleNamespace(**{switch: block.get(switch, False), scalar: block.get(scalar), listed: block.get(listed)})
    out["prefill_local_size"] = list(window_values(keys, "prefill", int(block["Layer_num"]),
                                                   where=lambda key: f"config.json sepllm.{key}"))
    return out
