"""Statistics of a study (pure Python + NumPy/SciPy, no TensorFlow): means with Student-t confidence
intervals over seeds, iterations to a target accuracy from a run's per-epoch evaluations, and the ratio
of iterations-to-target between two groups with a percentile bootstrap over seeds.

Units: iterations are optimizer steps. A run is evaluated on its held-out split once per epoch (the
`epochs` columns of history.json, `step` = the global step at the end of that epoch), so
iterations-to-target has the resolution of one epoch: the first epoch-end step whose `val_accuracy`
reaches the target. A run that never reaches it gives None ("not reached").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 10000
BOOTSTRAP_SEED = 0


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """{n, mean, std (ddof=1), ci_low, ci_high}: the two-sided Student-t interval of the mean at `level`.

    std and the interval are None for fewer than 2 values; every field is None for none.
    """
    from scipy import stats  # deferred: scipy takes a second to import and only the aggregates need it

    x = np.asarray([float(v) for v in values], dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def iterations_to_target(epochs: Mapping[str, Sequence[float]], target: float) -> int | None:
    """The first epoch-end step (history.json `epochs.step`) whose `val_accuracy` >= `target`, else None."""
    for step, accuracy in zip(epochs.get("step", ()), epochs.get("val_accuracy", ())):
        if accuracy is not None and accuracy >= target:
            return int(step)
    return None


def censored(iterations: Sequence[int | None], budget: int) -> np.ndarray:
    """Iterations-to-target with "not reached" counted as the step budget (a lower bound for that seed)."""
    return np.asarray([budget if v is None else v for v in iterations], dtype=np.float64)


def ratio_ci(group: Sequence[float], baseline: Sequence[float], level: float = 0.95,
             samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """mean(group) / mean(baseline) with a percentile bootstrap interval at `level`.

    Each bootstrap sample redraws the seeds of each group independently, with replacement (the groups'
    seeds are different runs). Returns {ratio, ci_low, ci_high}; all None when a group is empty or the
    baseline's mean is 0.
    """
    g, b = np.asarray(group, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if g.size == 0 or b.size == 0 or b.mean() == 0:
        return {"ratio": None, "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    g_means = g[rng.integers(0, g.size, size=(samples, g.size))].mean(axis=1)
    b_means = b[rng.integers(0, b.size, size=(samples, b.size))].mean(axis=1)
    ok = b_means > 0
    ratios = g_means[ok] / b_means[ok]
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha])
    return {"ratio": float(g.mean() / b.mean()), "ci_low": float(low), "ci_high": float(high)}


def group_curves(histories: Sequence[Mapping[str, Any]], key: str) -> dict[str, list[float]] | None:
    """Per-epoch mean and sd over runs of `epochs[key]` at the epoch-end steps all runs share
    ({step, mean, std}), or None without histories."""
    columns = [h["epochs"] for h in histories if h and h.get("epochs", {}).get(key)]
    if not columns:
        return None
    n = min(len(c[key]) for c in columns)
    values = np.asarray([c[key][:n] for c in columns], dtype=np.float64)
    std = values.std(axis=0, ddof=1) if len(columns) > 1 else np.zeros(n)
    return {"step": [int(s) for s in columns[0]["step"][:n]], "mean": values.mean(axis=0).tolist(),
            "std": std.tolist()}
