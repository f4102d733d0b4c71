"""`CyclicLR`: bckenstler's cyclical learning rate callback (bckenstler/CLR, clr_callback.py), on Keras 3.

The same constructor, defaults, attributes and per-batch semantics, with the Keras 3 API underneath
(no `optimizer.lr`, no `keras.backend.set_value`). Its values come from
`clrlab.schedules.CyclicalLearningRate`, the code the in-graph schedule runs, so the callback and the
schedule give the same learning rates at the same steps.

The hooks run eagerly, on the host, between compiled training calls of `model.fit`, with a host read
per batch: the price of driving the learning rate from Python. For the fastest exact option pass a
`clrlab.schedules.CyclicalLearningRate` as the optimizer's `learning_rate` instead.
"""

from __future__ import annotations

import math
import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from clrlab import config, keras_internals, optimizers, schedules
from clrlab.callbacks import step_values
from clrlab.callbacks.step_values import GraphLR, deaverage

__all__ = ["CyclicLR"]


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
    * **Cyclical momentum** (PyTorch `CyclicLR`'s keywords, torch/optim/lr_scheduler.py, but OFF by
      default so the classic API is unchanged): with `cycle_momentum=True` the optimizer's momentum
      (SGD) or `beta_1` (Adam, AdamW) moves inversely to the LR, from the same cycle height, each batch:
      `momentum = max_momentum - (max_momentum - base_momentum) * height(t)` with
      `lr = base_lr + (max_lr - base_lr) * height(t)` (`clrlab.schedules.CyclicalMomentum`'s formula),
      so the first batch trains at `max_momentum`. It is set at the same points as the LR and recorded in
      `history['momentum']` (the momentum batch `k` trained with). The optimizer must be a
      `clrlab.optimizers` SGD/Adam/AdamW built with a float momentum: Keras' own keep momentum as a
      Python float fixed when the step is traced.
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
        NumPy functions such as `lambda x: 0.5 * (1 + np.sin(x * np.pi / 2.))` work. It must return a
        finite factor in [0, 1]: the constructor tries it at a few points (`_PROBES`) and every LR it
        sets is checked, so a NaN/inf or out-of-range factor is a ValueError, never a NaN LR.
      scale_mode: `'cycle'` or `'iterations'`: what `scale_fn` receives. `'iterations'` passes
        `clr_iterations` (batches since the last `_reset`), not the position within the cycle.
      cycle_momentum: bool, cycle the momentum inversely to the LR (default False: momentum untouched).
      base_momentum: momentum at the LR peak, finite, in [0, max_momentum] (PyTorch's default 0.8).
      max_momentum: momentum at the LR floor and at the first batch, finite, in [base_momentum, 1)
        (PyTorch's default 0.9).

    Attributes:
      history: dict of lists: `'lr'`, `'iterations'`, `'batch_loss'` (when logs have `'loss'`),
        `'momentum'` (with `cycle_momentum`) and one list per batch-log key (running means).
      clr_iterations: batches since the last `_reset` (drives the policy).
      trn_iterations: batches trained with this callback (never reset).

    Raises:
      ValueError: for invalid arguments (constructor or `_reset`), including bounds or step sizes outside
        float32's range and a `scale_fn` factor outside [0, 1]; at the batch whose LR would be non-finite
        or outside [base_lr, max_lr]; at `on_train_begin` for an optimizer
        built with a `LearningRateSchedule`, a model without an optimizer, or `steps_per_execution > 1`;
        with `cycle_momentum`, for an optimizer without a momentum variable or one built with a momentum
        schedule.
    """

    sets_learning_rate = True

    def __init__(self, base_lr=0.001, max_lr=0.006, step_size=2000., mode='triangular', gamma=1.,
                 scale_fn=None, scale_mode='cycle', cycle_momentum=False, base_momentum=0.8, max_momentum=0.9):
        super().__init__()
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"Argument `cycle_momentum` must be True or False. Received: "
                             f"cycle_momentum={cycle_momentum!r}.")
        for name, value in (("base_momentum", base_momentum), ("max_momentum", max_momentum)):
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or not 0.0 <= value < 1.0):
                raise ValueError(f"Argument `{name}` must be a finite number in [0, 1). Received: {name}={value!r}.")
        if base_momentum > max_momentum:
            raise ValueError(f"Argument `base_momentum` must be <= `max_momentum`. Received: "
                             f"base_momentum={base_momentum!r}, max_momentum={max_momentum!r}.")
        self.cycle_momentum = cycle_momentum
        self.base_momentum, self.max_momentum = float(base_momentum), float(max_momentum)
        if scale_fn is None:
            if not isinstance(mode, str) or mode not in config.CLR_MODES:
                raise ValueError(f"Argument `mode` must be one of {config.CLR_MODES}. Received: mode={mode!r}.")
        if not isinstance(scale_mode, str) or scale_mode not in config.SCALE_MODES:
            raise ValueError(f"Argument `scale_mode` must be one of {config.SCALE_MODES}. "
                             f"Received: scale_mode={scale_mode!r}.")
        if scale_fn is None and config.IMPLIED_SCALE_MODE[mode] == "cycle" and scale_mode == "iterations":
            warnings.warn(f"CyclicLR: mode={mode!r} implies scale_mode='cycle'; scale_mode='iterations' is "
                          "ignored (it only applies to a custom scale_fn), as in bckenstler's CyclicLR.",
                          stacklevel=2)
        self.mode = mode
        self.gamma = gamma
        self.scale_fn = scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else config.IMPLIED_SCALE_MODE[mode]
        self.base_lr, self.max_lr, self.step_size = base_lr, max_lr, step_size
        self._set_schedule(self._make_schedule(base_lr, max_lr, step_size))
        if scale_fn is not None:
            self._probe_scale_fn()
        self._momentum = None  # the optimizer's momentum variable (with cycle_momentum), from on_train_begin
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

    # scale_fn arguments tried in the constructor: cycle numbers (1-based) or global steps
    _PROBES = {"cycle": (1.0, 2.0, 3.0, 10.0, 1000.0), "iterations": (0.0, 1.0, 10.0, 1000.0, 1e6)}

    def _probe_scale_fn(self) -> None:
        """Calls a custom `scale_fn` eagerly at a few points (`_PROBES`); a value that is not a finite
        number in [0, 1] (NaN, 1e30, ...) raises ValueError here rather than as a NaN/inf LR later."""
        for u in self._PROBES[self.scale_mode]:
            value = float(keras.ops.convert_to_numpy(self.scale_fn(tf.constant(u, tf.float32))))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"Argument `scale_fn` must return a finite factor in [0, 1]. Received: "
                                 f"scale_fn({u:g})={value:.6g} (scale_mode={self.scale_mode!r}).")

    def _set_schedule(self, schedule) -> None:
        self._schedule = schedule
        self._lr_at = GraphLR(schedule)
        self._momentum_at = GraphLR(schedules.CyclicalMomentum(schedule, self.base_momentum, self.max_momentum))

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
        self._set_schedule(self._make_schedule(base_lr, max_lr, step_size))
        self.base_lr, self.max_lr, self.step_size = base_lr, max_lr, step_size
        self.clr_iterations = 0

    # ------------------------------------------------------------------------------------ hooks
    def _set_lr(self, value: float) -> None:
        """Assigns the LR for `clr_iterations`, refusing a value that is non-finite or outside
        [base_lr, max_lr] (a `scale_fn` factor outside [0, 1] at a step the constructor did not try)."""
        lo, hi = float(np.float32(self.base_lr)), float(np.float32(self.max_lr))
        if not (math.isfinite(value) and lo * (1 - 1e-6) <= value <= hi * (1 + 1e-6)):
            raise ValueError(
                f"CyclicLR computed the learning rate {value!r} for clr_iterations={self.clr_iterations}, "
                f"outside [base_lr, max_lr] = [{self.base_lr!r}, {self.max_lr!r}]: scale_fn must return a "
                "finite factor in [0, 1] at every step.")
        self.model.optimizer.learning_rate = float(value)

    def _set_momentum(self) -> None:
        """With `cycle_momentum`: assigns the momentum for `clr_iterations`, the float32 value the in-graph
        `CyclicalMomentum` gives at that step (max_momentum at the cycle start)."""
        if self._momentum is not None:
            value = self._momentum_at([self.clr_iterations])[0]
            self._momentum.assign(tf.cast(value, self._momentum.dtype))

    def on_train_begin(self, logs=None):
        optimizer = step_values.per_batch_lr_optimizer(
            self.model, "CyclicLR",
            schedule_advice=lambda name: (
                "CyclicLR cannot set the learning rate of an optimizer built with a LearningRateSchedule "
                f"({name}): pass a float learning rate or use "
                "clrlab.schedules.CyclicalLearningRate instead of the callback."),
            steps_advice=lambda spe: (
                f"CyclicLR sets the learning rate from Python between batches, but compile(steps_per_execution="
                f"{spe}) runs {spe} batches per call, so the LR would change only every {spe} batches. "
                "Compile with steps_per_execution=1, or pass clrlab.schedules.CyclicalLearningRate as the "
                "optimizer's learning_rate (exact at any steps_per_execution)."))
        if self.cycle_momentum:
            self._momentum = optimizers.momentum_variable(optimizer)  # one-line ValueError for other optimizers
            if keras_internals.inner_optimizer(optimizer).momentum_schedule is not None:
                raise ValueError("CyclicLR(cycle_momentum=True) cannot set the momentum of an optimizer built "
                                 "with a momentum schedule: pass a float momentum/beta_1, or drop cycle_momentum.")
        done = keras_internals.read_iterations(optimizer)
        if done > self.trn_iterations:  # resume rule: a restored optimizer is ahead of our counters
            ahead = done - self.trn_iterations
            self.trn_iterations += ahead
            self.clr_iterations += ahead
        if self.clr_iterations == 0:
            self._set_lr(self.base_lr)
        else:
            self._set_lr(self.clr())
        self._set_momentum()

    def on_epoch_begin(self, epoch, logs=None):
        self._last_mean, self._last_batch = None, -1

    def on_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.trn_iterations += 1
        self.clr_iterations += 1
        self.history.setdefault('lr', []).append(keras_internals.read_learning_rate(self.model.optimizer))
        self.history.setdefault('iterations', []).append(self.trn_iterations)
        if self._momentum is not None:
            self.history.setdefault('momentum', []).append(float(self._momentum.numpy()))
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        if 'loss' in logs:
            mean = float(logs['loss'])
            seen = self._last_batch + 1 if (self._last_mean is not None and batch > self._last_batch) else 0
            self.history.setdefault('batch_loss', []).append(deaverage(mean, batch + 1, self._last_mean, seen))
            self._last_mean, self._last_batch = mean, batch
        self._set_lr(self.clr())
        self._set_momentum()

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self.history.get('lr'):
            logs['learning_rate'] = self.history['lr'][-1]
