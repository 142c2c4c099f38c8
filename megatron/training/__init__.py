"""Training: DeepSpeed engine set-up, the loop, LR schedules, atomic checkpoints, logging.

``from megatron.training import pretrain`` runs a whole job from a resolved ``NeoXConfig``; the submodules are
usable on their own (``lr_schedules.AnnealingLR``, ``checkpointing.save_checkpoint`` / ``load_checkpoint``,
``logging.RunLogger``). Heavy imports (DeepSpeed, the model) happen lazily.
"""

from __future__ import annotations

from megatron._lazy import lazy_exports

_LAZY = {
    "loop": ("pretrain",),
    "run": ("TrainResult",),
    "steppers": ("TrainingError",),
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _LAZY, globals())
