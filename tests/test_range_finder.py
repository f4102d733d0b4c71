"""The LR range test command (`python -m clrlab.range_finder`): the sweep runs the training step, restores
exactly, writes its outputs, and its bounds round-trip into training."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from conftest import parse_config, read_scalars, run_module, user_lines

from clrlab import data, models, range_finder, schedules
from clrlab.range_finder import RangeTestResult, StateSnapshot, SweepOptions, run_sweep
from trainers.custom_loop import CustomLoopTrainer


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
    # No second implementation: the sweep's updates are CustomLoopTrainer's (the class clrlab.train runs).
    # Training the same model from the same state on the same batches with the sweep's LR policy as the
    # training schedule, in the same chunks, gives bitwise the weights the sweep leaves (restore=False).
    splits = _digits()
    options = SweepOptions(sweep="exponential", start_lr=1e-3, end_lr=0.05, num_steps=20, check_every=10)
    finals = []
    for via_sweep in (True, False):
        keras.utils.set_random_seed(2)
        model = models.build_model("mlp", splits.input_shape, splits.num_classes, weight_decay=1e-4, seed=2)
        opt = keras.optimizers.SGD(0.01, momentum=0.9)
        batches = data.train_dataset(splits, 64, seed=5)
        if via_sweep:
            result = run_sweep(model, opt, batches, options, restore=False)
            assert not result.recommendation.stopped_early and len(result.recommendation.lrs) == 20
        else:
            trainer = CustomLoopTrainer(model, opt, schedules.ExponentialSweep(1e-3, 0.05, 20))
            iterator = trainer.make_iterator(batches)
            trainer.train_steps(iterator, 10)
            trainer.train_steps(iterator, 10)
        finals.append([v.numpy() for v in model.weights])
    initial = models.build_model("mlp", splits.input_shape, splits.num_classes, weight_decay=1e-4, seed=2)
    assert not np.array_equal(finals[0][0], initial.weights[0].numpy())  # the sweep trained for real
    for a, b in zip(*finals, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_command_line_writes_outputs_and_bounds_round_trip_into_training(tmp_path, train_flags):
    logdir = tmp_path / "rt"
    proc = run_module("clrlab.range_finder", "--sweep=exponential", "--steps=60", "--start_lr=1e-4",
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
    assert not result["stopped_early"] and len(result["lrs"]) == 60  # LR 1 at the end does not diverge here
    lrs = read_scalars(str(logdir / "range_test"), "learning_rate")
    assert sorted(lrs) == list(range(60))
    np.testing.assert_allclose([lrs[i] for i in range(60)], result["lrs"], rtol=1e-6)
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(logdir / "range_test"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert "range_test" in acc.Tags()["tensors"]  # the plot as an image summary

    # --bounds_from hands the bounds to training.
    assert f"--bounds_from={logdir / 'range_test.json'}" in result["command_bounds_from"]
    trained = parse_config(train_flags, f"--bounds_from={logdir / 'range_test.json'}",
                           f"--logdir={tmp_path / 'train'}")
    assert (trained.base_lr, trained.max_lr) == (result["base_lr"], result["max_lr"])


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--start_lr=0.1", "--end_lr=0.01"], "--end_lr"),
    (["--steps=5"], "--steps"),
    (["--steps=100", "--epochs=2"], "not both"),
    (["--sweep=cosine"], "sweep"),
])
def test_command_line_rejects_bad_values_in_one_line(tmp_path, args, needle):
    proc = run_module("clrlab.range_finder", *args, f"--logdir={tmp_path / 'x'}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags_given,steps_per_epoch,want", [
    ({"sweep": "linear"}, 22, dict(start_lr=1e-4, end_lr=0.1, num_steps=176)),  # 8 epochs, the CLR paper's
    ({"sweep": "linear", "epochs": 0.1}, 22, dict(num_steps=10)),  # at least 10 steps
    ({"sweep": "exponential"}, 22, dict(start_lr=1e-6, end_lr=1.0, num_steps=300)),
    ({"sweep": "exponential", "epochs": 2.0, "start_lr": 1e-5}, 22, dict(start_lr=1e-5, num_steps=44)),
    ({"sweep": "linear", "steps": 90, "eval_every": 9, "beta": 0.5, "smoother": "none"}, 22,
     dict(num_steps=90, eval_every=9, beta=0.5, smoother="none", check_every=3)),
])
def test_sweep_options_fill_the_per_sweep_defaults_and_convert_epochs(flags_given, steps_per_epoch, want):
    options = range_finder.sweep_options(flags_given, steps_per_epoch)
    for field, value in want.items():
        assert getattr(options, field) == value, field


def test_main_builds_the_job_from_the_flags_and_writes_the_outputs(tmp_path, capsys, range_test_flags):
    logdir = tmp_path / "rt"
    range_test_flags(["prog", "--sweep=exponential", "--steps=20", "--start_lr=1e-3", "--end_lr=0.5",
                      "--model=mlp", "--batch_size=64", "--step_size_epochs=2", f"--logdir={logdir}"])
    try:
        assert range_finder.main(["prog"]) == 0
    finally:
        range_test_flags.unparse_flags()
    out = capsys.readouterr().out
    result = json.loads((logdir / "range_test.json").read_text())
    assert (result["dataset"], result["options"]["num_steps"], result["options"]["sweep"]) == ("digits", 20,
                                                                                             "exponential")
    assert len(result["lrs"]) == 20 and (logdir / "range_test.png").exists()
    # The data/model flags reached the job (and the printed train command); the half cycle is the flag's.
    assert result["command"].startswith("python -m clrlab.train --model=mlp --batch_size=64 --policy=triangular")
    assert result["command"].endswith("--step_size_epochs=2")
    assert "Train with them:" in out and result["command"] in out


def test_main_reports_a_data_problem_in_one_line(tmp_path, capsys, range_test_flags):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 2, 2)))  # no y_train, x_test, y_test
    range_test_flags(["prog", f"--dataset=npz:{bad}", f"--logdir={tmp_path / 'rt'}"])
    try:
        assert range_finder.main(["prog"]) == 1
    finally:
        range_test_flags.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.npz" in err[0], err
