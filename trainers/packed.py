"""The packed trainer: M runs of one architecture trained together, K steps per compiled `tf.function` call.

The members' weights are stacked on a leading member axis (`clrlab.packed_models.PackedModel`), so every op
of a step computes all members at once (batched matmuls / convolutions) and one optimizer update per
stacked variable applies every member's own LR and momentum (`trainers.packed_update.PackedOptimizer`). On
a small model, whose step is almost all per-op overhead, M members cost little more than one.

Per step, inside the graph (global step `t`, shared by all members):

    lr[m] = schedule_m(t)                       # float32 [M], each member's own LearningRateSchedule
    momentum[m] = momentum_schedule_m(t) | c_m  # float64 [M] (SGD momentum or Adam beta_1), cycling or constant
    idx[m] = epoch_order(n, seed_m, t // spe)[b * B:(b + 1) * B],  b = t % spe   # [M, B]
    x, y = gather(x_train, idx), gather(y_train, idx)                            # [M, B, ...], [M, B]
    loss[m] = mean_b sparse_ce(y[m], logits[m]);  total[m] = loss[m] + l2[m]     # as the custom loop
    grads = d(sum_m total[m]) / d(stacked weights)   # member m's slice = d total[m] / d its weights
    optimizer.apply(grads, lr, momentum);  t += 1

Equivalence with the unpacked custom loop (`trainers/custom_loop.py`), member by member:

* The batches are the unpacked pipeline's (`clrlab.data.pipelines.epoch_order`, the permutation
  `train_dataset` uses), gathered from resident float32 tensors.
* The LR and momentum are computed exactly as the custom loop does: a schedule made only of exactly rounded
  elementwise ops (`trainers.custom_loop.exactly_vectorizable`) for a whole call at once, any other per step
  as a scalar; so the traces are bit for bit the unpacked ones. Members with the same schedule (seeds of one
  grid point) share one evaluation.
* The losses and gradients agree to float32 rounding, not bit for bit: batched kernels (and a reduction
  over an axis of [M, B] instead of a whole [B] vector) sum in other orders than the unpacked ones.
* The gradient of the sum is each member's own gradient: d(sum)/d(total[m]) is exactly 1 and members share
  no op, so members never see each other.

A member whose loss (its total loss with an L2 term) becomes NaN or inf has FAILED: from the end of that
call it is masked (`active`): its per-step summaries stop, `train_steps` reports it once in `failures`
(a `trainers.custom_loop.NonFiniteLossError` naming its first bad step), and the caller stops recording it.
Its slice is still computed (and may hold NaN), which cannot reach the other members: every op keeps
members apart (a NaN upstream gradient only flows into the failed member's own slice).

`train_steps` and `evaluate` are eager entry points over compiled functions (one host sync per call); the
`_loop` / `_train_one_step` / `_write_summaries` methods are graph code inside one `tf.function` (traced once
per pattern of members that write summaries). Steps are global steps (batches); a call never crosses an epoch
end (the caller chunks by epoch). Shapes: M members, B examples per member per step, C classes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clrlab import keras_internals
from clrlab.data.pipelines import epoch_order, steps_per_epoch
from trainers.custom_loop import NonFiniteLossError, StepRecords, exactly_vectorizable
from trainers.evaluation import CACHE_BYTES


@dataclasses.dataclass(frozen=True)
class PackedRecords:
    """Per-step, per-member records of one `train_steps` call. `step` has shape [K]; every other array
    [K, M] (None when absent): `lr` the LR the step trained with, `loss` the batch's data loss, `accuracy`
    the batch accuracy, `momentum` (float32) the momentum / beta_1 (None when no member's momentum cycles),
    `l2_loss` and `total_loss` (None for a model without regularisation)."""

    step: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    momentum: np.ndarray | None = None
    l2_loss: np.ndarray | None = None
    total_loss: np.ndarray | None = None

    def member(self, index: int, *, with_momentum: bool = True) -> StepRecords:
        """Member `index`'s records as the custom loop's `StepRecords` (what `History.add_steps` takes);
        `with_momentum=False` leaves out the momentum column (a member whose momentum is constant)."""
        def col(a):
            return None if a is None else np.ascontiguousarray(a[:, index])

        return StepRecords(step=self.step, lr=col(self.lr), loss=col(self.loss), accuracy=col(self.accuracy),
                           applied=np.ones([len(self.step)], bool),
                           momentum=col(self.momentum) if with_momentum else None,
                           l2_loss=col(self.l2_loss), total_loss=col(self.total_loss))


def _key(schedule) -> str:
    """Identity of a schedule for sharing one evaluation: its Keras config, else the object itself."""
    try:
        return json.dumps(keras.saving.serialize_keras_object(schedule), sort_keys=True, default=str)
    except Exception:  # noqa: BLE001 - an arbitrary callable: shared only with itself
        return f"object:{id(schedule)}"


class _PerMember:
    """Values of M members' schedules at a step, each distinct schedule evaluated once (graph code).

    `table(first, n)` precomputes, for the exactly vectorizable schedules, their [n] values of steps
    first..first+n-1 (bit for bit the per-step values); `at(tables, i, step)` returns the [M] vector of
    step `first + i` in `dtype`: table entries, per-step scalar evaluations of the others, constants."""

    def __init__(self, schedules: Sequence[Callable | float], dtype, *, via: tf.DType | None = None):
        self.dtype, self.via = dtype, via
        self.distinct: list[Callable | float] = []
        keys: dict[str, int] = {}
        index = []
        for s in schedules:
            key = f"const:{float(s)!r}" if isinstance(s, (int, float)) else _key(s)
            if key not in keys:
                keys[key] = len(self.distinct)
                self.distinct.append(s)
            index.append(keys[key])
        self.index = tf.constant(index, tf.int32)
        self.vectorized = [not isinstance(s, (int, float)) and exactly_vectorizable(s) for s in self.distinct]

    def _cast(self, value):
        # The custom loop casts the schedule's value straight to the variable's dtype (float32 LR, float64
        # momentum): the same single cast here.
        return tf.cast(value, self.dtype)

    def tables(self, first: tf.Tensor, n: tf.Tensor) -> list[tf.Tensor | None]:
        steps = first + tf.range(tf.cast(n, tf.int64))
        return [self._cast(s(steps)) if v else None for s, v in zip(self.distinct, self.vectorized)]

    def at(self, tables, i: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        values = []
        for s, table in zip(self.distinct, tables):
            if isinstance(s, (int, float)):
                values.append(tf.constant(float(s), self.dtype))
            elif table is not None:
                values.append(tf.gather(table, i))
            else:
                values.append(self._cast(s(step)))
        return tf.gather(tf.stack(values), self.index)


class PackedTrainer:
    """Trains the M members of a `PackedModel` in compiled calls of K steps from one shared global step.

    Args:
      model: a `clrlab.packed_models.PackedModel` (`members` = M; `__call__(x [M, B, ...]) -> logits
        [M, B, C]`, `l2_loss() -> [M]`, `variables_by_member_order`).
      optimizer: a `trainers.packed_update.PackedOptimizer` over `model.variables_by_member_order`.
      schedules: M callables `int64 step tensor -> LR` (each member's `LearningRateSchedule`).
      momentum: M entries, each a momentum schedule (e.g. `clrlab.schedules.CyclicalMomentum`; recorded as
        `momentum`) or a float (a constant SGD momentum / Adam beta_1; not recorded).
      seeds: M data seeds: member m's batches are `train_dataset(..., seed=seeds[m])`'s.
      x_train, y_train: the training split, float32 [N, *input_shape] and int [N], made resident.
      batch_size: examples per member per step (B); steps per epoch = N // B.
      regularized: whether the members have regularisation losses (records `l2_loss`, `total_loss`).
      summary_writers: M `tf.summary` writers (or None entries / None) for the per-step scalars, with the
        custom loop's tags (learning_rate, [momentum,] loss, accuracy[, l2_loss, total_loss]); fixed for
        the trainer's life (traced in).
      summary_every: write per-step scalars when `global_step % summary_every == 0`.
    """

    def __init__(self, model, optimizer, schedules: Sequence[Callable], *, momentum: Sequence[Callable | float],
                 seeds: Sequence[int], x_train, y_train, batch_size: int, regularized: bool = False,
                 summary_writers: Sequence[Any] | None = None, summary_every: int = 1):
        m = int(model.members)
        for name, values in (("schedules", schedules), ("momentum", momentum), ("seeds", seeds)):
            if len(values) != m:
                raise ValueError(f"{name} needs one entry per member ({m}). Received: {len(values)}.")
        if summary_writers is not None and len(summary_writers) != m:
            raise ValueError(f"summary_writers needs one entry per member ({m}). Received: {len(summary_writers)}.")
        if summary_every < 1:
            raise ValueError(f"summary_every must be >= 1. Received: summary_every={summary_every}.")
        self.model, self.optimizer, self.members = model, optimizer, m
        self.seeds = [int(s) for s in seeds]
        self.batch_size = int(batch_size)
        self.num_examples = int(len(x_train))
        self.steps_per_epoch = steps_per_epoch(self.num_examples, self.batch_size)
        self.x_train = tf.constant(np.asarray(x_train, np.float32))
        self.y_train = tf.constant(np.asarray(y_train).astype(np.int32))
        self.regularized = bool(regularized)
        self.cycling = [not isinstance(v, (int, float)) for v in momentum]
        self._lr = _PerMember(schedules, tf.float32)
        self._momentum = _PerMember(momentum, tf.float64)
        self.summary_writers = list(summary_writers) if summary_writers is not None else [None] * m
        self.summary_every = int(summary_every)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.global_step = keras_internals.create_global_step()
        self.active = tf.Variable(tf.ones([m], tf.bool), trainable=False, name="active")
        # The record row per member: [lr, loss, accuracy] [+ l2_loss, total_loss] [+ momentum].
        self._columns = ["lr", "loss", "accuracy"] + (["l2_loss", "total_loss"] if self.regularized else []) \
            + (["momentum"] if any(self.cycling) else [])
        self._loop_fn = tf.function(self._loop, reduce_retracing=True)
        self._eval_fns: dict[str, Any] = {}  # compiled per-batch evaluation, by the dataset's element_spec
        self._kept: tuple[tf.data.Dataset, list] | None = None  # the last evaluated dataset and its batches

    def checkpoint_objects(self) -> dict[str, Any]:
        """What a `tf.train.Checkpoint` of the pack holds: stacked weights, optimizer slots, global step and
        the members' active mask (a failed member stays failed after a resume)."""
        return {"model": self.model, "optimizer": self.optimizer, "global_step": self.global_step,
                "active": self.active}

    @property
    def step(self) -> int:
        return int(self.global_step.numpy())

    # ----------------------------------------------------------------------------------- graph code
    def _loop(self, num_steps: tf.Tensor, writing: tuple[bool, ...]):
        """`num_steps` steps inside one tf.function, all within the epoch of the first one; `writing[m]`
        (a Python bool, traced in: one trace per pattern) says whether member m writes per-step scalars."""
        first = self.global_step.read_value()
        spe = self.steps_per_epoch
        epoch = first // spe
        orders = tf.stack([epoch_order(self.num_examples, s, epoch) for s in self.seeds])  # [M, N]
        lr_tables = self._lr.tables(first, num_steps)
        momentum_tables = self._momentum.tables(first, num_steps)
        records = tf.TensorArray(tf.float32, size=num_steps, element_shape=[self.members, len(self._columns)])
        for i in tf.range(num_steps):
            with tf.name_scope(""):
                step = first + tf.cast(i, tf.int64)
                lr = self._lr.at(lr_tables, i, step)
                momentum = self._momentum.at(momentum_tables, i, step)
                start = tf.cast((step - epoch * spe) * self.batch_size, tf.int32)
                indices = tf.slice(orders, tf.stack([0, start]), [self.members, self.batch_size])  # [M, B]
                records = records.write(i, self._train_one_step(indices, lr, momentum))
        records = records.stack()  # [K, M, columns]
        self._write_summaries(first, records, writing)
        return {"first_step": first, "records": records}

    def _train_one_step(self, indices: tf.Tensor, lr: tf.Tensor, momentum: tf.Tensor) -> tf.Tensor:
        x = tf.gather(self.x_train, indices)  # [M, B, *input_shape]
        y = tf.gather(self.y_train, indices)  # [M, B]
        variables = list(self.model.variables_by_member_order)
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)  # [M, B, C]
            per_example = tf.cast(self.loss_fn(y, logits), tf.float32)  # [M, B]
            # The custom loop's tf.nn.compute_average_loss: sum / global batch, per member.
            data_loss = tf.math.divide_no_nan(tf.reduce_sum(per_example, axis=1),
                                              tf.constant(self.batch_size, tf.float32))
            total = data_loss
            l2 = None
            if self.regularized:
                l2 = tf.cast(self.model.l2_loss(), tf.float32)
                total = data_loss + l2
            objective = tf.reduce_sum(total)
        grads = tape.gradient(objective, variables)
        self.optimizer.apply(grads, variables, lr, momentum)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        accuracy = tf.reduce_mean(tf.cast(tf.equal(predictions, y), tf.float32), axis=1)
        row = [lr, data_loss, accuracy] + ([l2, total] if l2 is not None else [])
        if any(self.cycling):
            row.append(tf.cast(momentum, tf.float32))
        self.global_step.assign_add(1)
        return tf.stack(row, axis=1)  # [M, columns]

    def _write_summaries(self, first: tf.Tensor, records: tf.Tensor, writing: Sequence[bool]) -> None:
        """Each writing member's per-step scalars (the custom loop's tags) into its own writer, after the
        steps: one loop over the K steps whose body unstacks the step's [M, columns] row (2 + M ops) and
        writes every member's scalars (one WriteSummary each), instead of a loop and a cond per member."""
        col = {name: j for j, name in enumerate(self._columns)}
        tags = [("learning_rate", "lr")] + ([("momentum", "momentum")] if any(self.cycling) else []) \
            + [("loss", "loss"), ("accuracy", "accuracy")] \
            + ([("l2_loss", "l2_loss"), ("total_loss", "total_loss")] if self.regularized else [])
        members = [(m, w, [(t, c) for t, c in tags if t != "momentum" or self.cycling[m]])
                   for m, w in enumerate(self.summary_writers) if w is not None and writing[m]]
        if not members:
            return
        for i in tf.range(tf.shape(records)[0]):
            step = first + tf.cast(i, tf.int64)

            def scalars(i=i, step=step):
                rows = tf.unstack(records[i], num=self.members)  # [columns] per member
                with tf.name_scope(""), tf.summary.record_if(True):
                    for m, writer, member_tags in members:
                        values = tf.unstack(rows[m], num=len(self._columns))
                        with writer.as_default():
                            for tag, column in member_tags:
                                tf.summary.scalar(tag, values[col[column]], step=step)
                return tf.constant(True)

            if self.summary_every == 1:
                scalars()
            else:
                tf.cond(tf.equal(step % self.summary_every, 0), scalars, lambda: tf.constant(False))

    # ----------------------------------------------------------------------------------- eager API
    def train_steps(self, num_steps: int) -> tuple[PackedRecords, dict[int, NonFiniteLossError]]:
        """Runs `num_steps` steps in one compiled call (eager entry point; one host sync at the end).

        The steps must lie in one epoch (ValueError otherwise). Returns the records and the members that
        failed in this call: {member index: NonFiniteLossError of its first non-finite step}; those are
        masked from here on (see the module docstring). `num_steps` is passed as a tensor: one trace.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1. Received: num_steps={num_steps}.")
        first = self.step
        if first % self.steps_per_epoch + num_steps > self.steps_per_epoch:
            raise ValueError(f"steps {first}..{first + num_steps - 1} cross an epoch end (every "
                             f"{self.steps_per_epoch} steps): a call trains within one epoch.")
        # Members failed before this call write no summaries (a new pattern traces once more). The mask is
        # read once: the compiled loop never changes it, only the host code below does.
        active = self.active.numpy()
        out = self._loop_fn(tf.constant(num_steps, tf.int32), tuple(bool(a) for a in active))
        rows = out["records"].numpy()  # [K, M, columns]
        columns = {name: np.ascontiguousarray(rows[:, :, j]) for j, name in enumerate(self._columns)}
        step = np.arange(first, first + num_steps, dtype=np.int64)
        records = PackedRecords(step=step, lr=columns["lr"], loss=columns["loss"], accuracy=columns["accuracy"],
                                momentum=columns.get("momentum"), l2_loss=columns.get("l2_loss"),
                                total_loss=columns.get("total_loss"))
        checked = records.total_loss if self.regularized else records.loss
        failures = {}
        for m in np.flatnonzero(active):
            bad = np.flatnonzero(~np.isfinite(checked[:, m]))
            if bad.size:
                i = int(bad[0])
                failures[int(m)] = NonFiniteLossError(step[i], records.lr[i, m], checked[i, m],
                                                      records.member(int(m), with_momentum=self.cycling[m]))
        if failures:
            self.active.assign(np.logical_and(active, ~np.isin(np.arange(self.members), list(failures))))
        return records, failures

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, np.ndarray]:
        """Every member's mean loss (no regularisation term) and accuracy over a finite dataset of shared
        (x [B, ...], y [B]) batches: {"loss": [M], "accuracy": [M]} float numpy (eager entry point).
        Accumulated as the unpacked `trainers.evaluation.Evaluator`'s Keras metrics: float32 totals of
        per-batch sums, divided by the example count. As the Evaluator does, each batch is one compiled call
        and the batches of the last dataset evaluated are kept (up to `trainers.evaluation.CACHE_BYTES`), so a
        later pass over the same dataset object starts no `tf.data` iterator (the held-out split is fixed)."""
        spec = getattr(dataset, "element_spec", None)
        eval_fn = self._eval_fns.get(repr(spec))
        if eval_fn is None:
            def eval_batch(x, y, loss_total, correct, count):
                xs = tf.broadcast_to(x[None], tf.concat([[self.members], tf.shape(x)], 0))
                ys = tf.broadcast_to(tf.cast(y, tf.int32)[None], [self.members, tf.shape(y)[0]])
                logits = tf.cast(self.model(xs, training=False), tf.float32)
                loss_total += tf.reduce_sum(tf.cast(self.loss_fn(ys, logits), tf.float32), axis=1)
                hits = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), ys)
                correct += tf.reduce_sum(tf.cast(hits, tf.float32), axis=1)
                count += tf.cast(tf.shape(y)[0], tf.float32)
                return loss_total, correct, count

            totals = [tf.TensorSpec([self.members], tf.float32)] * 2 + [tf.TensorSpec([], tf.float32)]
            if isinstance(spec, tuple) and all(isinstance(t, tf.TensorSpec) for t in spec):  # one trace
                eval_fn = tf.function(eval_batch, input_signature=[*spec, *totals])
            else:
                eval_fn = tf.function(eval_batch, reduce_retracing=True)
            self._eval_fns[repr(spec)] = eval_fn
        state = (tf.zeros([self.members], tf.float32), tf.zeros([self.members], tf.float32),
                 tf.constant(0.0, tf.float32))
        if self._kept is not None and self._kept[0] is dataset:
            for x, y in self._kept[1]:
                state = eval_fn(x, y, *state)
        else:
            self._kept = None
            kept, size = [], 0
            for x, y in dataset:
                state = eval_fn(x, y, *state)
                if kept is not None:
                    size += sum(t.shape.num_elements() * t.dtype.size for t in (x, y))
                    if size <= CACHE_BYTES:
                        kept.append((x, y))
                    else:
                        kept = None
            if kept is not None:
                self._kept = (dataset, kept)
        loss_total, correct, count = state
        loss, accuracy = tf.math.divide_no_nan(loss_total, count), tf.math.divide_no_nan(correct, count)
        return {"loss": loss.numpy().astype(np.float64), "accuracy": accuracy.numpy().astype(np.float64)}
