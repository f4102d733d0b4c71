"""trainers/evaluation.py: held-out loss (no regularisation term) and accuracy, and predicted classes."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainers.evaluation import Evaluator


def test_evaluate_is_the_mean_cross_entropy_without_l2_and_the_accuracy():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(1.0))])
    x = np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    evaluator = Evaluator(model, tf.distribute.get_strategy(), loss_fn)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # batches of 4, 4, 2
    logits = model(x).numpy()
    expected_loss = float(np.mean(loss_fn(y, logits).numpy()))
    result = evaluator.evaluate(dataset)
    assert abs(result["loss"] - expected_loss) < 1e-6
    assert result["accuracy"] == float(np.float32(np.mean(logits.argmax(-1) == y)))
    assert evaluator.evaluate(dataset) == result  # metrics are reset between calls
    np.testing.assert_array_equal(evaluator.predict_classes(dataset), logits.argmax(-1))
    np.testing.assert_array_equal(evaluator.predict_classes(tf.data.Dataset.from_tensor_slices(x).batch(3)),
                                  logits.argmax(-1))
    assert evaluator.predict_classes(tf.data.Dataset.from_tensor_slices(x).take(0).batch(3)).shape == (0,)


class CountingDataset:
    """Wraps a dataset and counts the passes started over it (each `iter` is a new tf.data iterator)."""

    def __init__(self, dataset):
        self.dataset, self.passes = dataset, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.dataset)


def test_the_batches_of_a_dataset_are_read_once_and_give_the_same_metrics():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    x = np.random.default_rng(1).normal(size=(10, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    data = CountingDataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    kept = Evaluator(model, tf.distribute.get_strategy(), loss_fn)
    first = kept.evaluate(data)
    assert kept.evaluate(data) == first and data.passes == 1  # the second pass used the kept batches
    np.testing.assert_array_equal(kept.predict_classes(data), model(x).numpy().argmax(-1))
    assert data.passes == 1  # predictions from the kept batches too
    model.layers[0].kernel.assign(model.layers[0].kernel * 2.0)  # new weights: new metrics from the kept batches
    moved = kept.evaluate(data)
    fresh = Evaluator(model, tf.distribute.get_strategy(), loss_fn, cache_bytes=0)
    assert moved != first and fresh.evaluate(data) == moved and fresh.evaluate(data) == moved
    assert data.passes == 3  # cache_bytes=0 keeps nothing: one iterator per pass
    small = Evaluator(model, tf.distribute.get_strategy(), loss_fn, cache_bytes=64)  # 64 B < the 120 B of batches
    small.evaluate(data)
    small.evaluate(data)
    assert data.passes == 5


def test_one_trace_serves_every_batch_size_of_a_dataset():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    x = np.random.default_rng(2).normal(size=(10, 2)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0], np.int32)
    evaluator = Evaluator(model, tf.distribute.get_strategy(),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)  # batches of 4, 4, 2
    evaluator.evaluate(dataset)
    evaluator.predict_classes(dataset)
    fns = evaluator._compiled_fns.values()
    assert len(fns) == 2 and all(f.experimental_get_tracing_count() == 1 for f in fns)
