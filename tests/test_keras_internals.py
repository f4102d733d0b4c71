"""Tests for clrlab.keras_internals: the inner optimizer, the held schedule, the LR and step reads, and
Orbit's create_global_step, on real Keras 3 optimizers (eager)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import keras_internals as ki
from clrlab import schedules
from conftest import subprocess_env


def clr():
    return schedules.CyclicalLearningRate(base_lr=0.001, max_lr=0.006, step_size=10)


def built(optimizer):
    optimizer.build([keras.Variable(np.zeros(2, np.float32))])
    return optimizer


def test_inner_optimizer_unwraps_loss_scale_optimizers():
    sgd = keras.optimizers.SGD(learning_rate=0.1)
    wrapped = keras.optimizers.LossScaleOptimizer(sgd)
    assert ki.inner_optimizer(sgd) is sgd
    assert ki.inner_optimizer(wrapped) is sgd
    assert ki.uses_loss_scaling(wrapped) and not ki.uses_loss_scaling(sgd)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "loss_scaled"])
def test_held_schedule_is_the_schedule_object_or_none(wrap):
    schedule = clr()
    with_schedule = keras.optimizers.SGD(learning_rate=schedule)
    with_float = keras.optimizers.SGD(learning_rate=0.01)
    if wrap:
        with_schedule = keras.optimizers.LossScaleOptimizer(with_schedule)
        with_float = keras.optimizers.LossScaleOptimizer(with_float)
    assert ki.held_schedule(with_schedule) is schedule and ki.holds_schedule(with_schedule)
    assert ki.held_schedule(built(with_float)) is None and not ki.holds_schedule(with_float)


def test_held_schedule_accepts_a_callable_learning_rate():
    def lr():
        return 0.02

    optimizer = keras.optimizers.SGD(learning_rate=lr)
    assert ki.held_schedule(optimizer) is lr and ki.holds_schedule(optimizer)


def test_read_learning_rate_and_iterations_follow_the_optimizer():
    schedule = clr()
    optimizer = built(keras.optimizers.SGD(learning_rate=schedule))
    assert ki.read_iterations(optimizer) == 0 and isinstance(ki.read_iterations(optimizer), int)
    optimizer.iterations.assign(5)
    lr = ki.read_learning_rate(optimizer)
    assert isinstance(lr, float) and lr == float(np.float32(schedule(5)))
    assert ki.read_iterations(optimizer) == 5

    fixed = built(keras.optimizers.SGD(learning_rate=0.25))
    assert ki.read_learning_rate(fixed) == 0.25
    fixed.learning_rate = 0.125  # what an LR-setting callback does
    assert ki.read_learning_rate(fixed) == 0.125
    # Through a LossScaleOptimizer: the inner optimizer's LR.
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.5))
    built(wrapped)
    assert ki.read_learning_rate(wrapped) == 0.5


def test_create_global_step_is_a_non_trainable_int64_zero():
    step = ki.create_global_step()
    assert step.dtype == tf.int64 and not step.trainable and int(step.numpy()) == 0
    assert step.name.startswith("global_step")
    assert step.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    assert ki.create_global_step("other").name.startswith("other")


def test_create_global_step_advances_once_per_step_under_a_two_replica_mirrored_strategy():
    # A fresh process: the logical CPU devices must be configured before TensorFlow initialises.
    code = textwrap.dedent("""
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from clrlab.keras_internals import create_global_step
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            step = create_global_step()

        @tf.function
        def train_step():
            strategy.run(lambda: step.assign_add(1))

        for _ in range(3):
            train_step()
        print(step.dtype.name, step.aggregation.name, int(step.numpy()))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["int64", "ONLY_FIRST_REPLICA", "3"]
