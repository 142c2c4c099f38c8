"""SepLLM: mask rules, attention paths, retention statistics and KV caches.

Heavy dependencies (transformers) are imported lazily so that ``import megatron.sepllm`` stays cheap for training.
``from megatron.sepllm import SepCache`` and ``model.generate(..., custom_generate=megatron.sepllm.generate)`` are
public contracts.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "hf.cache": ("SepCache",),
    "hf.generation": ("generate",),
    "hf.trainingfree": ("apply_sepllm",),
    "attention.backend": ("SepLLMBackend",),
    "attention.retention": ("RetentionStats",),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
