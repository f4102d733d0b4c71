"""Held-out evaluation shared by both trainers: mean loss and accuracy, and predicted classes.

`Evaluator.evaluate` runs one compiled pass over a finite dataset (replica context inside
`strategy.run`, Keras metrics read back eagerly); the loss is the per-example loss without any
regularisation term, so both trainers report the same `val_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf


class Evaluator:
    """Compiled evaluation of `model` under `strategy` (create it inside the strategy's scope)."""

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy,
                 loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]):
        self.model, self.strategy, self.loss_fn = model, strategy, loss_fn
        with strategy.scope():
            self.loss = keras.metrics.Mean(name="val_loss")
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
        self._eval_fn = None
        self._predict_fn = None

    def _step(self, x, y):
        logits = self.model(x, training=False)
        self.loss.update_state(tf.cast(self.loss_fn(y, logits), tf.float32))
        self.accuracy.update_state(y, tf.cast(logits, tf.float32))

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """{'loss', 'accuracy'} over a finite dataset of (x, y) batches (eager entry point)."""
        if self._eval_fn is None:
            @tf.function
            def eval_fn(ds):
                for x, y in ds:
                    self.strategy.run(self._step, args=(x, y))
            self._eval_fn = eval_fn
        self.loss.reset_state()
        self.accuracy.reset_state()
        if self.strategy.num_replicas_in_sync > 1:
            dataset = self.strategy.experimental_distribute_dataset(dataset)
        self._eval_fn(dataset)
        return {"loss": float(self.loss.result()), "accuracy": float(self.accuracy.result())}

    def predict_classes(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Argmax class per example of a finite dataset of (x, y) or x batches, as int32 numpy."""
        if self._predict_fn is None:
            self._predict_fn = tf.function(
                lambda x: tf.argmax(self.model(x, training=False), axis=-1, output_type=tf.int32))
        out = []
        for batch in dataset:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            out.append(self._predict_fn(x).numpy())
        return np.concatenate(out) if out else np.zeros([0], np.int32)
