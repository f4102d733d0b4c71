"""The LR range test (issue 6): the sweep through the training step, exact restore, outputs, CLI."""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import read_scalars, run_module, user_lines

from clrlab import data, models
from clrlab.range_test import RangeTestResult, StateSnapshot, SweepOptions, run_sweep
from trainers.custom_loop import CustomLoopTrainer
from clrlab import schedules


def _digits():
    return data.load("digits")


def _setup(splits, precision="float32", optimizer="sgd"):
    keras.mixed_precision.set_global_policy(precision)
    keras.utils.set_random_seed(1)
    model = models.build_model("small_cnn", splits.input_shape, splits.num_classes, weight_decay=1e-4, seed=1)
    inner = (keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam(0.001))
    opt = keras.optimizers.LossScaleOptimizer(inner) if precision == "mixed_float16" else inner
    # Train a few steps first so slots, iterations, BN statistics and the LR are all non-trivial.
    trainer = CustomLoopTrainer(model, opt, schedules.Constant(0.01))
    trainer.train_steps(iter(data.train_dataset(splits, 64, seed=0)), 5)
    return model, opt


def _state(model, opt):
    return [v.numpy().copy() for v in list(model.weights) + list(opt.variables)]


@pytest.mark.parametrize("precision,optimizer", [("float32", "sgd"), ("float32", "adam"),
                                                 ("mixed_float16", "sgd")])
def test_sweep_restores_weights_bn_statistics_optimizer_and_counters_bitwise(precision, optimizer):
    splits = _digits()
    model, opt = _setup(splits, precision, optimizer)
    before = _state(model, opt)
    names = [v.path for v in list(model.weights) + list(opt.variables)]
    assert any("moving_mean" in n for n in names) and any("iteration" in n for n in names)
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=3),
                       SweepOptions(sweep="exponential", start_lr=1e-4, end_lr=1.0, num_steps=40, check_every=10),
                       eval_dataset=data.eval_dataset(splits, 256))
    after = _state(model, opt)
    assert len(before) == len(after)
    for name, a, b in zip(names, before, after):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert isinstance(result, RangeTestResult) and len(result.recommendation.lrs) >= 10
    # The sweep trained for real: the recorded LRs follow the sweep schedule.
    expected = schedules.ExponentialSweep(1e-4, 1.0, 40)(np.arange(len(result.recommendation.lrs))).numpy()
    np.testing.assert_allclose(result.recommendation.lrs, expected, rtol=3e-7)


def test_snapshot_detects_a_change_and_restores_it():
    splits = _digits()
    model, opt = _setup(splits)
    snap = StateSnapshot(model, opt)
    assert snap.matches()
    model.weights[0].assign(model.weights[0] + 1.0)
    opt.variables[-1].assign(opt.variables[-1] + 1.0)
    assert not snap.matches()
    snap.restore()
    assert snap.matches()


def test_divergent_sweep_stops_early_and_still_restores():
    splits = _digits()
    model, opt = _setup(splits)
    before = _state(model, opt)
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=0),
                       SweepOptions(sweep="exponential", start_lr=1e-3, end_lr=1e4, num_steps=200, check_every=5))
    rec = result.recommendation
    assert rec.stopped_early and rec.reason in ("diverged", "nonfinite")
    assert len(rec.lrs) < 200
    for a, b in zip(before, _state(model, opt)):
        np.testing.assert_array_equal(a, b)


def test_range_test_step_is_the_training_step():
    # No second implementation: run_sweep drives CustomLoopTrainer (the same class clrlab.train uses).
    import inspect
    import clrlab.range_test as rt

    assert "CustomLoopTrainer(" in inspect.getsource(rt.run_sweep)
    assert "GradientTape" not in inspect.getsource(rt)


@pytest.mark.slow
def test_command_line_writes_outputs_and_bounds_round_trip_into_training(tmp_path):
    logdir = tmp_path / "rt"
    proc = run_module("clrlab.range_test", "--sweep=exponential", "--steps=60", "--start_lr=1e-4",
                      "--end_lr=1", "--eval_every=10", f"--logdir={logdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m clrlab.train" in proc.stdout and "--bounds_from=" in proc.stdout
    assert (logdir / "range_test.png").stat().st_size > 10_000
    result = json.loads((logdir / "range_test.json").read_text())
    for key in ("lrs", "loss_raw", "loss_smooth", "accuracy", "suggestions", "base_lr", "max_lr", "rule",
                "stopped_early", "reason", "command", "eval"):
        assert key in result, key
    assert 0 < result["base_lr"] < result["max_lr"]
    assert len(result["eval"]["accuracy"]) >= 1
    lrs = read_scalars(str(logdir / "range_test"), "learning_rate")
    assert len(lrs) == len(result["lrs"]) or result["stopped_early"]
    np.testing.assert_allclose([lrs[i] for i in range(len(result["lrs"]))], result["lrs"], rtol=1e-6)
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(logdir / "range_test"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert "range_test" in acc.Tags()["tensors"]  # the plot as an image summary

    # --bounds_from hands the bounds to training.
    from clrlab import cli
    cli.FLAGS.unparse_flags()
    try:
        cli.FLAGS(["prog", f"--bounds_from={logdir / 'range_test.json'}", f"--logdir={tmp_path / 'train'}"])
        config = cli.config_from_flags()
    finally:
        cli.FLAGS.unparse_flags()
    assert (config.base_lr, config.max_lr) == (result["base_lr"], result["max_lr"])


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--start_lr=0.1", "--end_lr=0.01"], "--end_lr"),
    (["--steps=5"], "--steps"),
    (["--steps=100", "--epochs=2"], "not both"),
    (["--sweep=cosine"], "sweep"),
])
def test_command_line_rejects_bad_values_in_one_line(tmp_path, args, needle):
    proc = run_module("clrlab.range_test", *args, f"--logdir={tmp_path / 'x'}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_bounds_from_rejects_malformed_json(tmp_path):
    from clrlab import cli

    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"base_lr": 0.1, "max_lr": 0.01}))
    with pytest.raises(ValueError, match="0 < base_lr < max_lr"):
        cli.read_bounds(str(bad))
    bad.write_text(json.dumps({"lrs": []}))
    with pytest.raises(ValueError, match="base_lr"):
        cli.read_bounds(str(bad))
