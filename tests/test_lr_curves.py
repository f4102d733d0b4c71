"""Tests for clrlab.lr_curves: smoothing, the divergence stop and fastai's suggestions, on synthetic curves.

The loss model is ``base - drop * sigmoid((x - x_s) / w) + exp((x - x_d) / v)`` with ``x = log10(lr)``:
its steepest descent against ``ln lr`` is at ``lr = 10**x_s`` (the blow-up term is ~1e-7 there) and its
minimum is found on a dense analytic grid, independently of the code under test. Noise is seeded.
"""

from __future__ import annotations

import doctest
import math
from collections.abc import Sequence

import numpy as np
import pytest

from clrlab import lr_curves as lc
from clrlab import lr_suggest
from helpers_curves import GRIDS, LIN_CURVE, LIN_LRS, loss_curve, noisy, true_minimum


def log_step(lrs, lr):
    """The sweep's spacing in ln(lr) around ``lr``."""
    i = min(int(np.searchsorted(lrs, lr)), lrs.size - 1)
    return float(np.log(lrs[i] / lrs[i - 1]))


# ----------------------------------------------------------------------------------------------
# Smoothing, non-finite values, divergence.
# ----------------------------------------------------------------------------------------------


def test_ema_seeded_matches_the_recurrence():
    x = noisy(np.zeros(50), 1.0, 0)
    f = 0.05
    want = [x[0]]
    for v in x[1:]:
        want.append(f * v + (1 - f) * want[-1])
    np.testing.assert_allclose(lc.smooth(x, "ema_seeded", beta=0.95), want, rtol=1e-12)


def test_ema_debiased_matches_the_closed_form_and_has_no_zero_pull():
    x = noisy(np.full(60, 3.0), 0.5, 1)
    beta = 0.9
    t = np.arange(x.size)
    weights = (1 - beta) * beta ** (t[:, None] - t[None, :]) * (t[None, :] <= t[:, None])
    want = (weights @ x) / (1 - beta ** (t + 1))
    np.testing.assert_allclose(lc.smooth(x, "ema_debiased", beta=beta), want, rtol=1e-12)
    np.testing.assert_allclose(lc.smooth(np.full(30, 7.0)), 7.0, rtol=1e-12)


def test_smooth_none_copies_and_rejects_bad_arguments():
    x = np.array([1.0, 2.0, 3.0])
    out = lc.smooth(x, "none")
    np.testing.assert_array_equal(out, x)
    assert out is not x
    assert lc.SMOOTHERS == ("none", "ema_seeded", "ema_debiased")
    with pytest.raises(ValueError, match="method"):
        lc.smooth(x, "gaussian")
    with pytest.raises(ValueError, match="beta"):
        lc.smooth(x, beta=1.0)


def test_first_nonfinite():
    assert lc.first_nonfinite([1.0, 2.0]) is None
    assert lc.first_nonfinite([1.0, np.inf, np.nan]) == 1
    assert lc.first_nonfinite([np.nan]) == 0
    assert lc.first_nonfinite([]) is None


def test_divergence_ratio_rule_skip_and_nonfinite():
    s = [1.0, 0.5, 0.6, 1.9, 2.1, 1.0]  # 2.1 > 4 * 0.5 at index 4; 1.9 is not.
    assert lc.divergence_index(s, skip=1) == 4
    assert lc.divergence_index(s, factor=5.0, skip=1) is None
    assert lc.divergence_index([0.5, 9.0, 9.0, 9.0], skip=2) == 2  # Skipped points are not tested...
    assert lc.divergence_index([9.0, 0.5, 1.0, 3.0], skip=2) == 3  # ...but do count for best.
    assert lc.divergence_index([1.0, 0.9, np.nan, 100.0], skip=5) == 2  # NaN stops even in skip.
    assert lc.divergence_index([1.0, 0.9, 0.8]) is None


def test_divergence_with_negative_losses_uses_the_gap_rule():
    s = np.array([-10.0, -10.2, -10.5, -9.0, 0.0, 10.0, 21.0, 25.0, 30.0])
    # The naive ratio test s > 4 * best fires at the first tested index for negative losses.
    naive = next(t for t in range(1, s.size) if s[t] > 4 * s[:t + 1].min())
    assert naive == 1
    # Gap rule: first t with s_t - best > 3 * |best| = 31.5, i.e. s_t > 21.
    assert lc.divergence_index(s, skip=1) == 7


# ----------------------------------------------------------------------------------------------
# Loss suggestions on curves with known answers.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lrs,curve", GRIDS)
def test_steep_is_the_steepest_point_against_ln_lr(lrs, curve):
    losses = loss_curve(lrs, **curve)
    truth = 10 ** curve["x_s"]
    got = lc.suggest_steep(lrs, losses)
    # Clean: the left end of the steepest segment, at most two sweep steps from the truth.
    assert abs(math.log(got / truth)) <= 2 * log_step(lrs, truth) + 1e-12
    for seed in range(3):  # Noisy (sigma = 0.002, 0.1% of the loss drop): within a factor 1.5.
        got = lc.suggest_steep(lrs, noisy(losses, 0.002, seed))
        assert truth / 1.5 < got < truth * 1.5


def test_steep_differentiates_against_ln_lr_not_the_index():
    # On a linear sweep the index-based (np.gradient) answer is ~10% low: outside the tolerance above.
    losses = loss_curve(LIN_LRS, **LIN_CURVE)
    truth = 10 ** LIN_CURVE["x_s"]
    by_index = LIN_LRS[np.argmin(np.diff(losses))]
    assert abs(math.log(by_index / truth)) > 5 * log_step(LIN_LRS, truth)


@pytest.mark.parametrize("lrs,curve", GRIDS)
def test_minimum_is_a_tenth_of_the_minimum(lrs, curve):
    losses = loss_curve(lrs, **curve)
    truth = true_minimum(lrs, curve)
    got = lc.suggest_minimum(lrs, losses) * 10
    assert abs(math.log(got / truth)) <= log_step(lrs, truth) + 1e-12
    for seed in range(3):  # Noisy: the flat bottom blurs the argmin; within a factor 1.5.
        got = lc.suggest_minimum(lrs, noisy(losses, 0.002, seed)) * 10
        assert truth / 1.5 < got < truth * 1.5
    assert lc.suggest_minimum(lrs, losses, divisor=4.0) == pytest.approx(
        lc.suggest_minimum(lrs, losses) * 10 / 4)


@pytest.mark.parametrize("lrs,curve", GRIDS)
def test_valley(lrs, curve):
    losses = loss_curve(lrs, **curve)
    # Clean: the loss falls strictly from index 0 to its minimum m, so L_m = m + 1, start = -1 and the
    # valley is index -1 + int((m + 1) / 3) + int((m + 1) / 6).
    m = int(np.argmin(losses))
    assert np.all(np.diff(losses[:m + 1]) < 0)
    assert lc.suggest_valley(lrs, losses) == lrs[-1 + int((m + 1) / 3) + int((m + 1) / 6)]
    # Noisy: the flat start no longer forms a long decreasing run, so the valley moves into the
    # descent, within two sigmoid widths of its middle.
    lo, hi = 10 ** (curve["x_s"] - 2 * curve["w"]), 10 ** (curve["x_s"] + 2 * curve["w"])
    for seed in range(3):
        assert lo < lc.suggest_valley(lrs, noisy(losses, 0.002, seed)) < hi


def test_valley_small_cases():
    lrs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert lc.suggest_valley(lrs, [1, 2, 3, 4, 5]) == 1.0  # Nothing beats index 0.
    # A two-point valley at the start: fastai's index is -1 (the last LR); we clamp to the first.
    assert lc.suggest_valley(lrs, [2, 1, 3, 4, 5]) == 1.0
    assert lc.suggest_valley([1.0], [3.0]) == 1.0


def lds_lengths_quadratic(losses: Sequence[float]) -> list[int]:
    """O(n^2) reference for `lr_curves._lds_lengths`: the double loop of fastai's `valley`
    (fastai/callback/schedule.py)."""
    n = len(losses)
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
    return lds


def valley_quadratic(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """O(n^2) reference for `lr_curves.suggest_valley`: fastai's `valley` loop, plus the clamp to index 0."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    idx = max(max_start + int(sections) + int(sections / 2), 0)
    return float(lrs[idx])


def test_valley_patience_sorting_equals_the_quadratic_oracle():
    rng = np.random.default_rng(0)
    cases = []
    for _ in range(1500):
        cases.append(rng.normal(size=int(rng.integers(1, 40))))
    for _ in range(1500):  # Heavy ties: strictness matters.
        cases.append(rng.integers(0, 4, size=int(rng.integers(1, 40))).astype(float))
    for _ in range(10):
        n = 300
        trend = np.linspace(3, 0, n) + np.where(np.arange(n) > 200, np.linspace(0, 5, n), 0)
        cases.append(np.round(trend + rng.normal(0, 0.3, n), 1))
    cases += [np.zeros(7), np.arange(9.0), np.arange(9.0)[::-1]]
    for losses in cases:
        lrs = np.geomspace(1e-4, 1.0, losses.size) if losses.size > 1 else np.array([1e-3])
        assert lc._lds_lengths(losses).tolist() == lds_lengths_quadratic(losses.tolist())
        assert lc.suggest_valley(lrs, losses) == valley_quadratic(lrs, losses.tolist())


def test_slide_finds_where_the_gradient_stops_changing():
    # Linear descent (gradient -0.01) up to index K, then curving up (gradient +0.004 per step): the
    # window slides left until r = K + 1, and the candidate is lr[K + 1 - lr_diff + 1].
    n, k = 120, 70
    i = np.arange(n, dtype=float)
    losses = 2.0 - 0.01 * i + 0.002 * np.maximum(i - k, 0) ** 2
    lrs = np.geomspace(1e-5, 1.0, n)
    assert lc.suggest_slide(lrs, losses) == lrs[k - 13]
    assert lc.suggest_slide(lrs, losses, adjust=0.5) == lrs[k - 13] * 0.5
    with pytest.raises(ValueError, match="at least 16"):
        lc.suggest_slide(lrs[:15], losses[:15])


@pytest.mark.parametrize("fn", [lc.suggest_steep, lc.suggest_minimum, lc.suggest_valley])
def test_suggestions_reject_invalid_curves(fn):
    with pytest.raises(ValueError, match="same length"):
        fn([1e-3, 1e-2], [1.0])
    with pytest.raises(ValueError, match="> 0"):
        fn([0.0, 1e-2], [1.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        fn([1e-2, 1e-3], [1.0, 0.5])
    with pytest.raises(ValueError, match="finite"):
        fn([1e-3, 1e-2], [1.0, np.nan])




def test_lr_suggest_re_exports_the_curve_functions():
    for name in lc.__all__:
        assert getattr(lr_suggest, name) is getattr(lc, name), name
        assert name in lr_suggest.__all__, name


def test_docstring_examples():
    result = doctest.testmod(lc, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
