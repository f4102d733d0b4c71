"""trainers/custom_loop.py: the compiled training step, its records and errors, and its per-step fast
paths, on models of a few parameters.

* An LR schedule made only of exactly rounded elementwise ops is evaluated once per call for all its
  steps; the recorded (= assigned, = logged) LR must be bit for bit what the per-step evaluation gives,
  whatever the call sizes.
* The packed per-step records still give the step numbers, `applied` and no `loss_scale` without
  loss scaling.
* A momentum schedule (cyclical momentum) really acts inside the compiled steps: the weights equal a
  float64 re-implementation of Keras' SGD / Nesterov / Adam update with the per-step momentum, and the
  recorded and logged momentum is the schedule's, only when it cycles.
"""

from __future__ import annotations

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import job, optimizers, schedules
from conftest import read_scalars
from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError, exactly_vectorizable


@pytest.mark.parametrize("schedule,expected", [
    (schedules.CyclicalLearningRate(0.001, 0.006, 2000), True),
    (schedules.CyclicalLearningRate(0.001, 0.1, 10, step_size_down=4), True),
    (schedules.Constant(0.01), True),
    (schedules.LinearSweep(1e-7, 10.0, 300), True),
    (schedules.CyclicalLearningRate(0.001, 0.006, 37, mode="triangular2"), False),  # pow
    (schedules.CyclicalLearningRate(0.001, 0.006, 37, mode="exp_range", gamma=0.99), False),  # exp
    (schedules.ExponentialSweep(1e-7, 10.0, 300), False),  # exp
    (lambda t: tf.cond(t < 5, lambda: 0.1, lambda: 0.2), False),  # control flow, scalar only
])
def test_which_schedules_are_evaluated_per_call(schedule, expected):
    assert exactly_vectorizable(schedule) is expected


def _lrs(schedule, fast: bool, sizes, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    trainer = CustomLoopTrainer(model, job.make_optimizer("sgd", 0.0, 0.0), schedule)
    trainer._lr_table = trainer._lr_table and fast  # fast=False forces the per-step evaluation
    trainer.global_step.assign(start)
    iterator = trainer.make_iterator(tf.data.Dataset.from_tensors((tf.ones([4, 3]), tf.zeros([4], tf.int32))).repeat())
    records = [trainer.train_steps(iterator, int(n)) for n in sizes]
    for r in records:
        assert r.applied.dtype == bool and r.applied.all() and r.loss_scale is None
    return np.concatenate([r.step for r in records]), np.concatenate([r.lr for r in records])


@pytest.mark.parametrize("name,schedule", [
    ("triangular", schedules.CyclicalLearningRate(0.001, 0.006, 7)),
    ("asymmetric", schedules.CyclicalLearningRate(0.01, 0.1, 10, step_size_down=3)),
    ("linear_sweep", schedules.LinearSweep(1e-5, 1.0, 500)),
])
@pytest.mark.parametrize("start", [0, 2**24 - 40])
def test_per_call_lr_is_bitwise_the_per_step_lr(name, schedule, start):
    sizes = np.random.default_rng(0).integers(1, 60, 8)
    steps_fast, fast = _lrs(schedule, True, sizes, start)
    steps_slow, slow = _lrs(schedule, False, sizes, start)
    np.testing.assert_array_equal(steps_fast, np.arange(start, start + sizes.sum()))
    np.testing.assert_array_equal(steps_fast, steps_slow)
    np.testing.assert_array_equal(fast.view(np.int32), slow.view(np.int32))


# ----------------------------------------------------------------------------- the trainer
def _trainer(optimizer=None, schedule=None, **kw) -> CustomLoopTrainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return CustomLoopTrainer(model, optimizer or job.make_optimizer("sgd", 0.0, 0.9),
                             schedule or schedules.CyclicalLearningRate(0.01, 0.1, 4), **kw)


def _iterator(trainer, x=None):
    x = tf.ones([4, 3]) if x is None else x
    return trainer.make_iterator(tf.data.Dataset.from_tensors((x, tf.zeros([4], tf.int32))).repeat())


def test_global_step_is_an_int64_counter_advanced_once_per_step():
    trainer = _trainer()
    assert trainer.global_step.dtype == tf.int64 and not trainer.global_step.trainable
    assert trainer.global_step.aggregation == tf.VariableAggregation.ONLY_FIRST_REPLICA
    records = trainer.train_steps(_iterator(trainer), 5)
    assert int(trainer.global_step.numpy()) == 5 and int(trainer.optimizer.iterations.numpy()) == 5
    np.testing.assert_array_equal(records.step, np.arange(5))
    np.testing.assert_allclose(records.lr, schedules.CyclicalLearningRate(0.01, 0.1, 4)(np.arange(5)), rtol=1e-6)
    assert trainer.learning_rate == pytest.approx(float(records.lr[-1]))


@pytest.mark.parametrize("wrap", [False, True])
def test_an_optimizer_holding_a_schedule_is_refused(wrap):
    optimizer = keras.optimizers.SGD(schedules.Constant(0.1))
    if wrap:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    with pytest.raises(ValueError, match="assigns the learning rate itself"):
        _trainer(optimizer)


def test_bad_counts_are_value_errors():
    with pytest.raises(ValueError, match="summary_every must be >= 1"):
        _trainer(summary_every=0)
    trainer = _trainer()
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        trainer.train_steps(_iterator(trainer), 0)


def test_a_nonfinite_loss_raises_with_the_first_bad_step_and_the_records():
    trainer = _trainer()
    x = tf.data.Dataset.range(100).map(lambda i: (tf.fill([4, 3], tf.where(i >= 3, np.float32("nan"), 1.0)),
                                                  tf.zeros([4], tf.int32)))
    with pytest.raises(NonFiniteLossError, match="at step 3") as info:
        trainer.train_steps(trainer.make_iterator(x), 6)
    err = info.value
    assert err.step == 3 and err.learning_rate == pytest.approx(float(err.records.lr[3]))
    assert len(err.records) == 6 and np.isfinite(err.records.loss[:3]).all()


def test_summaries_every_n_steps_hold_the_recorded_lr(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    trainer = _trainer(summary_writer=writer, summary_every=3)
    records = trainer.train_steps(_iterator(trainer), 7)
    writer.flush()
    logged = read_scalars(str(tmp_path), "learning_rate")
    assert sorted(logged) == [0, 3, 6]
    assert [logged[s] for s in (0, 3, 6)] == [float(records.lr[s]) for s in (0, 3, 6)]
    assert sorted(read_scalars(str(tmp_path), "loss")) == [0, 3, 6]


def test_mixed_float16_records_the_loss_scale_and_skipped_steps():
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores the policy
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Activation("linear",
                                                                                               dtype="float32")])
    optimizer = job.make_optimizer("sgd", 0.0, 0.0, loss_scaling=True)
    trainer = CustomLoopTrainer(model, optimizer, schedules.Constant(0.01))
    x = tf.data.Dataset.range(100).map(lambda i: (tf.fill([4, 3], tf.where(tf.equal(i, 2), np.float32("inf"), 1.0)),
                                                  tf.zeros([4], tf.int32)))
    records = trainer.train_steps(trainer.make_iterator(x), 4)  # no error: the step is skipped
    np.testing.assert_array_equal(records.applied, [True, True, False, True])
    assert records.loss_scale[0] == 2.0**15 and records.loss_scale[3] == records.loss_scale[2] / 2
    assert int(trainer.global_step.numpy()) == 4 and int(optimizer.iterations.numpy()) == 3


# ----------------------------------------------------------------------------- cyclical momentum
_RNG = np.random.default_rng(5)
_XS = _RNG.normal(size=(3, 4, 3))  # three batches of 4, repeated


def _half_square(labels, logits):
    """Per-example 0.5 * |logits|^2: d loss / d logits = logits / batch, easy to redo in numpy."""
    return 0.5 * tf.reduce_sum(tf.square(logits), axis=-1)


def _reference(kind, kernel, bias, lrs, momenta, beta_2=0.999, epsilon=1e-7):
    """float64 numpy of Keras' update rules (keras/src/optimizers/sgd.py, adam.py) with momentum[t] at step t
    (Adam: beta_1[t], bias correction 1 - beta_1[t] ** (t + 1) as clrlab.optimizers.Adam)."""
    params = [kernel.astype(np.float64), bias.astype(np.float64)]
    slots = [np.zeros_like(p) for p in params]
    velocities = [np.zeros_like(p) for p in params]
    for t, (lr, m) in enumerate(zip(np.float64(lrs), np.float64(momenta), strict=True)):
        x = _XS[t % 3]
        dlogits = (x @ params[0] + params[1]) / x.shape[0]
        grads = [x.T @ dlogits, dlogits.sum(0)]
        for i, g in enumerate(grads):
            if kind == "adam":
                alpha = lr * np.sqrt(1 - beta_2 ** (t + 1)) / (1 - m ** (t + 1))
                slots[i] += (g - slots[i]) * (1 - m)
                velocities[i] += (g * g - velocities[i]) * (1 - beta_2)
                params[i] -= slots[i] * alpha / (np.sqrt(velocities[i]) + epsilon)
            else:
                slots[i] = slots[i] * m - g * lr
                params[i] += slots[i] * m - g * lr if kind == "nesterov" else slots[i]
    return params


def _momentum_run(kind, cycle: bool, lr_schedule, jit_compile=False, fused=True, sizes=(4, 4, 2), **kw):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    initial = [w.numpy() for w in model.weights]
    optimizer = {"sgd": lambda: optimizers.SGD(0.0, 0.9), "nesterov": lambda: optimizers.SGD(0.0, 0.9, nesterov=True),
                 "adam": lambda: optimizers.Adam(0.0, 0.9)}[kind]()
    momentum = schedules.CyclicalMomentum(lr_schedule, 0.8, 0.95) if cycle else None
    trainer = CustomLoopTrainer(model, optimizer, lr_schedule, loss_fn=_half_square, jit_compile=jit_compile,
                                fused_updates=fused, momentum_schedule=momentum, **kw)
    ds = tf.data.Dataset.from_tensor_slices((_XS.astype(np.float32), np.zeros([3, 4], np.int32))).repeat()
    iterator = trainer.make_iterator(ds)
    records = [trainer.train_steps(iterator, n) for n in sizes]  # steps_per_loop > 1
    return trainer, initial, records


@pytest.mark.parametrize("kind,lr_schedule,jit_compile", [
    ("sgd", schedules.CyclicalLearningRate(0.01, 0.1, 3), False),
    ("sgd", schedules.CyclicalLearningRate(0.01, 0.1, 3), True),  # XLA
    ("nesterov", schedules.CyclicalLearningRate(0.01, 0.1, 3, mode="triangular2"), False),  # per-step momentum
    ("adam", schedules.CyclicalLearningRate(0.001, 0.01, 3), False),
])
def test_cycling_momentum_acts_inside_the_compiled_steps(kind, lr_schedule, jit_compile):
    trainer, initial, records = _momentum_run(kind, True, lr_schedule, jit_compile=jit_compile)
    lrs = np.concatenate([r.lr for r in records])
    momenta = np.concatenate([r.momentum for r in records])
    steps = tf.range(10, dtype=tf.int64)
    expected = schedules.CyclicalMomentum(lr_schedule, 0.8, 0.95)(steps).numpy()
    assert momenta.dtype == np.float32 and len(set(momenta.tolist())) > 2
    np.testing.assert_array_equal(momenta, expected)  # the recorded trace is the schedule's, exactly
    assert float(optimizers.momentum_variable(trainer.optimizer).numpy()) == float(expected[-1])
    kernel, bias = _reference(kind, *initial, lrs, momenta)
    np.testing.assert_allclose(trainer.model.weights[0].numpy(), kernel, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(trainer.model.weights[1].numpy(), bias, rtol=1e-5, atol=1e-7)
    # A run at the constant momentum 0.9 ends elsewhere, and so does its reference.
    constant, _, const_records = _momentum_run(kind, False, lr_schedule, jit_compile=jit_compile)
    assert all(r.momentum is None for r in const_records)
    const_kernel, _ = _reference(kind, *initial, lrs, np.full(10, 0.9))
    np.testing.assert_allclose(constant.model.weights[0].numpy(), const_kernel, rtol=1e-5, atol=1e-7)
    assert np.abs(constant.model.weights[0].numpy() - trainer.model.weights[0].numpy()).max() > 1e-4


def test_per_call_momentum_is_bitwise_the_per_step_momentum():
    lr_schedule = schedules.CyclicalLearningRate(0.01, 0.1, 3)
    fast, _, fast_records = _momentum_run("sgd", True, lr_schedule, sizes=(7, 3))
    assert fast._momentum_table
    slow, _, _ = _momentum_run("sgd", True, lr_schedule, sizes=(1,))
    slow._momentum_table = False  # force the per-step evaluation for the next trace
    slow._loop_fn = tf.function(slow._loop, reduce_retracing=True)
    ds = tf.data.Dataset.from_tensor_slices((_XS.astype(np.float32), np.zeros([3, 4], np.int32))).repeat()
    slow_records = slow.train_steps(slow.make_iterator(ds.skip(1)), 9)
    np.testing.assert_array_equal(np.concatenate([r.momentum for r in fast_records])[1:].view(np.int32),
                                  slow_records.momentum.view(np.int32))


def _loop_body_ops(trainer, iterator) -> collections.Counter:
    """Op types of the traced per-step loop body (`for i in tf.range(num_steps)`) of `trainer`'s call."""
    graph = trainer._loop_fn.get_concrete_function(iterator, tf.constant(1)).graph.as_graph_def()
    (body,) = [f for f in graph.library.function if "while_body" in f.signature.name]
    return collections.Counter(node.op for node in body.node_def)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_cycling_momentum_adds_no_per_step_op(fused):
    """With the fused update the momentum goes from the per-call table straight into the update kernels: the
    loop body assigns no momentum variable and has no more ops than at a constant momentum (optimizer.apply
    reads the variable, so the unfused loop assigns it every step)."""
    lr = schedules.CyclicalLearningRate(0.01, 0.1, 3)
    ops = {}
    for cycle in (False, True):
        trainer = _trainer(optimizers.SGD(0.0, 0.9), lr, fused_updates=fused,
                           momentum_schedule=schedules.CyclicalMomentum(lr, 0.8, 0.95) if cycle else None)
        iterator = _iterator(trainer)
        trainer.train_steps(iterator, 2)
        ops[cycle] = _loop_body_ops(trainer, iterator)
    assert ops[True]["AssignVariableOp"] == ops[False]["AssignVariableOp"] + (0 if fused else 1)
    if fused:
        assert sum(ops[True].values()) <= sum(ops[False].values())
        assert ops[True]["GatherV2"] == ops[False]["GatherV2"] == 1  # one [lr, momentum] row per step


@pytest.mark.parametrize("lr_schedule", [
    schedules.CyclicalLearningRate(0.01, 0.1, 3),  # momentum table per call
    schedules.CyclicalLearningRate(0.01, 0.1, 3, mode="triangular2"),  # momentum evaluated per step
])
def test_fused_momentum_variable_holds_each_calls_last_momentum(lr_schedule):
    """Fused, the variable is assigned once per call: after every call (when the controller checkpoints) it
    holds the momentum of the call's last step, as the per-step assignment left it."""
    trainer = _trainer(optimizers.SGD(0.0, 0.9), lr_schedule,
                       momentum_schedule=schedules.CyclicalMomentum(lr_schedule, 0.8, 0.95))
    assert trainer.fused_update_reason is None
    iterator = _iterator(trainer)
    for n in (4, 1, 3):
        records = trainer.train_steps(iterator, n)
        variable = optimizers.momentum_variable(trainer.optimizer)
        assert variable.dtype == "float64" and float(variable.numpy()) == float(records.momentum[-1])


@pytest.mark.parametrize("momentum", [
    lambda t: 0.9 - 0.05 * tf.cast(t % 3, tf.float64),  # float64, exactly vectorizable: a float64 table
    lambda t: 0.9 - 0.05 * tf.cos(tf.cast(t, tf.float64)),  # float64, evaluated per step
])
def test_float64_momentum_schedule_fused_is_unfused_bit_for_bit(momentum):
    lr = schedules.CyclicalLearningRate(0.01, 0.1, 3)
    runs = {}
    for fused in (True, False):
        trainer = _trainer(optimizers.SGD(0.0, 0.9), lr, fused_updates=fused, momentum_schedule=momentum)
        iterator = _iterator(trainer, tf.reshape(tf.range(12, dtype=tf.float32) / 7, [4, 3]))
        runs[fused] = trainer, np.concatenate([trainer.train_steps(iterator, n).momentum for n in (5, 2)])
    (fused, fused_momenta), (plain, plain_momenta) = runs[True], runs[False]
    assert fused.fused_update_reason is None and plain.fused_update_reason is not None
    expected = momentum(tf.range(7, dtype=tf.int64)).numpy()
    np.testing.assert_array_equal(fused_momenta, expected.astype(np.float32))
    np.testing.assert_array_equal(plain_momenta, fused_momenta)
    for a, b in zip(fused.model.weights + fused.optimizer.variables, plain.model.weights + plain.optimizer.variables,
                    strict=True):
        np.testing.assert_array_equal(np.atleast_1d(a.numpy()).view(np.uint8), np.atleast_1d(b.numpy()).view(np.uint8))
    assert float(optimizers.momentum_variable(fused.optimizer).numpy()) == float(expected[-1])


def test_a_momentum_schedule_needs_a_momentum_variable_the_optimizer_does_not_schedule():
    lr = schedules.CyclicalLearningRate(0.01, 0.1, 4)
    momentum = schedules.CyclicalMomentum(lr, 0.85, 0.95)
    with pytest.raises(ValueError, match="has no momentum variable") as info:
        _trainer(keras.optimizers.SGD(0.0, momentum=0.9), lr, momentum_schedule=momentum)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="already sets its momentum from its own schedule"):
        _trainer(optimizers.SGD(0.0, momentum=momentum), lr, momentum_schedule=momentum)
    with pytest.raises(ValueError, match="has no momentum variable"):
        _trainer(keras.optimizers.RMSprop(0.0, momentum=0.9), lr, momentum_schedule=momentum)


@pytest.mark.parametrize("cycle", [False, True])
def test_momentum_summaries_only_when_cycling_at_the_learning_rate_cadence(tmp_path, cycle):
    writer = tf.summary.create_file_writer(str(tmp_path))
    lr = schedules.CyclicalLearningRate(0.01, 0.1, 4)
    trainer = _trainer(optimizers.SGD(0.0, 0.9), lr, summary_writer=writer, summary_every=3,
                       momentum_schedule=schedules.CyclicalMomentum(lr, 0.85, 0.95) if cycle else None)
    records = trainer.train_steps(_iterator(trainer), 7)
    writer.flush()
    assert sorted(read_scalars(str(tmp_path), "learning_rate")) == [0, 3, 6]
    if cycle:
        logged = read_scalars(str(tmp_path), "momentum")
        assert sorted(logged) == [0, 3, 6]
        assert [logged[s] for s in (0, 3, 6)] == [float(records.momentum[s]) for s in (0, 3, 6)]
    else:
        assert records.momentum is None
        with pytest.raises(KeyError, match="momentum not in"):
            read_scalars(str(tmp_path), "momentum")


def test_cycling_momentum_under_mixed_float16_and_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")  # conftest restores the policy
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Activation("linear",
                                                                                               dtype="float32")])
    optimizer = keras.optimizers.LossScaleOptimizer(optimizers.SGD(0.0, 0.9))
    lr = schedules.CyclicalLearningRate(0.01, 0.1, 2)
    momentum = schedules.CyclicalMomentum(lr, 0.8, 0.95)
    trainer = CustomLoopTrainer(model, optimizer, lr, momentum_schedule=momentum)
    assert trainer.fused_update_reason is not None  # loss scaling keeps optimizer.apply
    x = tf.data.Dataset.range(100).map(lambda i: (tf.fill([4, 3], tf.where(tf.equal(i, 2), np.float32("inf"), 1.0)),
                                                  tf.zeros([4], tf.int32)))
    records = trainer.train_steps(trainer.make_iterator(x), 5)
    np.testing.assert_array_equal(records.applied, [True, True, False, True, True])
    assert records.loss_scale[0] == 2.0**15 and records.loss_scale[3] == records.loss_scale[2] / 2
    np.testing.assert_array_equal(records.momentum, momentum(tf.range(5, dtype=tf.int64)).numpy())
    inner = optimizers.momentum_variable(optimizer)
    assert inner.dtype == "float64" and float(inner.numpy()) == float(records.momentum[-1])


# ----------------------------------------------------------------------------- data loss vs L2 term
def _regularized_trainer(**kw) -> CustomLoopTrainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.05))])
    return CustomLoopTrainer(model, job.make_optimizer("sgd", 0.0, 0.9), schedules.Constant(0.1),
                             fused_updates=False, **kw)


def _batches():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 4, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(5, 4)).astype(np.int32)
    return x, y


def test_records_split_the_data_loss_from_the_l2_term_and_minimise_their_sum(tmp_path):
    x, y = _batches()
    writer = tf.summary.create_file_writer(str(tmp_path))
    trainer = _regularized_trainer(summary_writer=writer)
    # Oracle: the same model, SGD on data loss + L2 term, one eager step at a time.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(2, kernel_regularizer=keras.regularizers.L2(0.05))])
    opt = job.make_optimizer("sgd", 0.1, 0.9)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    data_losses, l2_losses = [], []
    for xb, yb in zip(x, y):
        with tf.GradientTape() as tape:
            data = tf.nn.compute_average_loss(ce(yb, model(xb, training=True)), global_batch_size=4)
            l2 = tf.nn.scale_regularization_loss(tf.add_n(model.losses))
            total = data + l2
        opt.apply(tape.gradient(total, model.trainable_variables), model.trainable_variables)
        data_losses.append(float(data))
        l2_losses.append(float(l2))

    records = trainer.train_steps(trainer.make_iterator(tf.data.Dataset.from_tensor_slices((x, y))), 5)
    writer.flush()
    np.testing.assert_allclose(records.loss, data_losses, rtol=1e-6)  # the data loss, like val_loss
    np.testing.assert_allclose(records.l2_loss, l2_losses, rtol=1e-6)
    assert (records.l2_loss > 0).all()
    np.testing.assert_array_equal(records.total_loss, records.loss + records.l2_loss)
    for got, want in zip(trainer.model.get_weights(), model.get_weights()):  # the optimizer minimised the total
        np.testing.assert_array_equal(got, want)
    for tag, values in (("loss", records.loss), ("l2_loss", records.l2_loss), ("total_loss", records.total_loss)):
        logged = read_scalars(str(tmp_path), tag)
        assert [logged[s] for s in range(5)] == [float(v) for v in values], tag


def test_an_unregularized_model_records_no_l2_columns():
    trainer = _trainer()
    records = trainer.train_steps(_iterator(trainer), 2)
    assert records.l2_loss is None and records.total_loss is None
