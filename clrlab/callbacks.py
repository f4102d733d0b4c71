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
* `LRRangeTest` runs the LR range test of `clrlab.range_test` inside `model.fit`: it sweeps the LR,
  records each batch's LR, own loss and accuracy, stops on divergence/NaN, restores the model and
  optimizer bitwise and recommends `base_lr`/`max_lr` (`clrlab.lr_suggest.recommend`).

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

from clrlab import lr_suggest, schedules
from clrlab.sweep_state import RangeTestResult, StateSnapshot, SweepOptions

__all__ = ["CyclicLR", "LRRangeTest", "StepRecorder", "deaverage"]

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


# ---------------------------------------------------------------------------------------- range test
def _real(name: str, value, what: str, ok, *, allow_inf: bool = False) -> float:
    """`value` as a float if it is a real number satisfying `ok`, else one clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"Argument `{name}` must be {what}. Received: {name}={value!r}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or not ok(value):
        raise ValueError(f"Argument `{name}` must be {what}. Received: {name}={value!r}.")
    return value


def _int(name: str, value, what: str, ok) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not ok(int(value)):
        raise ValueError(f"Argument `{name}` must be {what}. Received: {name}={value!r}.")
    return int(value)


def _find_mean_metric(model, name: str):
    """The `keras.metrics.Mean` (incl. `MeanMetricWrapper` metrics such as accuracy) behind batch-log
    key `name`: the loss tracker for `'loss'`, a compiled metric (inside `CompileMetrics`) otherwise.
    None when there is none (yet: compiled metrics are built at the first training step)."""
    stack, seen = list(getattr(model, "metrics", None) or []), set()
    while stack:
        metric = stack.pop(0)
        if id(metric) in seen:
            continue
        seen.add(id(metric))
        if isinstance(metric, keras.metrics.Mean) and metric.name == name:
            return metric
        try:
            stack.extend(getattr(metric, "metrics", None) or [])
        except Exception:  # noqa: BLE001  (a container that cannot list its metrics yet)
            pass
    return None


def _mean_state(metric) -> tuple[float, float]:
    return (float(keras.ops.convert_to_numpy(metric.total)), float(keras.ops.convert_to_numpy(metric.count)))


class _BatchValue:
    """One batch's own value of a batch-log key (not Keras' running mean since the epoch began).

    Preferred source: the state of the `keras.metrics.Mean` behind the key, read before and after the
    batch. Keras' `train_step` adds `loss * batch_size` to the loss tracker's `total` and `batch_size` to
    its `count` (accuracy metrics add the number of hits and of examples), so `d total / d count` is the
    batch's own value, weighted exactly as Keras weights it: correct for a smaller last batch and with
    `sample_weight`/`class_weight` (the loss is then the batch's weighted loss, as used for the gradient).
    Accuracy comes out exact (integer counts); the loss carries the float32 rounding of the running sum,
    `|error| <= ulp(total) / (2 * batch_size)`, i.e. a relative error of about `t * 2**-24` after `t`
    batches of the epoch.

    Fallback (a custom `train_step` that does not update the metric): `deaverage` of the batch logs,
    exact only for equal-size unweighted batches.
    """

    def __init__(self, key: str):
        self.key = key
        self.sources: set[str] = set()
        self._metric = None
        self._before: tuple[float, float] | None = None
        self._last: tuple[int, float | None] = (0, None)

    def epoch_begin(self) -> None:
        self._last = (0, None)

    def begin(self, model) -> None:
        self._metric = _find_mean_metric(model, self.key)
        self._before = _mean_state(self._metric) if self._metric is not None else None

    def end(self, model, batch: int, logs: dict) -> float | None:
        value = None
        metric = self._metric if self._metric is not None else _find_mean_metric(model, self.key)
        if metric is not None:
            total, count = _mean_state(metric)
            # A metric first built inside this batch started from zero.
            total0, count0 = self._before if metric is self._metric else (0.0, 0.0)
            if count > count0:
                value = (total - total0) / (count - count0)
                self.sources.add("metric_state")
        if self.key in logs:
            mean, count_now = float(keras.ops.convert_to_numpy(logs[self.key])), int(batch) + 1
            if value is None:
                count_before, mean_before = self._last
                value = (deaverage(mean, count_now, mean_before, count_before) if count_now > count_before
                         else float("nan"))
                self.sources.add("deaveraged")
            self._last = (count_now, mean)
        return value


def _accuracy_key(keys) -> str | None:
    """The accuracy among batch-log keys: 'accuracy', 'acc', else the first '*accuracy' key."""
    keys = list(keys)
    for key in ("accuracy", "acc"):
        if key in keys:
            return key
    return next((k for k in keys if k.endswith("accuracy") and not k.startswith("val_")), None)


class LRRangeTest(keras.callbacks.Callback):
    """The LR range test inside `model.fit` (Smith 2015, section 3.3; REFERENCE section 4).

    The same sweep as `python -m clrlab.range_test` / `clrlab.range_test.run_sweep`, for users who train
    with `model.fit`: the learning rate rises from `start_lr` to `end_lr` over `num_steps` batches, the
    callback records every batch's LR, loss and accuracy, stops the fit when the loss diverges, then puts
    the model and the optimizer back exactly as they were and recommends CLR bounds::

        import keras
        from clrlab import data
        from clrlab.callbacks import CyclicLR, LRRangeTest

        splits = data.load("digits")
        model = keras.Sequential([keras.Input(splits.input_shape), keras.layers.Flatten(),
                                  keras.layers.Dense(64, activation="relu"),
                                  keras.layers.Dense(splits.num_classes)])
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        rt = LRRangeTest(start_lr=1e-4, end_lr=10.0, num_steps=200)
        model.fit(splits.x_train, splits.y_train, batch_size=32, epochs=100, callbacks=[rt])
        print(rt.result.base_lr, rt.result.max_lr)  # the recommended CLR bounds
        rt.plot("range_test.png")                   # loss (raw and smoothed) and accuracy against the LR
        # The model and optimizer are as before the sweep: train with the bounds.
        clr = CyclicLR(base_lr=rt.result.base_lr, max_lr=rt.result.max_lr, step_size=4 * 45)
        model.fit(splits.x_train, splits.y_train, batch_size=32, epochs=8, callbacks=[clr])

    Give `fit` enough epochs to hold `num_steps` batches: the callback stops it (mid-epoch, through
    `model.stop_training`, which Keras 3 honours after every batch) when the sweep is done.

    Per batch `k` (0-based, counted across epochs):

    * `on_train_batch_begin` sets the optimizer's LR to `sweep(k)`: `clrlab.schedules.ExponentialSweep`
      (`start_lr * (end_lr/start_lr) ** (k/(N-1))`) or `LinearSweep`, evaluated in graph as the custom
      loop does, so the LRs are bit-identical to those of `run_sweep`. `history['lr'][k]` is the LR the
      batch trained with (read back from the optimizer after the batch; a change by another callback
      during the batch is an error).
    * `on_train_batch_end` records the batch's OWN loss and accuracy, not Keras' running means since the
      epoch began (REFERENCE 4.6): they are read from the state of the `keras.metrics.Mean` metrics
      behind the logs (change of `total` over change of `count` across the batch), which is exact for
      the accuracy, has float32 rounding of the running sum (relative ~`t * 6e-8` after `t` batches of
      the epoch) for the loss, and is right for a smaller last batch and for `sample_weight`. A custom
      `train_step` that does not update those metrics falls back to de-averaging the logs (`deaverage`:
      exact only for equal-size, unweighted batches); `loss_source` says which was used. The model is not
      changed for this.
    * The sweep stops (`model.stop_training = True`, the diverged batch kept) at once on a NaN/inf loss,
      when the smoothed loss diverges (`clrlab.lr_suggest`: `s_t - best > (k-1) * max(|best|, eps)`, i.e.
      `s_t > k * best` for positive losses and still sound for negative ones; not in the first 5 steps),
      or after `num_steps` batches. `stop_reason` says which (`'fit_ended'`, with a warning, when `fit`
      ran out of epochs first: enlarge `epochs`).
    * With `validation_data`, every `eval_every` batches the model is evaluated on it (`model.evaluate`;
      the running training metrics are saved and put back around it, so progress bars and `History`
      are unaffected); Smith's accuracy rule then uses the held-out accuracy, as `run_sweep` does.

    `on_train_begin` builds the optimizer if it is not built (only then: `LossScaleOptimizer.build` is
    not idempotent) and takes an in-memory snapshot of every model weight (batch-norm moving statistics
    included) and every optimizer variable (slots, `iterations`, the LR variable, loss-scale and its
    counter). With `restore=True` (default) `on_train_end` assigns them back and checks bitwise equality.
    (Keras does not call `on_train_end` when `fit` raises; call `rt.restore()` then.) With
    `restore=False` the model and optimizer are left as the sweep left them (LR included).

    `on_train_end` then analyses the sweep with `clrlab.lr_suggest.recommend` (same smoother, beta and
    divergence factor): `result` is a `clrlab.range_test.RangeTestResult`, as `run_sweep` returns:
    `result.base_lr`, `result.max_lr`, `result.recommendation` (series, suggestions, `rule`,
    `stopped_early`, `reason`, `stop_index`) and the held-out evaluations. `to_dict()` is the JSON
    document `range_test.json` holds (plus the options and how the sweep ended); `plot(path)` draws the
    same figure as `range_test.png`.

    Requirements (each a clear ValueError at `on_train_begin`): a compiled model whose optimizer holds a
    FLOAT learning rate (not a `LearningRateSchedule`; a `LossScaleOptimizer` is fine), and
    `steps_per_execution == 1` (the LR must change every batch and every batch must be recorded).

    Execution context: the hooks run eagerly between compiled training calls, with a few host reads per
    batch; the divergence test re-smooths the recorded series each batch (O(k), negligible next to a step).

    Args:
      start_lr: first LR of the sweep (finite, > 0).
      end_lr: last LR, reached at batch `num_steps - 1` (finite, > start_lr).
      num_steps: sweep length in batches (an integer >= 10).
      sweep: `'exponential'` (log-uniform; judge it on the loss) or `'linear'` (Smith's test; judge it on
        accuracy, best held-out: pass `validation_data`).
      smoother: loss smoother for the divergence stop and the suggestions: `'ema_debiased'` (fastai),
        `'ema_seeded'` (torch-lr-finder) or `'none'`.
      beta: smoother decay in [0, 1).
      divergence_factor: stop when the smoothed loss exceeds this times its best (> 1; 4 like fastai, 5
        like torch-lr-finder; `math.inf` never stops on divergence).
      restore: put every weight and optimizer variable back after the sweep (default True).
      validation_data: optional held-out data, `(x, y)`, `(x, y, sample_weight)` or a dataset that
        `model.evaluate` accepts.
      eval_every: evaluate on `validation_data` every this many batches (default with `validation_data`:
        `max(1, num_steps // 25)`; 0 turns it off).
      eval_batch_size: `batch_size` for `model.evaluate` on arrays (default: Keras' 32).
      accuracy_key: batch-log key of the accuracy (`'auto'`: `'accuracy'`, `'acc'` or the first
        `'*accuracy'` key; None: record no accuracy, recommend from the loss only).
      verbose: 1 prints one summary line after the sweep, 0 nothing.

    Attributes:
      history: dict of per-batch lists `'lr'`, `'loss'` and (with an accuracy) `'accuracy'`.
      eval_steps, eval_lrs, eval_accuracies: the held-out evaluations (batch index, its LR, accuracy).
      stop_reason: `'num_steps'`, `'diverged'`, `'nonfinite'` or `'fit_ended'` (None before the end).
      loss_source: `'metric_state'` or `'deaveraged'` (see above).
      options: the sweep as a `clrlab.range_test.SweepOptions`.
      result: the `RangeTestResult` (a RuntimeError explains why when there is none).

    Raises:
      ValueError: for an invalid argument (constructor); at `on_train_begin` for an uncompiled model, an
        optimizer built with a `LearningRateSchedule`, or `steps_per_execution > 1`; at the first batch
        for an `accuracy_key` missing from the logs.
      RuntimeError: if another callback changes the LR during a batch, or the restore does not match the
        snapshot (state is restored before either is raised from inside `fit`).
    """

    sets_learning_rate = True

    def __init__(self, start_lr=1e-6, end_lr=1.0, num_steps=300, sweep="exponential", smoother="ema_debiased",
                 beta=0.98, divergence_factor=4.0, restore=True, validation_data=None, eval_every=None,
                 eval_batch_size=None, accuracy_key="auto", verbose=1):
        super().__init__()
        if not isinstance(sweep, str) or sweep not in lr_suggest.SWEEPS:
            raise ValueError(f"Argument `sweep` must be one of {lr_suggest.SWEEPS}. Received: sweep={sweep!r}.")
        start_lr = _real("start_lr", start_lr, "a finite number > 0", lambda v: v > 0)
        end_lr = _real("end_lr", end_lr, f"a finite number > start_lr ({start_lr!r})", lambda v: v > start_lr)
        num_steps = _int("num_steps", num_steps, "an integer >= 10", lambda v: v >= 10)
        if not isinstance(smoother, str) or smoother not in lr_suggest.SMOOTHERS:
            raise ValueError(f"Argument `smoother` must be one of {lr_suggest.SMOOTHERS}. "
                             f"Received: smoother={smoother!r}.")
        beta = _real("beta", beta, "a number in [0, 1)", lambda v: 0 <= v < 1)
        divergence_factor = _real("divergence_factor", divergence_factor, "a number > 1 (math.inf: never)",
                                  lambda v: v > 1, allow_inf=True)
        if not isinstance(restore, (bool, np.bool_)):
            raise ValueError(f"Argument `restore` must be True or False. Received: restore={restore!r}.")
        if isinstance(validation_data, (tuple, list)) and len(validation_data) not in (2, 3):
            raise ValueError("Argument `validation_data` must be (x, y), (x, y, sample_weight) or a dataset. "
                             f"Received: a {type(validation_data).__name__} of length {len(validation_data)}.")
        if eval_every is None:
            eval_every = max(1, num_steps // 25) if validation_data is not None else 0
        eval_every = _int("eval_every", eval_every, "an integer >= 0 (None: the default)", lambda v: v >= 0)
        if eval_every and validation_data is None:
            raise ValueError(f"Argument `eval_every`={eval_every} needs `validation_data` to evaluate on.")
        if eval_batch_size is not None:
            eval_batch_size = _int("eval_batch_size", eval_batch_size, "an integer >= 1 or None", lambda v: v >= 1)
        if accuracy_key is not None and not (isinstance(accuracy_key, str) and accuracy_key):
            raise ValueError(f"Argument `accuracy_key` must be 'auto', a batch-log key or None. "
                             f"Received: accuracy_key={accuracy_key!r}.")
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(f"Argument `verbose` must be 0 or 1 (2 counts as 1). Received: verbose={verbose!r}.")

        self.options = SweepOptions(sweep=sweep, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                                    eval_every=eval_every, smoother=smoother, beta=beta,
                                    divergence_factor=divergence_factor, check_every=1)
        self.start_lr, self.end_lr, self.num_steps, self.sweep = start_lr, end_lr, num_steps, sweep
        self.smoother, self.beta, self.divergence_factor = smoother, beta, divergence_factor
        self.restore_state = bool(restore)
        self.validation_data, self.eval_every, self.eval_batch_size = validation_data, eval_every, eval_batch_size
        self.accuracy_key = accuracy_key
        self.verbose = int(verbose)
        cls = schedules.ExponentialSweep if sweep == "exponential" else schedules.LinearSweep
        self.schedule = cls(start_lr, end_lr, num_steps)
        self._planned: list[float] | None = None
        self._snapshot = None
        self._reset_records()

    # ------------------------------------------------------------------------------------ records
    def _reset_records(self) -> None:
        self.history: dict[str, list[float]] = {"lr": [], "loss": []}
        self.eval_steps: list[int] = []
        self.eval_lrs: list[float] = []
        self.eval_accuracies: list[float] = []
        self.stop_reason: str | None = None
        self.loss_source: str | None = None
        self._result = None
        self._result_error = "fit has not run with this callback yet."
        self._loss = _BatchValue("loss")
        self._acc: _BatchValue | None = None
        self._acc_key: str | None = None
        self._first_batch = True
        self._pending_lr: float | None = None
        self._done = False
        self._started = False
        self._model_name = None

    @property
    def result(self):
        """The `clrlab.range_test.RangeTestResult` of the last sweep (RuntimeError when there is none)."""
        if self._result is None:
            raise RuntimeError(f"LRRangeTest has no result: {self._result_error}")
        return self._result

    @property
    def stopped_early(self) -> bool:
        """Whether the sweep stopped before `num_steps` (divergence, NaN/inf, or fit ending first)."""
        return self.stop_reason is not None and self.stop_reason != "num_steps"

    # ------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):

        model = self.model
        optimizer = getattr(model, "optimizer", None)
        if optimizer is None:
            raise ValueError("LRRangeTest needs a compiled model: call model.compile(optimizer=...) first.")
        schedule = _lr_schedule(optimizer)
        if schedule is not None:
            raise ValueError(
                "LRRangeTest sets the learning rate every batch, which an optimizer built with a "
                f"LearningRateSchedule ({type(schedule).__name__}) does not allow: compile with a float "
                "learning rate for the range test (it is restored afterwards).")
        spe = int(getattr(model, "steps_per_execution", 1) or 1)
        if spe > 1:
            raise ValueError(
                f"LRRangeTest needs the exact LR of every batch, but compile(steps_per_execution={spe}) runs "
                f"{spe} batches per call, so the LR could change only every {spe} batches and {spe - 1} of "
                f"every {spe} losses would be missing. Compile with steps_per_execution=1 for the range test.")
        self._reset_records()
        self._model_name = getattr(model, "name", None)
        if not optimizer.built:  # Keras 3 creates slots lazily; LossScaleOptimizer.build is not idempotent
            optimizer.build(model.trainable_variables)
        if self._planned is None:
            self._planned = _GraphLR(self.schedule)(range(self.num_steps))
        if self.restore_state:
            known = {id(v) for v in list(model.weights) + list(optimizer.variables)}
            extra = [v for v in _inner(optimizer).variables if id(v) not in known]
            self._snapshot = StateSnapshot(model, optimizer, extra_variables=extra)
            self._known = known | {id(v) for v in extra}
        self._started = True
        self._result_error = "the sweep has not finished (fit is running or raised; rt.restore() puts the " \
                             "state back after an exception)."

    def on_epoch_begin(self, epoch, logs=None):
        self._loss.epoch_begin()
        if self._acc is not None:
            self._acc.epoch_begin()

    def on_train_batch_begin(self, batch, logs=None):
        if self._done:
            return
        step = len(self.history["lr"])
        self._pending_lr = self._planned[step]
        self.model.optimizer.learning_rate = self._pending_lr
        self._loss.begin(self.model)
        if self._acc is not None:
            self._acc.begin(self.model)

    def on_train_batch_end(self, batch, logs=None):
        if self._done or self._pending_lr is None:
            return
        logs = logs or {}
        model = self.model
        lr, self._pending_lr = _read_lr(model.optimizer), None
        if self._first_batch:
            self._first_batch = False
            self._setup_accuracy(batch, logs)
        step = len(self.history["lr"])
        if lr != self._planned[step]:
            self._abort(RuntimeError(
                f"The learning rate changed during batch {step} of the range test ({self._planned[step]!r} was "
                f"set, {lr!r} found after the batch): another callback sets the LR. Remove it for the sweep."))
        loss = self._loss.end(model, batch, logs)
        if loss is None:
            self._abort(ValueError(f"LRRangeTest found no 'loss' in the batch logs (keys: {sorted(logs)})."))
        self.history["lr"].append(lr)
        self.history["loss"].append(float(loss))
        if self._acc is not None:
            acc = self._acc.end(model, batch, logs)
            self.history["accuracy"].append(float("nan") if acc is None else float(acc))
        if not math.isfinite(loss):
            self._stop("nonfinite")
            return
        if self.eval_every and (step + 1) % self.eval_every == 0:
            self._evaluate(step, lr)
        smoothed = lr_suggest.smooth(self.history["loss"], self.smoother, self.beta)
        if lr_suggest.divergence_index(smoothed, self.divergence_factor) is not None:
            self._stop("diverged")
        elif step + 1 >= self.num_steps:
            self._stop("num_steps")

    def on_train_end(self, logs=None):
        if not self._started:
            return  # on_train_begin refused the model
        self._started = False
        try:
            if self._snapshot is not None:
                self.restore()
        finally:
            if self.stop_reason is None:
                self.stop_reason = "fit_ended"
                if len(self.history["lr"]) < self.num_steps:
                    warnings.warn(
                        f"LRRangeTest: fit ended after {len(self.history['lr'])} of num_steps={self.num_steps} "
                        f"sweep steps (the LR reached {self.history['lr'][-1] if self.history['lr'] else 'none'}"
                        f" of end_lr={self.end_lr:g}): give fit more epochs.", stacklevel=2)
            self._done = True
            sources = self._loss.sources
            self.loss_source = "deaveraged" if "deaveraged" in sources else ("metric_state" if sources else None)
            self._finish()
        if self.verbose:
            self._print_summary()

    # ------------------------------------------------------------------------------------ helpers
    def _setup_accuracy(self, batch, logs) -> None:
        if self.accuracy_key is None:
            return
        key = _accuracy_key(logs) if self.accuracy_key == "auto" else self.accuracy_key
        if key is not None and key not in logs:
            self._abort(ValueError(f"accuracy_key={key!r} is not a batch-log key of this model "
                                   f"(keys: {sorted(logs)}). Pass one of them, 'auto' or None."))
        if key is None:
            return
        self._acc_key = key
        self._acc = _BatchValue(key)
        self.history["accuracy"] = []
        # No begin() for this first batch of the fit: its metric state started from zero (reset at the
        # epoch start, or built inside the batch), which is what end() assumes without a begin().

    def _stop(self, reason: str) -> None:
        self.stop_reason = reason
        self._done = True
        self.model.stop_training = True

    def _abort(self, error: Exception) -> None:
        """Restores the state (on_train_end will not run when fit raises), then raises `error`."""
        self._done = True
        self.model.stop_training = True
        if self._snapshot is not None:
            self.restore()
        raise error

    def restore(self) -> None:
        """Puts back the weights and optimizer variables saved at `on_train_begin`, checks them bitwise and
        drops the snapshot. `on_train_end` calls it (with `restore=True`); call it yourself when `fit`
        raised during the sweep. A no-op when there is nothing to restore."""
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is None:
            return
        snapshot.restore()
        if not snapshot.matches():
            raise RuntimeError("LRRangeTest: the restored weights/optimizer variables differ from the snapshot.")
        optimizer = self.model.optimizer
        new = [v.path for v in list(self.model.weights) + list(optimizer.variables) + list(_inner(optimizer).variables)
               if id(v) not in self._known]
        if new:
            warnings.warn(f"LRRangeTest: variables created during the sweep keep their post-sweep values: {new}. "
                          "Build the model (and optimizer) before fit to have them restored.", stacklevel=3)

    def _evaluate(self, step: int, lr: float) -> None:
        """Held-out accuracy now; the running training metrics are saved and put back around it (evaluate
        resets them), so the batch logs, progress bar and History of the fit are unaffected."""
        model = self.model
        saved = [(v, keras.ops.convert_to_numpy(v).copy()) for v in model.metrics_variables]
        data = self.validation_data
        try:
            if isinstance(data, (tuple, list)):
                out = model.evaluate(data[0], data[1], sample_weight=data[2] if len(data) == 3 else None,
                                     batch_size=self.eval_batch_size, verbose=0, return_dict=True)
            else:
                out = model.evaluate(data, verbose=0, return_dict=True)
        finally:
            for variable, value in saved:
                variable.assign(value)
        key = self._acc_key if self._acc_key in out else _accuracy_key(out)
        if key is None:
            self._abort(ValueError(f"validation_data gave no accuracy to judge the sweep on (evaluate returned "
                                   f"{sorted(out)}); compile with metrics=['accuracy'] or drop validation_data."))
        self.eval_steps.append(step)
        self.eval_lrs.append(lr)
        self.eval_accuracies.append(float(out[key]))

    def _finish(self) -> None:
        """`result` from the records, as `clrlab.range_test.run_sweep` makes it."""
        import dataclasses


        accs = self.history.get("accuracy")
        try:
            rec = lr_suggest.recommend(np.asarray(self.history["lr"]), np.asarray(self.history["loss"]),
                                       None if accs is None else np.asarray(accs), sweep=self.sweep,
                                       smoother=self.smoother, beta=self.beta,
                                       divergence_factor=self.divergence_factor)
        except ValueError as e:
            self._result = None
            self._result_error = (f"the sweep recorded {len(self.history['lr'])} steps (stop: {self.stop_reason}) "
                                  f"and could not be analysed: {e}. Start lower (start_lr) or sweep longer.")
            warnings.warn(f"LRRangeTest: {self._result_error}", stacklevel=3)
            return
        if self.eval_accuracies:  # Smith's rule on held-out accuracy beats the noisier per-batch accuracy
            try:
                bounds = lr_suggest.suggest_from_accuracy(self.eval_lrs, self.eval_accuracies, sweep=self.sweep)
            except ValueError as e:  # too few evaluations: keep the per-batch recommendation
                warnings.warn(f"LRRangeTest: held-out accuracy not used for the bounds: {e}", stacklevel=3)
                bounds = None
            if bounds is not None and bounds.base_lr is not None and bounds.max_lr is not None:
                suggestions = dict(rec.suggestions, accuracy_base=bounds.base_lr, accuracy_max=bounds.max_lr)
                rec = dataclasses.replace(rec, base_lr=bounds.base_lr, max_lr=bounds.max_lr,
                                          rule=f"heldout_{bounds.rule}", suggestions=suggestions)
        self._result = RangeTestResult(recommendation=rec, eval_steps=tuple(self.eval_steps),
                                       eval_lrs=tuple(self.eval_lrs), eval_accuracies=tuple(self.eval_accuracies))

    def _print_summary(self) -> None:
        n = len(self.history["lr"])
        stop = {"num_steps": "ran all", "diverged": "stopped: loss diverged", "nonfinite": "stopped: NaN/inf loss",
                "fit_ended": "fit ended first"}.get(self.stop_reason, str(self.stop_reason))
        head = f"LRRangeTest: {n} steps ({stop}), LR {self.start_lr:g} -> {self.history['lr'][-1]:g}" if n else \
            "LRRangeTest: no steps"
        if self._result is not None:
            rec = self._result.recommendation
            head += f"; base_lr={rec.base_lr:.3g} max_lr={rec.max_lr:.3g} ({rec.rule})"
        else:
            head += "; no recommendation"
        if self.restore_state:
            head += "; weights and optimizer restored"
        print(head, flush=True)

    # ------------------------------------------------------------------------------------ outputs
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable result, shaped like `range_test.json`: every series, every suggestion,
        `base_lr`/`max_lr`, `rule`, `stopped_early`/`reason`/`stop_index`, the held-out `eval`, plus
        `options` (the `SweepOptions`), `stop` (`stop_reason`), `steps`, `loss_source` and `model`."""
        import dataclasses

        out = self.result.to_dict()
        out["options"] = dataclasses.asdict(self.options)
        out["stop"] = self.stop_reason
        out["steps"] = len(self.history["lr"])
        out["loss_source"] = self.loss_source
        out["model"] = self._model_name
        return out

    def plot(self, path=None, *, title: str | None = None) -> bytes:
        """Draws the range-test figure (`clrlab.plots.plot_range_test`, as `range_test.png`): raw and
        smoothed loss against the LR (log axis for an exponential sweep), the accuracy panel, every
        suggestion and the recommended bounds. Writes a PNG to `path` (None: only renders); returns its bytes."""
        from clrlab import plots

        rec = self.result.recommendation
        name = f", {self._model_name}" if self._model_name else ""
        return plots.plot_range_test(rec.lrs, rec.loss_raw, rec.loss_smooth, path, accuracy=rec.accuracy,
                                     base_lr=rec.base_lr, max_lr=rec.max_lr, log_x=(self.sweep == "exponential"),
                                     suggestions=rec.suggestions,
                                     title=title or f"LR range test ({self.sweep}, model.fit{name})")
