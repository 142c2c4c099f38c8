"""Inference with our own ``GPTModel``: KV caches (plain, and SepLLM-compressed with SepCache's eviction), sampling,
and the batched generation loop behind ``generate.py``."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "KVCacheSettings": "megatron.inference.kv_cache",
    "PlainKVCache": "megatron.inference.kv_cache",
    "SepKVCache": "megatron.inference.kv_cache",
    "build_kv_cache": "megatron.inference.kv_cache",
    "GenerationError": "megatron.inference.generator",
    "GeneratedTokens": "megatron.inference.generator",
    "KVCacheError": "megatron.inference.kv_cache",
    "SamplingSettings": "megatron.inference.sampling",
    "StopStrings": "megatron.inference.stopping",
    "generate_batch": "megatron.inference.generator",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
