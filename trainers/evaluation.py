"""Held-out evaluation shared by both trainers: mean loss and accuracy, and predicted classes.

`Evaluator.evaluate` passes once over a finite dataset (replica context inside `strategy.run`, Keras
metrics read back eagerly); the loss is the per-example loss without any regularisation term, so both
trainers report the same `val_loss`.

Cost: with one replica, each batch is one compiled call, and the batches of a dataset are read once and
kept in memory (eager tensors, up to `cache_bytes`): a later pass over the same dataset object starts no
`tf.data` iterator. Starting one inside a `tf.function` costs tens of milliseconds on a CPU, more than the
forward passes of a small held-out split (MNIST-1D's 1000 examples: about 55 ms per pass with an iterator
per pass, about 10 ms from the kept batches), and the trainers evaluate at every epoch end. The held-out
split is fixed (`clrlab.data.eval_dataset`: in order, un-augmented), so the kept batches are the ones a new
iterator would give. With several replicas the pass is one compiled loop over the distributed dataset.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

CACHE_BYTES = 256 * 2**20


class Evaluator:
    """Compiled evaluation of `model` under `strategy` (create it inside the strategy's scope).

    `cache_bytes`: the most bytes of (x, y) batches kept from the last dataset evaluated (0: none kept; see
    the module docstring). A dataset whose batches may differ from pass to pass must not be kept: pass 0.
    """

    def __init__(self, model: keras.Model, strategy: tf.distribute.Strategy,
                 loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor], *, cache_bytes: int = CACHE_BYTES):
        self.model, self.strategy, self.loss_fn = model, strategy, loss_fn
        self.cache_bytes = int(cache_bytes)
        with strategy.scope():
            self.loss = keras.metrics.Mean(name="val_loss")
            self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="val_accuracy")
        self._eval_fn = None
        self._compiled_fns: dict[tuple[str, str], Callable] = {}
        self._kept: tuple[tf.data.Dataset, list] | None = None  # (dataset, its batches); holds the dataset

    def _step(self, x, y):
        logits = self.model(x, training=False)
        self.loss.update_state(tf.cast(self.loss_fn(y, logits), tf.float32))
        self.accuracy.update_state(y, tf.cast(logits, tf.float32))

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """{'loss', 'accuracy'} over a finite dataset of (x, y) batches (eager entry point)."""
        self.loss.reset_state()
        self.accuracy.reset_state()
        if self.strategy.num_replicas_in_sync > 1:
            self._evaluate_distributed(dataset)
        else:
            self._evaluate_batches(dataset)
        return {"loss": float(self.loss.result()), "accuracy": float(self.accuracy.result())}

    def _compiled(self, name: str, fn: Callable, specs) -> Callable:
        """`fn` as a tf.function traced once for the batch specs `specs` (a dataset's element_spec, batch
        dimension unknown, so the last partial batch reuses the trace); without TensorSpecs, once per shape."""
        key = (name, repr(specs))
        if key not in self._compiled_fns:
            specs = list(specs) if isinstance(specs, tuple) else [specs]
            if all(isinstance(s, tf.TensorSpec) for s in specs):
                self._compiled_fns[key] = tf.function(fn, input_signature=specs)
            else:
                self._compiled_fns[key] = tf.function(fn, reduce_retracing=True)
        return self._compiled_fns[key]

    def _evaluate_batches(self, dataset: tf.data.Dataset) -> None:
        batch_fn = self._compiled("evaluate", lambda x, y: self.strategy.run(self._step, args=(x, y)),
                                  getattr(dataset, "element_spec", None))
        if self._kept is not None and self._kept[0] is dataset:
            for x, y in self._kept[1]:
                batch_fn(x, y)
            return
        self._kept = None
        kept, size = [], 0
        for x, y in dataset:
            batch_fn(x, y)
            if kept is not None:
                size += sum(t.shape.num_elements() * t.dtype.size for t in (x, y))
                if size <= self.cache_bytes:
                    kept.append((x, y))
                else:
                    kept = None
        if kept is not None:
            self._kept = (dataset, kept)

    def _evaluate_distributed(self, dataset: tf.data.Dataset) -> None:
        if self._eval_fn is None:
            @tf.function
            def eval_fn(ds):
                for x, y in ds:
                    self.strategy.run(self._step, args=(x, y))
            self._eval_fn = eval_fn
        self._eval_fn(self.strategy.experimental_distribute_dataset(dataset))

    def predict_classes(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Argmax class per example of a finite dataset of (x, y) or x batches, as int32 numpy."""
        spec = getattr(dataset, "element_spec", None)
        predict_fn = self._compiled(
            "predict", lambda x: tf.argmax(self.model(x, training=False), axis=-1, output_type=tf.int32),
            spec[0] if isinstance(spec, tuple) else spec)
        out = []
        kept = self._kept[1] if self._kept is not None and self._kept[0] is dataset else None
        for batch in kept if kept is not None else dataset:  # the kept batches of an evaluated dataset
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            out.append(predict_fn(x).numpy())
        return np.concatenate(out) if out else np.zeros([0], np.int32)
