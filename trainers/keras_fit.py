"""The same training job through `model.fit` (`--trainer=keras_fit`), with the custom loop's outputs.

Two ways to drive the learning rate (`--lr_control`):

* `schedule` (default): the optimizer is built with the job's `LearningRateSchedule`, so Keras computes
  `lr = schedule(optimizer.iterations)` in graph before every update. Exact at any
  `steps_per_execution`; `--steps_per_loop` maps to `compile(steps_per_execution=K)` with K the largest
  divisor of the epoch length, the run length, `--checkpoint_every` and the start step that is
  <= `--steps_per_loop` (Keras' epoch iterator runs whole chunks, so a chunk that does not divide the
  epoch would overrun it).
* `callback`: the optimizer holds a float LR and `clrlab.callbacks.CyclicLR` sets it before every batch
  from Python (triangular, triangular2 and exp_range only). Needs `steps_per_execution=1`, which is what
  it gets: the LR stays exact per step.

Outputs, in the layout the custom loop (`trainers/controller.py`) leaves, so both trainers can be
compared file by file: `history.json` (`trainers.controller.History`: per-step `step`, `lr`, `loss`,
`accuracy`; per-epoch records), TensorBoard `train/` per-step `learning_rate`, `loss`, `accuracy` (every
`--summary_every` steps) and `epoch_loss`/`epoch_accuracy`, `validation/` `loss`/`accuracy` per epoch,
and `checkpoints/` written by `tf.train.CheckpointManager` (model, optimizer, global step, epoch) at
every epoch end and every `--checkpoint_every` steps.

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
the whole test split), computed at every epoch end and added to the epoch logs (`val_loss`,
`val_accuracy`, plus `learning_rate`) before user callbacks see them.

Everything here is eager, between compiled `fit` calls.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from clrlab import schedules
from clrlab.callbacks import CyclicLR, StepRecorder
from clrlab.errors import UserError
from trainers.controller import (History, LearningRateConflictError, Outcome, _LR_CALLBACK_TYPES,
                                 _StopRequests)
from trainers.evaluation import Evaluator
from trainers.custom_loop import NonFiniteLossError, StepRecords, uses_loss_scaling

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


def _epoch_mean(values: list) -> float | None:
    """Mean of an epoch's per-step values where null marks a step inside a chunk whose mean is recorded
    at the chunk's last step: each recorded value weighs as many steps as it covers."""
    total, count, pending = 0.0, 0, 0
    for v in values:
        pending += 1
        if v is not None:
            total += float(v) * pending
            count += pending
            pending = 0
    return total / count if count else None


class KerasFitTrainer:
    """Trains a `clrlab.job.Job` with `model.fit`; the interface of `trainers.controller.Controller`.

    `restore()` loads the latest checkpoint (returns its step or None), `run()` trains to
    `job.total_steps` and returns a `trainers.controller.Outcome`, `predict_classes(dataset)` gives the
    test predictions. See the module docstring for what is written where.

    Args:
      job: the built job. Its optimizer holds the `LearningRateSchedule` for `lr_control='schedule'`
        (what `clrlab.job.build_job` builds for `--trainer=keras_fit`) and a float LR for 'callback'.
      summary_writer: `tf.summary` writer for per-step and per-epoch training scalars (None: none).
      validation_writer: `tf.summary` writer for per-epoch validation scalars (None: none).
      checkpoint_dir: folder for `tf.train.CheckpointManager` (None: no checkpoints).
      history_path: where `history.json` is (re)written at every checkpoint and at the end.
      callbacks: Keras callbacks, passed to `fit` after the trainer's own. Callbacks that set the LR
        (ReduceLROnPlateau, LearningRateScheduler, anything with `sets_learning_rate`, e.g. CyclicLR)
        are refused: the trainer already drives the LR.
      progress: 'bar' (Keras progress bar), 'log' (one line per epoch) or 'auto' (bar on a terminal).
      max_to_keep: checkpoints kept.

    Raises:
      LearningRateConflictError: for an LR-setting callback.
      UserError: `lr_control='callback'` with a policy the classic callback cannot express.
      ValueError: an optimizer that does not match `lr_control`.
    """

    def __init__(self, job, *, summary_writer: Any = None, validation_writer: Any = None,
                 checkpoint_dir: str | None = None, history_path: str | None = None,
                 callbacks: Iterable[keras.callbacks.Callback] | None = None, progress: str = "auto",
                 max_to_keep: int = 3):
        config = job.config
        if progress not in ("auto", "bar", "log"):
            raise ValueError(f"progress must be 'auto', 'bar' or 'log'. Received: progress={progress!r}.")
        self.job = job
        self.model = job.model
        self.optimizer = job.optimizer
        self.strategy = job.strategy
        self.summary_writer = summary_writer
        self.validation_writer = validation_writer
        self.history_path = history_path
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if isinstance(cb, _LR_CALLBACK_TYPES) or getattr(cb, "sets_learning_rate", False):
                raise LearningRateConflictError(
                    f"{type(cb).__name__} sets the learning rate, but --trainer=keras_fit already drives it "
                    f"(--lr_control={config.lr_control}). Remove the callback, or express the LR change as "
                    "a policy (clrlab.schedules).")
        self.progress = progress if progress != "auto" else ("bar" if sys.stdout.isatty() else "log")
        self.loss_scaling = uses_loss_scaling(self.optimizer)
        holds_schedule = isinstance(getattr(_inner(self.optimizer), "_learning_rate", None),
                                    keras.optimizers.schedules.LearningRateSchedule)
        self.clr = None
        if config.lr_control == "schedule":
            if not holds_schedule:
                raise ValueError("--lr_control=schedule needs the optimizer built with the job's schedule "
                                 "(clrlab.job.build_job does this for --trainer=keras_fit).")
        else:
            if holds_schedule:
                raise ValueError("--lr_control=callback needs an optimizer with a float learning rate.")
            if config.policy not in schedules.MODES or config.step_size_down is not None:
                raise UserError(
                    f"--lr_control=callback uses the classic CyclicLR callback, which has only the symmetric "
                    f"triangular, triangular2 and exp_range cycles. Received: --policy={config.policy}"
                    + (f", --step_size_down={config.step_size_down}" if config.step_size_down is not None else "")
                    + "; use --lr_control=schedule for it.")
            self.clr = CyclicLR(base_lr=config.base_lr, max_lr=config.max_lr, step_size=job.step_size,
                                mode=config.policy, gamma=config.gamma)
        self.history = History()
        with self.strategy.scope():
            # Built eagerly before any restore: checkpoints match optimizer variables by position.
            if not self.optimizer.built:  # LossScaleOptimizer.build is not idempotent: never build twice
                self.optimizer.build(self.model.trainable_variables)
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step",
                                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.evaluator = Evaluator(self.model, self.strategy,
                                   keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None))
        self.checkpoint_manager = None
        if checkpoint_dir is not None:
            checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer,
                                             global_step=self.global_step, epoch=self.epoch)
            self.checkpoint_manager = tf.train.CheckpointManager(
                checkpoint, checkpoint_dir, max_to_keep=max_to_keep, step_counter=self.global_step)

    # ----------------------------------------------------------------------------- checkpoints
    def restore(self) -> int | None:
        """Restores the latest checkpoint, if any, and the history saved with it. Returns its step."""
        if self.checkpoint_manager is None or self.checkpoint_manager.latest_checkpoint is None:
            return None
        with self.strategy.scope():
            self.checkpoint_manager.checkpoint.restore(
                self.checkpoint_manager.latest_checkpoint).assert_existing_objects_matched()
        step = int(self.global_step.numpy())
        if self.history_path and os.path.exists(self.history_path):
            with open(self.history_path, encoding="utf-8") as fh:
                self.history = History.from_json(json.load(fh))
            self.history.truncate(step, step // self.job.steps_per_epoch)
        else:
            logging.warning("No history.json next to the checkpoints: the history restarts at step %d.", step)
        return step

    def save(self) -> str | None:
        if self.history_path:
            self.history.save(self.history_path)  # first: a kill between the two leaves history >= ckpt.
        if self.checkpoint_manager is None:
            return None
        return self.checkpoint_manager.save(checkpoint_number=self.global_step)

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Mean cross-entropy (no L2 term) and accuracy over a finite dataset, as the custom loop."""
        return self.evaluator.evaluate(dataset)

    def predict_classes(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Argmax class per example of a finite dataset, as int32 numpy (eager)."""
        return self.evaluator.predict_classes(dataset)

    # ----------------------------------------------------------------------------- training
    def steps_per_execution(self, start_step: int) -> int:
        """K for `compile(steps_per_execution=K)`: 1 with the callback, else see the module docstring."""
        if self.clr is not None:
            return 1
        c = self.job.config
        return chunk_size(c.steps_per_loop, [self.job.steps_per_epoch, self.job.total_steps,
                                             c.checkpoint_every, start_step])

    def run(self) -> Outcome:
        """Trains from the restored global step to `job.total_steps` with `model.fit` (eager)."""
        job, model, config = self.job, self.model, self.job.config
        spe, total = job.steps_per_epoch, job.total_steps
        start = int(self.global_step.numpy())
        k = self.steps_per_execution(start)
        if k < config.steps_per_loop and self.clr is None:
            logging.info("keras_fit: steps_per_execution=%d (the largest divisor of the epoch, run, checkpoint "
                         "and start step counts that is <= --steps_per_loop=%d).", k, config.steps_per_loop)
        with self.strategy.scope():
            model.compile(optimizer=self.optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=["accuracy"], steps_per_execution=k, jit_compile=bool(config.jit_compile))
        recorder = StepRecorder(writer=self.summary_writer, summary_every=config.summary_every, initial_step=start)
        driver = _Driver(self, recorder)
        own = [recorder, driver]
        if self.clr is not None:
            # The checkpointed global step is the cycle position (exact also when a LossScaleOptimizer
            # skipped steps, where optimizer.iterations lags).
            self.clr.clr_iterations = self.clr.trn_iterations = start
            own.append(self.clr)
        callbacks = own + self.callbacks
        epoch, in_epoch = divmod(start, spe)
        phases = []  # (first step, first epoch, steps per fit-epoch, epochs)
        if in_epoch and start < total:
            phases.append((start, epoch, min(spe, total - epoch * spe) - in_epoch, epoch + 1))
            epoch += 1
        if epoch * spe < total:
            phases.append((epoch * spe, epoch, spe, math.ceil(total / spe)))
        with _StopRequests() as stops:
            driver.stops = stops
            for first, initial_epoch, steps, epochs in phases:
                model.fit(job.train_data_fn(first), steps_per_epoch=steps, epochs=epochs,
                          initial_epoch=initial_epoch, callbacks=callbacks, shuffle=False,  # order: data.py
                          verbose=1 if self.progress == "bar" else 0)
                if driver.status != "running" or model.stop_training:
                    break
        step = int(self.global_step.numpy())
        status = driver.status
        if status == "running":
            status = "completed" if step >= total else "stopped"
        if self.history_path:
            self.history.save(self.history_path)
        return Outcome(status=status, step=step, history=self.history, signal=driver.signal,
                       checkpoint=driver.checkpoint)


class _Driver(keras.callbacks.Callback):
    """The trainer's own bookkeeping inside `fit` (placed right after the `StepRecorder`).

    Per batch: moves the recorder's new records into `History`, advances the global step, stops at
    `total_steps`, checkpoints every `checkpoint_every` steps, raises `NonFiniteLossError` on a NaN/inf
    loss in full precision, and turns SIGTERM/SIGINT into a checkpoint and a stop. Per completed epoch:
    evaluates, writes the scalars and the epoch record, puts `loss`/`accuracy` (epoch means of the
    per-step values), `val_loss`, `val_accuracy` and `learning_rate` into the logs the later callbacks
    see, and checkpoints.
    """

    def __init__(self, trainer: KerasFitTrainer, recorder: StepRecorder):
        super().__init__()
        self.trainer = trainer
        self.recorder = recorder
        self.stops = None
        self.status = "running"
        self.signal = None
        self.checkpoint = None
        self._copied = 0
        self._epoch_start = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.trainer.epoch.assign(epoch)
        self._epoch_start = time.time()

    def on_train_batch_end(self, batch, logs=None):
        t = self.trainer
        rec = self.recorder.records
        new = slice(self._copied, len(rec["step"]))
        self._copied = len(rec["step"])
        steps = np.asarray(rec["step"][new], np.int64)
        if steps.size == 0:
            return
        loss = np.asarray(rec["loss"][new], np.float64)
        records = StepRecords(step=steps, lr=np.asarray(rec["lr"][new], np.float32), loss=loss,
                              accuracy=np.asarray(rec["accuracy"][new], np.float64),
                              applied=np.ones(steps.shape, bool))
        if not t.loss_scaling and not np.isfinite(loss[-1]):
            raise NonFiniteLossError(steps[-1], records.lr[-1], loss[-1], records)
        t.history.add_steps(records)
        step = int(steps[-1]) + 1
        previous = int(t.global_step.numpy())
        t.global_step.assign(step)
        if step >= t.job.total_steps:
            self.model.stop_training = True
        if self.stops is not None and self.stops.received is not None:
            self.signal = signal.Signals(self.stops.received).name
            self.status = "interrupted"
            self.model.stop_training = True
            self.checkpoint = t.save()
            return
        every = t.job.config.checkpoint_every
        epoch_end = step % t.job.steps_per_epoch == 0 or step >= t.job.total_steps
        if every and step // every > previous // every and not epoch_end:
            self.checkpoint = t.save()

    def on_epoch_end(self, epoch, logs=None):
        t = self.trainer
        job = t.job
        step = int(t.global_step.numpy())
        epoch_len = min(job.steps_per_epoch, job.total_steps - epoch * job.steps_per_epoch)
        if self.status != "running":
            return  # interrupted: checkpoint already saved
        if step != epoch * job.steps_per_epoch + epoch_len:
            # Stopped mid-epoch by a callback: keep the state, record no partial epoch (as the custom loop).
            self.checkpoint = t.save()
            return
        steps = t.history.steps
        first = epoch * job.steps_per_epoch
        idx = [i for i, s in enumerate(steps["step"]) if s >= first]
        epoch_logs = {"loss": _epoch_mean([steps["loss"][i] for i in idx]),
                      "accuracy": _epoch_mean([steps["accuracy"][i] for i in idx]),
                      "learning_rate": steps["lr"][idx[-1]] if idx else None}
        val = t.evaluate(job.eval_dataset())
        epoch_logs.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if t.summary_writer is not None:
            with t.summary_writer.as_default():
                for name in ("loss", "accuracy"):
                    if epoch_logs[name] is not None:
                        tf.summary.scalar(f"epoch_{name}", epoch_logs[name], step=step)
            t.summary_writer.flush()
        if t.validation_writer is not None:
            with t.validation_writer.as_default():
                tf.summary.scalar("loss", epoch_logs["val_loss"], step=step)
                tf.summary.scalar("accuracy", epoch_logs["val_accuracy"], step=step)
            t.validation_writer.flush()
        seconds = time.time() - self._epoch_start
        record = {"epoch": epoch, "step": step, "loss": epoch_logs["loss"], "accuracy": epoch_logs["accuracy"],
                  "val_loss": epoch_logs["val_loss"], "val_accuracy": epoch_logs["val_accuracy"],
                  "lr": epoch_logs["learning_rate"], "seconds": round(seconds, 3)}
        t.history.add_epoch(record)
        if logs is not None:
            logs.update({k: v for k, v in epoch_logs.items() if v is not None})
        total_epochs = math.ceil(job.total_steps / job.steps_per_epoch)
        message = f"epoch {epoch + 1}/{total_epochs} step {step}:"
        if record["loss"] is not None:
            message += f" loss {record['loss']:.4f} accuracy {record['accuracy']:.4f}"
        message += (f" val_loss {record['val_loss']:.4f} val_accuracy {record['val_accuracy']:.4f}"
                    f" lr {record['lr']:.6g} ({seconds:.1f}s)")
        if t.progress == "log":
            print(message, flush=True)
        else:
            logging.debug(message)
        t.epoch.assign(epoch + 1)
        self.checkpoint = t.save()


def _inner(optimizer):
    return optimizer.inner_optimizer if uses_loss_scaling(optimizer) else optimizer
