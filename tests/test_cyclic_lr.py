"""clrlab.callbacks.CyclicLR: bckenstler's CyclicLR (bckenstler/CLR, clr_callback.py) on Keras 3 under
`model.fit` (one-weight model of tests/linear_fit.py)."""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest

from clrlab import optimizers, schedules
from clrlab.callbacks import CyclicLR
from linear_fit import B, M, Probe, fit, linear_model, smith


@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.9)])
def test_history_lr_is_the_schedule_and_sgd_really_trains_at_it(mode, gamma):
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode=mode, gamma=gamma)
    probe = Probe()
    model = linear_model()  # compile's LR 0.5 must be overridden by base_lr
    fit(model, [clr, probe], epochs=3)
    steps = np.arange(15)
    lr = np.asarray(clr.history["lr"])
    ref = schedules.CyclicalLearningRate(B, M, 2, mode=mode, gamma=gamma)
    np.testing.assert_allclose(lr, [float(ref(int(t))) for t in steps], rtol=1e-6)
    np.testing.assert_allclose(lr, smith(steps, B, M, 2, mode, gamma), rtol=1e-6)
    assert lr[0] == pytest.approx(B)
    # history['lr'][k] is the LR batch k trained with: the optimizer held it before the batch ...
    assert probe.lr == clr.history["lr"]
    # ... and SGD moved w by exactly -lr_k (gradient 1).
    np.testing.assert_allclose(-np.diff([0.0] + probe.w), lr, rtol=1e-5)
    assert clr.history["iterations"] == list(range(1, 16))
    assert clr.trn_iterations == clr.clr_iterations == 15
    # batch logs are running means; batch_loss is each batch's own loss, here w before the update.
    true_loss = np.concatenate([[0.0], np.asarray(probe.w[:-1])])
    np.testing.assert_allclose(clr.history["batch_loss"], true_loss, atol=1e-6)
    assert not np.allclose(clr.history["loss"], true_loss, atol=1e-3)  # the averaged logs are not it
    # The LR for the next batch is already set: the next fit would start there.
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(float(ref(15)))


def test_fit_again_continues_then_reset_restarts_with_new_bounds():
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular")
    model = linear_model()
    first = fit(model, [clr], epochs=2)
    fit(model, [clr], epochs=1)
    ref = smith(np.arange(15), B, M, 3, "triangular")
    np.testing.assert_allclose(clr.history["lr"], ref, rtol=1e-6)
    # on_epoch_end puts the epoch's last LR in the logs, so Keras' History records it.
    np.testing.assert_allclose(first.history["learning_rate"], [ref[4], ref[9]], rtol=1e-6)

    clr._reset(new_base_lr=0.02, new_max_lr=0.2, new_step_size=2)
    assert (clr.base_lr, clr.max_lr, clr.step_size) == (0.02, 0.2, 2)
    assert clr.clr_iterations == 0 and clr.trn_iterations == 15 and len(clr.history["lr"]) == 15
    probe = Probe()
    fit(model, [clr, probe], epochs=1)
    np.testing.assert_allclose(clr.history["lr"][15:], smith(np.arange(5), 0.02, 0.2, 2, "triangular"), rtol=1e-6)
    assert probe.lr == clr.history["lr"][15:]
    assert clr.history["iterations"][-1] == 20 and clr.clr_iterations == 5
    clr._reset()  # no argument: same bounds, cycle restarts
    assert clr.clr_iterations == 0 and clr.base_lr == 0.02
    with pytest.raises(ValueError, match="max_lr"):
        clr._reset(new_max_lr=0.001)  # below base_lr: rejected, nothing changed
    assert clr.max_lr == 0.2


def test_resume_from_saved_keras_model_with_initial_epoch_continues_the_cycle(tmp_path):
    model = linear_model()
    first = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular2")
    fit(model, [first], epochs=2)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert int(restored.optimizer.iterations.numpy()) == 10
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular2")  # a fresh callback, as in a new process
    probe = Probe()
    fit(restored, [clr, probe], epochs=4, initial_epoch=2)
    np.testing.assert_allclose(clr.history["lr"], smith(np.arange(10, 20), B, M, 3, "triangular2"), rtol=1e-6)
    assert probe.lr == clr.history["lr"]
    assert clr.history["iterations"] == list(range(11, 21)) and clr.clr_iterations == 20


def test_works_under_loss_scale_optimizer():
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.5))
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode="exp_range", gamma=0.9)
    probe = Probe()
    model = linear_model(optimizer)
    fit(model, [clr, probe], epochs=2)
    np.testing.assert_allclose(clr.history["lr"], smith(np.arange(10), B, M, 2, "exp_range", 0.9), rtol=1e-6)
    assert probe.lr == clr.history["lr"]
    np.testing.assert_allclose(-np.diff([0.0] + probe.w), clr.history["lr"], rtol=1e-5)
    inner = float(keras.ops.convert_to_numpy(optimizer.inner_optimizer.learning_rate))
    assert inner == pytest.approx(clr.clr())


@pytest.mark.parametrize("wrap", [False, True])
def test_optimizer_built_with_a_schedule_is_a_clear_error(wrap):
    optimizer = keras.optimizers.SGD(learning_rate=schedules.CyclicalLearningRate(B, M, 2))
    if wrap:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    with pytest.raises(ValueError, match="pass a float learning rate or use "
                                         "clrlab.schedules.CyclicalLearningRate instead of the callback"):
        fit(linear_model(optimizer), [CyclicLR(base_lr=B, max_lr=M, step_size=2)], epochs=1)


def test_steps_per_execution_above_one_is_refused_not_silently_coarse():
    model = linear_model(steps_per_execution=2)
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2)
    with pytest.raises(ValueError, match="steps_per_execution=2"):
        fit(model, [clr], epochs=1)
    assert clr.history == {} and int(model.optimizer.iterations.numpy()) == 0  # refused before training


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "triangle"}, "mode"),
    ({"mode": "exp-range"}, "mode"),
    ({"scale_mode": "cycles"}, "scale_mode"),
    ({"base_lr": 0.01, "max_lr": 0.001}, "max_lr"),
    ({"step_size": 0}, "step_size"),
    ({"step_size": -5.0}, "step_size"),
    ({"mode": "exp_range", "gamma": 0.0}, "gamma"),
    ({"base_lr": float("nan")}, "base_lr"),
    ({"scale_fn": "not callable"}, "scale_fn"),
])
def test_arguments_are_validated_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CyclicLR(**kwargs)


def test_builtin_mode_overrides_scale_mode_as_bckenstler_with_at_most_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exp = CyclicLR(base_lr=0.001, max_lr=0.006, step_size=2000., mode="exp_range", gamma=0.99994)  # 'cycle' default
    assert exp.scale_mode == "iterations"
    with pytest.warns(UserWarning, match="scale_mode='iterations' is ignored"):
        tri = CyclicLR(mode="triangular2", scale_mode="iterations")
    tri.clr_iterations = 6000
    assert tri.clr() == pytest.approx(0.0035, abs=5e-7)  # still halves per cycle, not per step


@pytest.mark.parametrize("mode,gamma,table", [
    ("triangular", 1.0, {0: 0.001, 1000: 0.0035, 2000: 0.006, 3000: 0.0035, 4000: 0.001}),
    ("triangular2", 1.0, {2000: 0.006, 6000: 0.0035, 10000: 0.00225, 14000: 0.001625}),
    ("exp_range", 0.99994, {2000: 0.005435, 6000: 0.004488, 10000: 0.003744, 42000: 0.001402}),
])
def test_golden_values_from_the_reference_table(mode, gamma, table):
    clr = CyclicLR(base_lr=0.001, max_lr=0.006, step_size=2000., mode=mode, gamma=gamma)  # bckenstler defaults
    for t, expected in table.items():
        clr.clr_iterations = t
        assert round(clr.clr(), 6) == pytest.approx(expected, abs=1e-9), t


def test_numpy_scale_fn_from_the_bckenstler_readme():
    fn = lambda x: 0.5 * (1 + np.sin(x * np.pi / 2.))  # noqa: E731  (the README's example, NumPy inside)
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=4., scale_fn=fn, scale_mode="cycle")
    got = []
    for t in range(0, 40, 3):
        clr.clr_iterations = t
        got.append(clr.clr())
    t = np.arange(0, 40, 3, dtype=np.float64)
    cycle = np.floor(1 + t / 8)
    expected = B + (M - B) * np.maximum(0, 1 - np.abs(t / 4 - 2 * cycle + 1)) * fn(cycle)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


# ----------------------------------------------------------------------------- cycle_momentum (PyTorch keywords)
def torch_cyclic_momentum(t, base_m, max_m, step_size, mode, gamma=1.0):
    """float64 reference: PyTorch CyclicLR's momentum with cycle_momentum=True (torch/optim/lr_scheduler.py,
    CyclicLR.get_lr), written independently of clrlab."""
    t = np.asarray(t, np.float64)
    total = 2.0 * step_size
    ratio = 0.5
    cycle = np.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    factor = np.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
    scale = {"triangular": np.ones_like(t), "triangular2": 1 / (2.0 ** (cycle - 1)), "exp_range": gamma ** t}[mode]
    return max_m - (max_m - base_m) * factor * scale


class MomentumProbe(keras.callbacks.Callback):
    """The momentum variable before each batch (what the batch trains with)."""

    def __init__(self):
        super().__init__()
        self.momentum = []

    def on_train_batch_begin(self, batch, logs=None):
        self.momentum.append(float(optimizers.momentum_variable(self.model.optimizer).numpy()))


@pytest.mark.parametrize("mode,gamma", [("triangular", 1.0), ("triangular2", 1.0), ("exp_range", 0.9)])
def test_cycle_momentum_trace_is_pytorch_cyclic_lr_and_sgd_trains_with_it(mode, gamma):
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, mode=mode, gamma=gamma, cycle_momentum=True,
                   base_momentum=0.8, max_momentum=0.9)
    probe, mprobe = Probe(), MomentumProbe()
    model = linear_model(optimizers.SGD(learning_rate=0.5, momentum=0.3))  # 0.3 must be overridden
    fit(model, [clr, probe, mprobe], epochs=3)
    steps = np.arange(15)
    momentum = np.asarray(clr.history["momentum"])
    np.testing.assert_allclose(momentum, torch_cyclic_momentum(steps, 0.8, 0.9, 2, mode, gamma), rtol=1e-6)
    assert momentum[0] == pytest.approx(0.9) and mprobe.momentum == clr.history["momentum"]
    np.testing.assert_allclose(clr.history["lr"], smith(steps, B, M, 2, mode, gamma), rtol=1e-6)  # LR unchanged
    # Keras' SGD rule with the per-step momentum (gradient 1): v = m_t v - lr_t; w += v.
    v, w, want = 0.0, 0.0, []
    for lr, m in zip(clr.history["lr"], momentum, strict=True):
        v = m * v - lr
        w += v
        want.append(w)
    np.testing.assert_allclose(probe.w, want, rtol=1e-5, atol=1e-7)


def test_cycle_momentum_drives_adam_beta_1_and_continues_across_fits():
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=3, mode="triangular", cycle_momentum=True,
                   base_momentum=0.85, max_momentum=0.95)
    model = linear_model(optimizers.Adam(learning_rate=0.5))
    fit(model, [clr], epochs=2)
    fit(model, [clr], epochs=1)
    np.testing.assert_allclose(clr.history["momentum"], torch_cyclic_momentum(np.arange(15), 0.85, 0.95, 3,
                                                                              "triangular"), rtol=1e-6)
    beta_1 = float(optimizers.momentum_variable(model.optimizer).numpy())
    assert beta_1 == pytest.approx(torch_cyclic_momentum([15], 0.85, 0.95, 3, "triangular")[0])  # next batch's


def test_cycle_momentum_off_leaves_the_momentum_alone():
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2)
    model = linear_model(optimizers.SGD(learning_rate=0.5, momentum=0.3))
    fit(model, [clr], epochs=1)
    assert "momentum" not in clr.history
    assert float(optimizers.momentum_variable(model.optimizer).numpy()) == pytest.approx(0.3)


@pytest.mark.parametrize("kwargs,match", [
    ({"cycle_momentum": "yes"}, r"Argument `cycle_momentum` must be True or False. Received: cycle_momentum='yes'"),
    ({"base_momentum": float("nan")}, r"`base_momentum` must be a finite number in \[0, 1\). Received: "
                                      r"base_momentum=nan"),
    ({"max_momentum": float("inf")}, r"`max_momentum` must be a finite number in \[0, 1\)"),
    ({"max_momentum": 1.0}, r"Received: max_momentum=1.0"),
    ({"base_momentum": -0.1}, r"Received: base_momentum=-0.1"),
    ({"base_momentum": "0.8"}, r"base_momentum='0.8'"),
    ({"base_momentum": 0.95, "max_momentum": 0.85}, r"`base_momentum` must be <= `max_momentum`. Received: "
                                                    r"base_momentum=0.95, max_momentum=0.85"),
])
def test_momentum_keywords_are_validated_in_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as info:
        CyclicLR(cycle_momentum=kwargs.pop("cycle_momentum", True), **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("optimizer", [keras.optimizers.SGD(learning_rate=0.5, momentum=0.9),
                                       keras.optimizers.RMSprop(learning_rate=0.5, momentum=0.9)])
def test_cycle_momentum_with_an_optimizer_without_a_momentum_variable_is_refused(optimizer):
    model = linear_model(optimizer)
    clr = CyclicLR(base_lr=B, max_lr=M, step_size=2, cycle_momentum=True)
    with pytest.raises(ValueError, match="has no momentum variable that can change during training") as info:
        fit(model, [clr], epochs=1)
    assert "\n" not in str(info.value) and int(model.optimizer.iterations.numpy()) == 0


def test_cycle_momentum_with_an_optimizer_holding_a_momentum_schedule_is_refused():
    lr = schedules.CyclicalLearningRate(B, M, 2)
    model = linear_model(optimizers.SGD(learning_rate=0.5, momentum=schedules.CyclicalMomentum(lr, 0.8, 0.9)))
    with pytest.raises(ValueError, match="cannot set the momentum of an optimizer built with a momentum schedule"):
        fit(model, [CyclicLR(base_lr=B, max_lr=M, step_size=2, cycle_momentum=True)], epochs=1)


@pytest.mark.parametrize("kwargs,match", [
    ({"step_size": 1e-300}, r"step_size.*float32.*Received: step_size=1e-300\.$"),
    ({"max_lr": 1e308}, r"max_lr.*float32.*Received: max_lr=1e\+308\.$"),
    ({"step_size": 3e38}, r"step_size.*a cycle .* fits in float32"),
    ({"scale_fn": lambda u: u * float("nan")}, r"scale_fn.*finite factor in \[0, 1\]\. Received: scale_fn\(1\)=nan"),
    ({"scale_fn": lambda u: u * 0 + 1e30, "scale_mode": "iterations"}, r"scale_fn\(0\)=1e\+30"),
    ({"scale_fn": lambda u: 1.0 - u / 100.0}, r"scale_fn\(1000\)=-9 "),
])
def test_values_that_would_make_nan_or_inf_lrs_are_refused_in_the_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match) as err:
        CyclicLR(**kwargs)
    assert "\n" not in str(err.value)


def test_a_scale_fn_going_bad_at_a_step_the_constructor_did_not_try_stops_at_that_batch():
    import tensorflow as tf

    clr = CyclicLR(base_lr=B, max_lr=M, step_size=1,
                   scale_fn=lambda u: tf.where(tf.equal(u, 4.0), float("nan"), 1.0), scale_mode="cycle")
    model = linear_model()
    with pytest.raises(ValueError, match=r"^CyclicLR computed the learning rate nan for clr_iterations=6, outside "
                                         r"\[base_lr, max_lr\]"):
        fit(model, [clr], epochs=3)
    assert len(clr.history["lr"]) == 6 and all(np.isfinite(clr.history["lr"]))  # no NaN LR was ever set
    assert np.isfinite(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
