"""Checkpoints outside the training engine: our format and how it is read (:mod:`.format`), a trained checkpoint as
one full model (:mod:`.trained`), the GPT-NeoX library's checkpoint names (:mod:`.neox_library`) and Hugging Face
export / import (:mod:`.hf`). The engine's own save / resume is :mod:`megatron.training.checkpointing`.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "format": ("CheckpointError", "CheckpointLayout"),
    "trained": ("TrainedModel", "checkpoint_to_read", "find_checkpoint_dir", "load_checkpoint_config",
                "load_trained_model", "read_full_model_state"),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
