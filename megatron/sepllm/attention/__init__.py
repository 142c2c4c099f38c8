"""SepLLM attention for training and our own model: the keep rule, the per-batch plan, the dense / flex / compact
paths, BiPE and self-adjusting softmax helpers, retention statistics and the measured ``auto`` table.

Nothing here imports transformers; Hugging Face inference lives in :mod:`megatron.sepllm.hf`.
"""
