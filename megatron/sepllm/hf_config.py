"""Training-free SepLLM settings for Hugging Face models (spec §1.1, §1.2, §1.10, §4.2).

The training-free YAML files (``llama3_*.yml``) hold only SepLLM keys plus ``Layer_num``. They are read by the
project's config loader (``megatron.config.load_config``: safe YAML, unknown keys and ill-typed values rejected);
this module resolves the resulting ``SepLLMConfig`` against a concrete HF model config into :class:`TrainingFreeSettings`: the mode, per-layer prefill/decode windows, FixLLM
intervals and the separator ids, each checked against the model (layer count, vocabulary size).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import yaml

from megatron.config import load_config
from megatron.config.errors import ConfigError
from megatron.config.sepllm import SepLLMConfig

MODES = ("full", "sepllm", "streamingllm", "fixllm")
# The reference's kernel switches only concern training; a training-free file that omits them means "off".
_TRAININGFREE_BASE = {"USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False}


class TrainingFreeConfigError(ConfigError, ValueError):
    """A training-free SepLLM setting cannot be used; the message names the source, key, value and expectation."""


@dataclass(frozen=True)
class TrainingFreeSettings:
    """Everything the HF mask path needs, resolved for one model (one entry per layer in the lists)."""

    mode: str
    num_layers: int
    separator_ids: tuple[int, ...]
    num_initial: int
    prefill_windows: tuple[int, ...]
    generate_windows: tuple[int, ...]
    fixed_intervals: Optional[tuple[int, ...]]
    batch_adaptive_init_pos: bool
    print_kv_ratio: bool
    print_ratio_intervals: int

    def layer_pattern(self, layer_idx: int, decode: bool) -> tuple[int, Optional[int]]:
        """``(window, fixed_interval)`` of one layer for a prefill (``decode=False``) or a decode step."""
        windows = self.generate_windows if decode else self.prefill_windows
        interval = None if self.fixed_intervals is None else self.fixed_intervals[layer_idx]
        return windows[layer_idx], interval


def sepllm_config_from_mapping(raw: Mapping[str, Any]) -> SepLLMConfig:
    """A validated ``SepLLMConfig`` from a key/value mapping, through the project's config loader
    (``megatron.config.load_config``: unknown keys, types and SepLLM modes are checked there)."""
    return load_config(dict(_TRAININGFREE_BASE), dict(raw)).sepllm


def parse_override(text: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` -> ``(KEY, yaml-parsed VALUE)``, e.g. ``"Layer_num=2"`` or ``"separator_token_ids=[13, 11]"``."""
    if "=" not in text:
        raise TrainingFreeConfigError(f"override {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise TrainingFreeConfigError(f"override {text!r}: value is not valid YAML ({exc.__class__.__name__})")
    return key.strip(), parsed


def load_trainingfree_config(path: Union[str, os.PathLike],
                             overrides: Optional[Mapping[str, Any]] = None) -> SepLLMConfig:
    """Read a training-free SepLLM YAML (e.g. ``llama3_sepllm_a3_n256.yml``) with ``overrides`` applied on top, through
    ``megatron.config.load_config`` (safe YAML, unknown-key and type checks, mode derivation)."""
    return load_config(dict(_TRAININGFREE_BASE), os.fspath(path), overrides=dict(overrides or {})).sepllm


def _model_dims(model_config: Any) -> tuple[int, int]:
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    try:
        return int(cfg.num_hidden_layers), int(cfg.vocab_size)
    except AttributeError as exc:
        raise TrainingFreeConfigError(f"model config {type(cfg).__name__} lacks num_hidden_layers/vocab_size: "
                                      "SepLLM supports decoder-only HF models") from exc


def _windows(cfg: SepLLMConfig, per_layer: bool, list_key: str, scalar_key: str, num_layers: int,
             decode: bool = False) -> tuple[int, ...]:
    if per_layer:
        windows = getattr(cfg, list_key)
        if windows is None:
            raise TrainingFreeConfigError(f"'{list_key}' must be a list of {num_layers} windows when the per-layer "
                                          "flag is True")
        if len(windows) != num_layers:
            raise TrainingFreeConfigError(f"'{list_key}' has {len(windows)} entries, expected Layer_num="
                                          f"{num_layers} (one window per layer)")
        key = list_key
    else:
        windows = [getattr(cfg, scalar_key)] * num_layers
        key = scalar_key
    for i, w in enumerate(windows):
        if w < 1:
            raise TrainingFreeConfigError(f"'{key}' = {w} (layer {i}): every local window must be >= 1")
    # EXCLUDE_DIAGONAL=False: a prefill window holds w+1 tokens (spec §1.3). The reference's decode rule never reads
    # the flag: a decode query always sees the last w keys (itself included).
    extra = 0 if (cfg.EXCLUDE_DIAGONAL or decode) else 1
    return tuple(int(w) + extra for w in windows)


def derive_mode(cfg: SepLLMConfig) -> str:
    """Mode by the reference's priority: full > FixLLM > StreamingLLM > SepLLM (spec §1.2, §4.2)."""
    if cfg.USE_ORIGINAL_FULL_ATTEN:
        return "full"
    if cfg.USE_FIXED_SEP_INTERVALs:
        return "fixllm"
    if cfg.streamingLLM:
        return "streamingllm"
    return "sepllm"


def resolve_for_model(cfg: SepLLMConfig, model_config: Any) -> TrainingFreeSettings:
    """Check ``cfg`` against the HF ``model_config`` and resolve per-layer settings; fills ``cfg``'s derived fields."""
    num_layers, vocab = _model_dims(model_config)
    if cfg.Layer_num is None:
        raise TrainingFreeConfigError(f"'Layer_num' is required and must equal the model's num_hidden_layers="
                                      f"{num_layers}")
    if cfg.Layer_num != num_layers:
        raise TrainingFreeConfigError(f"'Layer_num' = {cfg.Layer_num} but the model has num_hidden_layers="
                                      f"{num_layers}; they must be equal")
    for key in ("USE_SA_SOFTMAX", "USE_SA_SOFTMAX_NO_DENO", "USE_BiPE"):
        if getattr(cfg, key) and not cfg.USE_ORIGINAL_FULL_ATTEN:
            raise TrainingFreeConfigError(f"'{key}' = True: this needs a model trained with it; the training-free "
                                          "HF path supports full / SepLLM / StreamingLLM / FixLLM only")
    for key in ("USE_SEP_ATTN_KERNEL_ACCELERATOR", "RECOMPILE_SEP_ATTN_KERNEL"):
        if getattr(cfg, key) and not cfg.USE_ORIGINAL_FULL_ATTEN:
            raise TrainingFreeConfigError(f"'{key}' = True is a training-only option; set it to False for the "
                                          "training-free HF path (it uses a dense mask)")
    if cfg.sep_attention_impl not in ("auto", "dense"):
        raise TrainingFreeConfigError(f"'sep_attention_impl' = {cfg.sep_attention_impl!r}: the training-free HF "
                                      "path is mask-based; expected 'auto' or 'dense'")
    for key in ("prefill_k", "generate_k"):
        if getattr(cfg, key) != 0:
            raise TrainingFreeConfigError(f"'{key}' = {getattr(cfg, key)}: deprecated in the reference, must be 0")
    if not 0 <= cfg.PADDING_ID < vocab:
        raise TrainingFreeConfigError(f"'PADDING_ID' = {cfg.PADDING_ID} is outside the model's vocabulary "
                                      f"[0, {vocab})")
    if cfg.print_ratio_intervals < 1:
        raise TrainingFreeConfigError(f"'print_ratio_intervals' = {cfg.print_ratio_intervals}: expected >= 1")
    mode = derive_mode(cfg)
    if cfg.init_tok_max_idx < -1:
        raise TrainingFreeConfigError(f"'init_tok_max_idx' = {cfg.init_tok_max_idx}: expected >= -1")
    if mode == "streamingllm" and cfg.init_tok_max_idx < 0:
        raise TrainingFreeConfigError("'init_tok_max_idx' must be >= 0 with streamingLLM=True (attention sinks)")

    separator_ids: tuple[int, ...] = ()
    if mode == "sepllm":
        seps = cfg.separator_token_ids
        if not seps or list(seps) == [-1]:
            raise TrainingFreeConfigError(f"'separator_token_ids' = {seps!r}: SepLLM mode needs a non-empty list of "
                                          "real token ids (use streamingLLM=True for no separators)")
        for s in seps:
            if not 0 <= s < vocab:
                raise TrainingFreeConfigError(f"'separator_token_ids' contains {s}, outside the model's vocabulary "
                                              f"[0, {vocab})")
        separator_ids = tuple(dict.fromkeys(int(s) for s in seps))

    fixed: Optional[tuple[int, ...]] = None
    if mode == "fixllm":
        intervals = cfg.fixed_sep_intervals_list
        if intervals is None or len(intervals) != num_layers:
            raise TrainingFreeConfigError(f"'fixed_sep_intervals_list' = {intervals!r}: FixLLM needs one interval "
                                          f"per layer (Layer_num={num_layers})")
        for i, v in enumerate(intervals):
            if v < 1:
                raise TrainingFreeConfigError(f"'fixed_sep_intervals_list'[{i}] = {v}: expected >= 1")
        fixed = tuple(int(v) for v in intervals)

    if mode == "full":
        prefill = generate = tuple([0] * num_layers)
    else:
        prefill = _windows(cfg, cfg.USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS, "prefill_loc_win_size_list",
                           "prefill_local_window_size", num_layers)
        generate = _windows(cfg, cfg.USE_GENERATE_LOCAL_WIN_SIZES_wrt_LAYERS, "generate_win_loc_size_list",
                            "generate_local_window_size", num_layers, decode=True)
    cfg.mode = mode
    cfg.prefill_windows = list(prefill)
    cfg.generate_windows = list(generate)
    return TrainingFreeSettings(
        mode=mode, num_layers=num_layers, separator_ids=separator_ids,
        num_initial=max(cfg.init_tok_max_idx + 1, 0) if mode != "full" else 0,
        prefill_windows=prefill, generate_windows=generate, fixed_intervals=fixed,
        batch_adaptive_init_pos=bool(cfg.BATCH_ADAPTIVE_INIT_POS) and mode != "full",
        print_kv_ratio=bool(cfg.PRINT_KV_RATIO) and mode != "full",
        print_ratio_intervals=int(cfg.print_ratio_intervals))


# ----------------------------------------------------------------------------------------- settings carried by a model
#: the hub ``generate``'s defaults (transformers-community/sep_cache shows sep_cache_size=128)
SEP_CACHE_FALLBACKS = {"init_cache_size": 4, "sep_cache_size": 128, "local_size": 256, "cache_size": 512}


def sepllm_config_from_model(model: Any) -> SepLLMConfig:
    """The SepLLM settings an exported model was trained with: the ``sepllm`` block of its ``config.json`` (written
    by ``tools/ckpts/convert_neox_to_hf.py``), validated like a training-free YAML."""
    from megatron.model.convert.sepllm_block import model_block, sepllm_settings

    try:
        block = model_block(model)
    except ValueError as exc:
        raise TrainingFreeConfigError(str(exc)) from exc
    if block is None:
        raise TrainingFreeConfigError("the model's config has no 'sepllm' block (only models exported by "
                                      "tools/ckpts/convert_neox_to_hf.py carry one); pass a SepLLMConfig or a "
                                      "training-free YAML path")
    cfg = sepllm_config_from_mapping(sepllm_settings(block))
    if derive_mode(cfg) != block["mode"]:
        raise TrainingFreeConfigError(f"config.json 'sepllm' block: mode = {block['mode']!r} but its keys describe "
                                      f"{derive_mode(cfg)!r}")
    return cfg


def sep_cache_arguments(model: Any, **given: Any) -> dict[str, Any]:
    """SepCache sizes / separators for ``generate``: explicit values win, then the model's ``sepllm`` block (an
    exported SepLLM / StreamingLLM model: its initial tokens, separators and decode windows), then SepCache's
    defaults; ``separator_token_ids`` / ``PADDING_ID`` left None fall back to the model-type preset."""
    from megatron.model.convert.sepllm_block import model_block, sep_cache_defaults

    try:
        from_model = sep_cache_defaults(model_block(model))
    except ValueError as exc:
        raise TrainingFreeConfigError(str(exc)) from exc
    out = {}
    for key, value in given.items():
        if value is None:
            value = from_model.get(key, SEP_CACHE_FALLBACKS.get(key))
        out[key] = value
    return out
