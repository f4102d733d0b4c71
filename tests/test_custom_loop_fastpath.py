"""The custom loop's per-step fast paths (issue 7) keep its semantics.

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
from trainers.custom_loop import CustomLoopTrainer, exactly_vectorizable


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
