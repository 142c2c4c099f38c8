"""SepLLM: mask rules, attention paths, retention statistics and KV caches.

Heavy dependencies (transformers) are imported lazily so that ``import megatron.sepllm`` stays cheap for training.
``from megatron.sepllm import SepCache`` and ``model.generate(..., custom_generate=megatron.sepllm.generate)`` are
public contracts.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "SepCache": ("megatron.sepllm.cache", "SepCache"),
    "generate": ("megatron.sepllm.generation", "generate"),
    "apply_sepllm": ("megatron.sepllm.hf_attention", "apply_sepllm"),
    "SepLLMBackend": ("megatron.sepllm.backend", "SepLLMBackend"),
    "RetentionStats": ("megatron.sepllm.retention", "RetentionStats"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'megatron.sepllm' has no attribute {name!r}")


__all__ = sorted(_LAZY)
