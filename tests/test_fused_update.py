"""Fused SGD updates (trainers/fused_update.py) are Keras' SGD, bit for bit, and only where they can be.

Each test trains two copies of one model on the same batches: one with `optimizer.apply`, one with the
fused kernels. Weights, momentum slots and `iterations` must be identical (compared as raw bits), for
plain SGD, momentum and Nesterov, with a learning rate that changes every step; and for
`clrlab.optimizers.SGD` with a momentum that changes every step too (cyclical momentum).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import job, optimizers, schedules
from trainers.custom_loop import CustomLoopTrainer
from trainers.fused_update import FusedSGDUpdate, make_apply_fn, unfusable_reason


def _model(seed: int = 3, embedding: bool = False) -> keras.Model:
    keras.utils.set_random_seed(seed)
    if embedding:  # an Embedding's gradient is IndexedSlices (sparse)
        return keras.Sequential([keras.Input((4,), dtype="int32"), keras.layers.Embedding(20, 5),
                                 keras.layers.Flatten(), keras.layers.Dense(3)])
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                             keras.layers.Dense(3, kernel_regularizer=keras.regularizers.L2(1e-3))])


def _bits(values) -> list[np.ndarray]:
    return [np.atleast_1d(keras.ops.convert_to_numpy(v)).view(np.uint8) for v in values]


def _train(optimizer_kwargs: dict, fused: bool, steps: int = 6, embedding: bool = False, cycle_momentum=False,
           momentum_dtype=None):
    """Trains `steps` steps; with `momentum_dtype` (and `cycle_momentum`) the cycling momentum is passed to
    the fused update as a tensor of that dtype instead of being assigned to the momentum variable."""
    model = _model(embedding=embedding)
    optimizer = (optimizers.SGD if cycle_momentum else keras.optimizers.SGD)(**optimizer_kwargs)
    optimizer.build(model.trainable_variables)
    apply = FusedSGDUpdate(optimizer) if fused else optimizer.apply
    rng = np.random.default_rng(0)
    if embedding:
        xs = rng.integers(0, 20, (steps, 8, 4)).astype("int32")
    else:
        xs = rng.normal(size=(steps, 8, 6)).astype("float32")
    ys = rng.integers(0, 3, (steps, 8)).astype("int32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y, lr):
        optimizer.learning_rate.assign(lr)
        momentum = None
        if cycle_momentum:  # a new momentum every step, as the trainer's momentum schedule gives it
            momentum = 0.97 - lr / 10.0
            if momentum_dtype is None:
                optimizer.momentum_variable.assign(tf.cast(momentum, tf.float64))
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) + tf.add_n(model.losses or [tf.constant(0.0)])
        grads = tape.gradient(loss, model.trainable_variables)
        if momentum_dtype is None:
            apply(grads, model.trainable_variables)
        else:
            apply(grads, model.trainable_variables, momentum=tf.cast(momentum, momentum_dtype))

    for i in range(steps):
        step(xs[i], ys[i], tf.constant(0.05 + 0.37 * i, tf.float32))  # a new, large LR every step
    slots = list(optimizer.momentums)  # the slots only (not clrlab's "momentum_value" variable)
    return model, optimizer, slots, step


@pytest.mark.parametrize("kwargs", [
    {"learning_rate": 0.1, "momentum": 0.9},
    {"learning_rate": 0.1, "momentum": 0.95, "nesterov": True},
    {"learning_rate": 0.1, "momentum": 0.0},
])
def test_fused_sgd_is_keras_sgd_bit_for_bit(kwargs):
    keras_model, keras_opt, keras_slots, _ = _train(kwargs, fused=False)
    fused_model, fused_opt, fused_slots, step = _train(kwargs, fused=True)
    ops = {node.op for node in step.get_concrete_function(
        tf.TensorSpec([8, 6]), tf.TensorSpec([8], tf.int32), tf.TensorSpec([], tf.float32)).graph.as_graph_def().node}
    assert ("ResourceApplyKerasMomentum" if kwargs["momentum"] else "ResourceApplyGradientDescent") in ops
    assert len(fused_slots) == (len(fused_model.trainable_variables) if kwargs["momentum"] else 0)
    for a, b in zip(_bits(keras_model.trainable_variables + keras_slots),
                    _bits(fused_model.trainable_variables + fused_slots), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fused_opt.iterations) == int(keras_opt.iterations) == 6
    # The weights did move (a test of two frozen models would pass trivially).
    assert not np.allclose(keras.ops.convert_to_numpy(fused_model.trainable_variables[0]),
                           keras.ops.convert_to_numpy(_model().trainable_variables[0]))


def test_sparse_gradients_fall_back_to_optimizer_apply():
    kwargs = {"learning_rate": 0.1, "momentum": 0.9}
    keras_model, _, keras_slots, _ = _train(kwargs, fused=False, embedding=True)
    fused_model, fused_opt, fused_slots, step = _train(kwargs, fused=True, embedding=True)
    graph = step.get_concrete_function(tf.TensorSpec([8, 4], tf.int32), tf.TensorSpec([8], tf.int32),
                                       tf.TensorSpec([], tf.float32)).graph.as_graph_def()
    ops = {node.op for node in graph.node}
    # The whole update went through optimizer.apply (Keras densifies the sparse gradient and assigns).
    assert "ResourceApplyKerasMomentum" not in ops and {"UnsortedSegmentSum", "AssignVariableOp"} <= ops
    for a, b in zip(_bits(keras_model.trainable_variables + keras_slots),
                    _bits(fused_model.trainable_variables + fused_slots), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fused_opt.iterations) == 6


@pytest.mark.parametrize("kwargs", [
    {"learning_rate": 0.1, "momentum": 0.9},
    {"learning_rate": 0.1, "momentum": 0.95, "nesterov": True},
    {"learning_rate": 0.1, "momentum": 0.0},  # the variable starts at 0, then cycles
])
def test_fused_clrlab_sgd_with_cycling_momentum_is_its_update_step_bit_for_bit(kwargs):
    ref_model, ref_opt, ref_slots, _ = _train(kwargs, fused=False, cycle_momentum=True)
    fused_model, fused_opt, fused_slots, step = _train(kwargs, fused=True, cycle_momentum=True)
    ops = {node.op for node in step.get_concrete_function(
        tf.TensorSpec([8, 6]), tf.TensorSpec([8], tf.int32), tf.TensorSpec([], tf.float32)).graph.as_graph_def().node}
    assert "ResourceApplyKerasMomentum" in ops and "ResourceApplyGradientDescent" not in ops
    assert len(fused_slots) == len(fused_model.trainable_variables)  # clrlab SGD: slots at momentum 0 too
    for a, b in zip(_bits(ref_model.trainable_variables + ref_slots + [ref_opt.momentum_variable]),
                    _bits(fused_model.trainable_variables + fused_slots + [fused_opt.momentum_variable]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fused_opt.iterations) == 6
    # The momentum did act: a run at the constant first momentum ends elsewhere.
    const_model, _, _, _ = _train(kwargs, fused=True)
    assert not np.allclose(keras.ops.convert_to_numpy(const_model.trainable_variables[0]),
                           keras.ops.convert_to_numpy(fused_model.trainable_variables[0]))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_a_momentum_tensor_is_the_assigned_momentum_variable_bit_for_bit(nesterov, dtype):
    """`FusedSGDUpdate(..., momentum=m)` (what the trainer passes with a momentum schedule) updates exactly as
    assigning m to the variable and reading it back, and leaves the variable alone."""
    kwargs = {"learning_rate": 0.1, "momentum": 0.9, "nesterov": nesterov}
    ref_model, _, ref_slots, ref_step = _train(kwargs, fused=True, cycle_momentum=True)
    model, optimizer, slots, step = _train(kwargs, fused=True, cycle_momentum=True, momentum_dtype=dtype)
    ops, ref_ops = ([node.op for node in fn.get_concrete_function(
        tf.TensorSpec([8, 6]), tf.TensorSpec([8], tf.int32), tf.TensorSpec([], tf.float32)).graph.as_graph_def().node]
        for fn in (step, ref_step))
    # One assign fewer than the reference (its momentum variable assign).
    assert ops.count("AssignVariableOp") == ref_ops.count("AssignVariableOp") - 1
    assert ops.count("ResourceApplyKerasMomentum") == len(slots)
    for a, b in zip(_bits(ref_model.trainable_variables + ref_slots), _bits(model.trainable_variables + slots),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert float(optimizer.momentum_variable.numpy()) == 0.9  # not assigned: the caller's job


def test_a_momentum_tensor_with_the_optimizer_apply_fallback_is_assigned_first():
    kwargs = {"learning_rate": 0.1, "momentum": 0.9}
    ref_model, ref_opt, ref_slots, _ = _train(kwargs, fused=False, embedding=True, cycle_momentum=True)
    model, optimizer, slots, _ = _train(kwargs, fused=True, embedding=True, cycle_momentum=True,
                                        momentum_dtype=tf.float32)
    for a, b in zip(_bits(ref_model.trainable_variables + ref_slots), _bits(model.trainable_variables + slots),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    # Sparse gradients: optimizer.apply read the variable, so the last momentum was assigned to it.
    assert float(optimizer.momentum_variable.numpy()) == float(np.float32(0.97 - np.float32(0.05 + 0.37 * 5) / 10))
    assert float(ref_opt.momentum_variable.numpy()) == float(optimizer.momentum_variable.numpy())


def test_a_momentum_tensor_needs_a_clrlab_sgd():
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    model = _model()
    optimizer.build(model.trainable_variables)
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    with pytest.raises(ValueError, match="momentum= needs a clrlab.optimizers.SGD"):
        FusedSGDUpdate(optimizer)(grads, model.trainable_variables, momentum=tf.constant(0.9))


class _MySGD(keras.optimizers.SGD):
    pass


class _MyClrlabSGD(optimizers.SGD):
    pass


_MOMENTUM = schedules.CyclicalMomentum(schedules.CyclicalLearningRate(0.01, 0.1, 4), 0.85, 0.95)


@pytest.mark.parametrize("make,reason", [
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), None),
    (lambda: keras.optimizers.SGD(0.1, nesterov=True, momentum=0.5), None),
    (lambda: keras.optimizers.Adam(0.1), "Adam is not keras.optimizers.SGD"),
    (lambda: _MySGD(0.1), "_MySGD is not keras.optimizers.SGD"),
    (lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1)), "LossScaleOptimizer is not"),
    (lambda: keras.optimizers.SGD(0.1, clipnorm=1.0), "clipnorm=1.0"),
    (lambda: keras.optimizers.SGD(0.1, global_clipnorm=2.0), "global_clipnorm=2.0"),
    (lambda: keras.optimizers.SGD(0.1, clipvalue=0.5), "clipvalue=0.5"),
    (lambda: keras.optimizers.SGD(0.1, weight_decay=1e-4), "weight_decay=0.0001"),
    (lambda: keras.optimizers.SGD(0.1, use_ema=True), "use_ema=True"),
    (lambda: keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
    (lambda: keras.optimizers.SGD(schedules.Constant(0.1)), "is a schedule"),
    (lambda: optimizers.SGD(0.1, momentum=0.9), None),
    (lambda: optimizers.SGD(0.1), None),
    (lambda: _MyClrlabSGD(0.1), "_MyClrlabSGD is not keras.optimizers.SGD or clrlab.optimizers.SGD"),
    (lambda: optimizers.SGD(0.1, momentum=_MOMENTUM), "sets its momentum from its own schedule"),
    (lambda: optimizers.SGD(0.1, clipnorm=1.0), "clipnorm=1.0"),
])
def test_only_plain_sgd_is_fused(make, reason):
    got = unfusable_reason(make())
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got
    fn, why = make_apply_fn(make())
    assert isinstance(fn, FusedSGDUpdate) == (reason is None) and why == got
    if reason is not None:
        with pytest.raises(ValueError, match="cannot fuse"):
            FusedSGDUpdate(make())
    fn, why = make_apply_fn(keras.optimizers.SGD(0.1), fused=False)
    assert not isinstance(fn, FusedSGDUpdate) and why == "fused updates turned off"


def _trainer_run(fused: bool, optimizer: str = "sgd", jit_compile: bool = False, cycle_momentum: bool = False):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    schedule = schedules.CyclicalLearningRate(0.01, 0.5, 4)
    if cycle_momentum:
        opt = {"sgd": optimizers.SGD(0.0, 0.9), "nesterov": optimizers.SGD(0.0, 0.9, nesterov=True)}[optimizer]
        extra = {"momentum_schedule": schedules.CyclicalMomentum(schedule, 0.8, 0.95)}
    else:
        opt, extra = job.make_optimizer(optimizer, 0.0, 0.9), {}
    trainer = CustomLoopTrainer(model, opt, schedule, fused_updates=fused, jit_compile=jit_compile, **extra)
    rng = np.random.default_rng(2)
    ds = tf.data.Dataset.from_tensor_slices((rng.normal(size=(40, 5)).astype("float32"),
                                             rng.integers(0, 3, 40).astype("int32"))).batch(8).repeat()
    records = trainer.train_steps(trainer.make_iterator(ds), 13)
    return trainer, records


def test_trainer_fuses_sgd_with_identical_results():
    fused, fused_records = _trainer_run(True)
    plain, plain_records = _trainer_run(False)
    assert fused.fused_update_reason is None and plain.fused_update_reason == "fused updates turned off"
    np.testing.assert_array_equal(fused_records.loss.view(np.int32), plain_records.loss.view(np.int32))
    np.testing.assert_array_equal(fused_records.lr, plain_records.lr)
    for a, b in zip(_bits(fused.model.weights + fused.optimizer.variables),
                    _bits(plain.model.weights + plain.optimizer.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fused.optimizer.iterations) == 13
    # The LR the optimizer holds after the call is the last step's (what callbacks read).
    assert fused.learning_rate == pytest.approx(float(fused_records.lr[-1]))


def test_trainer_keeps_optimizer_apply_for_adam_and_fuses_under_xla():
    adam, _ = _trainer_run(True, optimizer="adam")
    assert adam.fused_update_reason == "Adam is not keras.optimizers.SGD or clrlab.optimizers.SGD"
    xla, xla_records = _trainer_run(True, jit_compile=True)
    assert xla.fused_update_reason is None and np.isfinite(xla_records.loss).all()
    plain, plain_records = _trainer_run(False, jit_compile=True)
    np.testing.assert_allclose(xla_records.loss, plain_records.loss, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "nesterov"])
def test_trainer_fuses_clrlab_sgd_with_cycling_momentum_with_identical_results(optimizer):
    fused, fused_records = _trainer_run(True, optimizer, cycle_momentum=True)
    plain, plain_records = _trainer_run(False, optimizer, cycle_momentum=True)
    assert fused.fused_update_reason is None and plain.fused_update_reason == "fused updates turned off"
    assert len(set(fused_records.momentum.tolist())) > 2  # the momentum really cycled
    np.testing.assert_array_equal(fused_records.momentum, plain_records.momentum)
    np.testing.assert_array_equal(fused_records.loss.view(np.int32), plain_records.loss.view(np.int32))
    for a, b in zip(_bits(fused.model.weights + fused.optimizer.variables),
                    _bits(plain.model.weights + plain.optimizer.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert int(fused.optimizer.iterations) == 13
