"""bench/growth_training.py: the training-FLOP accounting and the FLOPs-to-reach interpolation."""

from __future__ import annotations

import pytest

from bench.growth_training import cumulative, flops_to_reach, step_flops


def test_two_size_schedule_counts_each_step_at_the_size_in_force():
    # growth after 2 steps: steps 1, 2 at 10 FLOPs/token, steps 3, 4, 5 at 40; 4 tokens per step, × 3 (fwd + bwd)
    per_step = step_flops([2], [10.0, 40.0], tokens_per_step=4, steps=5)
    assert per_step == [120.0, 120.0, 480.0, 480.0, 480.0]
    assert cumulative(per_step) == [0.0, 120.0, 240.0, 720.0, 1200.0, 1680.0]


def test_growth_at_step_zero_and_two_growths():
    assert step_flops([0], [1.0, 2.0], 1, 2) == [6.0, 6.0]  # grown before the first step
    assert step_flops([1, 2], [1.0, 2.0, 5.0], 1, 3) == [3.0, 6.0, 15.0]
    assert step_flops([], [7.0], 2, 2) == [42.0, 42.0]  # no growth: one size throughout


def test_sizes_must_match_the_growths():
    with pytest.raises(ValueError, match="1 growths need 2 sizes, got 1"):
        step_flops([3], [1.0], 1, 5)


def test_flops_to_reach_interpolates_on_the_eval_curve():
    curve = [(0.0, 5.0), (100.0, 3.0), (200.0, 2.0), (300.0, 1.5)]
    assert flops_to_reach(curve, 2.5) == pytest.approx(150.0)  # halfway between 3.0 at 100 and 2.0 at 200
    assert flops_to_reach(curve, 2.0) == pytest.approx(200.0)  # exactly on an evaluation
    assert flops_to_reach(curve, 1.75) == pytest.approx(250.0)
    assert flops_to_reach(curve, 6.0) == 0.0  # the first evaluation already reaches it


def test_flops_to_reach_uses_the_first_crossing_and_says_not_reached():
    bumpy = [(0.0, 4.0), (10.0, 2.0), (20.0, 3.0), (30.0, 1.0)]
    assert flops_to_reach(bumpy, 2.5) == pytest.approx(7.5)
    assert flops_to_reach(bumpy, 0.9) is None
    assert flops_to_reach([(0.0, 5.0), (100.0, 3.0)], 2.99) is None
