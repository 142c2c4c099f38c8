"""Inference with our own ``GPTModel``: KV caches (plain, and SepLLM-compressed with SepCache's eviction), sampling,
and the batched generation loop behind ``generate.py``."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "kv_cache": ("KVCacheSettings", "PlainKVCache", "SepKVCache", "build_kv_cache", "KVCacheError"),
    "generator": ("GenerationError", "GeneratedTokens", "generate_batch"),
    "sampling": ("SamplingSettings",),
    "stopping": ("StopStrings",),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
