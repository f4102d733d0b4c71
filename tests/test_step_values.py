"""clrlab.callbacks.step_values: de-averaging Keras' running batch-log means, and graph-mode LR values."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from clrlab import schedules
from clrlab.callbacks import deaverage
from clrlab.callbacks.step_values import GraphLR, accuracy_key


def test_deaverage_formula():
    x = np.array([3.0, 1.0, 4.0, 1.0, 5.0])
    means = np.cumsum(x) / np.arange(1, 6)
    got = [deaverage(means[0], 1, None, 0)] + [deaverage(means[t], t + 1, means[t - 1], t) for t in range(1, 5)]
    np.testing.assert_allclose(got, x)
    assert deaverage(means[4], 5, means[1], 2) == pytest.approx(np.mean(x[2:]))  # a chunk's mean
    with pytest.raises(ValueError, match="count_now must exceed count_before"):
        deaverage(means[1], 2, means[1], 2)


def test_graph_lr_is_the_in_graph_schedule_and_falls_back_to_eager_for_numpy_scale_fns():
    schedule = schedules.ExponentialSweep(1e-4, 1.0, 40)
    in_graph = tf.function(lambda t: tf.cast(schedule(t), tf.float32))
    expected = [float(in_graph(tf.constant(t, tf.int64)).numpy()) for t in range(40)]
    assert GraphLR(schedule)(range(40)) == expected
    fn = lambda x: 0.5 * (1 + np.sin(np.asarray(x) * np.pi / 2.))  # noqa: E731  (NumPy: cannot be traced)
    cyclic = schedules.CyclicalLearningRate(0.01, 0.1, 4., scale_fn=fn, scale_mode="cycle")
    lr = GraphLR(cyclic)
    got = lr(range(0, 12, 3))
    assert not lr._graph_ok  # the eager fallback ran
    np.testing.assert_allclose(got, [float(cyclic(t)) for t in range(0, 12, 3)], rtol=0)


def test_accuracy_key_prefers_accuracy_then_acc_then_a_training_accuracy():
    assert accuracy_key(["loss", "acc", "accuracy"]) == "accuracy"
    assert accuracy_key(["loss", "acc"]) == "acc"
    assert accuracy_key(["loss", "val_sparse_categorical_accuracy", "sparse_categorical_accuracy"]) == \
        "sparse_categorical_accuracy"
    assert accuracy_key(["loss", "val_accuracy"]) is None
