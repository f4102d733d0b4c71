"""trainers.range_sweep: the range test's custom-loop driver (exact restore of model and optimizer state,
the sweep's steps being the training loop's steps, early stop on divergence, its own TensorBoard tags)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from clrlab import data, schedules
from clrlab.sweep import RangeTestResult, SweepOptions, sweep_schedule
from conftest import model_state, read_scalars, trained_conv_bn_model
from trainers.custom_loop import CustomLoopTrainer
from trainers.range_sweep import run_sweep


def _digits():
    return data.load("digits")


@pytest.mark.parametrize("precision,optimizer", [("float32", "sgd"), ("float32", "adam"),
                                                 ("mixed_float16", "sgd")])
def test_sweep_restores_weights_bn_statistics_optimizer_and_counters_bitwise(precision, optimizer):
    splits = _digits()
    model, opt = trained_conv_bn_model(splits, precision, optimizer)
    before = model_state(model, opt)
    names = [v.path for v in list(model.weights) + list(opt.variables)]
    assert any("moving_mean" in n for n in names) and any("iteration" in n for n in names)
    if precision == "mixed_float16":
        assert any("scale" in n for n in names)
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=3),
                       SweepOptions(sweep="exponential", start_lr=1e-4, end_lr=1.0, num_steps=40, check_every=10),
                       eval_dataset=data.eval_dataset(splits, 256))
    after = model_state(model, opt)
    assert len(before) == len(after)
    for name, a, b in zip(names, before, after, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert isinstance(result, RangeTestResult) and len(result.recommendation.lrs) >= 10
    # The sweep trained for real: the recorded LRs follow the sweep schedule.
    expected = schedules.ExponentialSweep(1e-4, 1.0, 40)(np.arange(len(result.recommendation.lrs))).numpy()
    np.testing.assert_allclose(result.recommendation.lrs, expected, rtol=3e-7)


def test_divergent_sweep_stops_early_and_still_restores():
    splits = _digits()
    model, opt = trained_conv_bn_model(splits)
    before = model_state(model, opt)
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=0),
                       SweepOptions(sweep="exponential", start_lr=1e-3, end_lr=1e4, num_steps=200, check_every=5))
    rec = result.recommendation
    assert rec.stopped_early and rec.reason in ("diverged", "nonfinite")
    assert len(rec.lrs) < 200
    for a, b in zip(before, model_state(model, opt), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_sweep_steps_are_the_training_steps_of_custom_loop_trainer():
    # No second implementation: the same steps through CustomLoopTrainer (the class clrlab.train uses),
    # from the restored state, give the sweep's records bitwise.
    splits = _digits()
    model, opt = trained_conv_bn_model(splits)
    options = SweepOptions(sweep="linear", start_lr=1e-3, end_lr=0.1, num_steps=12, check_every=5)
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=3), options)
    rec = result.recommendation
    assert not rec.stopped_early and len(rec.lrs) == 12
    trainer = CustomLoopTrainer(model, opt, sweep_schedule(options))
    records = trainer.train_steps(trainer.make_iterator(data.train_dataset(splits, 64, seed=3)), 12)
    assert rec.lrs == tuple(records.lr.tolist())
    assert tuple(rec.loss_raw) == tuple(records.loss.tolist())
    assert tuple(rec.accuracy) == tuple(records.accuracy.tolist())


def _tags(event_dir) -> set[str]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(event_dir), size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


def test_a_sweep_writes_its_own_tensorboard_tags_apart_from_a_training_run(tmp_path):
    splits = _digits()
    model, opt = trained_conv_bn_model(splits)
    options = SweepOptions(sweep="exponential", start_lr=1e-3, end_lr=0.1, num_steps=12, check_every=5)
    writer = tf.summary.create_file_writer(str(tmp_path / "sweep"))
    result = run_sweep(model, opt, data.train_dataset(splits, 64, seed=3), options, summary_writer=writer)
    writer.flush()
    train_writer = tf.summary.create_file_writer(str(tmp_path / "train"))
    trainer = CustomLoopTrainer(model, opt, sweep_schedule(options), summary_writer=train_writer)
    trainer.train_steps(trainer.make_iterator(data.train_dataset(splits, 64, seed=3)), 4)
    train_writer.flush()
    sweep_tags, train_tags = _tags(tmp_path / "sweep"), _tags(tmp_path / "train")
    assert sweep_tags == {"range_test/learning_rate", "range_test/loss", "range_test/accuracy"}
    assert {"learning_rate", "loss"} <= train_tags and not sweep_tags & train_tags
    lrs = read_scalars(str(tmp_path / "sweep"), "range_test/learning_rate")
    assert sorted(lrs) == list(range(12))  # step = sweep step
    np.testing.assert_allclose([lrs[i] for i in range(12)], result.recommendation.lrs, rtol=1e-6)
