"""SepLLM: mask rules, attention paths, retention statistics and KV caches.

Heavy dependencies (transformers) are imported lazily so that ``import megatron.sepllm`` stays cheap for training.
``from megatron.sepllm import SepCache`` and ``model.generate(..., custom_generate=megatron.sepllm.generate)`` are
public contracts.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "SepCache": "megatron.sepllm.hf.cache",
    "generate": "megatron.sepllm.hf.generation",
    "apply_sepllm": "megatron.sepllm.hf.trainingfree",
    "SepLLMBackend": "megatron.sepllm.attention.backend",
    "RetentionStats": "megatron.sepllm.attention.retention",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
__all__ = sorted(_LAZY)
