"""Argument checks for SepLLM attention (spec §1.2) that concern the attention backend.

The config system validates keys and fills the derived fields; this module re-checks what the backend relies on,
so that a backend built directly from a ``SepLLMConfig`` (tests, notebooks) fails with a clear message too.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.config.sepllm import SepLLMConfig
from megatron.errors import UserInputError

MODES = ("full", "sepllm", "streamingllm", "fixllm", "sa", "sa_no_deno")
IMPLS = ("auto", "dense", "flex", "compact")
DENSE_ONLY_MODES = ("sa", "sa_no_deno")


class SepAttentionConfigError(UserInputError, ValueError):
    """A SepLLM attention setting is invalid; the message names the key, the value and what was expected."""


def torch_version_at_least(major: int, minor: int) -> bool:
    """True when the running torch is at least ``major.minor`` (dev/local suffixes ignored)."""
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def resolve_prefill_windows(cfg: SepLLMConfig, num_layers: int) -> list[int]:
    """Per-layer prefill windows: the derived ``prefill_windows`` when set, else the reference keys."""
    if cfg.prefill_windows is not None:
        windows = list(cfg.prefill_windows)
        key = "prefill_windows"
    elif cfg.USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS:
        if cfg.prefill_loc_win_size_list is None:
            raise SepAttentionConfigError(
                "USE_PREFILL_LOCAL_WIN_SIZES_wrt_LAYERS=True needs 'prefill_loc_win_size_list' (one window per layer)")
        windows = list(cfg.prefill_loc_win_size_list)
        key = "prefill_loc_win_size_list"
    else:
        windows = [cfg.prefill_local_window_size] * num_layers
        key = "prefill_local_window_size"
    if len(windows) != num_layers:
        raise SepAttentionConfigError(
            f"'{key}' has {len(windows)} entries but the model has num_layers={num_layers}; expected one per layer")
    for i, w in enumerate(windows):
        if not isinstance(w, int) or isinstance(w, bool) or w < 1:
            raise SepAttentionConfigError(f"'{key}'[{i}] = {w!r}: every local window must be an integer >= 1")
    return windows


def resolve_fixed_intervals(cfg: SepLLMConfig, num_layers: int) -> list[int]:
    """Per-layer FixLLM intervals from ``fixed_sep_intervals_list`` (spec §1.10)."""
    intervals = cfg.fixed_sep_intervals_list
    if intervals is None:
        raise SepAttentionConfigError("mode 'fixllm' (USE_FIXED_SEP_INTERVALs=True) needs 'fixed_sep_intervals_list'")
    intervals = list(intervals)
    if len(intervals) == 1 and num_layers > 1:
        intervals = intervals * num_layers
    if len(intervals) != num_layers:
        raise SepAttentionConfigError(
            f"'fixed_sep_intervals_list' has {len(intervals)} entries but num_layers={num_layers}; expected one per layer")
    for i, n in enumerate(intervals):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SepAttentionConfigError(f"'fixed_sep_intervals_list'[{i}] = {n!r}: intervals must be integers >= 1")
    return intervals


def check_backend_config(cfg: SepLLMConfig, num_layers: int) -> None:
    """Raise ``SepAttentionConfigError`` for settings the attention backend cannot honour."""
    if cfg.mode not in MODES:
        raise SepAttentionConfigError(f"SepLLM 'mode' = {cfg.mode!r}: expected one of {', '.join(MODES)}")
    if cfg.sep_attention_impl not in IMPLS:
        raise SepAttentionConfigError(
            f"'sep_attention_impl' = {cfg.sep_attention_impl!r}: expected one of {', '.join(IMPLS)}")
    if cfg.init_tok_max_idx < -1:
        raise SepAttentionConfigError(f"'init_tok_max_idx' = {cfg.init_tok_max_idx}: expected >= -1")
    if cfg.prefill_k != 0 or cfg.generate_k != 0:
        raise SepAttentionConfigError("'prefill_k' / 'generate_k' are deprecated in SepLLM and must stay 0")
    if cfg.mode in DENSE_ONLY_MODES and cfg.sep_attention_impl in ("flex", "compact"):
        raise SepAttentionConfigError(
            f"'sep_attention_impl' = {cfg.sep_attention_impl!r} with self-adjusting softmax (mode {cfg.mode!r}): "
            "SA softmax runs on the dense path only; use 'dense' or 'auto'")
    if cfg.mode == "sepllm":
        seps = cfg.separator_token_ids
        if not seps or list(seps) == [-1]:
            raise SepAttentionConfigError(
                f"'separator_token_ids' = {seps!r}: SepLLM mode needs a non-empty list of real token ids")
    if cfg.mode == "fixllm":
        resolve_fixed_intervals(cfg, num_layers)
    if cfg.sep_attention_impl == "flex":
        check_flex_available()
    resolve_prefill_windows(cfg, num_layers)


def check_flex_available() -> None:
    """FlexAttention needs torch >= 2.5 (spec §1.2: the Sep-Attention kernel path)."""
    if not torch_version_at_least(2, 5):
        raise SepAttentionConfigError(
            f"'sep_attention_impl' = 'flex' needs torch >= 2.5 (FlexAttention); found torch {torch.__version__}. "
            "Use 'compact' or 'dense'")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise SepAttentionConfigError(f"'sep_attention_impl' = 'flex' but FlexAttention is unavailable: {exc}") from exc


def effective_window(cfg: SepLLMConfig, window: int) -> int:
    """``EXCLUDE_DIAGONAL=False`` lets the window hold ``w + 1`` tokens (spec §1.3)."""
    return window if cfg.EXCLUDE_DIAGONAL else window + 1


def separator_ids_for_mode(cfg: SepLLMConfig) -> Optional[list[int]]:
    """Separator ids that make keys global in this mode (None = no separators)."""
    if cfg.mode == "sepllm":
        return [int(s) for s in cfg.separator_token_ids]
    return None
