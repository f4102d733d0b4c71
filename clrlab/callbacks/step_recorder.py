"""`StepRecorder`: per-step LR, loss and accuracy of `model.fit`, optionally as TensorBoard scalars.

clrlab's `keras_fit` trainer uses it to leave the same per-step outputs as the compiled custom loop.
The hooks run eagerly between compiled training calls, with one host read per hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clrlab import keras_internals
from clrlab.callbacks.step_values import GraphLR, deaverage

__all__ = ["StepRecorder"]


class StepRecorder(keras.callbacks.Callback):
    """Per-step records for `model.fit`: the LR each step used, and its own loss and accuracy.

    For every training step (batch) it appends to `records`:

    * `'step'`: the global step (0-based), counted from `initial_step` (default: the optimizer's
      `iterations` at the first `on_train_begin`) and continued across `fit` calls;
    * `'lr'`: the learning rate the step trained with, taken before the step (`on_train_batch_begin`):
      the LR variable for a float LR (as set by e.g. `CyclicLR`; constant inside a compiled chunk), or
      for a `LearningRateSchedule` the schedule at the optimizer's `iterations` (+ i for the i-th step
      of a chunk of `steps_per_execution = N` steps), evaluated in graph as the training step does
      (exact unless a `LossScaleOptimizer` skips a step inside a chunk);
    * one list per name in `metrics` (default `'loss'`, `'accuracy'`): the step's own value,
      de-averaged from Keras' running means (see `deaverage`; exact for equal-size unweighted batches).
      With `steps_per_execution = N > 1` only the mean over each chunk is known: it is recorded at the
      chunk's last step and the other steps get NaN;
    * `'momentum'`, when the optimizer holds a momentum schedule (`clrlab.optimizers` with
      `momentum=`/`beta_1=` a schedule, which sets its `momentum_variable` to the schedule at
      `iterations` before each update) or `record_momentum=True`: the momentum (or `beta_1`) the step
      trained with, as float32. With a schedule, the chunk's last step reads the variable itself after
      the step, and earlier steps of a chunk get the schedule at their step, evaluated in graph (the
      value the update assigned). Without one (a callback such as `CyclicLR(cycle_momentum=True)` sets
      the variable between batches) the variable is read before the step, as a float LR is.

    With a `writer` (a `tf.summary` writer), it also writes TensorBoard scalars `learning_rate` [,
    `momentum`] (per step), `loss`,
    `accuracy` (one per name in `metrics`) at the global step, for steps divisible by `summary_every`
    (a chunk's mean is written at its last step when the chunk holds such a step).

    Runs eagerly between compiled calls; one host read per hook.

    Args:
      writer: optional `tf.summary` writer for per-step scalars.
      summary_every: write scalars at steps divisible by this (>= 1).
      metrics: batch-log keys to de-average and record.
      initial_step: global step of the first batch; None: the optimizer's `iterations` at the first
        `on_train_begin`.
      record_momentum: record the momentum variable of a `clrlab.optimizers` optimizer even when it holds
        no momentum schedule (for a callback that sets it); it is always recorded when it holds one.
      data_loss: the name of a compiled metric holding the data loss (e.g. a
        `keras.metrics.SparseCategoricalCrossentropy(name="data_loss")`), for a model with regularisation
        losses, whose Keras `loss` is data loss + regularisation term. Then `'loss'` records (and logs)
        that metric, `'total_loss'` Keras' `loss` (what the optimizer minimised) and `'l2_loss'` their
        difference, in place of the metric's own name. None: `metrics` as they are.

    Attributes:
      records: dict of lists, keys `'step'`, `'lr'` [, `'momentum'`] and `metrics` (with `data_loss`: `'loss'`,
        the other metrics, `'l2_loss'`, `'total_loss'`), all of the same length.
      step: the global step of the next batch.
    """

    def __init__(self, writer: Any = None, summary_every: int = 1, metrics: Sequence[str] = ("loss", "accuracy"),
                 initial_step: int | None = None, record_momentum: bool = False, data_loss: str | None = None):
        super().__init__()
        if int(summary_every) < 1:
            raise ValueError(f"summary_every must be >= 1. Received: summary_every={summary_every}.")
        if data_loss is not None and "loss" not in metrics:
            raise ValueError(f"data_loss needs 'loss' in metrics. Received: metrics={tuple(metrics)}.")
        self.writer = writer
        self.summary_every = int(summary_every)
        self.data_loss = data_loss
        self.metrics = tuple(metrics) + ((data_loss,) if data_loss is not None else ())
        keys = self.metrics if data_loss is None else \
            tuple(k for k in metrics if k != data_loss) + ("l2_loss", "total_loss")
        self.records: dict[str, list] = {k: [] for k in ("step", "lr", *keys)}
        self.step = None if initial_step is None else int(initial_step)
        self._chunk_lrs: list[float] = []
        self._graph_lr = None
        self._graph_momentum = None
        self.record_momentum = bool(record_momentum)
        self._chunk_momenta: list[float] = []
        self._begin_batch = 0
        self._means: dict[str, tuple[int, float | None]] = {}

    def on_train_begin(self, logs=None):
        if self.step is None:
            self.step = keras_internals.read_iterations(self.model.optimizer)
        if self.record_momentum or self._momentum_schedule() is not None:
            self.records.setdefault("momentum", [])

    def _read_momentum(self) -> float:
        """The optimizer's momentum variable, rounded to float32 (one host read)."""
        variable = keras_internals.inner_optimizer(self.model.optimizer).momentum_variable
        return float(np.float32(keras.ops.convert_to_numpy(variable)))

    def _momentum_schedule(self):
        """The momentum schedule the (inner) optimizer holds, or None (Keras optimizers hold none)."""
        return getattr(keras_internals.inner_optimizer(self.model.optimizer), "momentum_schedule", None)

    def on_epoch_begin(self, epoch, logs=None):
        self._means = {k: (0, None) for k in self.metrics}

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self._begin_batch = int(batch)
        n = max(int(getattr(self.model, "steps_per_execution", 1) or 1), 1)
        schedule = keras_internals.held_schedule(optimizer)
        if schedule is None:  # a float LR: a variable, constant inside a compiled chunk
            self._chunk_lrs = [keras_internals.read_learning_rate(optimizer)] * n
        else:  # computed from the optimizer's step count, in graph as the training step does
            if self._graph_lr is None or self._graph_lr.schedule is not schedule:
                self._graph_lr = GraphLR(schedule)
            start = keras_internals.read_iterations(optimizer)
            self._chunk_lrs = self._graph_lr(range(start, start + n))
        momentum_schedule = self._momentum_schedule()
        if momentum_schedule is not None and n > 1:  # the steps before a chunk's last: in graph, as the update
            if self._graph_momentum is None or self._graph_momentum.schedule is not momentum_schedule:
                self._graph_momentum = GraphLR(momentum_schedule)
            start = keras_internals.read_iterations(optimizer)
            self._chunk_momenta = self._graph_momentum(range(start, start + n))
        elif momentum_schedule is None and "momentum" in self.records:  # set between batches by a callback
            self._chunk_momenta = [self._read_momentum()] * n

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        n = int(batch) - self._begin_batch + 1
        if n < 1:
            n = 1
        lrs = (self._chunk_lrs + [self._chunk_lrs[-1]] * n)[:n] if self._chunk_lrs else [float("nan")] * n
        steps = list(range(self.step, self.step + n))
        values = {}
        for key in self.metrics:
            if key not in logs:
                values[key] = None
                continue
            count_before, mean_before = self._means.get(key, (0, None))
            count_now = int(batch) + 1
            mean_now = float(logs[key])
            values[key] = deaverage(mean_now, count_now, mean_before, count_before) \
                if count_now > count_before else float("nan")
            self._means[key] = (count_now, mean_now)
        if self.data_loss is not None:  # Keras' loss is the total: split it into data loss and L2 term
            total, data = values.pop("loss"), values.pop(self.data_loss)
            values["loss"] = data
            values["l2_loss"] = None if total is None or data is None else total - data
            values["total_loss"] = total
        self.records["step"].extend(steps)
        self.records["lr"].extend(lrs)
        momenta = None
        if "momentum" in self.records:
            if self._momentum_schedule() is not None:  # the variable holds what the chunk's last step used
                last = self._read_momentum()
                momenta = (self._chunk_momenta + [last] * n)[:n - 1] + [last]
            else:
                momenta = (self._chunk_momenta + [self._chunk_momenta[-1]] * n)[:n]
            self.records["momentum"].extend(momenta)
        for key, v in values.items():
            per_step = [float("nan")] * (n - 1) + [float("nan") if v is None else v]
            self.records[key].extend(per_step)
        if self.writer is not None:
            self._write(steps, lrs, values, momenta)
        self.step += n

    def _write(self, steps, lrs, values, momenta=None) -> None:
        every = self.summary_every
        due = [s for s in steps if s % every == 0]
        if not due:
            return
        with self.writer.as_default():
            for i, (s, lr) in enumerate(zip(steps, lrs, strict=True)):
                if s % every == 0:
                    tf.summary.scalar("learning_rate", lr, step=s)
                    if momenta is not None:
                        tf.summary.scalar("momentum", momenta[i], step=s)
            for key, v in values.items():
                if v is not None:
                    tf.summary.scalar(key, v, step=steps[-1])
