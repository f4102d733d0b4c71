"""The same training job through `model.fit`, leaving the custom loop's outputs.

Two ways to drive the learning rate:

* no `lr_callback` (the in-graph schedule): the optimizer is built with a `LearningRateSchedule`, so
  Keras computes `lr = schedule(optimizer.iterations)` in graph before every update. Exact at any
  `steps_per_execution`; `steps_per_loop` maps to `compile(steps_per_execution=K)` with K the largest
  divisor of the epoch length, the run length, `checkpoint_every` and the start step that is
  <= `steps_per_loop` (Keras' epoch iterator runs whole chunks, so a chunk that does not divide the
  epoch would overrun it).
* an `lr_callback` (`clrlab.callbacks.CyclicLR`): the optimizer holds a float LR and the callback sets
  it before every batch from Python. Needs `steps_per_execution=1`, which is what it gets: the LR stays
  exact per step.

Outputs, in the layout the custom loop (`trainers/controller.py`) leaves, so both trainers can be
compared file by file: `history.json` (`trainers.run_state.History`), TensorBoard `train/` per-step
`learning_rate`, `loss` (the data loss), `accuracy` [, `l2_loss`, `total_loss` for a model with
regularisation losses: Keras' own `loss` is the total, split with a data-loss metric] (every
`summary_every` steps) and `epoch_loss`/`epoch_accuracy`,
`validation/` `loss`/`accuracy` per epoch, and `checkpoints/` (`trainers.run_state.RunState`: model,
optimizer, global step, epoch) on the cadence of `RunState.save_due` (the last step, every `checkpoint_every`
steps, and every `checkpoint_secs` seconds, or at every epoch end when that is 0) and on a stop.

Differences that come from `model.fit` itself, documented rather than hidden:

* The per-step loss and accuracy are de-averaged from Keras' running means (`clrlab.callbacks.deaverage`:
  exact for the equal-size unweighted batches `clrlab.data.train_dataset` yields, up to float32
  rounding). With `steps_per_execution = K > 1` only each chunk's mean is known: it is recorded at the
  chunk's last step and the other steps hold null in `history.json` (no TensorBoard point).
* Keras calls `on_epoch_end` also when training stops mid-epoch; an epoch that did not run to its end is
  not recorded or evaluated (as in the custom loop), but user callbacks still see that call.
* Resuming mid-epoch runs two `fit` calls (the rest of the interrupted epoch, then the remaining
  epochs), so user callbacks see `on_train_begin`/`on_train_end` twice in such a resumed run.
* Under `LossScaleOptimizer`, the schedule path follows `optimizer.iterations`, which does not advance on
  skipped (non-finite) steps, so the LR may lag the global step (the custom loop schedules from its own
  global step). The recorded `lr` is always the LR the step really used. `loss_scale`/`applied` are not
  recorded on this path.

Validation uses the custom loop's definition (mean cross-entropy without the L2 term, and accuracy over
the whole eval dataset), computed at every epoch end and added to the epoch logs (`val_loss`,
`val_accuracy`, plus `learning_rate`) before user callbacks see them.

Everything here is eager, between compiled `fit` calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from clrlab import keras_internals
from clrlab.callbacks import CyclicLR, StepRecorder
from trainers.custom_loop import NonFiniteLossError, StepRecords
from trainers.evaluation import Evaluator
from trainers.run_state import Outcome, RunState, StopRequests, refuse_lr_callbacks

__all__ = ["KerasFitTrainer", "chunk_size"]


def chunk_size(limit: int, lengths: Iterable[int]) -> int:
    """The largest divisor of every positive number in `lengths` that is <= `limit` (at least 1)."""
    g = 0
    for n in lengths:
        if n:
            g = math.gcd(g, int(n))
    if g == 0:
        return max(1, int(limit))
    return max(d for d in range(1, min(int(limit), g) + 1) if g % d == 0)


class KerasFitTrainer:
    """Trains `model` with `model.fit`; the interface of `trainers.controller.Controller`.

    `restore()` loads the latest checkpoint (returns its step or None), `run()` trains to `total_steps`
    and returns a `trainers.run_state.Outcome`, `predict_classes(dataset)` gives predictions. See the
    module docstring for what is written where.

    Args:
      model: a Keras model returning logits, created in `strategy`'s scope.
      optimizer: holds a `LearningRateSchedule` when `lr_callback` is None, else a float LR.
      train_data_fn: `start_step -> tf.data.Dataset`, infinite, whose k-th batch is the batch of global
        step `start_step + k`: what makes resume exact.
      eval_dataset: finite dataset evaluated at every epoch end.
      steps_per_epoch, total_steps: steps (batches) per epoch and in all (the run may end mid-epoch).
      strategy: the `tf.distribute.Strategy` (default: the current one).
      lr_callback: a `clrlab.callbacks.CyclicLR` that sets the LR before every batch, or None.
      steps_per_loop: the most steps per compiled call (see the module docstring).
      checkpoint_every: also checkpoint every N steps (0: off).
      checkpoint_secs: checkpoint at the first chunk end at least this many seconds after the previous
        save (0: at every epoch end); see `trainers.run_state.RunState.save_due`.
      summary_every: write the per-step scalars every N steps.
      jit_compile: compile the train step with XLA.
      summary_writer: `tf.summary` writer for per-step and per-epoch training scalars (None: none).
      validation_writer: `tf.summary` writer for per-epoch validation scalars (None: none).
      checkpoint_dir: folder for `tf.train.CheckpointManager` (None: no checkpoints).
      history_path: where `history.json` is (re)written at every checkpoint and at the end.
      callbacks: Keras callbacks, passed to `fit` after the trainer's own. Callbacks that set the LR are
        refused (`trainers.run_state.refuse_lr_callbacks`): the trainer already drives it.
      progress: 'bar' (Keras progress bar), 'log' (one line per epoch) or 'auto' (bar on a terminal).
      max_to_keep: checkpoints kept.

    Raises:
      LearningRateConflictError: for an LR-setting callback.
      ValueError: an optimizer whose LR does not match `lr_callback`, or a bad count.
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer, *,
                 train_data_fn: Callable[[int], tf.data.Dataset], eval_dataset: tf.data.Dataset,
                 steps_per_epoch: int, total_steps: int, strategy: tf.distribute.Strategy | None = None,
                 lr_callback: CyclicLR | None = None, steps_per_loop: int = 100, checkpoint_every: int = 0,
                 summary_every: int = 1, jit_compile: bool = False, summary_writer: Any = None,
                 validation_writer: Any = None, checkpoint_dir: str | None = None, history_path: str | None = None,
                 callbacks: Iterable[keras.callbacks.Callback] | None = None, progress: str = "auto",
                 max_to_keep: int = 3, checkpoint_secs: float = 0.0, clock=time.monotonic):
        for name, value, low in (("steps_per_loop", steps_per_loop, 1), ("checkpoint_every", checkpoint_every, 0),
                                 ("summary_every", summary_every, 1)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}. Received: {name}={value}.")
        self.callbacks = list(callbacks or [])
        refuse_lr_callbacks(self.callbacks)
        holds_schedule = keras_internals.holds_schedule(optimizer)
        if lr_callback is None and not holds_schedule:
            raise ValueError("Without an lr_callback the optimizer must be built with a LearningRateSchedule "
                             "(Keras then computes the LR in graph every step).")
        if lr_callback is not None and holds_schedule:
            raise ValueError("An lr_callback sets the learning rate itself: build the optimizer with a float "
                             "learning rate.")
        self.model, self.optimizer = model, optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.train_data_fn = train_data_fn
        self.lr_callback = lr_callback
        self.steps_per_loop, self.checkpoint_every = int(steps_per_loop), int(checkpoint_every)
        self.summary_every, self.jit_compile = int(summary_every), bool(jit_compile)
        self.summary_writer = summary_writer
        self.loss_scaling = keras_internals.uses_loss_scaling(optimizer)
        self.evaluator = Evaluator(model, self.strategy,
                                   keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
        self.state = RunState(model, optimizer, strategy=self.strategy, steps_per_epoch=steps_per_epoch,
                              total_steps=total_steps, checkpoint_dir=checkpoint_dir, history_path=history_path,
                              summary_writer=summary_writer, validation_writer=validation_writer,
                              evaluator=self.evaluator, eval_dataset=eval_dataset, progress=progress,
                              max_to_keep=max_to_keep, checkpoint_every=checkpoint_every,
                              checkpoint_secs=checkpoint_secs, clock=clock)
        self.global_step = self.state.global_step

    @property
    def history(self):
        return self.state.history

    def restore(self) -> int | None:
        """Restores the latest checkpoint, if any, and the history saved with it. Returns its step."""
        return self.state.restore()

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Mean cross-entropy (no L2 term) and accuracy over a finite dataset, as the custom loop."""
        return self.evaluator.evaluate(dataset)

    def predict_classes(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Argmax class per example of a finite dataset, as int32 numpy (eager)."""
        return self.evaluator.predict_classes(dataset)

    def steps_per_execution(self, start_step: int) -> int:
        """K for `compile(steps_per_execution=K)`: 1 with the callback, else see the module docstring."""
        if self.lr_callback is not None:
            return 1
        return chunk_size(self.steps_per_loop, [self.state.steps_per_epoch, self.state.total_steps,
                                                self.checkpoint_every, start_step])

    def run(self) -> Outcome:
        """Trains from the restored global step to `total_steps` with `model.fit` (eager)."""
        model, state = self.model, self.state
        spe, total = state.steps_per_epoch, state.total_steps
        start = state.step
        k = self.steps_per_execution(start)
        if k < self.steps_per_loop and self.lr_callback is None:
            logging.info("keras_fit: steps_per_execution=%d (the largest divisor of the epoch, run, checkpoint "
                         "and start step counts that is <= steps_per_loop=%d).", k, self.steps_per_loop)
        # Keras' `loss` includes the regularisation term: a data-loss metric lets the records split the two.
        data_loss = "data_loss" if model.losses else None
        metrics = ["accuracy"] + ([keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name=data_loss)]
                                  if data_loss else [])
        with self.strategy.scope():
            model.compile(optimizer=self.optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=metrics, steps_per_execution=k, jit_compile=self.jit_compile)
        # A CyclicLR with cycle_momentum sets the momentum variable between batches: record it too.
        recorder = StepRecorder(writer=self.summary_writer, summary_every=self.summary_every, initial_step=start,
                                record_momentum=bool(getattr(self.lr_callback, "cycle_momentum", False)),
                                data_loss=data_loss)
        driver = _Driver(self, recorder)
        own = [recorder, driver]
        if self.lr_callback is not None:
            # The checkpointed global step is the cycle position (exact also when a LossScaleOptimizer
            # skipped steps, where optimizer.iterations lags).
            self.lr_callback.clr_iterations = self.lr_callback.trn_iterations = start
            own.append(self.lr_callback)
        callbacks = own + self.callbacks
        epoch, in_epoch = divmod(start, spe)
        phases = []  # (first step, first epoch, steps per fit-epoch, epochs)
        if in_epoch and start < total:
            phases.append((start, epoch, state.epoch_length(epoch) - in_epoch, epoch + 1))
            epoch += 1
        if start < total and epoch * spe < total:  # a rerun of a finished run (killed after its last checkpoint)
            phases.append((epoch * spe, epoch, spe, state.total_epochs))  # trains nothing
        with StopRequests() as stops:
            driver.stops = stops
            for first, initial_epoch, steps, epochs in phases:
                model.fit(self.train_data_fn(first), steps_per_epoch=steps, epochs=epochs,
                          initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False,  # order: the data fn's
                          verbose=1 if state.progress == "bar" else 0)
                if driver.status != "running" or model.stop_training:
                    break
        step = state.step
        status = driver.status
        if status == "running":
            status = "completed" if step >= total else "stopped"
        if status == "stopped" and state.saved_step != step:  # e.g. stopped at an epoch end the cadence skipped
            state.save()
        state.save_history()
        return Outcome(status=status, step=step, history=state.history, signal=driver.signal,
                       checkpoint=state.last_checkpoint)


class _Driver(keras.callbacks.Callback):
    """The trainer's own bookkeeping inside `fit` (placed right after the `StepRecorder`).

    Per batch: moves the recorder's new records into `History`, advances the global step, stops at
    `total_steps`, checkpoints every `checkpoint_every` steps, raises `NonFiniteLossError` on a NaN/inf
    loss in full precision, and turns SIGTERM/SIGINT into a checkpoint and a stop. Per completed epoch:
    `RunState.end_epoch`, whose logs (`loss`/`accuracy` epoch means of the per-step values, `val_loss`,
    `val_accuracy`, `learning_rate`) go into the logs the later callbacks see.
    """

    def __init__(self, trainer: KerasFitTrainer, recorder: StepRecorder):
        super().__init__()
        self.trainer = trainer
        self.state = trainer.state
        self.recorder = recorder
        self.stops: StopRequests | None = None
        self.status = "running"
        self.signal = None
        self._copied = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.state.begin_epoch(epoch)

    def on_train_batch_end(self, batch, logs=None):
        state = self.state
        rec = self.recorder.records
        new = slice(self._copied, len(rec["step"]))
        self._copied = len(rec["step"])
        steps = np.asarray(rec["step"][new], np.int64)
        if steps.size == 0:
            return
        loss = np.asarray(rec["loss"][new], np.float64)
        momentum = np.asarray(rec["momentum"][new], np.float32) if "momentum" in rec else None
        terms = {k: np.asarray(rec[k][new], np.float64) for k in ("l2_loss", "total_loss") if k in rec}
        records = StepRecords(step=steps, lr=np.asarray(rec["lr"][new], np.float32), loss=loss,
                              accuracy=np.asarray(rec["accuracy"][new], np.float64),
                              applied=np.ones(steps.shape, bool), momentum=momentum, **terms)
        checked = terms.get("total_loss", loss)  # what the optimizer minimised
        if not self.trainer.loss_scaling and not np.isfinite(checked[-1]):
            raise NonFiniteLossError(steps[-1], records.lr[-1], checked[-1], records)
        state.history.add_steps(records)
        step = int(steps[-1]) + 1
        state.global_step.assign(step)
        if step >= state.total_steps:
            self.model.stop_training = True
        if self.stops is not None and self.stops.received is not None:
            self.signal = self.stops.name
            self.status = "interrupted"
            self.model.stop_training = True
            state.save()
            return
        epoch_end = step % state.steps_per_epoch == 0 or step >= state.total_steps
        if not epoch_end and state.save_due(step, epoch_end=False):  # an epoch end saves in on_epoch_end
            state.save()

    def on_epoch_end(self, epoch, logs=None):
        state = self.state
        if self.status != "running":
            return  # interrupted: checkpoint already saved
        if state.step != epoch * state.steps_per_epoch + state.epoch_length(epoch):
            # Stopped mid-epoch by a callback: keep the state, record no partial epoch (as the custom loop).
            state.save()
            return
        epoch_logs = state.end_epoch(epoch)
        if logs is not None:
            logs.update(epoch_logs)
