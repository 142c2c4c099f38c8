"""SepLLM for Hugging Face models: ``SepCache``, ``custom_generate``, training-free SepLLM attention
(``apply_sepllm``), the lm_eval model and the streaming-perplexity machinery.

Builds on :mod:`megatron.sepllm.attention` (the keep rule) and reads exported ``sepllm`` blocks through
:mod:`megatron.sepllm.config_block`.
"""
