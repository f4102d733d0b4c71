"""Keras callbacks for `model.fit`: the classic `CyclicLR`, working on Keras 3, and a per-step recorder.

* `CyclicLR` is a drop-in replacement for bckenstler's `clr_callback.CyclicLR` (the callback of the CLR
  repository and of the PyImageSearch CLR tutorial): same constructor, defaults, attributes and
  per-batch semantics, with the Keras 3 API underneath (no `optimizer.lr`, no `keras.backend.set_value`).
  Its values come from `clrlab.schedules.CyclicalLearningRate`, the same code the in-graph schedule
  runs, so the callback and the schedule give the same learning rates at the same steps.
* `StepRecorder` records, for every training step of `model.fit`, the learning rate that step used and
  the step's own loss and accuracy (de-averaged from Keras' running means), and can write them as
  per-step TensorBoard scalars. clrlab's `keras_fit` trainer uses it to leave the same per-step outputs
  as the compiled custom loop.

Execution context: every hook here runs eagerly, on the host, between compiled training calls of
`model.fit`. Each hook reads values back from the device (a host sync per batch), which is the price of
driving the learning rate from Python; for the fastest exact option pass a
`clrlab.schedules.CyclicalLearningRate` as the optimizer's `learning_rate` instead of using a callback.

Two Keras facts shape both callbacks (see `keras.callbacks.Callback.on_train_batch_end`):

* Batch `logs` hold **running averages since the start of the epoch**, not the batch's own values.
* With `compile(steps_per_execution=N)` the batch hooks fire once per N batches.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf

from clrlab import schedules

__all__ = ["CyclicLR", "StepRecorder", "deaverage"]

_SCHEDULE_ERROR = ("pass a float learning rate or use clrlab.schedules.CyclicalLearningRate instead of the "
                   "callback")


def deaverage(mean_now: float, count_now: int, mean_before: float | None, count_before: int) -> float:
    """The mean of the values added between two readings of a running mean.

    Keras' batch logs are running means since the epoch began: after `t` batches (1-based) the log holds
    `m_t = (x_1 + ... + x_t) / t`. The batches between reading `count_before` and `count_now` therefore
    average to `(count_now * m_now - count_before * m_before) / (count_now - count_before)`; for one batch
    that is the batch's own value `x_t = t m_t - (t-1) m_{t-1}`.

    Valid only when every batch has the same weight: equal-size batches, no `sample_weight` or
    `class_weight` (Keras weights the mean by example count). Computed in float64 from the float32
    logs, so the result carries an absolute error of about `t * 1e-7 * |m|`.

    Args:
      mean_now: the running mean after `count_now` batches.
      count_now: batches seen this epoch at the newer reading (>= 1).
      mean_before: the running mean after `count_before` batches (ignored when `count_before` is 0).
      count_before: batches seen at the older reading (0 at the start of an epoch).

    Returns:
      The mean of batches `count_before + 1 .. count_now` (NaN propagates).
    """
    if count_now <= count_before:
        raise ValueError(f"count_now must exceed count_before. Received: count_now={count_now}, "
                         f"count_before={count_before}.")
    if count_before == 0 or mean_before is None:
        return float(mean_now) if count_before == 0 else float("nan")
    total = count_now * float(mean_now) - count_before * float(mean_before)
    return total / (count_now - count_before)


def _inner(optimizer):
    """The optimizer that owns the learning rate (the inner one of a `LossScaleOptimizer`)."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def _lr_schedule(optimizer):
    """The optimizer's `LearningRateSchedule` or callable learning rate, or None for a variable LR.

    Keras 3 keeps it in the private `_learning_rate` (the public property returns its current value).
    """
    held = getattr(_inner(optimizer), "_learning_rate", None)
    if isinstance(held, keras.optimizers.schedules.LearningRateSchedule):
        return held
    if callable(held) and not isinstance(held, (keras.Variable, tf.Variable)):
        return held
    return None


def _read_lr(optimizer) -> float:
    """The learning rate the optimizer's next update will use, as a Python float (a host read)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def _iterations(optimizer) -> int:
    return int(keras.ops.convert_to_numpy(optimizer.iterations))


class _GraphLR:
    """`schedule` evaluated at a list of steps inside a `tf.function`, one scalar call per step.

    Training graphs (the custom loop, `model.fit` with a schedule) compute the LR in graph mode, and
    graph and eager evaluation of the same ops can differ in the last bit (e.g. `exp` after graph
    rewrites). Evaluating in graph here makes the recorded/assigned LRs bit-identical to what an
    in-graph schedule computes at the same step. A schedule that cannot be traced (e.g. a custom
    `scale_fn` written with NumPy) is evaluated eagerly instead.
    """

    def __init__(self, schedule):
        self.schedule = schedule
        self._fn = tf.function(
            lambda steps: tf.map_fn(lambda t: tf.cast(schedule(t), tf.float32), steps,
                                    fn_output_signature=tf.float32),
            autograph=False, reduce_retracing=True)
        self._graph_ok = True

    def __call__(self, steps) -> list[float]:
        steps = [int(t) for t in steps]
        if self._graph_ok:
            try:
                return [float(v) for v in self._fn(tf.constant(steps, tf.int64)).numpy()]
            except Exception:  # noqa: BLE001  (untraceable schedule: fall back to eager calls)
                self._graph_ok = False
        return [float(keras.ops.convert_to_numpy(self.schedule(t))) for t in steps]


class CyclicLR(keras.callbacks.Callback):
    """Cyclical learning rate callback: bckenstler's `CyclicLR`, working on Keras 3.

    A drop-in replacement for `clr_callback.CyclicLR` (bckenstler/CLR, also the PyImageSearch CLR
    tutorial's `pyimagesearch/clr_callback.py`): only the import line changes::

        from clrlab.callbacks import CyclicLR

        clr = CyclicLR(base_lr=0.001, max_lr=0.006, step_size=2000., mode='triangular')
        model.fit(x, y, callbacks=[clr])
        plt.plot(clr.history['iterations'], clr.history['lr'])

    Policy (step = training batch, `t` = `clr_iterations`, 0-based for the first batch)::

        cycle = floor(1 + t / (2 * step_size))
        x     = |t / step_size - 2 * cycle + 1|
        lr    = base_lr + (max_lr - base_lr) * max(0, 1 - x) * scale_fn(cycle or t)

    with `'triangular'` (scale 1), `'triangular2'` (amplitude halved every cycle) and `'exp_range'`
    (amplitude scaled by `gamma ** t`). The values are computed by `clrlab.schedules.CyclicalLearningRate`
    in float32, exactly as the in-graph schedule computes them. `step_size` is the number of batches in
    HALF a cycle (Smith: 2-8x the batches per epoch).

    Semantics kept from bckenstler (so existing code and plots do not change):

    * `on_train_begin` sets the optimizer's LR to `base_lr` when `clr_iterations == 0`, else to `clr()`:
      the first batch trains at `base_lr` whatever LR was given to `compile`. Calling `fit` again with
      the same instance continues the cycle.
    * After every batch (`on_batch_end`): (1) both counters go up by one; (2) `history` gets the LR that
      batch trained with, `trn_iterations` and every batch-log value; (3) only then the LR for the next
      batch is set. So `history['lr'][k]` is the LR batch `k` used.
    * `_reset(new_base_lr=None, new_max_lr=None, new_step_size=None)` replaces the bounds given, zeroes
      `clr_iterations`, and keeps `history` and `trn_iterations`; the LR is written at the next
      `on_train_begin` or after the next batch (so a `_reset` from another callback mid-epoch takes
      effect from the batch after next, as in bckenstler).
    * A built-in `mode` silently implies its scale mode (`'cycle'` for triangular/triangular2,
      `'iterations'` for exp_range) whatever `scale_mode` says, so `CyclicLR(mode='exp_range')` works
      with the default `scale_mode='cycle'`; an explicit `scale_mode='iterations'` with a triangular
      mode only adds a warning. `scale_mode` matters only with a custom `scale_fn`.

    Additions (none changes the above):

    * Arguments are validated in the constructor (a `mode` typo, `max_lr <= base_lr`, ...), not at the
      first batch.
    * **Resume rule.** At `on_train_begin`, if `model.optimizer.iterations` is ahead of
      `trn_iterations` (a model restored from a `.keras` file or checkpoint, typically with
      `fit(initial_epoch=...)`), both counters advance by the difference, so the cycle continues from
      the optimizer's step count instead of restarting at zero. The counters never move backwards
      (after `_reset`, or when a `LossScaleOptimizer` skipped steps, `iterations` is not ahead).
      `initial_epoch` alone does not move the cycle: the optimizer's step count does. You may also set
      `clr_iterations` / `trn_iterations` yourself before `fit`.
    * **Per-batch loss.** Batch logs are running averages since the epoch began, so `history['loss']`
      (like every `history[<log key>]`) is NOT the batch's loss. `history['batch_loss']` holds the
      batch's own loss, de-averaged as `x_t = t m_t - (t-1) m_{t-1}` (`t` 1-based within the epoch):
      exact only for equal-size, unweighted batches (no `sample_weight`/`class_weight`; a smaller last
      batch of an epoch is averaged with a smaller weight, so its value is off).
    * `on_epoch_end` adds `logs['learning_rate']` (the LR of the epoch's last batch), so Keras' `History`,
      `CSVLogger` and TensorBoard see it when this callback comes before them.
    * `sets_learning_rate = True` marks it as an LR-setting callback: clrlab's custom loop, which sets
      the LR in graph every step, refuses it rather than silently overwriting it.

    Keras 3 requirements (each a clear error at `on_train_begin`):

    * The optimizer must hold a FLOAT learning rate (a variable). If it was built with a
      `LearningRateSchedule` the LR cannot be set: pass a float learning rate or use
      `clrlab.schedules.CyclicalLearningRate` instead of the callback. Any optimizer works, also
      wrapped in `keras.optimizers.LossScaleOptimizer` (the LR is set through the `learning_rate`
      property, which forwards to the inner optimizer).
    * `compile(steps_per_execution=N)` with `N > 1` is refused: the batch hooks would fire once per N
      batches, so the LR would only change every N batches and `history` would miss N-1 of them. For
      cycles exact at any `steps_per_execution`, use the in-graph `CyclicalLearningRate` schedule.

    Args:
      base_lr: lower bound of the cycle, the LR of the first batch (finite, >= 0).
      max_lr: upper bound of the unscaled cycle (finite, > base_lr).
      step_size: batches in half a cycle (> 0; may be a float, as in bckenstler's `2000.`).
      mode: `'triangular'`, `'triangular2'` or `'exp_range'`; ignored when `scale_fn` is given.
      gamma: `'exp_range'` decay per batch, in (0, 1].
      scale_fn: optional custom amplitude scale `u -> factor` (overrides `mode`). It is called eagerly
        with a float32 scalar tensor `u` (the cycle number or the step count, see `scale_mode`);
        NumPy functions such as `lambda x: 0.5 * (1 + np.sin(x * np.pi / 2.))` work.
      scale_mode: `'cycle'` or `'iterations'`: what `scale_fn` receives. `'iterations'` passes
        `clr_iterations` (batches since the last `_reset`), not the position within the cycle.

    Attributes:
      history: dict of lists: `'lr'`, `'iterations'`, `'batch_loss'` (when logs have `'loss'`) and
        one list per batch-log key (running means).
      clr_iterations: batches since the last `_reset` (drives the policy).
      trn_iterations: batches trained with this callback (never reset).

    Raises:
      ValueError: for invalid arguments (constructor or `_reset`); at `on_train_begin` for an optimizer
        built with a `LearningRateSchedule`, a model without an optimizer, or `steps_per_execution > 1`.
    """

    sets_learning_rate = True

    def __init__(self, base_lr=0.001, max_lr=0.006, step_size=2000., mode='triangular', gamma=1.,
                 scale_fn=None, scale_mode='cycle'):
        super().__init__()
        if scale_fn is None:
            if not isinstance(mode, str) or mode not in schedules.MODES:
                raise ValueError(f"Argument `mode` must be one of {schedules.MODES}. Received: mode={mode!r}.")
        if not isinstance(scale_mode, str) or scale_mode not in schedules.SCALE_MODES:
            raise ValueError(f"Argument `scale_mode` must be one of {schedules.SCALE_MODES}. "
                             f"Received: scale_mode={scale_mode!r}.")
        if scale_fn is None and mode != "exp_range" and scale_mode == "iterations":
            warnings.warn(f"CyclicLR: mode={mode!r} implies scale_mode='cycle'; scale_mode='iterations' is "
                          "ignored (it only applies to a custom scale_fn), as in bckenstler's CyclicLR.",
                          stacklevel=2)
        self.mode = mode
        self.gamma = gamma
        self.scale_fn = scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else ("iterations" if mode == "exp_range" else "cycle")
        self.base_lr, self.max_lr, self.step_size = base_lr, max_lr, step_size
        self._schedule = self._make_schedule(base_lr, max_lr, step_size)
        self._lr_at = _GraphLR(self._schedule)
        self.clr_iterations = 0
        self.trn_iterations = 0
        self.history: dict[str, list] = {}
        self._last_mean: float | None = None
        self._last_batch = -1

    # ------------------------------------------------------------------------------------ policy
    def _make_schedule(self, base_lr, max_lr, step_size):
        """A validated `CyclicalLearningRate` (raises ValueError naming the bad argument)."""
        if self.scale_fn is None:
            return schedules.CyclicalLearningRate(base_lr=base_lr, max_lr=max_lr, step_size=step_size,
                                                  mode=self.mode, gamma=self.gamma)
        return schedules.CyclicalLearningRate(base_lr=base_lr, max_lr=max_lr, step_size=step_size,
                                              gamma=self.gamma, scale_fn=self.scale_fn,
                                              scale_mode=self.scale_mode)

    def clr(self) -> float:
        """The learning rate for the current `clr_iterations` (float32 value as a Python float)."""
        return self._lr_at([self.clr_iterations])[0]

    def _reset(self, new_base_lr=None, new_max_lr=None, new_step_size=None):
        """Replaces the bounds given (None keeps one) and restarts the cycle (`clr_iterations = 0`).

        `history` and `trn_iterations` are kept. Validated: on a ValueError nothing changes.
        """
        base_lr = self.base_lr if new_base_lr is None else new_base_lr
        max_lr = self.max_lr if new_max_lr is None else new_max_lr
        step_size = self.step_size if new_step_size is None else new_step_size
        self._schedule = self._make_schedule(base_lr, max_lr, step_size)
        self._lr_at = _GraphLR(self._schedule)
        self.base_lr, self.max_lr, self.step_size = base_lr, max_lr, step_size
        self.clr_iterations = 0

    # ------------------------------------------------------------------------------------ hooks
    def _set_lr(self, value: float) -> None:
        self.model.optimizer.learning_rate = float(value)

    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("CyclicLR needs a compiled model: call model.compile(optimizer=...) first.")
        if _lr_schedule(optimizer) is not None:
            raise ValueError(
                "CyclicLR cannot set the learning rate of an optimizer built with a LearningRateSchedule "
                f"({type(_lr_schedule(optimizer)).__name__}): {_SCHEDULE_ERROR}.")
        spe = getattr(model, "steps_per_execution", 1) or 1
        if int(spe) > 1:
            raise ValueError(
                f"CyclicLR sets the learning rate from Python between batches, but compile(steps_per_execution="
                f"{spe}) runs {spe} batches per call, so the LR would change only every {spe} batches. "
                "Compile with steps_per_execution=1, or pass clrlab.schedules.CyclicalLearningRate as the "
                "optimizer's learning_rate (exact at any steps_per_execution).")
        done = _iterations(optimizer)
        if done > self.trn_iterations:  # resume rule: a restored optimizer is ahead of our counters
            ahead = done - self.trn_iterations
            self.trn_iterations += ahead
            self.clr_iterations += ahead
        if self.clr_iterations == 0:
            self._set_lr(self.base_lr)
        else:
            self._set_lr(self.clr())

    def on_epoch_begin(self, epoch, logs=None):
        self._last_mean, self._last_batch = None, -1

    def on_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.trn_iterations += 1
        self.clr_iterations += 1
        self.history.setdefault('lr', []).append(_read_lr(self.model.optimizer))
        self.history.setdefault('iterations', []).append(self.trn_iterations)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        if 'loss' in logs:
            mean = float(logs['loss'])
            seen = self._last_batch + 1 if (self._last_mean is not None and batch > self._last_batch) else 0
            self.history.setdefault('batch_loss', []).append(deaverage(mean, batch + 1, self._last_mean, seen))
            self._last_mean, self._last_batch = mean, batch
        self._set_lr(self.clr())

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.history.get('lr'):
            logs['learning_rate'] = self.history['lr'][-1]


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
      chunk's last step and the other steps get NaN.

    With a `writer` (a `tf.summary` writer), it also writes TensorBoard scalars `learning_rate`, `loss`,
    `accuracy` (one per name in `metrics`) at the global step, for steps divisible by `summary_every`
    (a chunk's mean is written at its last step when the chunk holds such a step).

    Runs eagerly between compiled calls; one host read per hook.

    Args:
      writer: optional `tf.summary` writer for per-step scalars.
      summary_every: write scalars at steps divisible by this (>= 1).
      metrics: batch-log keys to de-average and record.
      initial_step: global step of the first batch; None: the optimizer's `iterations` at the first
        `on_train_begin`.

    Attributes:
      records: dict of lists, keys `'step'`, `'lr'` and `metrics`, all of the same length.
      step: the global step of the next batch.
    """

    def __init__(self, writer: Any = None, summary_every: int = 1, metrics: Sequence[str] = ("loss", "accuracy"),
                 initial_step: int | None = None):
        super().__init__()
        if int(summary_every) < 1:
            raise ValueError(f"summary_every must be >= 1. Received: summary_every={summary_every}.")
        self.writer = writer
        self.summary_every = int(summary_every)
        self.metrics = tuple(metrics)
        self.records: dict[str, list] = {k: [] for k in ("step", "lr", *self.metrics)}
        self.step = None if initial_step is None else int(initial_step)
        self._chunk_lrs: list[float] = []
        self._graph_lr = None
        self._begin_batch = 0
        self._means: dict[str, tuple[int, float | None]] = {}

    def on_train_begin(self, logs=None):
        if self.step is None:
            self.step = _iterations(self.model.optimizer)

    def on_epoch_begin(self, epoch, logs=None):
        self._means = {k: (0, None) for k in self.metrics}

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self._begin_batch = int(batch)
        n = max(int(getattr(self.model, "steps_per_execution", 1) or 1), 1)
        schedule = _lr_schedule(optimizer)
        if schedule is None:  # a float LR: a variable, constant inside a compiled chunk
            self._chunk_lrs = [_read_lr(optimizer)] * n
        else:  # computed from the optimizer's step count, in graph as the training step does
            if self._graph_lr is None or self._graph_lr.schedule is not schedule:
                self._graph_lr = _GraphLR(schedule)
            start = _iterations(optimizer)
            self._chunk_lrs = self._graph_lr(range(start, start + n))

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
        self.records["step"].extend(steps)
        self.records["lr"].extend(lrs)
        for key in self.metrics:
            v = values[key]
            per_step = [float("nan")] * (n - 1) + [float("nan") if v is None else v]
            self.records[key].extend(per_step)
        if self.writer is not None:
            self._write(steps, lrs, values)
        self.step += n

    def _write(self, steps, lrs, values) -> None:
        every = self.summary_every
        due = [s for s in steps if s % every == 0]
        if not due:
            return
        with self.writer.as_default():
            for s, lr in zip(steps, lrs):
                if s % every == 0:
                    tf.summary.scalar("learning_rate", lr, step=s)
            for key, v in values.items():
                if v is not None:
                    tf.summary.scalar(key, v, step=steps[-1])

    def last(self, key: str) -> float:
        """The most recent recorded value of `key` (NaN when none)."""
        values = self.records.get(key) or [float("nan")]
        return values[-1]
