"""Training-free SepLLM settings for Hugging Face models (spec §1.1, §1.2, §1.10, §4.2).

The training-free YAML files (``llama3_*.yml``) hold only SepLLM keys plus ``Layer_num``. They are read by the
project's config loader (``megatron.config.load_config``: safe YAML, unknown keys and ill-typed values rejected);
this module resolves the resulting ``SepLLMConfig`` against a concrete HF model config into
:class:`TrainingFreeSettings`
(the project's one ``SepLLMSettings``, built by ``megatron.config.sepllm_settings.settings_of``): the mode, per-layer
prefill/decode windows, FixLLM intervals and the separator ids, plus the HF path's own checks against the model
(layer count, vocabulary size, the modes it can run).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Union

import yaml

from megatron.config import load_config
from megatron.config.errors import ConfigError
from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import SepLLMSettings, mode_of, settings_of

MODES = ("full", "sepllm", "streamingllm", "fixllm")  # the modes the training-free HF path runs
# The reference's kernel switches only concern training; a training-free file that omits them means "off".
_TRAININGFREE_BASE = {"USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False}


class TrainingFreeConfigError(ConfigError, ValueError):
    """A training-free SepLLM setting cannot be used; the message names the source, key, value and expectation."""


#: the settings ``apply_sepllm`` reads: the project's one resolved SepLLM view (kept under its old name)
TrainingFreeSettings = SepLLMSettings


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


def derive_mode(cfg: SepLLMConfig) -> str:
    """The mode ``cfg``'s switches select (the one rule: ``megatron.config.sepllm_settings.mode_of``)."""
    return mode_of(cfg)


def resolve_for_model(cfg: SepLLMConfig, model_config: Any) -> TrainingFreeSettings:
    """Check ``cfg`` against the HF ``model_config`` and resolve per-layer settings (the one resolver,
    ``settings_of``, plus what only the training-free HF path requires: its modes and the model's vocabulary)."""
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
    if not 0 <= cfg.PADDING_ID < vocab:
        raise TrainingFreeConfigError(f"'PADDING_ID' = {cfg.PADDING_ID} is outside the model's vocabulary "
                                      f"[0, {vocab})")
    if cfg.mode != mode_of(cfg):
        raise TrainingFreeConfigError(f"SepLLM 'mode' = {cfg.mode!r} but the config's switches select "
                                      f"{mode_of(cfg)!r}: build the config with load_trainingfree_config or "
                                      "sepllm_config_from_mapping so its derived fields are filled")
    settings = settings_of(cfg, num_layers, error=TrainingFreeConfigError)
    for s in settings.separator_ids:
        if not 0 <= s < vocab:
            raise TrainingFreeConfigError(f"'separator_token_ids' contains {s}, outside the model's vocabulary "
                                          f"[0, {vocab})")
    return settings


# ----------------------------------------------------------------------------------------- settings carried by a model
#: the hub ``generate``'s defaults (transformers-community/sep_cache shows sep_cache_size=128) and the reference
#: SepCache's timing, for models that carry no ``sepllm`` block (training-free use)
SEP_CACHE_FALLBACKS = {"init_cache_size": 4, "sep_cache_size": 128, "local_size": 256, "cache_size": 512,
                       "exact_window": False, "USE_MAX_SEP_CACHE": False, "prefill_attention": "full",
                       "prefill_local_size": None}


def sepllm_config_from_model(model: Any) -> SepLLMConfig:
    """The SepLLM settings an exported model was trained with: the ``sepllm`` block of its ``config.json`` (written
    by ``tools/ckpts/convert_neox_to_hf.py``), else the SepLLM keys at the top level of its config (the SepLLM
    authors' ``sepllm_gpt_neox`` format); the block wins when both exist. Validated like a training-free YAML."""
    from megatron.sepllm.config_block import model_block, sepllm_settings

    try:
        block = model_block(model)
    except ValueError as exc:
        raise TrainingFreeConfigError(str(exc)) from exc
    if block is None:
        raise TrainingFreeConfigError("the model's config has no 'sepllm' block (models exported by "
                                      "tools/ckpts/convert_neox_to_hf.py carry one) and no top-level SepLLM keys "
                                      "(the SepLLM authors' sepllm_gpt_neox format); pass a SepLLMConfig or a "
                                      "training-free YAML path")
    cfg = sepllm_config_from_mapping(sepllm_settings(block))
    if derive_mode(cfg) != block["mode"]:
        raise TrainingFreeConfigError(f"config.json 'sepllm' block: mode = {block['mode']!r} but its keys describe "
                                      f"{derive_mode(cfg)!r}")
    return cfg


def sep_cache_arguments(model: Any, **given: Any) -> dict[str, Any]:
    """SepCache sizes / separators / decode rule for ``generate``: explicit values win, then the model's ``sepllm``
    block (an exported SepLLM / StreamingLLM model: its initial tokens, separators, decode and prefill windows and the
    trained decode rule, ``config_block.sep_cache_defaults``; or the block its
    top-level SepLLM keys describe, ``config_block.model_block``), then SepCache's
    defaults; ``separator_token_ids`` / ``PADDING_ID`` left None fall back to the model-type preset."""
    from megatron.sepllm.config_block import model_block, sep_cache_defaults

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
