"""clrlab.study_stats: Student-t intervals, iterations-to-target, the bootstrap ratio, group curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from clrlab import study_stats as stats


def test_mean_ci_is_the_student_t_interval():
    x = [0.90, 0.92, 0.94, 0.91, 0.93]
    ci = stats.mean_ci(x)
    # t_{0.975, 4} = 2.7764451 (tables); sd = 0.0158114, so the half-width is 2.7764451 * sd / sqrt(5).
    half = 2.7764451 * 0.015811388 / math.sqrt(5)
    assert ci["n"] == 5
    assert ci["mean"] == pytest.approx(0.92)
    assert ci["std"] == pytest.approx(0.015811388, rel=1e-6)
    assert ci["ci_low"] == pytest.approx(0.92 - half, rel=1e-6)
    assert ci["ci_high"] == pytest.approx(0.92 + half, rel=1e-6)


def test_mean_ci_of_one_and_no_values():
    assert stats.mean_ci([0.5]) == {"n": 1, "mean": 0.5, "std": None, "ci_low": None, "ci_high": None}
    assert stats.mean_ci([]) == {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}


def test_iterations_to_target_is_the_first_epoch_end_reaching_it():
    epochs = {"step": [40, 80, 120, 160], "val_accuracy": [0.5, 0.91, 0.89, 0.95]}
    assert stats.iterations_to_target(epochs, 0.9) == 80
    assert stats.iterations_to_target(epochs, 0.91) == 80  # >= counts
    assert stats.iterations_to_target(epochs, 0.95) == 160
    assert stats.iterations_to_target(epochs, 0.96) is None  # not reached
    assert stats.iterations_to_target({"step": [], "val_accuracy": []}, 0.1) is None


def test_censored_counts_not_reached_at_the_budget():
    np.testing.assert_array_equal(stats.censored([40, None, 120], 8000), [40, 8000, 120])


def test_ratio_ci_percentile_bootstrap():
    group, base = [100, 200, 300], [400, 400, 400]
    r = stats.ratio_ci(group, base)
    assert r["ratio"] == pytest.approx(0.5)
    # Redraws of the group's 3 seeds: the smallest mean is 100 and the largest 300, so the interval lies
    # in [0.25, 0.75] and, with 10000 resamples, strictly inside it around the ratio.
    assert 0.25 <= r["ci_low"] < 0.5 < r["ci_high"] <= 0.75
    assert stats.ratio_ci(group, base) == r  # seeded: the same interval every time
    # Recompute the percentile interval by hand with the same generator.
    rng = np.random.default_rng(stats.BOOTSTRAP_SEED)
    g = np.asarray(group, float)[rng.integers(0, 3, size=(stats.BOOTSTRAP_SAMPLES, 3))].mean(axis=1)
    b = np.asarray(base, float)[rng.integers(0, 3, size=(stats.BOOTSTRAP_SAMPLES, 3))].mean(axis=1)
    low, high = np.quantile(g / b, [0.025, 0.975])
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((low, high))


def test_ratio_ci_without_spread_and_degenerate_inputs():
    r = stats.ratio_ci([80, 80], [160, 160])
    assert (r["ratio"], r["ci_low"], r["ci_high"]) == pytest.approx((0.5, 0.5, 0.5))
    assert stats.ratio_ci([], [1, 2])["ratio"] is None
    assert stats.ratio_ci([1, 2], [0, 0])["ratio"] is None


def test_group_curves_mean_and_sd_over_runs_at_shared_steps():
    h1 = {"epochs": {"step": [4, 8, 12], "val_accuracy": [0.1, 0.2, 0.3]}}
    h2 = {"epochs": {"step": [4, 8], "val_accuracy": [0.3, 0.4]}}  # interrupted early: shorter
    c = stats.group_curves([h1, h2], "val_accuracy")
    assert c["step"] == [4, 8]
    assert c["mean"] == pytest.approx([0.2, 0.3])
    assert c["std"] == pytest.approx([math.sqrt(0.02), math.sqrt(0.02)])
    assert stats.group_curves([], "val_accuracy") is None
