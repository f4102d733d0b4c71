"""The eager outer loop around `CustomLoopTrainer`: epochs, callbacks, progress; bookkeeping in run_state.

Everything here runs eagerly, once per compiled call of K = `steps_per_loop` steps (chunks never cross
an epoch end or a `checkpoint_every` boundary). The split follows Orbit's runner/controller
(tensorflow/models, orbit/controller.py): the trainer owns the graph, the controller owns time, and the
global step, checkpoints and history live in a `trainers.run_state.RunState`.

Keras callbacks are driven like `model.fit` with `steps_per_execution=K`: `on_train_batch_begin/end`
fire once per compiled chunk, with the index of the chunk's first/last batch; batch logs hold the
epoch's running means of `loss` and `accuracy` (`trainers.run_state.epoch_mean` of the steps so far; NaN
for a chunk holding a non-finite loss, as Keras' running mean turns NaN, so TerminateOnNaN stops), plus
the true loss of the chunk's last batch as `batch_loss`, and `learning_rate`. Epoch logs add `val_loss`
and `val_accuracy`. `model.stop_training` is honoured after every chunk and epoch. A callback that
changes the optimizer's learning rate is rejected: the loop sets it from the policy every step and would
silently undo it.

Resume: `restore()` loads the latest checkpoint (model, optimizer, global step, epoch) and the history
written with it; the data pipeline restarts at the restored global step, so the LR trace (a function of
the step) continues unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainers.custom_loop import CustomLoopTrainer
from trainers.run_state import LearningRateConflictError, Outcome, RunState, StopRequests, refuse_lr_callbacks

__all__ = ["Controller", "LearningRateConflictError"]

_BAR_METRICS = ["loss", "accuracy", "learning_rate", "loss_scale", "skipped_steps", "val_loss", "val_accuracy"]


class Controller:
    """Drives a `CustomLoopTrainer` through epochs (eager, per compiled chunk).

    Args:
      trainer: the compiled step runner; its `global_step` is the run's.
      train_data_fn: `start_step -> tf.data.Dataset`, infinite, whose k-th batch is the batch of global
        step `start_step + k` (clrlab.data.train_dataset): what makes resume exact.
      steps_per_epoch: steps (batches) per epoch.
      total_steps: steps to train in all (may end mid-epoch).
      steps_per_loop: steps per compiled call (K).
      eval_dataset: finite validation/test dataset evaluated at every epoch end, or None.
      checkpoint_dir: folder for `tf.train.CheckpointManager` (None: no checkpoints).
      checkpoint_every: also checkpoint every N steps (0: off).
      checkpoint_secs: checkpoint at the first chunk end at least this many seconds after the previous
        save (0: at every epoch end); see `trainers.run_state.RunState.save_due`. The last step and a stop
        (signal, `stop_training`) always save.
      history_path: where `history.json` is (re)written at every checkpoint and at the end.
      validation_writer: `tf.summary` writer for per-epoch validation scalars.
      callbacks: Keras callbacks, driven as described in the module docstring.
      progress: 'bar' (Keras Progbar), 'log' (one line per epoch) or 'auto' (bar on a terminal).
      max_to_keep: checkpoints kept.
    """

    def __init__(self, trainer: CustomLoopTrainer, *, train_data_fn: Callable[[int], tf.data.Dataset],
                 steps_per_epoch: int, total_steps: int, steps_per_loop: int = 100,
                 eval_dataset: tf.data.Dataset | None = None, checkpoint_dir: str | None = None,
                 checkpoint_every: int = 0, history_path: str | None = None, validation_writer: Any = None,
                 callbacks: Iterable[keras.callbacks.Callback] | None = None, progress: str = "auto",
                 max_to_keep: int = 3, checkpoint_secs: float = 0.0, clock=time.monotonic):
        for name, value, low in (("steps_per_loop", steps_per_loop, 1), ("checkpoint_every", checkpoint_every, 0)):
            if value < low:
                raise ValueError(f"{name} must be >= {low}. Received: {name}={value}.")
        self.callbacks = list(callbacks or [])
        refuse_lr_callbacks(self.callbacks)
        self.trainer = trainer
        self.train_data_fn = train_data_fn
        self.steps_per_loop = int(steps_per_loop)
        self.checkpoint_every = int(checkpoint_every)
        self.state = RunState(trainer.model, trainer.optimizer, strategy=trainer.strategy,
                              steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                              global_step=trainer.global_step, checkpoint_dir=checkpoint_dir,
                              history_path=history_path, summary_writer=trainer.summary_writer,
                              validation_writer=validation_writer, evaluator=trainer.evaluator,
                              eval_dataset=eval_dataset, progress=progress, max_to_keep=max_to_keep,
                              checkpoint_every=checkpoint_every, checkpoint_secs=checkpoint_secs, clock=clock)

    def restore(self) -> int | None:
        """Restores the latest checkpoint, if any, and the history saved with it. Returns its step."""
        return self.state.restore()

    def _check_lr_untouched(self, expected: float, where: str) -> None:
        actual = self.trainer.learning_rate
        if not math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-12):
            raise LearningRateConflictError(
                f"A callback changed the learning rate to {actual:.6g} in {where} (the policy set "
                f"{expected:.6g}). The custom loop sets the LR from the policy every step, so the change "
                "would be silently undone: remove that callback or express the change as a policy.")

    def run(self) -> Outcome:
        """Trains from the current global step to `total_steps` (eager). See the module docstring."""
        trainer, state = self.trainer, self.state
        model, spe = trainer.model, state.steps_per_epoch
        step = state.step
        callbacks = keras.callbacks.CallbackList(self.callbacks, add_history=False, add_progbar=False, model=model,
                                                 verbose=0, epochs=state.total_epochs, steps=spe)
        model.stop_training = False
        iterator = trainer.make_iterator(self.train_data_fn(step))
        status, received = "completed", None
        callbacks.on_train_begin()
        progbar = None
        with StopRequests() as stops:
            while step < state.total_steps:
                epoch, in_epoch = divmod(step, spe)
                epoch_len = state.epoch_length(epoch)
                if progbar is None:
                    state.begin_epoch(epoch)
                    callbacks.on_epoch_begin(epoch)
                    progbar = self._progbar(epoch, epoch_len, in_epoch)
                chunk = min(self.steps_per_loop, epoch_len - in_epoch)
                if self.checkpoint_every:
                    chunk = min(chunk, self.checkpoint_every - step % self.checkpoint_every)
                callbacks.on_train_batch_begin(in_epoch)
                records = trainer.train_steps(iterator, chunk)
                step += chunk
                state.history.add_steps(records)
                logs = {**state.running_means(epoch), "batch_loss": float(records.loss[-1]),
                        "learning_rate": float(records.lr[-1])}
                if not np.isfinite(records.loss).all():
                    logs["loss"] = float("nan")
                if records.loss_scale is not None:
                    logs["loss_scale"] = float(records.loss_scale[-1])
                    logs["skipped_steps"] = state.history.skipped_steps
                callbacks.on_train_batch_end(in_epoch + chunk - 1, logs)
                self._check_lr_untouched(logs["learning_rate"], "on_train_batch_end")
                epoch_done = in_epoch + chunk == epoch_len
                bar_values = [(k, v) for k, v in logs.items() if k != "batch_loss" and v is not None]
                if self.state.progress == "bar" and not epoch_done:
                    progbar.update(in_epoch + chunk, bar_values)
                if epoch_done:
                    epoch_logs = state.end_epoch(epoch)  # evaluates, records, saves when due
                    if state.progress == "bar":  # the epoch's last line shows validation too, like fit
                        progbar.update(epoch_len, bar_values + [(k, epoch_logs[k]) for k in ("val_loss", "val_accuracy")
                                                                if k in epoch_logs])
                    callbacks.on_epoch_end(epoch, epoch_logs)
                    self._check_lr_untouched(logs["learning_rate"], "on_epoch_end")
                    progbar = None
                elif state.save_due(step, epoch_end=False):
                    state.save()
                if stops.received is not None:
                    status, received = "interrupted", stops.name
                    if state.saved_step != step:
                        state.save()
                    break
                if model.stop_training:
                    status = "stopped"
                    if state.saved_step != step:
                        state.save()
                    break
        callbacks.on_train_end({"learning_rate": trainer.learning_rate})
        state.save_history()
        return Outcome(status=status, step=step, history=state.history, signal=received,
                       checkpoint=state.last_checkpoint)

    def _progbar(self, epoch: int, epoch_len: int, in_epoch: int):
        if self.state.progress != "bar":
            return True  # a non-None marker: the epoch has begun
        print(f"Epoch {epoch + 1}/{self.state.total_epochs}")
        bar = keras.utils.Progbar(epoch_len, stateful_metrics=_BAR_METRICS)
        if in_epoch:
            bar.update(in_epoch)
        return bar
