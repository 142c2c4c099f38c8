"""Taking trained models in and out of the framework: loading our checkpoints as one full model, and the weight
tables between ``GPTModel`` and Hugging Face GPT-NeoX / Llama (used in both directions)."""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "checkpoint": ("TrainedModel", "find_checkpoint_dir", "load_checkpoint_config", "load_trained_model",
                   "read_full_model_state"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
