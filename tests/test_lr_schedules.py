"""LR schedule values at chosen iterations (GPT-NeoX AnnealingLR semantics, 1-indexed iterations)."""

from __future__ import annotations

import math

import pytest

from megatron.training.lr_schedules import AnnealingLR, LRScheduleError, resolve_warmup_iters


def test_warmup_is_linear_from_the_first_step():
    s = AnnealingLR(max_lr=6e-4, warmup_iters=1430, lr_decay_iters=143000, decay_style="cosine", min_lr=6e-5)
    # the reference Pythia-160M log shows 4.196e-6 at iteration 10 (and +4.196e-6 per 10 iterations)
    assert s.lr_at(10) == pytest.approx(4.1958e-6, rel=1e-4)
    assert s.lr_at(20) == pytest.approx(2 * s.lr_at(10))
    assert s.lr_at(1430) == pytest.approx(6e-4)
    assert s.lr_at(0) == 0.0


def test_cosine_midpoint_end_and_floor():
    s = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=110, decay_style="cosine", min_lr=0.1)
    assert s.lr_at(10) == 1.0
    assert s.lr_at(60) == pytest.approx(0.55)           # halfway through decay: (max + min) / 2
    assert s.lr_at(35) == pytest.approx(0.1 + 0.9 / 2 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)           # stays at the floor, never rises again


def test_linear_decay_is_clipped_at_min_lr():
    s = AnnealingLR(max_lr=1.0, warmup_iters=0, lr_decay_iters=100, decay_style="linear", min_lr=0.2)
    assert s.lr_at(1) == pytest.approx(0.99)
    assert s.lr_at(50) == pytest.approx(0.5)
    assert s.lr_at(79) == pytest.approx(0.21)
    assert s.lr_at(90) == pytest.approx(0.2)            # 0.1 computed, floored at min_lr
    assert s.lr_at(1000) == pytest.approx(0.2)


def test_constant_with_warmup():
    s = AnnealingLR(max_lr=3e-4, warmup_iters=4, lr_decay_iters=10, decay_style="constant", min_lr=0.0)
    assert [s.lr_at(i) for i in (1, 2, 4, 5, 99)] == pytest.approx([7.5e-5, 1.5e-4, 3e-4, 3e-4, 3e-4])


def test_step_sets_param_groups_and_state_roundtrip():
    s = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=20, decay_style="linear")
    groups = [{"lr": 0.0}, {"lr": 0.0, "lr_scale": 0.5}]
    assert s.step(5, groups) == pytest.approx(0.5)
    assert [g["lr"] for g in groups] == pytest.approx([0.5, 0.25])
    other = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=20, decay_style="linear")
    other.load_state_dict(s.state_dict())
    assert other.iteration == 5


def test_warmup_fraction_or_iterations():
    assert resolve_warmup_iters(0.01, 143000) == 1430
    assert resolve_warmup_iters(50, 1000) == 50
    assert resolve_warmup_iters(None, 1000) == 0


def test_warmup_fraction_rounds_like_config_validation():
    from megatron.config.derived import warmup_iters

    # halves round up (GPT-NeoX's truncation gave 0 and 2 here); the schedule and the validated config agree
    assert resolve_warmup_iters(0.5, 1) == 1 == warmup_iters(0.5, 1)
    assert resolve_warmup_iters(0.25, 10) == 3 == warmup_iters(0.25, 10)
    assert resolve_warmup_iters(0.299, 10) == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_style="exponential"), "lr_decay_style"),
    (dict(min_lr=2.0), "min_lr"),
    (dict(warmup_iters=200), "lr_decay_iters"),
])
def test_bad_parameters_are_rejected(kwargs, match):
    base = dict(max_lr=1.0, warmup_iters=10, lr_decay_iters=100, decay_style="cosine", min_lr=0.0)
    base.update(kwargs)
    with pytest.raises(LRScheduleError, match=match):
        AnnealingLR(**base)
