"""Hugging Face folders in and out: ``GPTModel`` <-> ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` /
``MistralForCausalLM`` (:mod:`.mapping`), the ``sepllm_neox`` export with its own modeling code (:mod:`.sepllm_neox`,
``remote_code/``), the SepLLM authors' ``sepllm_gpt_neox`` weights (:mod:`.sepllm_gpt_neox`), and the two tools'
functions (:mod:`.export`, :mod:`.import_hf`).
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "export": ("ExportError", "export_to_hf"),
    "import_hf": ("ImportHFError", "import_from_hf"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
