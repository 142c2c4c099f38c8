"""Learning-rate schedule: GPT-NeoX's ``AnnealingLR``, value for value, plus our warmup-stable-decay style.

The rate is a function of ``n``, the number of optimizer steps applied so far (GPT-NeoX's ``num_iters``): the step of
1-based iteration ``k`` uses ``lr_for(k - 1)`` in a run without skipped steps, and an fp16 step DeepSpeed skips for
an overflow does not advance ``n`` (DeepSpeed steps GPT-NeoX's scheduler only after an applied step). With ``W`` the
warmup length in steps (``warmup x lr_decay_iters``, unrounded), ``E`` = ``lr_decay_iters``, ``t = n - W`` and
``T = E - W``:

* warmup, ``W > 0`` and ``n <= W``: ``lr x max(1, n) / W`` (so the first two steps share ``lr / W``);
* ``constant``: ``lr``; ``linear``: ``lr x (T - t) / T``; ``cosine``: ``min_lr + (lr - min_lr) / 2 x (1 + cos(pi t /
  T))``, which rises again past ``E`` exactly as GPT-NeoX's does; ``exponential``: ``lr x exp(-0.693 t / T)``;
* ``wsd`` (ours, GPT-NeoX has none): ``lr`` until the last ``wsd_decay_fraction`` of ``T``, then ``wsd_decay_style``
  (linear / cosine / 1-sqrt) from ``lr`` down to ``min_lr`` at ``E``, ``min_lr`` after;
* every value is floored at ``min_lr``.

``state_dict`` / ``load_state_dict`` keep GPT-NeoX's names and its resume rule: the step count always comes from the
checkpoint; lr, min_lr, warmup, lr_decay_iters and the style come from the config with ``override_lr_scheduler``,
from the checkpoint with ``use_checkpoint_lr_scheduler``, and otherwise must agree (GPT-NeoX asserts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from megatron.config.derived import LR_DECAY_STYLES, WSD_DECAY_STYLES
from megatron.errors import UserInputError


class LRScheduleError(UserInputError, ValueError):
    """A schedule parameter is out of range, or a checkpoint's schedule contradicts the config."""


def resolve_warmup_iters(warmup: float | None, lr_decay_iters: int) -> float:
    """GPT-NeoX's warmup length in steps: the fraction ``warmup`` of ``lr_decay_iters``, not rounded."""
    if warmup is None:
        return 0.0
    if warmup < 0:
        raise LRScheduleError(f"warmup must be >= 0, got {warmup!r}")
    return warmup * lr_decay_iters


@dataclass
class AnnealingLR:
    """GPT-NeoX's AnnealingLR (see the module docstring for every formula); ``num_iters`` = steps applied so far."""

    max_lr: float
    warmup_iters: float
    lr_decay_iters: int
    decay_style: str = "linear"
    min_lr: float = 0.0
    wsd_decay_fraction: float = 0.1
    wsd_decay_style: str = "linear"
    num_iters: int = 0

    def __post_init__(self) -> None:
        if self.decay_style not in LR_DECAY_STYLES:
            raise LRScheduleError(f"lr_decay_style must be one of {', '.join(LR_DECAY_STYLES)}, got "
                                  f"{self.decay_style!r}")
        if self.wsd_decay_style not in WSD_DECAY_STYLES:
            raise LRScheduleError(f"wsd_decay_style must be one of {', '.join(WSD_DECAY_STYLES)}, got "
                                  f"{self.wsd_decay_style!r}")
        if self.max_lr < 0 or self.min_lr < 0:
            raise LRScheduleError(f"lr and min_lr must be >= 0, got lr={self.max_lr} min_lr={self.min_lr}")
        if self.min_lr > self.max_lr:
            raise LRScheduleError(f"min_lr ({self.min_lr}) must not exceed lr ({self.max_lr})")
        if self.lr_decay_iters < 1:
            raise LRScheduleError(f"lr_decay_iters must be >= 1, got {self.lr_decay_iters}")
        if self.warmup_iters < 0:
            raise LRScheduleError(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if self.decay_style != "constant" and self.warmup_iters > self.lr_decay_iters:
            raise LRScheduleError(f"warmup_iters ({self.warmup_iters}) must not exceed lr_decay_iters "
                                  f"({self.lr_decay_iters}) for {self.decay_style!r} decay")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise LRScheduleError(f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")

    def check_reach(self, steps: int) -> None:
        """Refuse, before training, a run of ``steps`` optimizer steps that would need the decay past a warmup as long
        as the whole decay (GPT-NeoX divides by zero there)."""
        no_decay = self.decay_style != "constant" and self.warmup_iters == self.lr_decay_iters
        if no_decay and steps - 1 > self.warmup_iters:
            raise LRScheduleError(f"warmup covers all lr_decay_iters={self.lr_decay_iters} steps, so the "
                                  f"{self.decay_style} decay has no length, but the run takes {steps} steps; shorten "
                                  f"warmup or lengthen lr_decay_iters")

    def lr_for(self, num_iters: int) -> float:
        """The rate after ``num_iters`` applied optimizer steps (GPT-NeoX ``get_lr``)."""
        w = self.warmup_iters
        if w > 0 and num_iters <= w:
            return float(self.max_lr) * max(1, num_iters) / w
        t = num_iters - w
        span = self.lr_decay_iters - w
        style = self.decay_style
        if style == "linear":
            lr = self.max_lr * (span - t) / span
        elif style == "cosine":
            lr = self.min_lr + (self.max_lr - self.min_lr) / 2.0 * (math.cos(math.pi * t / span) + 1)
        elif style == "exponential":
            lr = self.max_lr * math.exp(-0.693 * t / span)
        elif style == "wsd":
            lr = self._wsd(t, span)
        else:
            lr = self.max_lr
        return max(lr, self.min_lr)

    def _wsd(self, t: float, span: float) -> float:
        decay_len = self.wsd_decay_fraction * span
        into = t - (span - decay_len)
        if into <= 0:
            return self.max_lr
        if into >= decay_len:
            return self.min_lr
        p = into / decay_len
        shape = {"linear": 1.0 - p, "cosine": (1.0 + math.cos(math.pi * p)) / 2.0, "1-sqrt": 1.0 - math.sqrt(p)}
        return self.min_lr + (self.max_lr - self.min_lr) * shape[self.wsd_decay_style]

    def lr_at(self, iteration: int) -> float:
        """The rate of the optimizer step of 1-based ``iteration`` when no earlier step was skipped."""
        return self.lr_for(iteration - 1)

    def apply(self, param_groups: Iterable[dict]) -> float:
        """Set ``param_groups`` to the rate of the next step (``lr_for(num_iters)``, times a group's ``lr_scale``)."""
        lr = self.lr_for(self.num_iters)
        for group in param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def advance(self) -> None:
        """One optimizer step was applied (call it only then: a skipped fp16 step leaves the schedule where it is)."""
        self.num_iters += 1

    def step(self, iteration: int, param_groups: Iterable[dict]) -> float:
        """Set the rate of 1-based ``iteration`` assuming no skipped steps (``num_iters = iteration - 1``)."""
        self.num_iters = iteration - 1
        return self.apply(param_groups)

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"start_lr": self.max_lr, "warmup_iter": self.warmup_iters, "num_iters": self.num_iters,
                "decay_style": self.decay_style, "end_iter": self.lr_decay_iters, "min_lr": self.min_lr,
                "wsd_decay_fraction": self.wsd_decay_fraction, "wsd_decay_style": self.wsd_decay_style}

    def load_state_dict(self, state: dict[str, Any], *, override: bool = False, use_checkpoint: bool = False) -> None:
        """Resume: ``num_iters`` from ``state``; the shape by GPT-NeoX's rule (see the module docstring). Raises
        LRScheduleError naming every differing value when neither flag is set and config and checkpoint differ."""
        if override and use_checkpoint:
            raise LRScheduleError("override_lr_scheduler and use_checkpoint_lr_scheduler are both set")
        saved = _saved_values(state)
        fields = [("lr", "max_lr"), ("min_lr", "min_lr"), ("warmup_iters", "warmup_iters"),
                  ("lr_decay_iters", "lr_decay_iters"), ("lr_decay_style", "decay_style")]
        if "wsd" in (self.decay_style, saved.get("decay_style")):
            fields += [("wsd_decay_fraction", "wsd_decay_fraction"), ("wsd_decay_style", "wsd_decay_style")]
        if not override:
            differing = [(key, saved[attr], getattr(self, attr)) for key, attr in fields
                         if attr in saved and saved[attr] != getattr(self, attr)]
            if differing and not use_checkpoint:
                shown = ", ".join(f"{key} {old!r} (checkpoint) vs {new!r} (config)" for key, old, new in differing)
                raise LRScheduleError(f"the checkpoint's learning-rate schedule differs from the config: {shown}; set "
                                      f"override_lr_scheduler to use the config's values or "
                                      f"use_checkpoint_lr_scheduler to keep the checkpoint's")
            for _, attr in fields:
                if attr in saved:
                    setattr(self, attr, saved[attr])
            self.__post_init__()
        self.num_iters = int(saved["num_iters"])


def _saved_values(state: dict[str, Any]) -> dict[str, Any]:
    """A schedule state dict (GPT-NeoX names, or this project's earlier ones) by attribute name."""
    names = {"start_lr": "max_lr", "max_lr": "max_lr", "warmup_iter": "warmup_iters", "warmup_iters": "warmup_iters",
             "end_iter": "lr_decay_iters", "lr_decay_iters": "lr_decay_iters", "decay_style": "decay_style",
             "min_lr": "min_lr", "wsd_decay_fraction": "wsd_decay_fraction", "wsd_decay_style": "wsd_decay_style",
             "num_iters": "num_iters", "iteration": "num_iters"}
    out = {names[k]: v for k, v in state.items() if k in names}
    if "num_iters" not in out:
        raise LRScheduleError(f"learning-rate schedule state without a step count: {sorted(state)}")
    return out
