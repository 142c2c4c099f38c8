"""Argument checks for SepLLM attention (spec §1.2) that concern the attention backend.

The config system validates keys and fills the derived fields; the backend resolves them through the one resolver
(``megatron.config.sepllm_settings.settings_of``), so that a backend built directly from a ``SepLLMConfig`` (tests,
notebooks) fails with a clear message too. Only what is specific to the training kernels (FlexAttention's
availability, and the triton package's) is checked here.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from megatron.config.sepllm import SepLLMConfig
from megatron.config.sepllm_settings import (DENSE_ONLY_MODES, MODES, SepLLMSettings, SepLLMSettingsError,
                                             settings_of)
from megatron.config.sepllm_settings import SEP_ATTENTION_IMPLS as IMPLS

__all__ = ["DENSE_ONLY_MODES", "IMPLS", "MODES", "SepAttentionConfigError", "TRITON_MISSING", "check_backend_config",
           "check_flex_available", "torch_version_at_least"]


TRITON_MISSING = ("'sep_attention_impl' = 'triton' needs the triton package (pip install triton); use "
                  "'flex_compact' or 'compact' instead")


class SepAttentionConfigError(SepLLMSettingsError):
    """A SepLLM attention setting is invalid; the message names the key, the value and what was expected."""


def torch_version_at_least(major: int, minor: int) -> bool:
    """True when the running torch is at least ``major.minor`` (dev/local suffixes ignored)."""
    parts = torch.__version__.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return True


def check_backend_config(cfg: SepLLMConfig, num_layers: int, sliding_window_width: Optional[int] = None
                         ) -> SepLLMSettings:
    """The resolved settings, raising ``SepAttentionConfigError`` for settings the attention backend cannot honour
    (``sliding_window_width``: the model key, see ``settings_of``)."""
    settings = settings_of(cfg, num_layers, error=SepAttentionConfigError, sliding_window_width=sliding_window_width)
    if settings.impl in ("flex", "flex_compact"):
        check_flex_available()
    if settings.impl == "triton" and importlib.util.find_spec("triton") is None:
        raise SepAttentionConfigError(TRITON_MISSING)
    return settings


def check_flex_available() -> None:
    """FlexAttention needs torch >= 2.5 (spec §1.2: the Sep-Attention kernel path)."""
    if not torch_version_at_least(2, 5):
        raise SepAttentionConfigError(
            f"'sep_attention_impl' = 'flex' / 'flex_compact' needs torch >= 2.5 (FlexAttention); found torch "
            f"{torch.__version__}. Use 'compact' or 'dense'")
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the torch build
        raise SepAttentionConfigError(
            f"'sep_attention_impl' = 'flex' / 'flex_compact' but FlexAttention is unavailable: {exc}") from exc


