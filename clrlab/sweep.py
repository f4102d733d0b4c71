"""The LR range-test sweep engine (Smith 2015, section 3.3), shared by every driver.

fastai's `LRFinder` (fastai/fastai, fastai/callback/schedule.py) is a schedule, a stop rule and a
restore; so is this module, in pieces any training loop can drive:

* `SweepOptions`: the sweep's arguments, each validated here and nowhere else.
* `sweep_schedule(options)`: the LR of step k (`clrlab.schedules.LinearSweep` / `ExponentialSweep`).
* `SweepRecorder`: fed the steps as they are trained (LR, own loss, own accuracy) it records them,
  takes held-out evaluations when due, applies the stop rule (NaN/inf at once, divergence of the
  smoothed loss, end of the sweep) and builds the `RangeTestResult`, merging the held-out accuracy
  into the recommendation.
* `StateSnapshot`: the bitwise copy of model and optimizer state that is put back afterwards.
The drivers: `trainers.range_sweep.run_sweep` runs the sweep with `trainers.custom_loop.CustomLoopTrainer`
(the training step of `python -m clrlab.train`); `clrlab.callbacks.LRRangeTest` is the `model.fit` driver.

Steps are 0-based training steps (batches) of the sweep. Everything here runs eagerly on the host,
between compiled training calls.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from clrlab import config, lr_curves, lr_suggest

__all__ = ["RANGE_TEST_TAGS", "SWEEP_DEFAULTS", "RangeTestResult", "StateSnapshot", "SweepOptions", "SweepRecorder",
           "sweep_schedule", "write_sweep_scalars"]

_log = logging.getLogger(__name__)

# Defaults per sweep: Smith's linear test is long and judged on accuracy (the CLR paper runs 8 epochs);
# the exponential test covers many decades in a few hundred steps.
SWEEP_DEFAULTS = {
    "linear": {"start_lr": 1e-4, "end_lr": 0.1, "epochs": 8.0},
    "exponential": {"start_lr": 1e-6, "end_lr": 1.0, "steps": 300},
}


def _real(name: str, value, what: str, ok, *, allow_inf: bool = False) -> float:
    """`value` as a float if it is a real number satisfying `ok`, else one clear ValueError."""
    bad = ValueError(f"Argument `{name}` must be {what}. Received: {name}={value!r}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or not ok(value):
        raise bad
    return value


def _int(name: str, value, what: str, ok) -> int:
    """`value` as an int if it is an integer satisfying `ok`, else one clear ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not ok(int(value)):
        raise ValueError(f"Argument `{name}` must be {what}. Received: {name}={value!r}.")
    return int(value)


def _choice(name: str, value, names: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"Argument `{name}` must be one of {tuple(names)}. Received: {name}={value!r}.")
    return value


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How to sweep; every field is validated on construction (one ValueError naming the argument).

    Attributes:
      sweep: `'linear'` (Smith's test; judge it on accuracy) or `'exponential'` (fastai's; on the loss).
      start_lr, end_lr: the LR of step 0 and of step `num_steps - 1` (finite, 0 < start_lr < end_lr).
      num_steps: sweep length in steps (an integer >= 10).
      eval_every: held-out evaluation every this many steps (0: none). Smith's accuracy rule then uses
        the held-out accuracy instead of the noisier per-batch training accuracy.
      smoother, beta: the loss smoother of `clrlab.lr_curves` (`'ema_debiased'`, `'ema_seeded'`,
        `'none'`) and its decay in [0, 1), for the divergence stop and the suggestions.
      divergence_factor: stop when the smoothed loss exceeds this times its best (> 1; `math.inf`:
        never stop on divergence).
      check_every: steps between two stop-rule checks (>= 1): how many steps a driver may train per
        compiled call (`SweepRecorder.next_chunk`).
    """

    sweep: str = "exponential"
    start_lr: float = 1e-6
    end_lr: float = 1.0
    num_steps: int = 300
    eval_every: int = 0
    smoother: str = "ema_debiased"
    beta: float = 0.98
    divergence_factor: float = 4.0
    check_every: int = 10

    def __post_init__(self):
        _choice("sweep", self.sweep, config.SWEEPS)
        start = _real("start_lr", self.start_lr, "a finite number > 0", lambda v: v > 0)
        checked = {
            "start_lr": start,
            "end_lr": _real("end_lr", self.end_lr, f"a finite number > start_lr ({start!r})", lambda v: v > start),
            "num_steps": _int("num_steps", self.num_steps, "an integer >= 10", lambda v: v >= 10),
            "eval_every": _int("eval_every", self.eval_every, "an integer >= 0", lambda v: v >= 0),
            "smoother": _choice("smoother", self.smoother, lr_curves.SMOOTHERS),
            "beta": _real("beta", self.beta, "a number in [0, 1)", lambda v: 0 <= v < 1),
            "divergence_factor": _real("divergence_factor", self.divergence_factor, "a number > 1 (math.inf: never)",
                                       lambda v: v > 1, allow_inf=True),
            "check_every": _int("check_every", self.check_every, "an integer >= 1", lambda v: v >= 1),
        }
        for name, value in checked.items():  # plain float/int, whatever real/integral type was given
            object.__setattr__(self, name, value)


def sweep_schedule(options: SweepOptions):
    """The sweep's `LearningRateSchedule`: LR of step k (0-based) rising from `start_lr` to `end_lr` at
    step `num_steps - 1`, linearly or by a constant factor per step."""
    from clrlab import schedules  # deferred: schedules imports TensorFlow, the options and recorder do not

    cls = schedules.LinearSweep if options.sweep == "linear" else schedules.ExponentialSweep
    return cls(options.start_lr, options.end_lr, options.num_steps)


@dataclasses.dataclass(frozen=True)
class RangeTestResult:
    """A finished sweep: the `Recommendation` plus the held-out evaluations (steps, LRs, accuracies)."""

    recommendation: lr_suggest.Recommendation
    eval_steps: tuple[int, ...] = ()
    eval_lrs: tuple[float, ...] = ()
    eval_accuracies: tuple[float, ...] = ()

    @property
    def base_lr(self) -> float | None:
        return self.recommendation.base_lr

    @property
    def max_lr(self) -> float | None:
        return self.recommendation.max_lr

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of `range_test.json` (before the command adds its own keys)."""
        out = self.recommendation.to_dict()
        out["eval"] = {"steps": list(self.eval_steps), "lrs": list(self.eval_lrs),
                       "accuracy": list(self.eval_accuracies)}
        return out


class SweepRecorder:
    """The records and the stop rule of one sweep; a driver feeds it the steps it trains.

    Per call of `record` (one or more consecutive steps), in this order: the steps are appended; a
    NaN/inf loss among them stops the sweep (`'nonfinite'`, no evaluation after it); when the step
    count is a multiple of `eval_every`, `evaluate()` gives the held-out accuracy at the last step;
    the sweep stops when the smoothed loss diverges (`clrlab.lr_curves.divergence_index`:
    `'diverged'`) or `num_steps` steps are recorded (`'num_steps'`).

    Attributes:
      options: the `SweepOptions`.
      lrs, losses: per step, the LR it trained with and its own loss (not a running mean).
      accuracies: per step its own accuracy, or None when the driver records no accuracy.
      eval_steps, eval_lrs, eval_accuracies: the held-out evaluations (step, its LR, accuracy).
      stop_reason: None while the sweep runs, then `'nonfinite'`, `'diverged'`, `'num_steps'` or what
        the driver passed to `stop` (e.g. `'fit_ended'`).
    """

    def __init__(self, options: SweepOptions):
        self.options = options
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.accuracies: list[float] | None = None
        self.eval_steps: list[int] = []
        self.eval_lrs: list[float] = []
        self.eval_accuracies: list[float] = []
        self.stop_reason: str | None = None

    @property
    def steps(self) -> int:
        """Steps recorded so far."""
        return len(self.lrs)

    @property
    def done(self) -> bool:
        """Whether the sweep has stopped (`stop_reason` is set)."""
        return self.stop_reason is not None

    def next_chunk(self) -> int:
        """How many steps to train before the next `record` (>= 1): at most `check_every`, ending at the
        sweep's last step and at the next held-out evaluation."""
        options = self.options
        n = min(options.check_every, options.num_steps - self.steps)
        if options.eval_every:
            n = min(n, options.eval_every - self.steps % options.eval_every)
        return max(n, 1)

    def record(self, lrs: Sequence[float], losses: Sequence[float], accuracies: Sequence[float] | None = None,
               evaluate: Callable[[], float] | None = None) -> str | None:
        """Appends consecutive steps and applies the stop rule; returns `stop_reason` (None: go on).

        Args:
          lrs, losses: the steps' LRs and own losses (equal lengths, >= 1).
          accuracies: the steps' own accuracies (NaN where unknown), or None on every call.
          evaluate: returns the held-out accuracy now; called when an evaluation is due (None: never).
        """
        if self.done:
            raise RuntimeError(f"The sweep has stopped ({self.stop_reason}); record no more steps.")
        if len(lrs) != len(losses) or not len(lrs) or (accuracies is not None and len(accuracies) != len(lrs)):
            raise ValueError(f"Need as many LRs as losses (and accuracies), at least one. Received: "
                             f"{len(lrs)} LRs, {len(losses)} losses, "
                             f"{None if accuracies is None else len(accuracies)} accuracies.")
        if (accuracies is None) != (self.accuracies is None) and self.steps:
            raise ValueError("Give accuracies on every call or on none.")
        if accuracies is not None and self.accuracies is None:
            self.accuracies = []
        self.lrs.extend(float(v) for v in lrs)
        self.losses.extend(float(v) for v in losses)
        if accuracies is not None:
            self.accuracies.extend(float(v) for v in accuracies)
        options = self.options
        if not all(math.isfinite(float(v)) for v in losses):
            return self.stop("nonfinite")
        if evaluate is not None and options.eval_every and self.steps % options.eval_every == 0:
            accuracy = float(evaluate())
            self.eval_steps.append(self.steps - 1)
            self.eval_lrs.append(self.lrs[-1])
            self.eval_accuracies.append(accuracy)
        smoothed = lr_curves.smooth(self.losses, options.smoother, options.beta)
        if lr_curves.divergence_index(smoothed, options.divergence_factor) is not None:
            return self.stop("diverged")
        if self.steps >= options.num_steps:
            return self.stop("num_steps")
        return None

    def stop(self, reason: str) -> str:
        """Ends the sweep for `reason` (kept if it has stopped already); returns the stop reason."""
        if self.stop_reason is None:
            self.stop_reason = reason
        return self.stop_reason

    def result(self) -> RangeTestResult:
        """Analyses the records (`clrlab.lr_suggest.recommend`, with the options' smoother, beta and
        divergence factor). With held-out evaluations that rise, Smith's accuracy rule on them replaces the
        per-batch accuracy rule (`recommend(heldout=...)`: rules `heldout_accuracy_peak/2`,
        `heldout_accuracy_rise`, suggestions `accuracy_base`/`accuracy_max`): held-out accuracy beats the
        noisier per-batch training accuracy; too few evaluations keep the per-batch bounds (logged as a
        warning).

        Raises:
          ValueError: when `recommend` cannot analyse the records (too few finite steps).
        """
        options = self.options
        heldout = None
        if self.eval_accuracies:
            try:
                heldout = lr_suggest.suggest_from_accuracy(self.eval_lrs, self.eval_accuracies, sweep=options.sweep)
            except ValueError as e:
                _log.warning("Held-out accuracy not used for the bounds: %s", e)
            if heldout is not None and heldout.top_lr is None:
                heldout = None  # no readable held-out rise: the per-batch rules decide
        rec = lr_suggest.recommend(np.asarray(self.lrs), np.asarray(self.losses),
                                   None if self.accuracies is None else np.asarray(self.accuracies),
                                   sweep=options.sweep, smoother=options.smoother, beta=options.beta,
                                   divergence_factor=options.divergence_factor, heldout=heldout)
        return RangeTestResult(recommendation=rec, eval_steps=tuple(self.eval_steps),
                               eval_lrs=tuple(self.eval_lrs), eval_accuracies=tuple(self.eval_accuracies))


class StateSnapshot:
    """A bitwise copy of a model's weights (incl. non-trainable batch-norm statistics) and an optimizer's
    variables (slots, iterations, LR variable, loss-scale state), restorable in place (eager)."""

    def __init__(self, model, optimizer, extra_variables=()):
        self._variables = list(model.weights) + list(optimizer.variables) + list(extra_variables)
        self._values = [v.numpy().copy() for v in self._variables]

    def restore(self) -> None:
        for variable, value in zip(self._variables, self._values, strict=True):
            variable.assign(value)

    def matches(self) -> bool:
        """True when every variable is bitwise equal to the snapshot."""
        return all(np.array_equal(v.numpy(), value) for v, value in zip(self._variables, self._values, strict=True))


RANGE_TEST_TAGS = {"lr": "range_test/learning_rate", "loss": "range_test/loss",
                   "accuracy": "range_test/accuracy"}
"""The per-step TensorBoard tags of a sweep: a `range_test/` card of their own, apart from training's."""


def write_sweep_scalars(writer, first_step: int, lrs, losses, accuracies=None) -> None:
    """Writes consecutive sweep steps `first_step, first_step + 1, ...` under `RANGE_TEST_TAGS` (eager)."""
    import tensorflow as tf  # deferred: the options and the recorder do not need TensorFlow

    with writer.as_default():
        for i, lr in enumerate(lrs):
            step = first_step + i
            tf.summary.scalar(RANGE_TEST_TAGS["lr"], float(lr), step=step)
            tf.summary.scalar(RANGE_TEST_TAGS["loss"], float(losses[i]), step=step)
            if accuracies is not None:
                tf.summary.scalar(RANGE_TEST_TAGS["accuracy"], float(accuracies[i]), step=step)
