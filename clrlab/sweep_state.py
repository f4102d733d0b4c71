"""The data of an LR range-test sweep, shared by `clrlab.range_test` (the custom-loop sweep and its
command line) and `clrlab.callbacks.LRRangeTest` (the same sweep inside `model.fit`).

Layer 1: imports neither trainers nor the command line. `StateSnapshot` runs eagerly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

SWEEPS = ("linear", "exponential")


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How to sweep. `num_steps` and `eval_every` are in steps (batches).

    `eval_every` > 0 evaluates held-out accuracy every that many steps (on at most `eval_examples` test
    examples); Smith's rule then uses it instead of the noisier per-batch training accuracy.
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
        if self.sweep not in SWEEPS:
            raise ValueError(f"sweep must be one of {SWEEPS}. Received: sweep={self.sweep!r}.")
        if not (0 < self.start_lr < self.end_lr):
            raise ValueError(f"Need 0 < start_lr < end_lr. Received: start_lr={self.start_lr}, end_lr={self.end_lr}.")
        if self.num_steps < 10:
            raise ValueError(f"num_steps must be >= 10. Received: num_steps={self.num_steps}.")
        if self.eval_every < 0 or self.check_every < 1:
            raise ValueError(f"eval_every must be >= 0 and check_every >= 1. Received: "
                             f"eval_every={self.eval_every}, check_every={self.check_every}.")
        if self.divergence_factor <= 1:
            raise ValueError(f"divergence_factor must be > 1. Received: {self.divergence_factor}.")


@dataclasses.dataclass(frozen=True)
class RangeTestResult:
    """A finished sweep: the `Recommendation` plus the held-out evaluations (steps, LRs, accuracies)."""

    recommendation: Any  # clrlab.lr_suggest.Recommendation
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
        out = self.recommendation.to_dict()
        out["eval"] = {"steps": list(self.eval_steps), "lrs": list(self.eval_lrs),
                       "accuracy": list(self.eval_accuracies)}
        return out


class StateSnapshot:
    """A bitwise copy of a model's weights (incl. non-trainable batch-norm statistics) and an optimizer's
    variables (slots, iterations, LR variable, loss-scale state), restorable in place (eager)."""

    def __init__(self, model, optimizer, extra_variables=()):
        self._variables = list(model.weights) + list(optimizer.variables) + list(extra_variables)
        self._values = [v.numpy().copy() for v in self._variables]

    def restore(self) -> None:
        for variable, value in zip(self._variables, self._values):
            variable.assign(value)

    def matches(self) -> bool:
        """True when every variable is bitwise equal to the snapshot."""
        import numpy as np

        return all(np.array_equal(v.numpy(), value) for v, value in zip(self._variables, self._values))
