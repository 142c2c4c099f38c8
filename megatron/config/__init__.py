"""Typed configuration: YAML load / merge / CLI overrides / validation into one ``NeoXConfig``.

``load_config("a.yml", "b.yml", overrides=["--train-iters", "10"])`` is the entry point; ``python -m megatron.config``
prints a resolved config. See ``docs/config_reference.md`` for every key.
"""

from __future__ import annotations

from typing import Any

from megatron.config.components import (
    CheckpointConfig,
    DataConfig,
    LauncherConfig,
    LoggingConfig,
    LRScheduleConfig,
    OptimizerConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainingConfig,
)
from megatron.config.errors import ConfigError
from megatron.config.model import ModelConfig
from megatron.config.neox import NeoXConfig
from megatron.config.sepllm import SepLLMConfig

_LAZY = {
    "load_config": ("megatron.config.loader", "load_config"),
    "padded_vocab_size": ("megatron.config.derived", "padded_vocab_size"),
    "check_separator_ids": ("megatron.config.sepllm_checks", "check_separator_ids"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'megatron.config' has no attribute {name!r}")


__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "LauncherConfig", "LoggingConfig", "LRScheduleConfig",
    "ModelConfig", "NeoXConfig", "OptimizerConfig", "ParallelConfig", "SepLLMConfig", "TokenizerConfig",
    "TrainingConfig", "check_separator_ids", "load_config", "padded_vocab_size",
]
