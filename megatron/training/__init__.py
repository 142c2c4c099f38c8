"""Training: DeepSpeed engine set-up, the loop, LR schedules, atomic checkpoints, logging.

``from megatron.training import pretrain`` runs a whole job from a resolved ``NeoXConfig``; the submodules are
usable on their own (``lr_schedules.AnnealingLR``, ``checkpointing.save_checkpoint`` / ``load_checkpoint``,
``logging.RunLogger``). Heavy imports (DeepSpeed, the model) happen lazily.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "pretrain": ("megatron.training.loop", "pretrain"),
    "TrainResult": ("megatron.training.loop", "TrainResult"),
    "TrainingError": ("megatron.training.loop", "TrainingError"),
    "CheckpointError": ("megatron.training.checkpointing", "CheckpointError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'megatron.training' has no attribute {name!r}")


__all__ = sorted(_LAZY)
