"""Taking trained models in and out of the framework: loading our checkpoints as one full model, and the weight
tables between ``GPTModel`` and Hugging Face GPT-NeoX / Llama (used in both directions)."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "TrainedModel": "megatron.model.convert.checkpoint",
    "find_checkpoint_dir": "megatron.model.convert.checkpoint",
    "load_checkpoint_config": "megatron.model.convert.checkpoint",
    "load_trained_model": "megatron.model.convert.checkpoint",
    "read_full_model_state": "megatron.model.convert.checkpoint",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())

__all__ = sorted(_LAZY)
