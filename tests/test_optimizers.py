"""clrlab.optimizers: Keras' SGD/Adam/AdamW with the momentum (beta_1) in a variable read at run time.

References written here from Keras' update rules (keras/src/optimizers/sgd.py, adam.py), in float64
numpy, with the per-step momentum; stock Keras optimizers for the bit-for-bit checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import clrlab  # noqa: F401  (registers the optimizers, as a user would)
from clrlab import optimizers as O
from clrlab import schedules as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (4, 3)
STEPS = 24
COEF = np.linspace(0.5, 1.5, 12).reshape(SHAPE)  # gradient of 0.5 * sum(COEF * (w - TARGET) ** 2)
TARGET = np.linspace(-1.0, 1.0, 12).reshape(SHAPE)


def _clr(base=0.02, peak=0.2, step_size=4):
    return S.CyclicalLearningRate(base, peak, step_size)


def _cyclic_momentum(lr=None):
    return S.CyclicalMomentum(lr or _clr(), base_momentum=0.8, max_momentum=0.95)


def _bits(values):
    return [np.atleast_1d(keras.ops.convert_to_numpy(v)).view(np.uint8) for v in values]


def _start():
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


def _slots(optimizer):
    """The per-weight slot variables (every optimizer variable except iterations, LR and momentum)."""
    skip = {id(optimizer.iterations), id(optimizer._learning_rate)}
    if isinstance(optimizer, O._VariableMomentum):
        skip.add(id(optimizer.momentum_variable))
    return [v for v in optimizer.variables if id(v) not in skip]


# ------------------------------------------------------------------------------------------------
# Constant momentum: bit for bit the stock Keras optimizer.
# ------------------------------------------------------------------------------------------------
def _grads(steps):
    return np.random.default_rng(1).normal(size=(steps,) + SHAPE).astype(np.float32)


def _train_on_fixed_grads(optimizer, steps=10):
    weight = keras.Variable(_start())
    optimizer.build([weight])
    grads = tf.constant(_grads(steps))

    @tf.function
    def train():
        for i in tf.range(steps):
            optimizer.apply([grads[i]], [weight])

    train()
    return weight, optimizer


@pytest.mark.parametrize("stock, ours", [
    (lambda: keras.optimizers.SGD(0.1, momentum=0.9), lambda: O.SGD(0.1, momentum=0.9)),
    (lambda: keras.optimizers.SGD(0.1, momentum=0.95, nesterov=True),
     lambda: O.SGD(0.1, momentum=0.95, nesterov=True)),
    (lambda: keras.optimizers.SGD(0.1), lambda: O.SGD(0.1)),  # Keras: no slots; clrlab: slots of 0 momentum
    (lambda: keras.optimizers.Adam(0.01), lambda: O.Adam(0.01)),
    (lambda: keras.optimizers.Adam(0.01, beta_1=0.85, amsgrad=True), lambda: O.Adam(0.01, beta_1=0.85, amsgrad=True)),
    (lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1), lambda: O.AdamW(0.01, weight_decay=0.1)),
], ids=["sgd", "nesterov", "sgd-no-momentum", "adam", "adam-amsgrad", "adamw"])
def test_constant_momentum_is_stock_keras_bit_for_bit(stock, ours):
    stock_w, stock_opt = _train_on_fixed_grads(stock())
    our_w, our_opt = _train_on_fixed_grads(ours())
    np.testing.assert_array_equal(_bits([stock_w])[0], _bits([our_w])[0])
    stock_slots, our_slots = _slots(stock_opt), _slots(our_opt)
    if isinstance(stock_opt, keras.optimizers.SGD) and not stock_slots:
        # clrlab keeps a slot: at momentum 0 it holds the last `0 * accum - grad * lr`, exactly -(grad * lr).
        assert len(our_slots) == 1
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(our_slots[0]), -(_grads(10)[-1] * np.float32(0.1)))
    else:
        assert len(stock_slots) == len(our_slots) > 0
        for a, b in zip(_bits(stock_slots), _bits(our_slots)):
            np.testing.assert_array_equal(a, b)
    assert int(our_opt.iterations) == int(stock_opt.iterations) == 10
    assert not np.allclose(keras.ops.convert_to_numpy(our_w), _start())  # the weights moved


# ------------------------------------------------------------------------------------------------
# A momentum assigned in graph every step acts: float64 references of Keras' rules.
# ------------------------------------------------------------------------------------------------
def _reference(kind, lrs, moms, beta_2=0.999, epsilon=1e-7):
    """Keras' update rule in float64 on the quadratic loss, with momentum/beta_1 `moms[t]` at step t."""
    w = _start().astype(np.float64)
    m = np.zeros(SHAPE)
    v = np.zeros(SHAPE)
    for t, (lr, mom) in enumerate(zip(lrs, moms)):
        g = COEF * (w - TARGET)
        if kind == "adam":
            step = t + 1
            alpha = lr * np.sqrt(1 - beta_2**step) / (1 - mom**step)  # the CURRENT beta_1, as PyTorch
            m += (g - m) * (1 - mom)
            v += (g * g - v) * (1 - beta_2)
            w -= m * alpha / (np.sqrt(v) + epsilon)
        else:
            m = m * mom - g * lr
            w += m * mom - g * lr if kind == "nesterov" else m
    return w


def _f32(schedule, steps):
    return schedule(tf.range(steps)).numpy().astype(np.float64)


def _make(kind, momentum):
    if kind == "adam":
        return O.Adam(0.01, beta_1=momentum)
    return O.SGD(0.01, momentum=momentum, nesterov=kind == "nesterov")


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "adam"])
def test_momentum_assigned_in_graph_every_step_acts(kind):
    lr_schedule = _clr(0.001, 0.01) if kind == "adam" else _clr()
    mom_schedule = _cyclic_momentum(lr_schedule)
    optimizer = _make(kind, 0.95)
    weight = keras.Variable(_start())
    optimizer.build([weight])
    coef, target = tf.constant(COEF, tf.float32), tf.constant(TARGET, tf.float32)
    traces = []

    @tf.function
    def train(steps):
        traces.append(1)
        mom_var = O.momentum_variable(optimizer)
        for _ in tf.range(steps):
            step = optimizer.iterations  # the global step: the second call goes on where the first stopped
            optimizer.learning_rate.assign(lr_schedule(step))
            mom_var.assign(tf.cast(mom_schedule(step), mom_var.dtype))
            optimizer.apply([coef * (weight - target)], [weight])

    train(tf.constant(STEPS // 2))
    train(tf.constant(STEPS - STEPS // 2))
    assert len(traces) == 1  # one trace: the momentum is a run-time value, not a constant
    got = keras.ops.convert_to_numpy(weight)
    lrs, moms = _f32(lr_schedule, STEPS), _f32(mom_schedule, STEPS)
    assert moms.min() < 0.81 and moms.max() > 0.94  # the momentum really cycled
    want = _reference(kind, lrs, moms)
    # float32 tolerance: relative, plus a few float32 ulps of the weights' scale for near-zero entries
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.abs(want).max())
    constant = _reference(kind, lrs, np.full(STEPS, 0.95))
    assert np.abs(got - constant).max() > 1e-3 * np.abs(constant).max()
    assert float(optimizer.momentum_variable.numpy()) == moms[-1]


# ------------------------------------------------------------------------------------------------
# A momentum schedule held by the optimizer: model.fit.
# ------------------------------------------------------------------------------------------------
def _fit_data(batches=6, batch=4):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(batches * batch, 3)).astype(np.float32)
    y = rng.normal(size=(batches * batch, 2)).astype(np.float32)
    return x, y, batch


def _fit_reference(x, y, batch, kernel, bias, lrs, moms, nesterov):
    """SGD on Dense(2) + mean squared error (mean over outputs and batch), float64."""
    params = [kernel.astype(np.float64), bias.astype(np.float64)]
    slots = [np.zeros_like(p) for p in params]
    for t in range(len(lrs)):
        xb, yb = x[t * batch:(t + 1) * batch].astype(np.float64), y[t * batch:(t + 1) * batch]
        residual = 2.0 * (xb @ params[0] + params[1] - yb) / yb.size
        grads = [xb.T @ residual, residual.sum(axis=0)]
        for i, g in enumerate(grads):
            slots[i] = slots[i] * moms[t] - g * lrs[t]
            params[i] += slots[i] * moms[t] - g * lrs[t] if nesterov else slots[i]
    return params


@pytest.mark.parametrize("steps_per_execution, jit_compile, nesterov", [(1, False, False), (3, False, True),
                                                                         (2, True, False)])
def test_schedule_in_optimizer_under_model_fit(steps_per_execution, jit_compile, nesterov):
    x, y, batch = _fit_data()
    steps = len(x) // batch
    lr = S.CyclicalLearningRate(0.05, 0.3, 2)
    mom = S.CyclicalMomentum(lr, base_momentum=0.5, max_momentum=0.95)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in model.weights)
    optimizer = O.SGD(learning_rate=lr, momentum=mom, nesterov=nesterov)
    assert optimizer.momentum_schedule is mom
    model.compile(optimizer, loss="mse", steps_per_execution=steps_per_execution, jit_compile=jit_compile)
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert int(optimizer.iterations) == steps
    lrs, moms = _f32(lr, steps), _f32(mom, steps)
    assert len(set(moms.tolist())) > 2
    want = _fit_reference(x, y, batch, kernel, bias, lrs, moms, nesterov)
    for got, ref in zip(model.weights, want):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got), ref, rtol=1e-5, atol=1e-6)
    constant = _fit_reference(x, y, batch, kernel, bias, lrs, np.full(steps, 0.95), nesterov)
    assert np.abs(keras.ops.convert_to_numpy(model.weights[0]) - constant[0]).max() > 1e-3
    assert float(optimizer.momentum_variable.numpy()) == moms[-1]  # the last update's momentum
    assert float(optimizer.momentum) == pytest.approx(float(mom(steps)))  # the next update's


# ------------------------------------------------------------------------------------------------
# Saving: .keras files and tf.train.Checkpoint.
# ------------------------------------------------------------------------------------------------
def test_keras_file_round_trip_in_a_fresh_process(tmp_path):
    x, y, batch = _fit_data()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    lr = S.OneCycle(0.3, total_steps=20)
    model.compile(O.Adam(learning_rate=lr, beta_1=S.CyclicalMomentum(lr, 0.85, 0.95)), loss="mse")
    model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    saved = [keras.ops.convert_to_numpy(v).tolist() for v in model.optimizer.variables]
    script = textwrap.dedent(f"""
        import json
        import clrlab
        import keras
        model = keras.models.load_model({path!r})
        opt = model.optimizer
        mom = opt.momentum_schedule
        print(json.dumps({{
            "optimizer": type(opt).__module__ + "." + type(opt).__name__,
            "schedule": type(mom).__name__, "inner": type(mom.lr_schedule).__name__,
            "momenta": [mom.base_momentum, mom.max_momentum], "total": mom.lr_schedule.total_steps,
            "variables": [keras.ops.convert_to_numpy(v).tolist() for v in opt.variables],
        }}))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["optimizer"] == "clrlab.optimizers.Adam"
    assert (loaded["schedule"], loaded["inner"], loaded["momenta"], loaded["total"]) == (
        "CyclicalMomentum", "OneCycle", [0.85, 0.95], 20)
    assert loaded["variables"] == saved and len(saved) == 1 + 1 + 4  # iterations, beta_1, 2 slots x 2 weights


def test_get_config_round_trip_float_and_schedule():
    sgd = O.SGD(0.1, momentum=0.9, nesterov=True)
    sgd.momentum_variable.assign(0.8)  # the current value is saved, as Keras saves its LR variable's value
    restored = O.SGD.from_config(sgd.get_config())
    assert (restored.nesterov, float(restored.momentum_variable.numpy()), restored.momentum_schedule) == (
        True, 0.8, None)
    adamw = O.AdamW(0.01, weight_decay=0.2, beta_1=_cyclic_momentum())
    restored = O.AdamW.from_config(json.loads(json.dumps(adamw.get_config())))
    assert isinstance(restored.momentum_schedule, S.CyclicalMomentum) and restored.weight_decay == 0.2
    assert restored.momentum_schedule.get_config() == adamw.momentum_schedule.get_config()
    assert float(restored.momentum_variable.numpy()) == pytest.approx(0.95)  # schedule(0), the LR floor


def test_checkpoint_restores_momentum_variable_and_slots(tmp_path):
    def trained(momentum, steps):
        optimizer = O.SGD(0.1, momentum=momentum)
        weight, optimizer = _train_on_fixed_grads(optimizer, steps)
        return weight, optimizer

    weight, optimizer = trained(0.9, 5)
    optimizer.momentum_variable.assign(0.83)
    path = tf.train.Checkpoint(optimizer=optimizer, weight=weight).save(str(tmp_path / "ckpt"))
    fresh_weight, fresh = trained(0.5, 2)
    assert float(fresh.momentum_variable.numpy()) == 0.5
    tf.train.Checkpoint(optimizer=fresh, weight=fresh_weight).restore(path).assert_consumed()
    assert float(fresh.momentum_variable.numpy()) == 0.83
    assert int(fresh.iterations) == 5
    for a, b in zip(_bits(_slots(optimizer) + [weight]), _bits(_slots(fresh) + [fresh_weight])):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# The fused SGD kernel takes the momentum variable as a tensor: bit for bit update_step.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nesterov", [False, True])
def test_fused_kernel_with_momentum_variable_is_update_step_bit_for_bit(nesterov):
    lr_schedule = _clr()
    mom_schedule = _cyclic_momentum(lr_schedule)
    # Fixed gradients: with gradients computed from the weights in the same graph, grappler rewrites
    # the two graphs differently and even stock Keras SGD vs the kernel can differ in the last bit.
    grads = tf.constant(_grads(STEPS))

    def run(fused, cycle=True):
        optimizer = O.SGD(0.01, momentum=0.9, nesterov=nesterov)
        weight = keras.Variable(_start())
        optimizer.build([weight])
        slot = optimizer.momentums[0]

        @tf.function
        def train():
            for step in tf.range(STEPS):
                optimizer.learning_rate.assign(lr_schedule(step))
                if cycle:
                    optimizer.momentum_variable.assign(tf.cast(mom_schedule(step), tf.float64))
                if fused:  # as trainers/fused_update.py, with the momentum read from the variable
                    tf.raw_ops.ResourceApplyKerasMomentum(
                        var=weight.value.handle, accum=slot.value.handle,
                        lr=tf.cast(optimizer.learning_rate, tf.float32), grad=grads[step],
                        momentum=tf.cast(optimizer.momentum_variable, tf.float32), use_locking=False,
                        use_nesterov=nesterov)
                    optimizer.iterations.assign_add(1)
                else:
                    optimizer.apply([grads[step]], [weight])

        train()
        return [keras.ops.convert_to_numpy(weight), keras.ops.convert_to_numpy(slot)]

    unfused, fused = run(False), run(True)
    for a, b in zip(_bits(unfused), _bits(fused)):
        np.testing.assert_array_equal(a, b)
    constant = run(False, cycle=False)[0]
    assert np.abs(fused[0] - constant).max() > 1e-3  # the momentum cycled, and it mattered


# ------------------------------------------------------------------------------------------------
# The helper, and bad values.
# ------------------------------------------------------------------------------------------------
def test_momentum_variable_helper_unwraps_loss_scaling():
    adam = O.Adam(0.01, beta_1=0.9)
    assert O.momentum_variable(keras.optimizers.LossScaleOptimizer(adam)) is adam.momentum_variable
    assert O.momentum_variable(adam).dtype == "float64" and not adam.momentum_variable.trainable
    assert O.momentum_variable(O.SGD(0.1)).numpy() == 0.0  # a momentum term of 0 that may be raised


@pytest.mark.parametrize("optimizer, match", [
    (keras.optimizers.SGD(0.1, momentum=0.9), r"^keras\.src\.optimizers\.sgd\.SGD has no momentum variable"),
    (keras.optimizers.Adam(), r"^keras\.src\.optimizers\.adam\.Adam has no momentum variable"),
    (keras.optimizers.LossScaleOptimizer(keras.optimizers.Adagrad()), r"\.Adagrad has no momentum variable"),
])
def test_momentum_variable_refuses_other_optimizers(optimizer, match):
    with pytest.raises(ValueError, match=match) as error:
        O.momentum_variable(optimizer)
    assert "\n" not in str(error.value) and "clrlab.optimizers.SGD, Adam or AdamW" in str(error.value)


def _vector(step):
    return tf.fill([2], 0.9) + 0.0 * tf.cast(step, tf.float32)


@pytest.mark.parametrize("make, match", [
    (lambda: O.SGD(momentum=1.0), r"`momentum` must be a finite number in \[0, 1\).*Received: momentum=1\.0\.$"),
    (lambda: O.SGD(momentum=-0.1), r"Received: momentum=-0\.1\.$"),
    (lambda: O.SGD(momentum=float("nan")), r"Received: momentum=nan\.$"),
    (lambda: O.SGD(momentum=float("inf")), r"Received: momentum=inf\.$"),
    (lambda: O.SGD(momentum=True), r"Received: momentum=True\.$"),
    (lambda: O.SGD(momentum="0.9"), r"Received: momentum='0\.9'\.$"),
    (lambda: O.Adam(beta_1=1.0), r"`beta_1` must be a finite number in \[0, 1\).*Received: beta_1=1\.0\.$"),
    (lambda: O.AdamW(beta_1=-1e-3), r"Received: beta_1=-0\.001\.$"),
    (lambda: O.AdamW(weight_decay=None), r"Received: weight_decay=None\.$"),
    (lambda: O.SGD(momentum=S.Constant(1.0)),
     r"momentum schedule's value at step 0 must be a finite number in \[0, 1\)\. Received: momentum\(0\)=1\.0"),
    (lambda: O.Adam(beta_1=lambda step: tf.constant(np.nan)), r"Received: beta_1\(0\)=nan\.$"),
    (lambda: O.SGD(momentum=_vector), r"must map a step to one number"),
])
def test_bad_momentum_values_fail_in_one_line(make, match):
    with pytest.raises(ValueError, match=match) as error:
        make()
    assert "\n" not in str(error.value)
