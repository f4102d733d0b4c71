"""trainers/custom_loop.py: the compiled training step, its records and errors, and its per-step fast
paths, on models of a few parameters.

* An LR schedule made only of exactly rounded elementwise ops is evaluated once per call for all its
  steps; the recorded (= assigned, = logged) LR must be bit for bit what the per-step evaluation gives,
  whatever the call sizes.
* The packed per-step records still give the step numbers, `applied` and no `loss_scale` without
  loss scaling.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import job, schedules
from conftest import read_scalars
from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError, exactly_vectorizable


@pytest.mark.parametrize("schedule,expected", [
    (schedules.CyclicalLearningRate(0.001, 0.006, 2000), True),
    (schedules.CyclicalLearningRate(0.001, 0.1, 10, step_size_down=4), True),
    (schedules.Constant(0.01), True),
    (schedules.LinearSweep(1e-7, 10.0, 300), True),
    (schedules.CyclicalLearningRate(0.001, 0.006, 37, mode="triangular2"), False),  # pow
    (schedules.CyclicalLearningRate(0.001, 0.006, 37, mode="exp_range", gamma=0.99), False),  # exp
    (schedules.ExponentialSweep(1e-7, 10.0, 300), False),  # exp
    (lambda t: tf.cond(t < 5, lambda: 0.1, lambda: 0.2), False),  # control flow, scalar only
])
def test_which_schedules_are_evaluated_per_call(schedule, expected):
    assert exactly_vectorizable(schedule) is expected


def _lrs(schedule, fast: bool, sizes, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    trainer = CustomLoopTrainer(model, job.make_optimizer("sgd", 0.0, 0.0), schedule)
    trainer._lr_table = trainer._lr_table and fast  # fast=False forces the per-step evaluation
    trainer.global_step.assign(start)
    iterator = trainer.make_iterator(tf.data.Dataset.from_tensors((tf.ones([4, 3]), tf.zeros([4], tf.int32))).repeat())
    records = [trainer.train_steps(iterator, int(n)) for n in sizes]
    for r in records:
        assert r.applied.dtype == bool and r.applied.all() and r.loss_scale is None
    return np.concatenate([r.step for r in records]), np.concatenate([r.lr for r in records])


@pytest.mark.parametrize("name,schedule", [
    ("triangular", schedules.CyclicalLearningRate(0.001, 0.006, 7)),
    ("asymmetric", schedules.CyclicalLearningRate(0.01, 0.1, 10, step_size_down=3)),
    ("linear_sweep", schedules.LinearSweep(1e-5, 1.0, 500)),
])
@pytest.mark.parametrize("start", [0, 2**24 - 40])
def test_per_call_lr_is_bitwise_the_per_step_lr(name, schedule, start):
    sizes = np.random.default_rng(0).integers(1, 60, 8)
    steps_fast, fast = _lrs(schedule, True, sizes, start)
    steps_slow, slow = _lrs(schedule, False, sizes, start)
    np.testing.assert_array_equal(steps_fast, np.arange(start, start + sizes.sum()))
    np.testing.assert_array_equal(steps_fast, steps_slow)
    np.testing.assert_array_equal(fast.view(np.int32), slow.view(np.int32))


# ----------------------------------------------------------------------------- the trainer
def _trainer(optimizer=None, schedule=None, **kw) -> CustomLoopTrainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return CustomLoopTrainer(model, optimizer or job.make_optimizer("sgd", 0.0, 0.9),
                             schedule or schedules.CyclicalLearningRate(0.01, 0.1, 4), **kw)


def _iterator(trainer, x=None):
    x = tf.ones([4, 3]) if x is None else x
    return trainer.make_iterator(tf.data.Dataset.from_tensors((x, tf.zeros([4], tf.int32))).repeat())


def test_global_step_is_an_int64_counter_advanced_once_per_step():
    trainer = _trainer()
    assert trainer.global_step.dtype == tf.int64 and not trainer.global_step.trainable
    assert trainer.global_step.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    records = trainer.train_steps(_iterator(trainer), 5)
    assert int(trainer.global_step.numpy()) == 5 and int(trainer.optimizer.iterations.numpy()) == 5
    np.testing.assert_array_equal(records.step, np.arange(5))
    np.testing.assert_allclose(records.lr, schedules.CyclicalLearningRate(0.01, 0.1, 4)(np.arange(5)), rtol=1e-6)
    assert trainer.learning_rate == pytest.approx(float(records.lr[-1]))


@pytest.mark.parametrize("wrap", [False, True])
def test_an_optimizer_holding_a_schedule_is_refused(wrap):
    optimizer = keras.optimizers.SGD(schedules.Constant(0.1))
    if wrap:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    with pytest.raises(ValueError, match="assigns the learning rate itself"):
        _trainer(optimizer)


def test_bad_counts_are_value_errors():
    with pytest.raises(ValueError, match="summary_every must be >= 1"):
        _trainer(summary_every=0)
    trainer = _trainer()
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        trainer.train_steps(_iterator(trainer), 0)


def test_a_nonfinite_loss_raises_with_the_first_bad_step_and_the_records():
    trainer = _trainer()
    x = tf.data.Dataset.range(100).map(lambda i: (tf.fill([4, 3], tf.where(i >= 3, np.float32("nan"), 1.0)),
                                                  tf.zeros([4], tf.int32)))
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        trainer.train_steps(trainer.make_iterator(x), 6)
    err = info.value
    assert err.step == 3 and err.learning_rate == pytest.approx(float(err.records.lr[3]))
    assert len(err.records) == 6 and np.isfinite(err.records.loss[:3]).all()


def test_summaries_every_n_steps_hold_the_recorded_lr(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    trainer = _trainer(summary_writer=writer, summary_every=3)
    records = trainer.train_steps(_iterator(trainer), 7)
    writer.flush()
    logged = read_scalars(str(tmp_path), "learning_rate")
    assert sorted(logged) == [0, 3, 6]
    assert [logged[s] for s in (0, 3, 6)] == [float(records.lr[s]) for s in (0, 3, 6)]
    assert sorted(read_scalars(str(tmp_path), "loss")) == [0, 3, 6]


def test_mixed_float16_records_the_loss_scale_and_skipped_steps():
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores the policy
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Activation("linear",
                                                                                               dtype="float32")])
    optimizer = job.make_optimizer("sgd", 0.0, 0.0, loss_scaling=True)
    trainer = CustomLoopTrainer(model, optimizer, schedules.Constant(0.01))
    x = tf.data.Dataset.range(100).map(lambda i: (tf.fill([4, 3], tf.where(tf.equal(i, 2), np.float32("inf"), 1.0)),
                                                  tf.zeros([4], tf.int32)))
    records = trainer.train_steps(trainer.make_iterator(x), 4)  # no error: the step is skipped
    np.testing.assert_array_equal(records.applied, [True, True, False, True])
    assert records.loss_scale[0] == 2.0**15 and records.loss_scale[3] == records.loss_scale[2] / 2
    assert int(trainer.global_step.numpy()) == 4 and int(optimizer.iterations.numpy()) == 3
