"""SepCache's eviction planner, torch only (no transformers): per layer and batch row, which cached slots survive
(initial tokens, separators, the local window), when a layer compresses and how its budget grows.

:mod:`~megatron.sepllm.cache.eviction` is the keep rule on slot kinds, :mod:`~megatron.sepllm.cache.slots` the
per-layer bookkeeping, :mod:`~megatron.sepllm.cache.planner` plans each step for every layer (which slots stay,
positions, attention masks) and :mod:`~megatron.sepllm.cache.storage` applies a step plan to key/value tensors. Two
adapters build on it: the Hugging Face ``SepCache`` (:mod:`megatron.sepllm.hf.cache`) and our own decoding cache
(:mod:`megatron.inference.kv_cache`).
"""
