"""The explicit GradientTape trainer: K training steps per compiled `tf.function` call.

This module holds the training step and nothing else (no epochs, files or callbacks: those live in
`trainers/controller.py`). Per step, inside the graph:

    lr = schedule(global_step)                 # float32, from the trainer's checkpointed int64 step
    optimizer.learning_rate.assign(lr)         # the optimizer's own LR variable, cross-replica context
    [m = momentum_schedule(global_step)        # only with a momentum schedule (cyclical momentum)
     momentum_variable(optimizer).assign(m)]   # clrlab.optimizers' float64 momentum / beta_1 variable; with
                                               # the fused SGD update m goes straight into the update kernels
                                               # and the variable is assigned once per call (last step's m)
    x, y = next(iterator)
    strategy.run(step_fn): tape -> loss (data) [+ l2_loss = total_loss] -> [loss scaling] -> gradients -> apply
    summaries (learning_rate[, momentum], loss, accuracy[, l2_loss, total_loss][, loss_scale]) at global_step,
        every `summary_every` steps
    global_step += 1

The learning rate lives in one place (the optimizer's variable), is computed from one counter
(`global_step`, which is what checkpoints save and restore), and the value logged is the tensor that was
assigned. Nothing in the step reads back to Python; the eager wrapper `train_steps` converts the per-step
records to numpy once per call.

`global_step` is deliberately not `optimizer.iterations`: under `LossScaleOptimizer` that counter does not
advance on skipped (non-finite) steps, so an LR derived from it would drift from the step count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from clrlab import keras_internals, optimizers
from trainers.evaluation import Evaluator
from trainers.fused_update import FusedSGDUpdate, make_apply_fn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf in full precision. `step` and `learning_rate` name the first bad step;
    `records` holds the whole call's per-step records (a range test keeps the steps before it)."""

    def __init__(self, step: int, learning_rate: float, loss: float, records: StepRecords | None = None):
        self.step, self.learning_rate, self.loss = int(step), float(learning_rate), float(loss)
        self.records = records
        super().__init__(f"loss became {loss} at step {self.step} (learning rate {self.learning_rate:.6g})")


@dataclasses.dataclass(frozen=True)
class StepRecords:
    """Per-step records of one `train_steps` call; every array has shape [num_steps].

    `lr` is the learning rate the step trained with, `loss` that batch's data loss (not a running average;
    without the regularisation term, like the evaluation loss), `l2_loss` the model's regularisation term and
    `total_loss` = loss + l2_loss, what the optimizer minimised (both None for a model without
    regularisation losses),
    `accuracy` that batch's accuracy, `applied` whether the optimizer applied the update (False only for
    mixed_float16 steps skipped for non-finite gradients), `loss_scale` the loss scale the step used
    (None without loss scaling), `momentum` the momentum (SGD) or `beta_1` (Adam) the step trained with,
    float32 (None when the trainer has no momentum schedule).
    """

    step: np.ndarray
    lr: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    applied: np.ndarray
    loss_scale: np.ndarray | None = None
    momentum: np.ndarray | None = None
    l2_loss: np.ndarray | None = None
    total_loss: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.step.shape[0])


# Elementwise ops whose float results are exact or correctly rounded (IEEE-754 add, sub, mul, div,
# comparisons, selection, rounding, casts), so that an element's value does not depend on whether it is
# computed alone or inside a vector (SIMD or scalar code path, any position). Transcendental ops (exp, pow,
# cos...) are NOT in the list: their vectorised kernels may differ from the scalar ones in the last bit.
_EXACT_ELEMENTWISE_OPS = frozenset({
    "Placeholder", "Const", "Identity", "IdentityN", "NoOp", "StopGradient", "Cast", "Shape", "Reshape",
    "ExpandDims", "Squeeze", "ZerosLike", "OnesLike", "Fill", "AddV2", "Add", "Sub", "Mul", "RealDiv", "Div",
    "DivNoNan", "FloorDiv", "FloorMod", "Floor", "Ceil", "Round", "Rint", "Neg", "Abs", "Sign", "Maximum",
    "Minimum", "ClipByValue", "Less", "LessEqual", "Greater", "GreaterEqual", "Equal", "NotEqual",
    "LogicalAnd", "LogicalOr", "LogicalNot", "Select", "SelectV2",
})


def exactly_vectorizable(schedule: Callable[[tf.Tensor], tf.Tensor]) -> bool:
    """True when `schedule(steps)` for a vector of steps gives, element by element, bit for bit what
    `schedule(step)` gives for each step alone: the schedule maps a [n] int64 tensor to [n] values using
    only `_EXACT_ELEMENTWISE_OPS` (no control flow, no transcendental functions). Traced, never run."""
    fn = tf.function(lambda t: schedule(t), autograph=False)
    try:
        scalar = fn.get_concrete_function(tf.TensorSpec([], tf.int64))
        vector = fn.get_concrete_function(tf.TensorSpec([None], tf.int64))
    except Exception:  # noqa: BLE001 - any schedule that cannot take a vector is simply not vectorised
        return False
    for concrete, rank in ((scalar, 0), (vector, 1)):
        outputs = concrete.structured_outputs
        if not isinstance(outputs, tf.Tensor) or outputs.shape.rank != rank:
            return False
        graph_def = concrete.graph.as_graph_def()
        if graph_def.library.function or any(node.op not in _EXACT_ELEMENTWISE_OPS for node in graph_def.node):
            return False
    return True


class CustomLoopTrainer:
    """Runs compiled training steps that set the optimizer's learning rate from `schedule` every step.

    Args:
      model: a Keras model returning logits (float32 under mixed precision).
      optimizer: a Keras optimizer built with a FLOAT learning rate (it becomes a variable that the loop
        assigns; an optimizer holding a `LearningRateSchedule` is rejected), optionally wrapped in
        `keras.optimizers.LossScaleOptimizer` for mixed_float16.
      schedule: callable `int64 step tensor -> float32 LR tensor` (any `LearningRateSchedule`), traced
        into the graph once.
      strategy: a `tf.distribute.Strategy`; default: the current one. Create the model and optimizer in
        its scope before constructing the trainer.
      jit_compile: compile the per-replica step with XLA (the loop around it stays a plain tf.function,
        since dataset iterators cannot be XLA-compiled).
      summary_writer: a `tf.summary` writer for the per-step scalars; None writes none. Fixed for the
        trainer's life because a traced function keeps the writer it saw at trace time.
      summary_every: write per-step scalars when `global_step % summary_every == 0`.
      loss_fn: per-example loss `(labels, logits) -> [batch]`; default sparse categorical cross-entropy
        on logits.
      fused_updates: apply plain SGD updates (momentum, Nesterov or none) with TensorFlow's fused
        training kernels, which do Keras' SGD arithmetic (`trainers/fused_update.py`); other optimizers
        and settings always use `optimizer.apply`. `fused_update_reason` says why a trainer is not fused.
      momentum_schedule: optional callable `int64 step tensor -> momentum tensor` (e.g.
        `clrlab.schedules.CyclicalMomentum`): every step, next to the LR and from the same global step,
        the loop assigns it to `clrlab.optimizers.momentum_variable(optimizer)` (SGD momentum or Adam's
        `beta_1`), records it (`StepRecords.momentum`) and writes the TensorBoard scalar `momentum`.
        The optimizer must be a `clrlab.optimizers` one built with a float momentum (not a schedule).
        With the fused SGD update the step's value goes straight into the update and the variable is
        assigned once per `train_steps` call (the last step's value): the same weights, bit for bit.
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 schedule: Callable[[tf.Tensor], tf.Tensor], *, strategy: tf.distribute.Strategy | None = None,
                 jit_compile: bool = False, summary_writer: Any = None, summary_every: int = 1,
                 loss_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor] | None = None, fused_updates: bool = True,
                 momentum_schedule: Callable[[tf.Tensor], tf.Tensor] | None = None):
        if keras_internals.holds_schedule(optimizer):
            raise ValueError("The custom loop assigns the learning rate itself every step: build the optimizer "
                             "with a float learning rate and pass the schedule to the trainer instead.")
        if summary_every < 1:
            raise ValueError(f"summary_every must be >= 1. Received: summary_every={summary_every}.")
        self.momentum_schedule = momentum_schedule
        self._momentum_variable = None
        if momentum_schedule is not None:
            self._momentum_variable = optimizers.momentum_variable(optimizer)  # one-line ValueError if none
            if keras_internals.inner_optimizer(optimizer).momentum_schedule is not None:
                raise ValueError("The optimizer already sets its momentum from its own schedule: build it with a "
                                 "float momentum/beta_1 and pass the momentum schedule to the trainer instead.")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.strategy = strategy or tf.distribute.get_strategy()
        self.jit_compile = bool(jit_compile)
        self.summary_writer = summary_writer
        self.summary_every = int(summary_every)
        self.loss_fn = loss_fn or keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.loss_scaling = keras_internals.uses_loss_scaling(optimizer)
        with self.strategy.scope():
            # Built eagerly, in scope, before the first trace: fixes the variable order that checkpoints
            # rely on and avoids the Keras 3.14+ placeholder error when building inside a trace.
            if not self.optimizer.built:  # LossScaleOptimizer.build is not idempotent: never build twice
                self.optimizer.build(self.model.trainable_variables)
            self.global_step = keras_internals.create_global_step()
        # The optimizer update: fused SGD kernels where they give Keras' exact arithmetic, else optimizer.apply.
        self._apply_updates, self.fused_update_reason = make_apply_fn(self.optimizer, self.strategy,
                                                                      fused=fused_updates)
        # With a momentum schedule and the fused update, the step's momentum goes straight into the fused
        # kernels; the momentum variable is assigned once per call (the last step's value), not every step.
        self._momentum_in_update = momentum_schedule is not None and isinstance(self._apply_updates, FusedSGDUpdate)
        # XLA compiles the per-replica step only: dataset iterators cannot be compiled.
        self._replica_step = tf.function(self._step_fn, jit_compile=True) if self.jit_compile else self._step_fn
        # Schedules made only of exactly rounded elementwise ops (triangular CLR, Constant, LinearSweep...)
        # are evaluated for a whole call in one vectorised op chain: same values, bit for bit.
        self._lr_table = exactly_vectorizable(schedule)
        self._momentum_table = momentum_schedule is not None and exactly_vectorizable(momentum_schedule)
        # The record row: [lr, loss, accuracy] [+ l2_loss, total_loss] [+ momentum] [+ loss_scale, applied].
        self._regularized = bool(model.losses)
        self._columns = ["lr", "loss", "accuracy"] + (["l2_loss", "total_loss"] if self._regularized else []) \
            + (["momentum"] if momentum_schedule is not None else []) \
            + (["loss_scale", "applied"] if self.loss_scaling else [])
        self._loop_fn = tf.function(self._loop, reduce_retracing=True)
        self.evaluator = Evaluator(model, self.strategy, self.loss_fn)

    # ----------------------------------------------------------------------------------- graph code
    def _step_fn(self, x: tf.Tensor, y: tf.Tensor, momentum: tf.Tensor | None = None):
        """One replica's step (replica context). Returns (data loss, l2 term or None, total loss, correct,
        count, grads_finite); the gradients are those of the total loss. `momentum` (fused SGD with a
        momentum schedule only) is the step's momentum, passed to the fused update."""
        model, optimizer = self.model, self.optimizer
        num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            per_example = tf.cast(self.loss_fn(y, logits), tf.float32)
            # A static batch size (drop_remainder=True pipelines) makes compute_average_loss's
            # "non-negative batch size" check a constant instead of three ops per step.
            batch = per_example.shape[0] if per_example.shape[0] is not None else tf.shape(per_example)[0]
            global_batch = batch * num_replicas
            data_loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            l2_loss, loss = None, data_loss
            if model.losses:
                terms = [tf.cast(term, tf.float32) for term in model.losses]
                l2_loss = tf.nn.scale_regularization_loss(tf.add_n(terms))
                loss = data_loss + l2_loss
            objective = optimizer.scale_loss(loss) if self.loss_scaling else loss
        variables = model.trainable_variables
        grads = tape.gradient(objective, variables)
        if self.loss_scaling:
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads if g is not None])
        else:
            finite = tf.constant(True)
        if momentum is not None:
            self._apply_updates(grads, variables, momentum=momentum)
        else:
            self._apply_updates(grads, variables)
        predictions = tf.argmax(logits, axis=-1, output_type=tf.int32)
        correct = tf.reduce_sum(tf.cast(tf.equal(predictions, tf.cast(tf.reshape(y, [-1]), tf.int32)), tf.float32))
        count = tf.cast(tf.shape(per_example)[0], tf.float32)
        return data_loss, l2_loss, loss, correct, count, tf.cast(finite, tf.int32)

    def _loop(self, iterator, num_steps: tf.Tensor):
        """`num_steps` training steps; runs inside one tf.function (cross-replica context).

        Per-step cost matters here (a small model's step is ~1 ms on a CPU, and every op in the loop body
        costs a few microseconds of executor time), so the body is kept lean; each choice was measured
        with scripts/bench.py (see BENCHMARKS.md):
          * the per-step records go into ONE float32 TensorArray ([lr, loss, accuracy], plus [momentum]
            with a momentum schedule, plus [loss_scale, applied] under loss scaling; `self._columns`):
            one write and one loop variable per step instead
            of six. The step numbers are not recorded: they are `first_step + arange(n)`, since
            `global_step` advances by exactly one per iteration;
          * when the schedule is built only from exactly rounded elementwise ops (`exactly_vectorizable`:
            triangular CLR, Constant, LinearSweep; not exp/pow/cos schedules), its values for the whole
            call are computed once before the loop from `global_step + range(n)`; each step gathers its
            own (one op instead of the schedule's dozen). The values are bit for bit those of the
            per-step evaluation, which other schedules keep. The momentum schedule gets the same
            treatment (a `CyclicalMomentum` over a triangular CLR is exactly vectorizable); when both
            tables are float32 they are one [n, 2] table: one gather (and one loop-carried tensor) per
            step for both;
          * with a momentum schedule and the fused SGD update, the step's momentum is passed to the
            fused kernels as a tensor (bit for bit what assigning and reading the float64 variable
            gives): no per-step assign, read and cast of the momentum variable. The variable is
            assigned once after the loop, with the last step's momentum, so checkpoints taken between
            calls hold what per-step assignment would have left. `optimizer.apply` (every other
            optimizer) reads the variable, so there it is assigned every step;
          * the summary gate is decided once at trace time when it can be: with `summary_every == 1` the
            scalars are written unconditionally (no per-scalar `record_if` callable and cond), otherwise
            ONE `tf.cond` on `step % summary_every == 0` guards all of them; without `summary_writer` no
            summary op is built at all.
        """
        first_step = self.global_step.read_value()
        lr_table = None
        if self._lr_table:  # the schedule of steps first_step .. first_step + n - 1, computed at once
            lr_table = tf.cast(self.schedule(first_step + tf.range(tf.cast(num_steps, tf.int64))), tf.float32)
            tf.debugging.assert_equal(tf.shape(lr_table), tf.reshape(num_steps, [1]),
                                      message="the schedule must map a vector of steps to one LR per step")
        momentum_table = None
        if self._momentum_table:  # likewise for the momentum schedule (float32 when that is exact)
            momentum_table = self._momentum_value(
                self.momentum_schedule(first_step + tf.range(tf.cast(num_steps, tf.int64))))
            tf.debugging.assert_equal(tf.shape(momentum_table), tf.reshape(num_steps, [1]),
                                      message="the momentum schedule must map a vector of steps to one value per step")
        # Both tables float32: one [n, 2] table, so the loop carries one tensor and gathers one row per step.
        joint = None
        if lr_table is not None and momentum_table is not None and momentum_table.dtype == tf.float32:
            joint = tf.stack([lr_table, momentum_table], axis=1)
        records = tf.TensorArray(tf.float32, size=num_steps, element_shape=[len(self._columns)])
        for i in tf.range(num_steps):
            with tf.name_scope(""):
                if joint is not None:
                    lr, momentum = tf.unstack(tf.gather(joint, i), num=2)
                else:
                    lr = None if lr_table is None else tf.gather(lr_table, i)
                    momentum = None if momentum_table is None else tf.gather(momentum_table, i)
                records = records.write(i, self._train_one_step(iterator, lr, momentum))
        if self._momentum_in_update:  # the state checkpoints save: the momentum of the call's last step
            if momentum_table is not None:
                last = tf.gather(momentum_table, num_steps - 1)
            else:
                last = self._momentum_value(self.momentum_schedule(self.global_step.read_value() - 1))
            self._momentum_variable.assign(tf.cast(last, self._momentum_variable.dtype))
        return {"first_step": first_step, "records": records.stack()}

    def _momentum_value(self, momentum) -> tf.Tensor:
        """A momentum schedule's output as the loop carries it: float32 when that is exact (a float16,
        bfloat16 or float32 schedule, e.g. `CyclicalMomentum`), else the momentum variable's dtype. Either
        way, assigning it to the (float64) variable stores the same number (graph code, any shape)."""
        momentum = tf.convert_to_tensor(momentum)
        if momentum.dtype in (tf.float16, tf.bfloat16, tf.float32):
            return tf.cast(momentum, tf.float32)
        return tf.cast(momentum, self._momentum_variable.dtype)

    def _train_one_step(self, iterator, lr: tf.Tensor | None, momentum: tf.Tensor | None = None) -> tf.Tensor:
        """The body of `_loop`: one step at `global_step`, with `lr` = schedule(global_step) and `momentum` =
        momentum_schedule(global_step) precomputed by the loop (or None: computed here). Returns the step's
        record row (float32)."""
        strategy = self.strategy
        step = self.global_step.read_value()
        if lr is None:
            lr = tf.cast(self.schedule(step), tf.float32)
        self.optimizer.learning_rate.assign(lr)
        momentum_record = None
        if self.momentum_schedule is not None:
            if momentum is None:
                momentum = self._momentum_value(self.momentum_schedule(step))
            if not self._momentum_in_update:  # optimizer.apply reads the variable
                self._momentum_variable.assign(tf.cast(momentum, self._momentum_variable.dtype))
            momentum_record = tf.cast(momentum, tf.float32)  # no op for a float32 momentum
        # The loss scale this step uses (read before the step may change it).
        loss_scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if self.loss_scaling else None
        x, y = next(iterator)
        args = (x, y, momentum) if self._momentum_in_update else (x, y)
        loss, l2_loss, total_loss, correct, count, finite = strategy.run(self._replica_step, args=args)
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, loss, axis=None)
        if l2_loss is not None:
            l2_loss = strategy.reduce(tf.distribute.ReduceOp.SUM, l2_loss, axis=None)
            total_loss = strategy.reduce(tf.distribute.ReduceOp.SUM, total_loss, axis=None)
        correct = strategy.reduce(tf.distribute.ReduceOp.SUM, correct, axis=None)
        count = strategy.reduce(tf.distribute.ReduceOp.SUM, count, axis=None)
        accuracy = correct / count
        row = [lr, loss, accuracy] + ([l2_loss, total_loss] if l2_loss is not None else [])
        if momentum_record is not None:
            row.append(momentum_record)
        if self.loss_scaling:  # the scale the step used, and whether the update was applied
            applied = tf.equal(strategy.reduce(tf.distribute.ReduceOp.SUM, finite, axis=None),
                               strategy.num_replicas_in_sync)
            row += [loss_scale, tf.cast(applied, tf.float32)]
        if self.summary_writer is not None:  # documented: None writes no summaries
            def write_scalars():
                with tf.name_scope(""), tf.summary.record_if(True):  # tags without a "cond/" prefix
                    tf.summary.scalar("learning_rate", lr, step=step)
                    if momentum_record is not None:
                        tf.summary.scalar("momentum", momentum_record, step=step)
                    tf.summary.scalar("loss", loss, step=step)
                    tf.summary.scalar("accuracy", accuracy, step=step)
                    if l2_loss is not None:
                        tf.summary.scalar("l2_loss", l2_loss, step=step)
                        tf.summary.scalar("total_loss", total_loss, step=step)
                    if self.loss_scaling:
                        tf.summary.scalar("loss_scale", loss_scale, step=step)
                return tf.constant(True)

            if self.summary_every == 1:
                write_scalars()
            else:
                tf.cond(tf.equal(step % self.summary_every, 0), write_scalars, lambda: tf.constant(False))
        self.global_step.assign_add(1)
        return tf.stack(row)

    # ----------------------------------------------------------------------------------- eager API
    def make_iterator(self, dataset: tf.data.Dataset):
        """An iterator over `dataset` (distributed across replicas under a multi-device strategy)."""
        if self.strategy.num_replicas_in_sync > 1:
            dataset = self.strategy.experimental_distribute_dataset(dataset)
        return iter(dataset)

    def train_steps(self, iterator, num_steps: int) -> StepRecords:
        """Runs `num_steps` steps in one compiled call (eager entry point; one host sync at the end).

        `num_steps` is passed as a tensor, so calls with different lengths reuse one trace. Raises
        `NonFiniteLossError` when the loss became NaN/inf in full precision (the weights are then no
        longer trustworthy: do not checkpoint them). Under mixed_float16, non-finite steps are skipped
        by the `LossScaleOptimizer` and reported through `applied`.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1. Received: num_steps={num_steps}.")
        n = tf.constant(num_steps, dtype=tf.int32)
        if self.summary_writer is not None:
            with self.summary_writer.as_default():
                out = self._loop_fn(iterator, n)
        else:
            out = self._loop_fn(iterator, n)
        first, rows = int(out["first_step"]), np.ascontiguousarray(out["records"].numpy().T)
        columns = dict(zip(self._columns, rows, strict=True))
        step = np.arange(first, first + num_steps, dtype=np.int64)
        applied = columns["applied"] != 0 if self.loss_scaling else np.ones([num_steps], bool)
        records = StepRecords(step=step, lr=columns["lr"], loss=columns["loss"], accuracy=columns["accuracy"],
                              applied=applied, loss_scale=columns.get("loss_scale"),
                              momentum=columns.get("momentum"), l2_loss=columns.get("l2_loss"),
                              total_loss=columns.get("total_loss"))
        if not self.loss_scaling:  # the total (what the optimizer minimised) covers a diverging L2 term too
            checked = records.total_loss if self._regularized else records.loss
            bad = np.flatnonzero(~np.isfinite(checked))
            if bad.size:
                i = int(bad[0])
                raise NonFiniteLossError(records.step[i], records.lr[i], checked[i], records)
        return records

    def evaluate(self, dataset: tf.data.Dataset) -> dict[str, float]:
        """Mean loss (no regularisation term) and accuracy over a finite dataset (eager)."""
        return self.evaluator.evaluate(dataset)

    def predict_classes(self, dataset: tf.data.Dataset) -> np.ndarray:
        """Argmax class per example of a finite dataset, as int32 numpy (eager)."""
        return self.evaluator.predict_classes(dataset)

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate (a host read; eager only)."""
        return keras_internals.read_learning_rate(self.optimizer)
