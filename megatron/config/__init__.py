"""Typed configuration: YAML load / merge / CLI overrides / validation into one ``NeoXConfig``.

``load_config("a.yml", "b.yml", overrides=["--train-iters", "10"])`` is the entry point; ``python -m megatron.config``
prints a resolved config. See ``docs/config_reference.md`` for every key.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports
from megatron.config.components import (CheckpointConfig, DataConfig, LauncherConfig, LoggingConfig,
                                        LRScheduleConfig, OptimizerConfig, ParallelConfig, TokenizerConfig,
                                        TrainingConfig)
from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig
from megatron.config.neox import NeoXConfig
from megatron.config.sepllm import SepLLMConfig

_LAZY = {
    "loader": ("load_config",),
    "derived": ("padded_vocab_size",),
    "sepllm_settings": ("check_separator_ids",),
}

__getattr__, __dir__, _ = lazy_exports(__name__, _LAZY, globals())


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LauncherConfig", "LoggingConfig", "LRScheduleConfig",
    "ModelConfig", "NeoXConfig", "OptimizerConfig", "ParallelConfig", "SepLLMConfig", "TokenizerConfig",
    "TrainingConfig", "check_separator_ids", "load_config", "padded_vocab_size",
]
