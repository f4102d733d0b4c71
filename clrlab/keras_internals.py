"""The few Keras 3 internals clrlab must touch, in one place.

Keras 3 hides the things a training loop that sets the learning rate itself needs: the optimizer that
owns the LR inside a `LossScaleOptimizer`, whether an optimizer was built with a
`LearningRateSchedule` (held in the private `_learning_rate`; the public `learning_rate` property
returns its current value), and the LR as a number. Every module reads them through these helpers, so
a change in Keras is fixed here once.

All helpers run eagerly except `create_global_step`, whose variable is then read and assigned inside
`tf.function`s.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def uses_loss_scaling(optimizer: keras.optimizers.Optimizer) -> bool:
    """True for a `keras.optimizers.LossScaleOptimizer` (dynamic loss scaling, for mixed_float16)."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer that owns the learning rate and the slots (unwraps `LossScaleOptimizer`s)."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def held_schedule(optimizer: keras.optimizers.Optimizer):
    """The `LearningRateSchedule` (or other callable LR) the optimizer was built with, else None.

    None means the optimizer holds its LR in a variable that a loop or callback may assign.
    """
    held = getattr(inner_optimizer(optimizer), "_learning_rate", None)
    if isinstance(held, keras.optimizers.schedules.LearningRateSchedule):
        return held
    if callable(held) and not isinstance(held, (keras.Variable, tf.Variable)):
        return held
    return None


def holds_schedule(optimizer: keras.optimizers.Optimizer) -> bool:
    """True when the optimizer computes its LR from its own `iterations` (built with a schedule)."""
    return held_schedule(optimizer) is not None


def read_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The LR the optimizer's next update will use, as a Python float (a host read; eager only)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def read_iterations(optimizer: keras.optimizers.Optimizer) -> int:
    """The optimizer's update counter `iterations` as a Python int (eager only)."""
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


def create_global_step(name: str = "global_step") -> tf.Variable:
    """A non-trainable int64 step counter starting at 0, as Orbit's `orbit.utils.create_global_step`
    (tensorflow/models, orbit/utils/common.py).

    Create it inside the strategy's scope. Under a `tf.distribute` strategy it is aggregated
    ONLY_FIRST_REPLICA, so every replica reads the same step and an `assign_add(1)` in a replica
    context advances it once. Checkpoint it next to the model: the LR policy is a function of it, so
    restoring it is what makes resume exact.
    """
    return tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
