"""Training-free SepLLM settings for Hugging Face models (spec §1.1, §1.2, §1.10, §4.2).

The training-free YAML files (``llama3_*.yml``) hold only SepLLM keys plus ``Layer_num``. This module reads them
safely (``yaml.safe_load``), rejects unknown keys and ill-typed values, and resolves a ``SepLLMConfig`` against a
concrete HF model config into :class:`TrainingFreeSettings`: the mode, per-layer prefill/decode windows, FixLLM
intervals and the separator ids, each checked against the model (layer count, vocabulary size).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import yaml

from megatron.config.errors import ConfigError
from megatron.config.sepllm import SepLLMConfig

MODES = ("full", "sepllm", "streamingllm", "fixllm")
_DERIVED = ("mode", "prefill_windows", "generate_windows")
_BOOL_KEYS = {f.name for f in dataclasses.fields(SepLLMConfig) if f.type == "bool"}
_INT_KEYS = {f.name for f in dataclasses.fields(SepLLMConfig) if f.type == "int"}
_FLOAT_KEYS = {f.name for f in dataclasses.fields(SepLLMConfig) if f.type == "float"}
_OPT_INT_KEYS = {"Layer_num"}
_LIST_KEYS = {"separator_token_ids", "prefill_loc_win_size_list", "generate_win_loc_size_list", "BiPE_seps",
              "fixed_sep_intervals_list"}
_STR_KEYS = {"sep_attention_impl"}
_ALLOWED_KEYS = (_BOOL_KEYS | _INT_KEYS | _FLOAT_KEYS | _OPT_INT_KEYS | _LIST_KEYS | _STR_KEYS) - set(_DERIVED)


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


def _check_type(source: str, key: str, value: Any) -> Any:
    """Return ``value`` if it has the type the key needs, else raise naming source/key/value."""
    def bad(expected: str) -> TrainingFreeConfigError:
        return TrainingFreeConfigError(f"{source}: key '{key}' = {value!r}: expected {expected}")

    if key in _BOOL_KEYS and not isinstance(value, bool):
        raise bad("true or false")
    if value == "None" and (key in _LIST_KEYS or key in _OPT_INT_KEYS):
        value = None                          # the reference files are Python-dict style: `None` means null
    if key in _BOOL_KEYS:
        pass
    elif key in _INT_KEYS or key in _OPT_INT_KEYS:
        if value is None and key in _OPT_INT_KEYS:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
    elif key in _FLOAT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
    elif key in _LIST_KEYS:
        if value is None:
            return value
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise bad("a list of integers (or null)")
        value = [int(v) for v in value]
    elif key in _STR_KEYS:
        if not isinstance(value, str):
            raise bad("a string")
    return value


def sepllm_config_from_mapping(raw: Mapping[str, Any], source: str = "<mapping>") -> SepLLMConfig:
    """Build a ``SepLLMConfig`` from a training-free key/value mapping; unknown or derived keys are errors.

    Keys missing from the mapping take the ``SepLLMConfig`` defaults, except the training-only kernel switches
    (``USE_SEP_ATTN_KERNEL_ACCELERATOR``, ``RECOMPILE_SEP_ATTN_KERNEL``), which default to False here.
    """
    if not isinstance(raw, Mapping):
        raise TrainingFreeConfigError(f"{source}: expected a mapping of SepLLM keys, got {type(raw).__name__}")
    values: dict[str, Any] = {"USE_SEP_ATTN_KERNEL_ACCELERATOR": False, "RECOMPILE_SEP_ATTN_KERNEL": False}
    for key, value in raw.items():
        key = str(key)
        if key in _DERIVED:
            raise TrainingFreeConfigError(f"{source}: key '{key}' is derived by validation and cannot be set")
        if key not in _ALLOWED_KEYS:
            close = difflib.get_close_matches(key, sorted(_ALLOWED_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrainingFreeConfigError(f"{source}: unknown SepLLM key '{key}'{hint}")
        values[key] = _check_type(source, key, value)
    return SepLLMConfig(**values)


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
    """Read a training-free SepLLM YAML (e.g. ``llama3_sepllm_a3_n256.yml``) and apply ``overrides`` on top."""
    path = os.fspath(path)
    try:
        with open(path, "r", encoding="utf-8") as fh:
            raw = yaml.safe_load(fh)
    except FileNotFoundError:
        raise TrainingFreeConfigError(f"{path}: SepLLM config file not found") from None
    except yaml.YAMLError as exc:
        raise TrainingFreeConfigError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TrainingFreeConfigError(f"{path}: expected a mapping of SepLLM keys at top level, got "
                                      f"{type(raw).__name__}")
    merged = dict(raw)
    for key, value in (overrides or {}).items():
        merged[key] = value
    return sepllm_config_from_mapping(merged, source=path)


def _model_dims(model_config: Any) -> tuple[int, int]:
    cfg = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    try:
        return int(cfg.num_hidden_layers), int(cfg.vocab_size)
    except AttributeError as exc:
        raise TrainingFreeConfigError(f"model config {type(cfg).__name__} lacks num_hidden_layers/vocab_size: "
                                      "SepLLM supports decoder-only HF models") from exc


def _windows(cfg: SepLLMConfig, per_layer: bool, list_key: str, scalar_key: str, num_layers: int) -> tuple[int, ...]:
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
    extra = 0 if cfg.EXCLUDE_DIAGONAL else 1        # EXCLUDE_DIAGONAL=False: the window holds w+1 tokens (spec §1.3)
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
                            "generate_local_window_size", num_layers)
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
