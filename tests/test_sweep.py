"""clrlab.sweep: the LR range-test engine (options, schedule, recorder and stop rule, held-out merge,
state snapshot). Its custom-loop driver is tested in test_range_sweep.py."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest

from clrlab import data, lr_suggest, schedules
from clrlab.sweep import (
    SWEEP_DEFAULTS,
    RangeTestResult,
    StateSnapshot,
    SweepOptions,
    SweepRecorder,
    sweep_schedule,
)
from conftest import trained_conv_bn_model


def _digits():
    return data.load("digits")


# ---------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("kwargs,match", [
    (dict(sweep="cosine"), "sweep"),
    (dict(start_lr=0.0), "start_lr"),
    (dict(start_lr=float("nan")), "start_lr"),
    (dict(start_lr=1e-3, end_lr=1e-4), "end_lr"),
    (dict(end_lr=float("inf")), "end_lr"),
    (dict(num_steps=5), "num_steps"),
    (dict(num_steps=20.0), "num_steps"),
    (dict(num_steps=True), "num_steps"),
    (dict(eval_every=-1), "eval_every"),
    (dict(smoother="ema"), "smoother"),
    (dict(beta=1.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(divergence_factor=1.0), "divergence_factor"),
    (dict(check_every=0), "check_every"),
])
def test_options_reject_each_bad_argument_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=f"Argument `{match}`"):
        SweepOptions(**kwargs)


def test_options_hold_plain_numbers_and_accept_an_infinite_divergence_factor():
    options = SweepOptions(start_lr=np.float32(1e-3), end_lr=1, num_steps=np.int64(20), divergence_factor=math.inf)
    assert type(options.start_lr) is float and type(options.end_lr) is float and type(options.num_steps) is int
    assert options.divergence_factor == math.inf


@pytest.mark.parametrize("sweep,cls", [("linear", schedules.LinearSweep), ("exponential", schedules.ExponentialSweep)])
def test_sweep_schedule_is_the_named_sweep_from_start_to_end(sweep, cls):
    defaults = SWEEP_DEFAULTS[sweep]
    schedule = sweep_schedule(SweepOptions(sweep=sweep, start_lr=defaults["start_lr"], end_lr=defaults["end_lr"],
                                           num_steps=50))
    assert type(schedule) is cls
    np.testing.assert_allclose([float(schedule(0)), float(schedule(49))], [defaults["start_lr"], defaults["end_lr"]],
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------- recorder
def test_recorder_chunks_end_at_the_next_evaluation_and_at_the_last_step():
    recorder = SweepRecorder(SweepOptions(num_steps=23, check_every=10, eval_every=7))
    chunks = []
    while not recorder.done:
        n = recorder.next_chunk()
        chunks.append(n)
        recorder.record([1e-3] * n, [1.0] * n, evaluate=lambda: 0.5)
    assert chunks == [7, 7, 7, 2] and recorder.stop_reason == "num_steps" and recorder.steps == 23
    assert recorder.eval_steps == [6, 13, 20] and recorder.eval_accuracies == [0.5, 0.5, 0.5]


def test_recorder_stops_at_once_on_a_non_finite_loss_without_evaluating():
    recorder = SweepRecorder(SweepOptions(num_steps=40, eval_every=8))
    calls = []

    def evaluate():
        calls.append(recorder.steps)
        return 0.5

    lrs = [1e-3 * k for k in range(1, 10)]
    assert recorder.record(lrs[:7], [1.0] * 7, [0.1] * 7, evaluate=evaluate) is None
    # Step 7 is NaN; an evaluation is due after it (8 steps) but the sweep stops first.
    assert recorder.record(lrs[7:8], [float("nan")], [0.1], evaluate=evaluate) == "nonfinite"
    assert calls == [] and recorder.eval_steps == [] and recorder.steps == 8
    with pytest.raises(RuntimeError, match="stopped"):
        recorder.record(lrs[8:], [1.0], [0.1])
    rec = recorder.result().recommendation  # recommend() truncates at the first non-finite loss
    assert rec.stopped_early and rec.reason == "nonfinite" and rec.stop_index == 7 and len(rec.lrs) == 7


@pytest.mark.parametrize("offset", [0.0, -10.0])
def test_recorder_stops_when_the_smoothed_loss_diverges_sound_for_negative_losses(offset):
    options = SweepOptions(num_steps=200, check_every=1, divergence_factor=4.0, smoother="none")
    recorder = SweepRecorder(options)
    losses = [1.0] * 20 + [1.0 + 0.5 * k for k in range(1, 100)]
    for k, loss in enumerate(losses):
        if recorder.record([1e-3 * (k + 1)], [loss + offset]) is not None:
            break
    assert recorder.stop_reason == "diverged"
    # The lr_suggest rule: stop at the first step where s - best > (k - 1) * max(|best|, eps).
    best = 1.0 + offset
    first = next(i for i, v in enumerate(losses) if (v + offset) - best > 3 * abs(best))
    assert recorder.steps == first + 1
    assert lr_suggest.divergence_index(recorder.losses, 4.0) == first


def test_recorder_refuses_mismatched_series_and_accuracies_on_some_calls_only():
    recorder = SweepRecorder(SweepOptions())
    with pytest.raises(ValueError, match="as many LRs as losses"):
        recorder.record([1e-3, 2e-3], [1.0])
    recorder.record([1e-3], [1.0], [0.5])
    with pytest.raises(ValueError, match="every call or on none"):
        recorder.record([2e-3], [1.0])


def _accuracy_at(lr):
    """Accuracy flat, rising from 0.1 to 0.9 between LR 0.2 and 0.6, then falling: Smith's rule has bounds."""
    return float(np.interp(lr, [0, 0.2, 0.6, 0.8, 1.0], [0.1, 0.1, 0.9, 0.9, 0.2]))


def test_result_merges_held_out_accuracy_into_the_bounds_with_smiths_rule():
    options = SweepOptions(sweep="linear", start_lr=1e-3, end_lr=1.0, num_steps=100, eval_every=10, check_every=10)
    schedule = sweep_schedule(options)
    lrs = [float(schedule(k)) for k in range(100)]
    loss = list(np.linspace(2.3, 1.0, 100))
    recorder = SweepRecorder(options)
    for start in range(0, 100, 10):
        chunk = lrs[start:start + 10]
        recorder.record(chunk, loss[start:start + 10], [0.5] * 10,
                        evaluate=lambda chunk=chunk: _accuracy_at(chunk[-1]))
    result = recorder.result()
    assert isinstance(result, RangeTestResult)
    assert result.eval_steps == tuple(range(9, 100, 10)) and result.eval_lrs == tuple(lrs[9::10])
    bounds = lr_suggest.suggest_from_accuracy(result.eval_lrs, result.eval_accuracies, sweep="linear")
    assert bounds.base_lr is not None and bounds.max_lr is not None
    rec = result.recommendation
    # The held-out accuracy peaks (0.6-0.8) below the loss's minimum (the loss falls to the end): max = its half.
    assert result.max_lr == pytest.approx(bounds.top_lr / 2) and rec.max_rule == "heldout_accuracy_peak/2"
    assert result.base_lr == pytest.approx(result.max_lr / 3) and rec.base_rule.startswith("max_lr/3")
    assert rec.rule == f"base: {rec.base_rule}; max: heldout_accuracy_peak/2"
    assert (rec.suggestions["accuracy_base"], rec.suggestions["accuracy_max"]) == (bounds.base_lr, bounds.max_lr)
    out = result.to_dict()
    assert out["eval"] == {"steps": list(range(9, 100, 10)), "lrs": lrs[9::10],
                           "accuracy": list(result.eval_accuracies)}
    # Without the held-out points the same records give the per-batch recommendation.
    plain = SweepRecorder(dataclasses.replace(options, eval_every=0))
    plain.record(lrs, loss, [0.5] * 100)
    assert "heldout_" not in plain.result().recommendation.rule


def test_result_keeps_the_per_batch_bounds_with_a_logged_warning_when_too_few_evaluations(caplog):
    options = SweepOptions(num_steps=30, eval_every=29, check_every=29)
    recorder = SweepRecorder(options)
    recorder.record(list(np.geomspace(1e-6, 1e-3, 29)), list(np.linspace(2.3, 1.0, 29)), [0.5] * 29,
                    evaluate=lambda: 0.5)
    with caplog.at_level(logging.WARNING, logger="clrlab.sweep"):
        result = recorder.result()
    assert [r.getMessage() for r in caplog.records if r.name == "clrlab.sweep"] == [
        "Held-out accuracy not used for the bounds: Need at least 10 points. Received: 1"]
    assert result.eval_steps == (28,) and "heldout_" not in result.recommendation.rule


# ---------------------------------------------------------------------------------------- snapshot
def test_snapshot_detects_a_change_and_restores_it():
    splits = _digits()
    model, opt = trained_conv_bn_model(splits)
    snap = StateSnapshot(model, opt)
    assert snap.matches()
    model.weights[0].assign(model.weights[0] + 1.0)
    opt.variables[-1].assign(opt.variables[-1] + 1.0)
    assert not snap.matches()
    snap.restore()
    assert snap.matches()
