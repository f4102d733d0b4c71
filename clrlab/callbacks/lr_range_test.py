"""`LRRangeTest`: the LR range test (Smith 2015, section 3.3) inside `model.fit`, over `clrlab.sweep`.

A `model.fit` driver of the sweep engine, as fastai's `LRFinder` (fastai/fastai,
fastai/callback/schedule.py) is a callback: the sweep schedule sets the LR before each batch,
`clrlab.sweep.SweepRecorder` gets each batch's LR, own loss and accuracy and says when to stop, and
`clrlab.sweep.StateSnapshot` puts the model and optimizer back afterwards.
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings
from typing import Any

import keras
import numpy as np

from clrlab import keras_internals
from clrlab.callbacks import step_values
from clrlab.callbacks.step_values import BatchValue, GraphLR, accuracy_key
from clrlab.sweep import RangeTestResult, StateSnapshot, SweepOptions, SweepRecorder, sweep_schedule

__all__ = ["LRRangeTest"]


class LRRangeTest(keras.callbacks.Callback):
    """The LR range test inside `model.fit` (Smith 2015, section 3.3; fastai's LRFinder).

    The same sweep as `trainers.range_sweep.run_sweep` (the range-test command), for users who train with
    `model.fit`; both drive `clrlab.sweep.SweepRecorder` (records, stop rule, held-out merge, result).
    The learning rate rises from `start_lr` to `end_lr` over `num_steps` batches, the callback records
    every batch's LR, loss and accuracy, stops the fit when the loss diverges, then puts the model and
    the optimizer back exactly as they were and recommends CLR bounds::

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
      epoch began: they are read from the state of the `keras.metrics.Mean` metrics
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
    divergence factor): `result` is a `clrlab.sweep.RangeTestResult`, as `run_sweep` returns:
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
      options: the sweep as a `clrlab.sweep.SweepOptions`.
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
        if isinstance(validation_data, (tuple, list)) and len(validation_data) not in (2, 3):
            raise ValueError("Argument `validation_data` must be (x, y), (x, y, sample_weight) or a dataset. "
                             f"Received: a {type(validation_data).__name__} of length {len(validation_data)}.")
        # The sweep's own arguments are validated by SweepOptions, the callback's below.
        options = SweepOptions(sweep=sweep, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                               eval_every=0 if eval_every is None else eval_every, smoother=smoother, beta=beta,
                               divergence_factor=divergence_factor, check_every=1)
        if eval_every is None and validation_data is not None:
            options = dataclasses.replace(options, eval_every=max(1, options.num_steps // 25))
        if options.eval_every and validation_data is None:
            raise ValueError(f"Argument `eval_every`={options.eval_every} needs `validation_data` to evaluate on.")
        if not isinstance(restore, (bool, np.bool_)):
            raise ValueError(f"Argument `restore` must be True or False. Received: restore={restore!r}.")
        if eval_batch_size is not None and (isinstance(eval_batch_size, bool) or
                                            not isinstance(eval_batch_size, numbers.Integral) or eval_batch_size < 1):
            raise ValueError(f"Argument `eval_batch_size` must be an integer >= 1 or None. "
                             f"Received: eval_batch_size={eval_batch_size!r}.")
        if accuracy_key is not None and not (isinstance(accuracy_key, str) and accuracy_key):
            raise ValueError(f"Argument `accuracy_key` must be 'auto', a batch-log key or None. "
                             f"Received: accuracy_key={accuracy_key!r}.")
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(f"Argument `verbose` must be 0 or 1 (2 counts as 1). Received: verbose={verbose!r}.")
        self.options = options
        self.restore_state = bool(restore)
        self.validation_data = validation_data
        self.eval_batch_size = None if eval_batch_size is None else int(eval_batch_size)
        self.accuracy_key = accuracy_key
        self.verbose = int(verbose)
        self.schedule = sweep_schedule(options)
        self._planned: list[float] | None = None
        self._snapshot: StateSnapshot | None = None
        self._known: set[int] = set()
        self._reset_records()

    # ------------------------------------------------------------------------------------ records
    def _reset_records(self) -> None:
        self._recorder = SweepRecorder(self.options)
        self.loss_source: str | None = None
        self._result: RangeTestResult | None = None
        self._result_error = "fit has not run with this callback yet."
        self._loss = BatchValue("loss")
        self._acc: BatchValue | None = None
        self._acc_key: str | None = None
        self._first_batch = True
        self._pending_lr: float | None = None
        self._aborted = False
        self._started = False
        self._model_name = None

    @property
    def history(self) -> dict[str, list[float]]:
        """Per-batch `'lr'`, `'loss'` and (with an accuracy) `'accuracy'` of the last sweep."""
        rec = self._recorder
        out = {"lr": rec.lrs, "loss": rec.losses}
        if rec.accuracies is not None:
            out["accuracy"] = rec.accuracies
        return out

    @property
    def eval_steps(self) -> list[int]:
        return self._recorder.eval_steps

    @property
    def eval_lrs(self) -> list[float]:
        return self._recorder.eval_lrs

    @property
    def eval_accuracies(self) -> list[float]:
        return self._recorder.eval_accuracies

    @property
    def stop_reason(self) -> str | None:
        """`'num_steps'`, `'diverged'`, `'nonfinite'` or `'fit_ended'`; None before the sweep ends."""
        return self._recorder.stop_reason

    @property
    def result(self) -> RangeTestResult:
        """The `clrlab.sweep.RangeTestResult` of the last sweep (RuntimeError when there is none)."""
        if self._result is None:
            raise RuntimeError(f"LRRangeTest has no result: {self._result_error}")
        return self._result

    @property
    def stopped_early(self) -> bool:
        """Whether the sweep stopped before `num_steps` (divergence, NaN/inf, or fit ending first)."""
        return self.stop_reason is not None and self.stop_reason != "num_steps"

    @property
    def _done(self) -> bool:
        return self._aborted or self._recorder.done

    # ------------------------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        model = self.model
        optimizer = step_values.per_batch_lr_optimizer(
            model, "LRRangeTest",
            schedule_advice=lambda name: (
                "LRRangeTest sets the learning rate every batch, which an optimizer built with a "
                f"LearningRateSchedule ({name}) does not allow: compile with a float "
                "learning rate for the range test (it is restored afterwards)."),
            steps_advice=lambda spe: (
                f"LRRangeTest needs the exact LR of every batch, but compile(steps_per_execution={spe}) runs "
                f"{spe} batches per call, so the LR could change only every {spe} batches and {spe - 1} of "
                f"every {spe} losses would be missing. Compile with steps_per_execution=1 for the range test."))
        self._reset_records()
        self._model_name = getattr(model, "name", None)
        if not optimizer.built:  # Keras 3 creates slots lazily; LossScaleOptimizer.build is not idempotent
            optimizer.build(model.trainable_variables)
        if self._planned is None:
            self._planned = GraphLR(self.schedule)(range(self.options.num_steps))
        if self.restore_state:
            known = {id(v) for v in list(model.weights) + list(optimizer.variables)}
            extra = [v for v in keras_internals.inner_optimizer(optimizer).variables if id(v) not in known]
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
        self._pending_lr = self._planned[self._recorder.steps]
        self.model.optimizer.learning_rate = self._pending_lr
        self._loss.begin(self.model)
        if self._acc is not None:
            self._acc.begin(self.model)

    def on_train_batch_end(self, batch, logs=None):
        if self._done or self._pending_lr is None:
            return
        logs = logs or {}
        model = self.model
        lr, self._pending_lr = keras_internals.read_learning_rate(model.optimizer), None
        if self._first_batch:
            self._first_batch = False
            self._setup_accuracy(logs)
        step = self._recorder.steps
        if lr != self._planned[step]:
            self._abort(RuntimeError(
                f"The learning rate changed during batch {step} of the range test ({self._planned[step]!r} was "
                f"set, {lr!r} found after the batch): another callback sets the LR. Remove it for the sweep."))
        loss = self._loss.end(model, batch, logs)
        if loss is None:
            self._abort(ValueError(f"LRRangeTest found no 'loss' in the batch logs (keys: {sorted(logs)})."))
        accuracies = None
        if self._acc is not None:
            acc = self._acc.end(model, batch, logs)
            accuracies = [float("nan") if acc is None else acc]
        evaluate = self._evaluate if self.validation_data is not None else None
        if self._recorder.record([lr], [loss], accuracies, evaluate) is not None:
            model.stop_training = True

    def on_train_end(self, logs=None):
        if not self._started:
            return  # on_train_begin refused the model
        self._started = False
        try:
            if self._snapshot is not None:
                self.restore()
        finally:
            if self._recorder.stop_reason is None:
                self._recorder.stop("fit_ended")
                lrs = self._recorder.lrs
                warnings.warn(
                    f"LRRangeTest: fit ended after {len(lrs)} of num_steps={self.options.num_steps} sweep steps "
                    f"(the LR reached {lrs[-1] if lrs else 'none'} of end_lr={self.options.end_lr:g}): give fit "
                    "more epochs.", stacklevel=2)
            sources = self._loss.sources
            self.loss_source = "deaveraged" if "deaveraged" in sources else ("metric_state" if sources else None)
            self._finish()
        if self.verbose:
            self._print_summary()

    # ------------------------------------------------------------------------------------ helpers
    def _setup_accuracy(self, logs) -> None:
        if self.accuracy_key is None:
            return
        key = accuracy_key(logs) if self.accuracy_key == "auto" else self.accuracy_key
        if key is not None and key not in logs:
            self._abort(ValueError(f"accuracy_key={key!r} is not a batch-log key of this model "
                                   f"(keys: {sorted(logs)}). Pass one of them, 'auto' or None."))
        if key is None:
            return
        self._acc_key = key
        self._acc = BatchValue(key)
        # No begin() for this first batch of the fit: its metric state started from zero (reset at the
        # epoch start, or built inside the batch), which is what end() assumes without a begin().

    def _abort(self, error: Exception) -> None:
        """Restores the state (on_train_end will not run when fit raises), then raises `error`."""
        self._aborted = True
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
        variables = (list(self.model.weights) + list(optimizer.variables)
                     + list(keras_internals.inner_optimizer(optimizer).variables))
        new = [v.path for v in variables if id(v) not in self._known]
        if new:
            warnings.warn(f"LRRangeTest: variables created during the sweep keep their post-sweep values: {new}. "
                          "Build the model (and optimizer) before fit to have them restored.", stacklevel=3)

    def _evaluate(self) -> float:
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
        key = self._acc_key if self._acc_key in out else accuracy_key(out)
        if key is None:
            self._abort(ValueError(f"validation_data gave no accuracy to judge the sweep on (evaluate returned "
                                   f"{sorted(out)}); compile with metrics=['accuracy'] or drop validation_data."))
        return float(out[key])

    def _finish(self) -> None:
        """`result` from the records (`SweepRecorder.result`, as for `run_sweep`)."""
        try:
            self._result = self._recorder.result()
        except ValueError as e:
            self._result = None
            self._result_error = (f"the sweep recorded {self._recorder.steps} steps (stop: {self.stop_reason}) "
                                  f"and could not be analysed: {e}. Start lower (start_lr) or sweep longer.")
            warnings.warn(f"LRRangeTest: {self._result_error}", stacklevel=3)

    def _print_summary(self) -> None:
        lrs = self._recorder.lrs
        stop = {"num_steps": "ran all", "diverged": "stopped: loss diverged", "nonfinite": "stopped: NaN/inf loss",
                "fit_ended": "fit ended first"}.get(self.stop_reason, str(self.stop_reason))
        head = (f"LRRangeTest: {len(lrs)} steps ({stop}), LR {self.options.start_lr:g} -> {lrs[-1]:g}" if lrs
                else "LRRangeTest: no steps")
        if self._result is not None:
            rec = self._result.recommendation
            if rec.base_lr is not None and rec.max_lr is not None:
                head += (f"; base_lr={rec.base_lr:.3g} ({rec.base_rule}), max_lr={rec.max_lr:.3g} "
                         f"({rec.max_rule})")
            else:
                head += "; no bounds"
        else:
            head += "; no recommendation"
        if self.restore_state:
            head += "; weights and optimizer restored"
        warnings = self._result.recommendation.warnings if self._result is not None else ()
        print(head + "".join(f"\n  warning: {w}" for w in warnings), flush=True)

    # ------------------------------------------------------------------------------------ outputs
    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable result, shaped like `range_test.json`: every series, every suggestion,
        `base_lr`/`max_lr`, `rule`, `stopped_early`/`reason`/`stop_index`, the held-out `eval`, plus
        `options` (the `SweepOptions`), `stop` (`stop_reason`), `steps`, `loss_source` and `model`."""
        out = self.result.to_dict()
        out["options"] = dataclasses.asdict(self.options)
        out["stop"] = self.stop_reason
        out["steps"] = self._recorder.steps
        out["loss_source"] = self.loss_source
        out["model"] = self._model_name
        return out

    def plot(self, path=None, *, title: str | None = None) -> bytes:
        """Draws the range-test figure (`clrlab.plots.plot_range_test`, as `range_test.png`): raw and
        zero-lag smoothed loss against the LR (log axis for an exponential sweep), the accuracy panel, every
        suggestion and the recommended bounds. Writes a PNG to `path` (None: only renders); returns its bytes."""
        from clrlab import plots  # deferred: matplotlib is needed only to draw, not to run the sweep

        rec = self.result.recommendation
        sweep = self.options.sweep
        name = f", {self._model_name}" if self._model_name else ""
        return plots.plot_range_test(rec.lrs, rec.loss_raw, rec.loss_trend or rec.loss_smooth, path,
                                     accuracy=rec.accuracy, accuracy_trend=rec.accuracy_trend, base_lr=rec.base_lr,
                                     max_lr=rec.max_lr, base_rule=rec.base_rule or None,
                                     max_rule=rec.max_rule or None, log_x=(sweep == "exponential"),
                                     suggestions=rec.suggestions,
                                     title=title or f"LR range test ({sweep}, model.fit{name})")
