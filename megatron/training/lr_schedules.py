"""Learning-rate schedules with GPT-NeoX ``AnnealingLR`` semantics, stepped once per training iteration.

We own the schedule instead of handing it to DeepSpeed because DeepSpeed steps a client scheduler only on applied
optimizer steps (fp16 overflow skips it); GPT-NeoX users expect the LR to be a function of the iteration number, and
resumption then only needs the iteration.

Conventions (1-indexed iterations: the optimizer step of iteration ``it`` uses ``lr_at(it)``):
* warmup: ``lr = max_lr * it / warmup_iters`` for ``it <= warmup_iters`` (so iteration 10 of a 1430-step warmup to
  6e-4 uses 4.196e-6, as in the reference logs; unlike GPT-NeoX the very first step is not wasted at lr 0);
* after warmup, with ``t = it - warmup_iters`` and ``T = lr_decay_iters - warmup_iters``:
  ``constant``: ``max_lr``; ``linear``: ``max_lr * (T - t) / T``; ``cosine``:
  ``min_lr + (max_lr - min_lr) / 2 * (1 + cos(pi * t / T))``;
* the result is floored at ``min_lr`` (GPT-NeoX semantics: linear decays towards 0 and is clipped at ``min_lr``);
* past ``lr_decay_iters`` the LR stays at ``min_lr`` (``max_lr`` for constant), where GPT-NeoX's cosine would rise
  again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from megatron.config import derived
from megatron.errors import UserInputError

DECAY_STYLES = ("constant", "linear", "cosine")


class LRScheduleError(UserInputError, ValueError):
    """A schedule parameter is out of range."""


def resolve_warmup_iters(warmup: float | int | None, lr_decay_iters: int) -> int:
    """Warmup given as a fraction of ``lr_decay_iters`` (< 1.0, GPT-NeoX ``warmup``) or as an iteration count. A
    fraction is rounded by config validation's rule (:func:`megatron.config.derived.warmup_iters`), so a schedule
    built here and one built from a validated config agree."""
    if warmup is None:
        return 0
    if warmup < 0:
        raise LRScheduleError(f"warmup must be >= 0, got {warmup!r}")
    if isinstance(warmup, float) and warmup < 1.0:
        return derived.warmup_iters(warmup, lr_decay_iters)
    return int(warmup)


@dataclass
class AnnealingLR:
    """Warmup + constant/linear/cosine decay to ``min_lr``; see the module docstring for the exact formulas."""

    max_lr: float
    warmup_iters: int
    lr_decay_iters: int
    decay_style: str = "cosine"
    min_lr: float = 0.0
    iteration: int = 0

    def __post_init__(self) -> None:
        if self.decay_style not in DECAY_STYLES:
            raise LRScheduleError(
                f"lr_decay_style must be one of {', '.join(DECAY_STYLES)}, got {self.decay_style!r}")
        if self.max_lr < 0 or self.min_lr < 0:
            raise LRScheduleError(f"lr and min_lr must be >= 0, got lr={self.max_lr} min_lr={self.min_lr}")
        if self.min_lr > self.max_lr:
            raise LRScheduleError(f"min_lr ({self.min_lr}) must not exceed lr ({self.max_lr})")
        if self.warmup_iters < 0:
            raise LRScheduleError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.decay_style != "constant" and self.lr_decay_iters <= self.warmup_iters:
            raise LRScheduleError(
                f"lr_decay_iters ({self.lr_decay_iters}) must be larger than warmup_iters ({self.warmup_iters}) "
                f"for {self.decay_style!r} decay")

    def lr_at(self, iteration: int) -> float:
        """The learning rate used by the optimizer step of (1-indexed) ``iteration``."""
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            return self.max_lr * max(iteration, 0) / self.warmup_iters
        if self.decay_style == "constant":
            return self.max_lr
        if iteration >= self.lr_decay_iters:
            return self.min_lr
        t = iteration - self.warmup_iters
        span = self.lr_decay_iters - self.warmup_iters
        if self.decay_style == "linear":
            lr = self.max_lr * (span - t) / span
        else:
            lr = self.min_lr + (self.max_lr - self.min_lr) / 2.0 * (1.0 + math.cos(math.pi * t / span))
        return max(lr, self.min_lr)

    def step(self, iteration: int, param_groups: Iterable[dict]) -> float:
        """Set the LR of ``param_groups`` for ``iteration`` and remember it; returns the LR."""
        self.iteration = iteration
        lr = self.lr_at(iteration)
        for group in param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"max_lr": self.max_lr, "warmup_iters": self.warmup_iters, "lr_decay_iters": self.lr_decay_iters,
                "decay_style": self.decay_style, "min_lr": self.min_lr, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position. The schedule's shape comes from the current config (GPT-NeoX
        ``override_lr_scheduler`` behaviour), so a resumed run may change e.g. ``train_iters``."""
        self.iteration = int(state["iteration"])
