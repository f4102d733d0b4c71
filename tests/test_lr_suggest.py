"""Tests for clrlab.lr_suggest: pure numpy, synthetic curves with answers known in closed form.

The loss model is ``base - drop * sigmoid((x - x_s) / w) + exp((x - x_d) / v)`` with ``x = log10(lr)``:
its steepest descent against ``ln lr`` is at ``lr = 10**x_s`` (the blow-up term is ~1e-7 there) and its
minimum is found on a dense analytic grid, independently of the code under test. Noise is seeded.
"""

from __future__ import annotations

import dataclasses
import doctest
import json
import math
import pathlib

import numpy as np
import pytest

from clrlab import lr_suggest as ls
from helpers_curves import EXP_CURVE, EXP_LRS, GRIDS, loss_curve, noisy, true_minimum

# ----------------------------------------------------------------------------------------------
# Negative losses through recommend (the curve functions: tests/test_lr_curves.py).
# ----------------------------------------------------------------------------------------------


def test_negative_losses_give_the_same_result_as_the_positive_curve():
    # The rule is relative to |best| by design, so it is shift-invariant only for a blow-up that crosses
    # both thresholds in one step: a real explosion (here 1e6 at index 150).
    losses = noisy(loss_curve(EXP_LRS, **EXP_CURVE), 0.01, 2)
    losses[150:] = 1e6
    pos = ls.recommend(EXP_LRS, losses)
    neg = ls.recommend(EXP_LRS, losses - 10.0)
    assert float(np.max(losses[:150] - 10.0)) < 0
    assert pos.stop_index == neg.stop_index == 150 and pos.reason == neg.reason == "diverged"
    assert pos.suggestions == pytest.approx(neg.suggestions, rel=1e-12)
    assert (pos.base_lr, pos.max_lr, pos.rule) == pytest.approx((neg.base_lr, neg.max_lr, neg.rule))
    np.testing.assert_allclose(np.array(neg.loss_smooth) + 10.0, pos.loss_smooth, rtol=1e-12)


# ----------------------------------------------------------------------------------------------
# Zero-lag trend and noise.
# ----------------------------------------------------------------------------------------------


def test_trend_is_centred_and_has_no_lag():
    x = np.arange(200, dtype=float)
    v = (x - 120.0) ** 2  # a parabola: a centred mean keeps its minimum where it is
    t = ls.trend(v, 21)
    assert int(np.argmin(t)) == 120
    causal = ls.smooth(v, "ema_debiased", 0.9)
    assert int(np.argmin(causal)) > 125  # the causal EMA lags toward later steps
    assert ls.default_window(200) == 19 and ls.default_window(30) == 5
    rng = np.random.default_rng(0)
    values = np.linspace(0, 1, 2000) + rng.normal(0, 0.05, 2000)
    assert ls.batch_noise(values, ls.trend(values)) == pytest.approx(0.05, rel=0.1)


# ----------------------------------------------------------------------------------------------
# Smith's accuracy rule.
# ----------------------------------------------------------------------------------------------

ACC_LRS = np.linspace(5e-4, 0.02, 400)
ACC_STEP = float(ACC_LRS[1] - ACC_LRS[0])
LOG_LRS = np.geomspace(1e-4, 1.0, 200)
LOG_C, LOG_W = -2.5, 0.09  # logistic rise in log10(lr): 10% at -2.698, 98% at -2.150 (3.5x apart)


def log_accuracy(lrs, fall_at=-1.0):
    x = np.log10(lrs)
    rise = 0.1 + 0.8 / (1.0 + np.exp(-(x - LOG_C) / LOG_W))
    return rise - 0.7 * np.clip((x - fall_at) / 0.5, 0.0, 1.0)


def test_accuracy_rule_finds_where_the_accuracy_starts_and_stops_rising():
    # 10% and 98% of the rise; the 19-point centred mean (0.38 decades) widens the rise by up to half a window.
    base_true = 10 ** (LOG_C - LOG_W * math.log(9))
    max_true = 10 ** (LOG_C + LOG_W * math.log(49))
    step = math.log(LOG_LRS[1] / LOG_LRS[0])
    for seed in range(4):
        got = ls.suggest_from_accuracy(LOG_LRS, noisy(log_accuracy(LOG_LRS), 0.03, seed), sweep="exponential")
        assert got.max_rule == "accuracy_plateau" and got.warnings == ()
        assert -10 * step <= math.log(got.max_lr / max_true) <= 10 * step
        assert got.max_lr == LOG_LRS[got.max_index]
        # The rise starts 3.5x below its end: base is read off the curve, or clamped to max/4 when the
        # smoothing stretched the rise past 4x.
        if got.base_rule == "accuracy_rise":
            assert abs(math.log(got.base_lr / base_true)) <= 10 * step and got.base_lr == LOG_LRS[got.base_index]
        else:
            assert got.base_rule.startswith("max_lr/4 (clamp") and got.base_lr == pytest.approx(got.max_lr / 4)
        assert 3 <= got.max_lr / got.base_lr <= 4 + 1e-9


def test_accuracy_rule_reports_raggedness():
    # The noise grows 5x from lr = 10**-2.4, half-way up the rise and before it stops.
    sigma = np.where(np.log10(LOG_LRS) > -2.4, 0.15, 0.03)
    for seed in range(3):
        acc = log_accuracy(LOG_LRS) + np.random.default_rng(seed).normal(size=LOG_LRS.size) * sigma
        got = ls.suggest_from_accuracy(LOG_LRS, acc, sweep="exponential")
        assert got.max_rule == "accuracy_ragged"
        assert 10 ** -2.6 <= got.max_lr <= 10 ** -2.2  # within half a window (0.19 decades) of the change


def test_accuracy_rule_stops_before_a_sharp_fall():
    # A linear climb that collapses at its top: the rise never levels off, the fall is the signal.
    acc = np.interp(np.log10(LOG_LRS), [-4, -3, -2, -1.9, 0], [0.1, 0.1, 0.9, 0.1, 0.1])
    for seed in range(3):
        got = ls.suggest_from_accuracy(LOG_LRS, noisy(acc, 0.03, seed), sweep="exponential")
        assert got.max_rule in ("accuracy_plateau", "accuracy_falls")
        assert 10 ** -2.3 <= got.max_lr <= 10 ** -1.95  # at or just below the top, never past it


def test_a_rise_within_3x_falls_back_to_max_over_3_with_a_warning():
    # Smith-style linear sweep, a narrow logistic rise: it starts only ~2x below where it stops.
    acc = 0.1 + 0.7 / (1.0 + np.exp(-(ACC_LRS - 0.006) / 0.0008))
    for seed in range(3):
        got = ls.suggest_from_accuracy(ACC_LRS, noisy(acc, 0.02, seed))
        assert got.max_rule == "accuracy_plateau" and abs(got.max_lr - 0.0091) <= 20 * ACC_STEP  # half a window
        assert got.base_rule.startswith("max_lr/3 (fallback") and got.base_index is None
        assert got.base_lr == pytest.approx(got.max_lr / 3)
        assert len(got.warnings) == 1 and "below max_lr" in got.warnings[0] and ">= 3" in got.warnings[0]


def test_a_rise_far_below_max_is_clamped_to_max_over_4():
    wide = 0.1 + 0.8 / (1.0 + np.exp(-(np.log10(LOG_LRS) + 2.0) / 0.3))  # 10% to 98%: 1.8 decades
    got = ls.suggest_from_accuracy(LOG_LRS, wide, sweep="exponential")
    assert got.base_rule.startswith("max_lr/4 (clamp") and got.base_lr == pytest.approx(got.max_lr / 4)
    assert got.warnings == ()


def test_accuracy_rule_warns_when_the_sweep_starts_mid_rise():
    lrs = LOG_LRS[LOG_LRS > 10 ** -2.6]
    for seed in range(3):
        got = ls.suggest_from_accuracy(lrs, noisy(log_accuracy(lrs), 0.02, seed), sweep="exponential")
        assert got.base_rule.startswith("max_lr/3") and got.base_lr == pytest.approx(got.max_lr / 3)
        assert any("already rises at the start" in w for w in got.warnings)


def test_accuracy_rule_without_a_rise_above_the_noise():
    for seed in range(3):
        got = ls.suggest_from_accuracy(ACC_LRS, noisy(np.full(ACC_LRS.size, 0.1), 0.05, seed))
        assert (got.base_lr, got.max_lr, got.max_rule) == (None, None, "no_accuracy_rise")
        assert "batch noise" in got.warnings[0]


def test_accuracy_rule_validates_its_arguments():
    acc = log_accuracy(LOG_LRS)
    with pytest.raises(ValueError, match="at least 10"):
        ls.suggest_from_accuracy(LOG_LRS[:5], acc[:5])
    with pytest.raises(ValueError, match="`plateau`"):
        ls.suggest_from_accuracy(LOG_LRS, acc, plateau=1.5)
    with pytest.raises(ValueError, match="sweep"):
        ls.suggest_from_accuracy(LOG_LRS, acc, sweep="cosine")


# ----------------------------------------------------------------------------------------------
# The loss rule and recommend() on recorded curves.
# ----------------------------------------------------------------------------------------------

ISSUE_CURVES = np.load(pathlib.Path(__file__).parent / "data" / "range_test_issue_curves.npz")
ISSUE_CASES = sorted({k.rsplit("_", 1)[0] for k in ISSUE_CURVES.files})


@pytest.mark.parametrize("lrs,curve", GRIDS)
def true_bottom_start(lrs, curve, frac=0.02):
    """The first LR where the noiseless loss comes within ``frac`` of its drop of its minimum (dense grid)."""
    dense = np.geomspace(lrs[0], lrs[-1], 1_000_001)
    values = loss_curve(dense, **curve)
    i_min = int(np.argmin(values))
    bound = values[i_min] + frac * (values[0] - values[i_min])
    return float(dense[int(np.flatnonzero(values[:i_min + 1] <= bound)[0])])


@pytest.mark.parametrize("lrs,curve", GRIDS)
def test_loss_rule_is_half_the_start_of_the_bottom_with_base_a_third_of_it(lrs, curve):
    # The rule backs off by TOP_BACKOFF = 2 (Smith 2017 sec. 3.3's "within a factor of two of the largest one
    # that converges") from where the loss reaches its bottom (within 2% of its drop, here above the trend's
    # noise), not from the argmin inside it, which the batch noise moves about; nor from the steepest descent,
    # which on the recorded 200-step sweeps lay a decade below the LRs a run trains best with (BENCHMARKS.md).
    start = true_bottom_start(lrs, curve)
    assert start < true_minimum(lrs, curve) / 1.15  # the two readings differ
    for seed in range(3):
        rec = ls.recommend(lrs, noisy(loss_curve(lrs, **curve), 0.05, seed))
        assert rec.max_rule == "loss_minimum/2 (no accuracy recorded)" and rec.base_rule == "max_lr/3 (loss rule)"
        assert start / 2 / 1.4 < rec.max_lr < start / 2 * 1.4  # zero lag: no shift toward higher LR
        assert rec.base_lr == pytest.approx(rec.max_lr / 3)
        assert rec.suggestions["loss_max"] == rec.max_lr and rec.warnings == ()
        got = ls.suggest_from_loss(lrs, noisy(loss_curve(lrs, **curve), 0.05, seed))
        assert got.top_lr == pytest.approx(2 * got.max_lr) and got.top_lr == lrs[got.top_index]


def test_a_loss_that_still_falls_at_the_end_of_the_sweep_is_read_with_a_warning():
    lrs = np.geomspace(1e-4, 1e-2, 100)
    rec = ls.recommend(lrs, noisy(loss_curve(lrs, x_s=-2.0, w=0.3, x_d=3.0, v=0.2), 0.01, 0))
    assert rec.max_rule == "loss_minimum/2 (no accuracy recorded)" and rec.max_lr > lrs[-1] / 2 / 1.4
    assert any("still falls at the end of the sweep" in w for w in rec.warnings)


def test_a_flat_curve_recommends_nothing_and_says_so():
    lrs = np.geomspace(1e-4, 1e-2, 100)
    rec = ls.recommend(lrs, noisy(np.full(100, 2.3), 0.05, 0), noisy(np.full(100, 0.1), 0.05, 1))
    assert (rec.base_lr, rec.max_lr) == (None, None)
    assert any("not clearly above the batch noise" in w for w in rec.warnings)
    assert any("no bounds" in w for w in rec.warnings)


def test_a_curve_that_diverges_at_once_recommends_below_the_sweep_start_with_a_warning():
    lrs = np.geomspace(1.0, 100.0, 60)
    losses = noisy(2.3 * np.exp(np.linspace(0, 3, 60)), 0.02, 0)
    rec = ls.recommend(lrs, losses)
    assert rec.stopped_early and rec.reason == "diverged"
    assert rec.max_lr == pytest.approx(lrs[0]) and rec.max_rule.startswith("sweep_start (fallback")
    assert rec.base_lr == pytest.approx(rec.max_lr / 3)
    assert any("rises from the first steps" in w for w in rec.warnings)


def test_a_too_short_sweep_is_read_but_warned_about():
    lrs = np.geomspace(1e-4, 1.0, 12)
    rec = ls.recommend(lrs, loss_curve(lrs, x_s=-2.0, w=0.5, x_d=2.0, v=0.5))
    assert rec.max_lr is not None and rec.max_lr / rec.base_lr >= 3
    assert any("only 12 sweep points" in w for w in rec.warnings)


def test_disagreeing_rules_are_named_in_a_warning_and_the_lower_top_is_used():
    # The accuracy peaks at 10**-1 (it falls from there); the loss bottoms out near 10**-2.3 and blows up after.
    acc = noisy(log_accuracy(LOG_LRS), 0.02, 0)
    losses = noisy(loss_curve(LOG_LRS, x_s=-3.5, w=0.2, x_d=-2.0, v=0.2), 0.02, 1)
    rec = ls.recommend(LOG_LRS, losses, acc)
    loss_top = ls.suggest_from_loss(rec.lrs, rec.loss_raw).top_lr
    acc_top = ls.suggest_from_accuracy(rec.lrs, rec.accuracy, sweep="exponential").top_lr
    assert loss_top * 10 ** 0.5 < acc_top
    assert rec.max_lr == pytest.approx(loss_top / 2) and rec.max_rule == "loss_minimum/2"
    assert any("apart); using the lower, the loss minimum" in w for w in rec.warnings)
    # The other way round: the accuracy's lower top is used.
    late = noisy(loss_curve(LOG_LRS, x_s=-0.8, w=0.1, x_d=0.5, v=0.2), 0.02, 1)  # its bottom starts near 0.4
    rec = ls.recommend(LOG_LRS, late, acc)
    acc_top = ls.suggest_from_accuracy(rec.lrs, rec.accuracy, sweep="exponential").top_lr
    assert rec.max_lr == pytest.approx(acc_top / 2) and rec.max_rule == "accuracy_peak/2"
    assert any("using the lower, the accuracy peak" in w for w in rec.warnings)


def test_an_accuracy_that_stops_rising_where_it_starts_is_no_rise_and_the_loss_rule_takes_over():
    # Recorded: `scripts/range_check.py --setup=mnist1d_cnn_exp` seed 1 (MNIST-1D, 1-D CNN, 1e-4 -> 10 in 200
    # steps). The noisy per-batch accuracy "falls" at the very start; read as a rise it gave max_lr = 1e-4,
    # 3 decades below the loss rule, and a follow-up at chance accuracy.
    curve = np.load(pathlib.Path(__file__).parent / "data" / "range_test_mnist1d_seed1.npz")
    lrs, loss, acc = (curve[k].astype(np.float64) for k in ("lrs", "loss", "acc"))
    got = ls.suggest_from_accuracy(lrs, acc, sweep="exponential")
    assert (got.base_lr, got.max_lr, got.max_rule) == (None, None, "no_accuracy_rise")
    assert got.warnings[0].startswith("accuracy stops rising (accuracy_falls) where it starts to")
    rec = ls.recommend(lrs, loss, acc, sweep="exponential")
    assert rec.max_rule == "loss_minimum/2 (fallback: accuracy does not rise)" and 0.04 < rec.max_lr < 0.15
    assert rec.base_lr == pytest.approx(rec.max_lr / 3) and rec.base_rule == "max_lr/3 (loss rule)"


def test_without_an_accuracy_rise_the_loss_rule_is_a_named_fallback():
    losses = noisy(loss_curve(EXP_LRS, **EXP_CURVE), 0.01, 0)
    rec = ls.recommend(EXP_LRS, losses, noisy(np.full(EXP_LRS.size, 0.1), 0.01, 1))
    assert rec.max_rule == "loss_minimum/2 (fallback: accuracy does not rise)"
    assert rec.suggestions["accuracy_base"] is None and rec.suggestions["accuracy_max"] is None
    assert any("bounds from the loss rule" in w for w in rec.warnings)


@pytest.mark.parametrize("case", ISSUE_CASES)
def test_the_issue_sweeps_give_a_range_of_at_least_3x_that_both_rules_agree_on(case):
    # Recorded on digits: `python -m clrlab.range_finder --sweep=exponential --model=mlp --start_lr=1e-4
    # --end_lr=10 --steps=200 --seed=S` (cmd_*), and the LRRangeTest docstring example (doc_*).
    lrs, loss, acc = (ISSUE_CURVES[f"{case}_{k}"].astype(np.float64) for k in ("lrs", "loss", "acc"))
    rec = ls.recommend(lrs, loss, acc, sweep="exponential")
    assert rec.max_lr / rec.base_lr >= 3 and rec.warnings == ()
    assert rec.max_rule in ("accuracy_peak/2", "loss_minimum/2")  # both tops agree (else a warning)
    assert 0.02 < rec.max_lr < 0.3  # half the top of the accuracy climb, not its foot
    assert 1 / 10 ** 0.5 < rec.max_lr / rec.suggestions["loss_max"] <= 1  # never above the loss rule's


def test_bounds_are_never_under_3x_without_a_warning_on_many_noisy_curves():
    for seed in range(30):
        rng = np.random.default_rng(seed)
        width, centre, sigma = rng.uniform(0.02, 0.4), rng.uniform(-3.5, -1.5), rng.uniform(0.0, 0.1)
        x = np.log10(LOG_LRS)
        acc = noisy(0.1 + 0.8 / (1 + np.exp(-(x - centre) / width)), sigma, seed)
        losses = noisy(loss_curve(LOG_LRS, x_s=centre, w=width, x_d=0.0, v=0.2), sigma, seed + 100)
        rec = ls.recommend(LOG_LRS, losses, acc)
        if rec.max_lr is not None:
            assert rec.max_lr / rec.base_lr >= 3 - 1e-9 or rec.warnings, seed


def test_repeats_average_the_curves_and_report_the_spread():
    runs = [(LOG_LRS, noisy(loss_curve(LOG_LRS, **EXP_CURVE), 0.1, s), noisy(log_accuracy(LOG_LRS), 0.05, s))
            for s in range(3)]
    rec = ls.recommend_repeats(runs, sweep="exponential")
    single = [ls.recommend(*r, sweep="exponential") for r in runs]
    assert rec.spread == {"base_lr": tuple(r.base_lr for r in single), "max_lr": tuple(r.max_lr for r in single)}
    mean = ls.recommend(LOG_LRS, np.mean([r[1] for r in runs], 0), np.mean([r[2] for r in runs], 0),
                        sweep="exponential")
    assert (rec.base_lr, rec.max_lr) == (mean.base_lr, mean.max_lr)
    # The third sweep's accuracy peaks 1.5 decades lower: its own max_lr (half the lower top) is 4x below.
    shifted = runs[:2] + [(LOG_LRS, runs[2][1], log_accuracy(LOG_LRS * 10 ** 1.5))]
    assert any("sweeps disagree" in w for w in ls.recommend_repeats(shifted, sweep="exponential").warnings)
    with pytest.raises(ValueError, match="same LR grid"):
        ls.recommend_repeats([runs[0], (LOG_LRS * 2, runs[1][1], None)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_recommend_truncates_at_the_first_nonfinite_loss(bad):
    losses = noisy(loss_curve(EXP_LRS, **EXP_CURVE), 0.01, 0)
    losses[120] = bad
    losses[121:] = 1.0
    rec = ls.recommend(EXP_LRS, losses)
    assert (rec.stopped_early, rec.reason, rec.stop_index) == (True, "nonfinite", 120)
    assert len(rec.lrs) == len(rec.loss_raw) == len(rec.loss_smooth) == len(rec.loss_trend) == 120
    assert np.all(np.isfinite(rec.loss_smooth)) and np.all(np.isfinite(rec.loss_trend))
    assert sorted(rec.suggestions) == ["loss_base", "loss_max", "minimum", "slide", "steep", "valley"]
    assert all(math.isfinite(v) for v in rec.suggestions.values()), rec.suggestions
    json.loads(rec.to_json())


def test_recommend_divergence_before_a_nan_wins():
    losses = loss_curve(EXP_LRS, **EXP_CURVE)
    losses[195] = np.nan
    rec = ls.recommend(EXP_LRS, losses, smoother="none")
    assert rec.reason == "diverged" and rec.stop_index < 195
    assert losses[rec.stop_index] > 4 * losses[:rec.stop_index].min()


def test_recommend_suggestions_are_read_off_the_trimmed_trend():
    losses = loss_curve(EXP_LRS, **EXP_CURVE)
    rec = ls.recommend(EXP_LRS, losses, smoother="none")
    keep = rec.stop_index + 1
    t = ls.trend(losses[:keep])
    window = (EXP_LRS[keep // 10:keep - 5], t[keep // 10:keep - 5])
    assert rec.loss_trend == tuple(t)
    assert {k: rec.suggestions[k] for k in ("steep", "minimum", "valley", "slide")} == {
        "steep": ls.suggest_steep(*window), "minimum": ls.suggest_minimum(*window),
        "valley": ls.suggest_valley(*window), "slide": ls.suggest_slide(*window)}


def test_recommend_with_accuracy_uses_smiths_rule():
    acc = noisy(log_accuracy(LOG_LRS), 0.02, 0)
    losses = 2.3 - 1.5 * (acc - 0.1)  # A loss that mirrors the accuracy and never diverges.
    rec = ls.recommend(LOG_LRS, losses, acc)
    want = ls.suggest_from_accuracy(LOG_LRS, acc, sweep="exponential")
    assert rec.sweep == "exponential" and not rec.stopped_early and rec.reason is None
    # Smith's reading is kept in the suggestions; the bounds back off from the lower of the two tops.
    assert (rec.suggestions["accuracy_base"], rec.suggestions["accuracy_max"]) == (want.base_lr, want.max_lr)
    loss_top = ls.suggest_from_loss(LOG_LRS, losses).top_lr
    assert rec.max_lr == pytest.approx(min(want.top_lr, loss_top) / 2)
    assert want.top_lr == LOG_LRS[int(np.argmax(ls.trend(acc)))]
    assert rec.max_lr / rec.base_lr == pytest.approx(3) or rec.base_rule == "accuracy_rise"
    assert rec.accuracy == tuple(acc) and rec.accuracy_trend == tuple(ls.trend(acc))
    tuned = ls.recommend(LOG_LRS, losses, acc, accuracy_kwargs={"plateau": 0.7})
    assert tuned.suggestions["accuracy_max"] < rec.suggestions["accuracy_max"]


def test_recommend_nan_accuracy_truncates_too():
    acc = log_accuracy(LOG_LRS)
    acc[150] = np.nan
    rec = ls.recommend(LOG_LRS, np.linspace(2.0, 1.0, LOG_LRS.size), acc)
    assert (rec.reason, rec.stop_index, len(rec.accuracy)) == ("nonfinite", 150, 150)


def test_recommend_trims_are_configurable_and_shrink_for_short_sweeps():
    lrs = np.geomspace(1e-4, 1e-1, 60)
    losses = np.linspace(2.0, 1.0, 60) ** 2
    rec = ls.recommend(lrs, losses, skip_start=0, skip_end=0, window=1)
    assert rec.suggestions["minimum"] == pytest.approx(lrs[-1] / 10)
    rec = ls.recommend(lrs, losses, skip_start=20, skip_end=10, window=1)
    assert rec.suggestions["minimum"] == pytest.approx(lrs[-11] / 10)
    short = ls.recommend(lrs[:7], losses[:7], skip_start=4, skip_end=5, window=1)
    assert short.suggestions["minimum"] == pytest.approx(lrs[4] / 10)  # Kept 5 = MIN_POINTS: [0, 5).
    assert short.suggestions["slide"] is None


def test_recommend_validates_inputs():
    lrs = np.geomspace(1e-4, 1.0, 20)
    losses = np.linspace(2.0, 1.0, 20)
    with pytest.raises(ValueError, match=r"same length.*len\(lrs\)=20, len\(losses\)=19"):
        ls.recommend(lrs, losses[:-1])
    with pytest.raises(ValueError, match=r"len\(accuracies\)=3"):
        ls.recommend(lrs, losses, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"> 0.*lrs\[0\]=0\.0"):
        ls.recommend(np.linspace(0.0, 0.1, 20), losses)
    with pytest.raises(ValueError, match="strictly increasing"):
        ls.recommend(lrs[::-1], losses)
    bad = losses.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=r"at least 5 finite losses.*Received: 3 of 20 .*index 3"):
        ls.recommend(lrs, bad)
    with pytest.raises(ValueError, match="sweep"):
        ls.recommend(lrs, losses, sweep="cosine")


def test_sweep_is_inferred_from_the_grid():
    losses = np.linspace(2.0, 1.0, 50)
    assert ls.recommend(np.linspace(1e-3, 1e-2, 50), losses).sweep == "linear"
    assert ls.recommend(np.geomspace(1e-3, 1e-2, 50), losses).sweep == "exponential"
    assert ls.recommend(np.geomspace(1e-3, 1e-2, 50), losses, sweep="linear").sweep == "linear"


def test_to_dict_has_exactly_the_result_fields_and_round_trips():
    acc = noisy(log_accuracy(LOG_LRS), 0.02, 0)
    losses = 2.3 - 1.5 * (acc - 0.1)
    losses[180] = np.nan
    rec = ls.recommend_repeats([(LOG_LRS, losses, acc)] * 2)
    data = rec.to_dict()
    assert list(data) == ["lrs", "loss_raw", "loss_smooth", "accuracy", "suggestions", "base_lr",
                          "max_lr", "rule", "stopped_early", "reason", "stop_index", "sweep", "base_rule",
                          "max_rule", "warnings", "loss_trend", "accuracy_trend", "spread"]
    text = json.dumps(data, allow_nan=False)
    assert ls.Recommendation.from_dict(json.loads(text)) == rec
    assert ls.Recommendation.from_dict(data).to_dict() == data
    with pytest.raises(ValueError, match="lacks fields"):
        ls.Recommendation.from_dict({k: v for k, v in data.items() if k != "rule"})
    old = {k: v for k, v in data.items() if k in list(data)[:12]}  # a file written before base_rule existed
    assert ls.Recommendation.from_dict(old).base_rule == "" and ls.Recommendation.from_dict(old).warnings == ()


def test_to_dict_never_writes_nan_or_inf():
    rec = ls.Recommendation(
        lrs=(1e-3, 1e-2), loss_raw=(1.0, float("nan")), loss_smooth=(1.0, float("inf")),
        accuracy=None, suggestions={"steep": float("nan"), "valley": 1e-3}, base_lr=float("nan"),
        max_lr=1e-2, rule="base: x; max: y", stopped_early=True, reason="nonfinite", stop_index=1,
        sweep="exponential")
    data = json.loads(rec.to_json())
    assert data["loss_raw"] == [1.0, None] and data["loss_smooth"] == [1.0, None]
    assert data["suggestions"] == {"steep": None, "valley": 1e-3} and data["base_lr"] is None
    back = ls.Recommendation.from_dict(data)
    assert math.isnan(back.loss_raw[1]) and back.base_lr is None


def test_every_loss_suggestion_has_a_one_line_explanation():
    assert sorted(ls.SUGGESTION_HELP) == ["minimum", "slide", "steep", "valley"]
    for name, line in ls.SUGGESTION_HELP.items():
        assert line.startswith(f"{name}: ") and "\n" not in line


def test_docstring_examples():
    result = doctest.testmod(ls, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 9 and result.failed == 0  # smooth, divergence, valley: tests/test_lr_curves.py


# ----------------------------------------------------------------------------------------------
# choose_bounds: the sweep's top, backed off by TOP_BACKOFF; base from the rise or max/3.
# ----------------------------------------------------------------------------------------------


def _acc(top, rise, warnings=()):
    return ls.Bounds(0.0, 0.0, "accuracy_rise", "accuracy_plateau", warnings=warnings, top_lr=top, rise_lr=rise)


def _loss(top):
    return ls.Bounds(top / 2 / 3, top / 2, "max_lr/3 (loss rule)", "loss_minimum/2", top_lr=top)


def test_choose_bounds_halves_the_lower_top_and_takes_a_rise_3_to_4x_below():
    base, mx, base_rule, max_rule, warnings = ls.choose_bounds(_acc(0.1, 0.0135), _loss(0.2), n=200, lrs=[1e-4])
    assert (mx, max_rule) == (pytest.approx(0.05), "accuracy_peak/2") and ls.TOP_BACKOFF == 2
    assert (base, base_rule, warnings) == (0.0135, "accuracy_rise", [])
    base, mx, base_rule, max_rule, warnings = ls.choose_bounds(_acc(0.3, 0.0135), _loss(0.2), n=200, lrs=[1e-4])
    assert (mx, max_rule, warnings) == (pytest.approx(0.1), "loss_minimum/2", [])
    assert base == pytest.approx(0.1 / 3) and base_rule == "max_lr/3 (accuracy rise starts 7.41x below max)"


def test_choose_bounds_never_gives_under_3x_without_a_warning_and_names_disagreeing_tops():
    base, mx, base_rule, _, warnings = ls.choose_bounds(_acc(0.1, 0.03), _loss(0.12), n=200, lrs=[1e-4])
    assert mx / base == pytest.approx(3) and base_rule == "max_lr/3 (fallback: rise within 3x of max)"
    assert len(warnings) == 1 and "only 1.7x below max_lr=0.05" in warnings[0] and ">= 3" in warnings[0]
    base, mx, _, max_rule, warnings = ls.choose_bounds(_acc(0.01, 1e-4), _loss(0.2), n=200, lrs=[1e-4])
    assert (mx, max_rule) == (pytest.approx(0.005), "accuracy_peak/2")
    assert len(warnings) == 1 and "(20x apart); using the lower, the accuracy peak" in warnings[0]


def test_choose_bounds_fallbacks_name_themselves():
    no_rise = ls.Bounds(None, None, "no_accuracy_rise", "no_accuracy_rise", warnings=("flat accuracy",))
    base, mx, base_rule, max_rule, warnings = ls.choose_bounds(no_rise, _loss(0.2), n=200, lrs=[1e-4])
    assert (mx, max_rule, base_rule) == (pytest.approx(0.1), "loss_minimum/2 (fallback: accuracy does not rise)",
                                         "max_lr/3 (loss rule)")
    assert warnings == ["flat accuracy", "the accuracy rule found no rise: bounds from the loss rule"]
    # Mid-rise at the sweep start: no rise LR, the warning says so (Smith's ratio warnings are not repeated).
    mid = _acc(0.1, None, warnings=(ls.MID_RISE_WARNING, "accuracy starts rising at ... only 2x below ..."))
    base, mx, base_rule, _, warnings = ls.choose_bounds(mid, _loss(0.2), n=200, lrs=[1e-4])
    assert base == pytest.approx(mx / 3) and base_rule == "max_lr/3 (fallback)" and warnings == [ls.MID_RISE_WARNING]
    # Held-out bounds keep their prefix in the names.
    held = dataclasses.replace(_acc(0.1, 0.0135), base_rule="heldout_accuracy_rise",
                               max_rule="heldout_accuracy_plateau")
    _, _, base_rule, max_rule, _ = ls.choose_bounds(held, _loss(0.2), n=200, lrs=[1e-4])
    assert (base_rule, max_rule) == ("heldout_accuracy_rise", "heldout_accuracy_peak/2")
    rises = ls.Bounds(None, None, "loss_rises_at_once", "loss_rises_at_once")
    got = ls.choose_bounds(None, rises, n=8, lrs=[0.5, 1.0])
    assert got[:4] == (pytest.approx(0.5 / 3), 0.5, "max_lr/3 (fallback)", "sweep_start (fallback: rises at once)")
    assert any("only 8 sweep points" in w for w in got[4])
    flat = ls.Bounds(None, None, "loss_flat", "loss_flat")
    assert ls.choose_bounds(None, flat, n=200, lrs=[1e-4])[:4] == (None, None, "none", "none")


CHECK_CURVES = np.load(pathlib.Path(__file__).parent / "data" / "range_check_curves.npz")
CHECK_CASES = sorted({k.rsplit("_", 1)[0] for k in CHECK_CURVES.files})


@pytest.mark.parametrize("case", CHECK_CASES)
def test_the_recorded_check_sweeps_give_half_the_lower_top(case):
    # Recorded by `scripts/range_check.py --setup=S --seeds=1,2,3` and `--seeds=4,5,6` (BENCHMARKS.md, range-test
    # section): digits MLP (exponential and linear sweeps), digits small CNN and MNIST-1D CNN. The grid put the best
    # max_lr at 0.03-0.3, and 0.17 trains MNIST-1D to 0.49 (seed 6's old reading): the rule lands in between.
    lrs, loss, acc = (CHECK_CURVES[f"{case}_{k}"].astype(np.float64) for k in ("lrs", "loss", "acc"))
    rec = ls.recommend(lrs, loss, acc)
    assert rec.sweep == ("linear" if "_lin_" in case else "exponential")
    n = len(rec.lrs)
    tops = [ls.suggest_from_loss(rec.lrs, rec.loss_raw, skip_start=n // 10, skip_end=5).top_lr]
    acc_rule = ls.suggest_from_accuracy(rec.lrs, rec.accuracy, sweep=rec.sweep)
    if acc_rule.top_lr is not None:
        tops.append(acc_rule.top_lr)
    assert rec.max_lr == pytest.approx(min(tops) / 2) and rec.max_rule.split(" ")[0].endswith("/2")
    assert 0.04 < rec.max_lr < 0.17 and rec.max_lr / rec.base_lr == pytest.approx(3)
    assert rec.max_lr <= rec.suggestions["loss_max"] * (1 + 1e-12)


def test_a_flat_loss_bottom_is_read_at_its_start_not_at_its_noisy_argmin():
    # Recorded: `scripts/range_check.py --setup=mnist1d_cnn_exp --seeds=6` (a fresh seed of the check). The loss
    # trend lies within 0.03 of its bottom from lr 0.1 to 0.35 and its argmin sits at the far end; the accuracy
    # rise is under the noise, so the loss rule alone sets max_lr. Half the argmin (0.174) trained MNIST-1D to 0.49
    # test accuracy over 5 seeds; half the bottom's start (0.078) to 0.94, the grid's best being 0.92.
    lrs, loss, acc = (CHECK_CURVES[f"mnist1d_cnn_exp_6_{k}"].astype(np.float64) for k in ("lrs", "loss", "acc"))
    rec = ls.recommend(lrs, loss, acc)
    assert rec.max_rule == "loss_minimum/2 (fallback: accuracy does not rise)"
    n = len(rec.lrs)
    t = np.array(rec.loss_trend)
    i_min = n // 10 + int(np.argmin(t[n // 10:n - 5]))
    assert rec.lrs[i_min] > 0.3 and 0.06 < rec.max_lr < 0.1
    top = ls.suggest_from_loss(rec.lrs, rec.loss_raw, skip_start=n // 10, skip_end=5)
    assert top.top_lr == pytest.approx(2 * rec.max_lr) and top.top_index < i_min
    assert t[top.top_index] - t[i_min] < 0.03 < 0.15 * (t[0] - t[i_min])  # on the bottom, not above it ...
    assert t[top.top_index - 1] > t[top.top_index]  # ... where the trend still falls into it
