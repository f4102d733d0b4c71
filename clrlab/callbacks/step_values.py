"""What the callbacks read per training step, from what Keras exposes between batches.

* `deaverage`: a batch's own value from two readings of Keras' running batch-log means.
* `BatchValue`: a batch's own value from the state of the `keras.metrics.Mean` behind a log key
  (falls back to `deaverage`).
* `GraphLR`: a `LearningRateSchedule` evaluated at given steps in graph mode, bit-identical to what a
  compiled training step computes.

Two Keras facts shape them (see `keras.callbacks.Callback.on_train_batch_end`, keras/src/callbacks/
callback.py): batch `logs` hold running averages since the start of the epoch, not the batch's own
values; and with `compile(steps_per_execution=N)` the batch hooks fire once per N batches.

Everything here runs eagerly, on the host, between compiled training calls.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from clrlab import keras_internals

__all__ = ["BatchValue", "GraphLR", "accuracy_key", "deaverage"]


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


class GraphLR:
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


class BatchValue:
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


def accuracy_key(keys) -> str | None:
    """The accuracy among batch-log keys: 'accuracy', 'acc', else the first '*accuracy' key."""
    keys = list(keys)
    for key in ("accuracy", "acc"):
        if key in keys:
            return key
    return next((k for k in keys if k.endswith("accuracy") and not k.startswith("val_")), None)


def per_batch_lr_optimizer(model, callback: str, *, schedule_advice: str, steps_advice) -> Any:
    """The optimizer of a compiled `model` whose LR a callback may set between batches (eager, once in
    `on_train_begin`). Raises one-line ValueErrors for an uncompiled model, an optimizer built with a
    `LearningRateSchedule` (`schedule_advice(name_of_schedule)` says what to do) and
    `steps_per_execution > 1` (`steps_advice(k)` says what goes wrong and what to do)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"{callback} needs a compiled model: call model.compile(optimizer=...) first.")
    schedule = keras_internals.held_schedule(optimizer)
    if schedule is not None:
        raise ValueError(schedule_advice(type(schedule).__name__))
    spe = int(getattr(model, "steps_per_execution", 1) or 1)
    if spe > 1:
        raise ValueError(steps_advice(spe))
    return optimizer
