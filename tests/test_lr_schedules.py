"""LR schedule values on worked examples: GPT-NeoX's AnnealingLR (step count n = optimizer steps taken, unrounded
warmup, cosine rising past the decay end, exponential), our WSD style, and GPT-NeoX's resume rules."""

from __future__ import annotations

import math

import pytest

from megatron.training.lr_schedules import AnnealingLR, LRScheduleError, resolve_warmup_iters


def test_warmup_uses_the_step_count_with_max_one():
    s = AnnealingLR(max_lr=6e-4, warmup_iters=1430.0, lr_decay_iters=143000, decay_style="cosine", min_lr=6e-5)
    # GPT-NeoX sets lr_for(0) before the first step and lr_for(k) after step k; the Pythia-160M log shows the value
    # set after step 10 at iteration 10: 4.196e-6
    assert s.lr_for(10) == pytest.approx(4.1958e-6, rel=1e-4)
    assert s.lr_for(0) == s.lr_for(1) == pytest.approx(6e-4 / 1430)     # max(1, n): steps 1 and 2 share lr / W
    assert s.lr_at(1) == s.lr_at(2) == s.lr_for(0) and s.lr_at(11) == s.lr_for(10)
    assert s.lr_for(1430) == pytest.approx(6e-4)


def test_fractional_warmup_is_not_rounded():
    # warmup 0.25 of 6 decay steps = 1.5 steps: n = 0 and 1 warm up, n = 2 decays from t = 0.5 of T = 4.5
    s = AnnealingLR(max_lr=1.0, warmup_iters=resolve_warmup_iters(0.25, 6), lr_decay_iters=6, decay_style="cosine",
                    min_lr=0.0)
    assert resolve_warmup_iters(0.25, 6) == 1.5
    assert [s.lr_for(0), s.lr_for(1)] == pytest.approx([1 / 1.5, 1 / 1.5])
    assert s.lr_for(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5 / 4.5)))


def test_cosine_midpoint_end_and_rise_past_the_end():
    s = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=110, decay_style="cosine", min_lr=0.1)
    assert s.lr_for(10) == 1.0
    assert s.lr_for(60) == pytest.approx(0.55)            # halfway through the decay: (max + min) / 2
    assert s.lr_for(35) == pytest.approx(0.1 + 0.9 / 2 * (1 + math.cos(math.pi * 0.25)))
    assert s.lr_for(110) == pytest.approx(0.1)
    assert s.lr_for(160) == pytest.approx(0.55)           # GPT-NeoX's cosine comes back up past lr_decay_iters
    assert s.lr_for(210) == pytest.approx(1.0)


def test_linear_decays_towards_zero_and_is_clipped_at_min_lr():
    s = AnnealingLR(max_lr=1.0, warmup_iters=0, lr_decay_iters=100, decay_style="linear", min_lr=0.2)
    assert s.lr_for(0) == 1.0 and s.lr_for(1) == pytest.approx(0.99)
    assert s.lr_for(50) == pytest.approx(0.5)
    assert s.lr_for(79) == pytest.approx(0.21)
    assert s.lr_for(90) == pytest.approx(0.2)             # 0.1 computed, floored at min_lr
    assert s.lr_for(1000) == pytest.approx(0.2)


def test_exponential_halves_over_the_decay():
    s = AnnealingLR(max_lr=2.0, warmup_iters=10, lr_decay_iters=110, decay_style="exponential", min_lr=0.01)
    assert s.lr_for(10) == 2.0
    assert s.lr_for(110) == pytest.approx(2.0 * math.exp(-0.693)) == pytest.approx(1.0, rel=1e-3)
    assert s.lr_for(60) == pytest.approx(2.0 * math.exp(-0.3465))
    assert s.lr_for(10 ** 6) == pytest.approx(0.01)       # keeps decaying past the end, down to the floor


def test_constant_with_warmup():
    s = AnnealingLR(max_lr=3e-4, warmup_iters=4, lr_decay_iters=10, decay_style="constant", min_lr=0.0)
    assert [s.lr_for(n) for n in (0, 1, 2, 4, 5, 99)] == pytest.approx([7.5e-5, 7.5e-5, 1.5e-4, 3e-4, 3e-4, 3e-4])


@pytest.mark.parametrize("shape, p25", [("linear", 0.75), ("cosine", (1 + math.cos(math.pi / 4)) / 2),
                                        ("1-sqrt", 0.5)])
def test_wsd_holds_then_decays_over_its_fraction(shape, p25):
    # warmup 10, decay end 110: T = 100, the last 20 % (n = 90..110) decay from 1.0 to 0.1
    s = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=110, decay_style="wsd", min_lr=0.1,
                    wsd_decay_fraction=0.2, wsd_decay_style=shape)
    assert s.lr_for(5) == pytest.approx(0.5)
    assert s.lr_for(11) == s.lr_for(90) == 1.0
    assert s.lr_for(95) == pytest.approx(0.1 + 0.9 * p25)
    assert s.lr_for(110) == pytest.approx(0.1) and s.lr_for(500) == pytest.approx(0.1)


def test_apply_and_advance_follow_applied_steps():
    s = AnnealingLR(max_lr=1.0, warmup_iters=10, lr_decay_iters=20, decay_style="linear")
    groups = [{"lr": 0.0}, {"lr": 0.0, "lr_scale": 0.5}]
    assert s.apply(groups) == pytest.approx(0.1) and [g["lr"] for g in groups] == pytest.approx([0.1, 0.05])
    s.advance()
    s.advance()
    assert s.apply(groups) == pytest.approx(0.2)           # a skipped fp16 step is simply not advanced
    assert s.step(5, groups) == pytest.approx(0.4) and s.num_iters == 4


def _sched(**kw):
    base = dict(max_lr=1.0, warmup_iters=10.0, lr_decay_iters=100, decay_style="cosine", min_lr=0.1)
    base.update(kw)
    return AnnealingLR(**base)


def test_resume_keeps_the_step_count_and_refuses_a_changed_schedule():
    saved = _sched()
    saved.num_iters = 37
    state = saved.state_dict()
    assert set(state) >= {"start_lr", "warmup_iter", "num_iters", "decay_style", "end_iter", "min_lr"}
    same = _sched()
    same.load_state_dict(state)
    assert same.num_iters == 37 and same.lr_for(37) == saved.lr_for(37)
    with pytest.raises(LRScheduleError, match=r"lr_decay_iters 100 \(checkpoint\) vs 200 \(config\).*"
                                              r"override_lr_scheduler.*use_checkpoint_lr_scheduler"):
        _sched(lr_decay_iters=200).load_state_dict(state)


def test_override_takes_the_config_and_use_checkpoint_the_checkpoint():
    state = dict(_sched().state_dict(), num_iters=37)
    override = _sched(lr_decay_iters=200, max_lr=2.0)
    override.load_state_dict(state, override=True)
    assert (override.lr_decay_iters, override.max_lr, override.num_iters) == (200, 2.0, 37)
    kept = _sched(lr_decay_iters=200, max_lr=2.0, decay_style="linear")
    kept.load_state_dict(state, use_checkpoint=True)
    assert (kept.lr_decay_iters, kept.max_lr, kept.decay_style, kept.num_iters) == (100, 1.0, "cosine", 37)
    with pytest.raises(LRScheduleError, match="both"):
        kept.load_state_dict(state, override=True, use_checkpoint=True)


def test_earlier_state_format_is_read():
    old = {"max_lr": 1.0, "warmup_iters": 10, "lr_decay_iters": 100, "decay_style": "cosine", "min_lr": 0.1,
           "iteration": 12}
    s = _sched()
    s.load_state_dict(old)
    assert s.num_iters == 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(decay_style="step"), "lr_decay_style"),
    (dict(min_lr=2.0), "min_lr"),
    (dict(warmup_iters=200), "lr_decay_iters"),
    (dict(decay_style="wsd", wsd_decay_fraction=0.0), "wsd_decay_fraction"),
])
def test_bad_parameters_are_rejected(kwargs, match):
    with pytest.raises(LRScheduleError, match=match):
        _sched(**kwargs)


def test_a_run_past_a_decay_of_no_length_is_refused_before_training():
    s = _sched(warmup_iters=100.0)
    s.check_reach(101)                                     # the last step uses n = 100: still warmup
    with pytest.raises(LRScheduleError, match="has no length"):
        s.check_reach(102)
