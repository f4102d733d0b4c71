"""Tests for clrlab.schedules against independent float64 references of the published formulas.

References written here from the sources, not from clrlab's code:
  * Smith's triangular family as in the CLR paper (Smith, "Cyclical Learning Rates for Training Neural
    Networks", WACV 2017, arXiv:1506.01186, section 3.1) and bckenstler/CLR `clr_callback.py`,
  * PyTorch `CyclicLR` for asymmetric cycles and its momentum (pytorch/pytorch
    `torch/optim/lr_scheduler.py`),
  * PyTorch `OneCycleLR` phase table, anneal functions and momentum (the same file).
"""

import inspect
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import clrlab  # noqa: F401  (registers the schedules, as a user would)
from clrlab import schedules as S
from clrlab.config import ANNEAL_STRATEGIES, CLR_MODES, SCALE_MODES

B, M, STEP = 0.001, 0.006, 2000
GAMMA = 0.99994
N_STEPS = 50_000
T64 = np.arange(N_STEPS, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# Registered custom scale functions, as a user would write them.
# ------------------------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="clrlab_tests")
def inverse_cycle(u):
    """1 / u: a registered plain function for scale_mode='cycle'."""
    return 1.0 / u


@keras.saving.register_keras_serializable(package="clrlab_tests")
def slow_decay(u):
    """1 / (1 + u / 10000): a registered plain function for scale_mode='iterations'."""
    return 1.0 / (1.0 + u / 10000.0)


def unregistered_scale(u):
    return 1.0 / u


@keras.saving.register_keras_serializable(package="clrlab_tests")
class NoFromConfig:
    """Registered, but `load_model` could not rebuild it: no `from_config`."""

    def __call__(self, u):
        return tf.ones_like(u)

    def get_config(self):
        return {}


# ------------------------------------------------------------------------------------------------
# float64 references.
# ------------------------------------------------------------------------------------------------
def smith_ref(t, b, m, s, scale, scale_mode):
    """CLR paper / bckenstler: cycle = floor(1 + t/2s), x = |t/s - 2 cycle + 1|."""
    t = np.asarray(t, np.float64)
    cycle = np.floor(1 + t / (2 * s))
    x = np.abs(t / s - 2 * cycle + 1)
    u = cycle if scale_mode == "cycle" else t
    return b + (m - b) * np.maximum(0.0, 1 - x) * scale(u)


def torch_height(t, up, down, scale, scale_mode):
    """PyTorch CyclicLR.get_lr: the factor h * scale_fn(cycle | t)."""
    t = np.asarray(t, np.float64)
    total = float(up + down)
    ratio = up / total
    cycle = np.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    h = np.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
    u = cycle if scale_mode == "cycle" else t
    return h * scale(u)


def torch_clr_ref(t, b, m, up, down, scale, scale_mode):
    return b + (m - b) * torch_height(t, up, down, scale, scale_mode)


BUILTIN_SCALES = {
    "triangular": (lambda u: np.ones_like(u), "cycle"),
    "triangular2": (lambda u: 1.0 / 2.0 ** (u - 1), "cycle"),
    "exp_range": (lambda u: GAMMA**u, "iterations"),
}


def one_cycle_ref(total, max_lr, pct=0.3, div=25.0, final_div=1e4, anneal="cos",
                  three_phase=False, base_m=0.85, max_m=0.95, first_step=0):
    """PyTorch OneCycleLR.get_lr (lr and momentum) for steps first_step..total-1, in float64."""
    lr0 = max_lr / div
    lr_min = lr0 / final_div
    if three_phase:
        phases = [
            (float(pct * total) - 1, lr0, max_lr, max_m, base_m),
            (float(2 * pct * total) - 2, max_lr, lr0, base_m, max_m),
            (total - 1, lr0, lr_min, max_m, max_m),
        ]
    else:
        phases = [
            (float(pct * total) - 1, lr0, max_lr, max_m, base_m),
            (total - 1, max_lr, lr_min, base_m, max_m),
        ]
    if anneal == "cos":
        def fn(start, end, p):
            return end + (start - end) / 2.0 * (math.cos(math.pi * p) + 1)
    else:
        def fn(start, end, p):
            return (end - start) * p + start
    lrs, moms = [], []
    for step in range(first_step, total):
        start_step = 0.0
        for i, (end_step, lr_a, lr_b, m_a, m_b) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                p = (step - start_step) / (end_step - start_step)
                lrs.append(fn(lr_a, lr_b, p))
                moms.append(fn(m_a, m_b, p))
                break
            start_step = end_step
    return np.array(lrs), np.array(moms)


def values(schedule, steps, dtype=np.int64):
    return schedule(tf.constant(np.asarray(steps), dtype=dtype)).numpy()


# ------------------------------------------------------------------------------------------------
# Worked values (by hand from the formula in bckenstler/CLR's README) and golden one-cycle values
# (PyTorch `OneCycleLR` at the same arguments).
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode, steps, expected",
    [
        ("triangular", [0, 1000, 2000, 3000, 4000], [0.001, 0.0035, 0.006, 0.0035, 0.001]),
        ("triangular2", [2000, 6000, 10000, 14000], [0.006, 0.0035, 0.00225, 0.001625]),
        ("exp_range", [2000, 6000, 10000, 42000], [0.005435, 0.004488, 0.003744, 0.001402]),
    ],
)
def test_worked_values(mode, steps, expected):
    lr = S.CyclicalLearningRate(B, M, STEP, mode=mode, gamma=GAMMA if mode == "exp_range" else 1.0)
    got = values(lr, steps)
    assert got.dtype == np.float32
    if mode == "exp_range":  # the table is rounded to 6 decimals
        np.testing.assert_array_equal(np.round(got.astype(np.float64), 6), expected)
    else:
        np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_one_cycle_golden_values_and_hold():
    lr = S.OneCycle(max_lr=0.1, total_steps=100)
    mom = S.CyclicalMomentum(lr)  # defaults 0.85 / 0.95, as OneCycleLR
    steps = [0, 29, 64, 99]
    np.testing.assert_allclose(values(lr, steps), [0.004, 0.1, 0.0500002, 4e-7], rtol=1e-6)
    np.testing.assert_allclose(values(mom, steps), [0.95, 0.85, 0.90, 0.95], rtol=1e-6)
    three = S.OneCycle(max_lr=0.1, total_steps=100, three_phase=True)
    np.testing.assert_allclose(values(three, [58]), [0.004], rtol=1e-6)
    np.testing.assert_allclose(values(S.CyclicalMomentum(three), [58]), [0.95], rtol=1e-6)
    # Past total_steps - 1 the final value is held, never an error.
    past = values(lr, [99, 100, 101, 5000, 10**9])
    np.testing.assert_array_equal(past, np.full(5, past[0]))
    np.testing.assert_array_equal(values(mom, [100, 10**6]), values(mom, [99, 99]))


# ------------------------------------------------------------------------------------------------
# 50,000 steps against the float64 references.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", CLR_MODES)
def test_symmetric_modes_match_smith_formula(mode):
    scale, scale_mode = BUILTIN_SCALES[mode]
    lr = S.CyclicalLearningRate(B, M, STEP, mode=mode, gamma=GAMMA)
    np.testing.assert_allclose(
        values(lr, T64.astype(np.int64)), smith_ref(T64, B, M, STEP, scale, scale_mode), rtol=1e-6
    )


@pytest.mark.parametrize("up, down", [(2000, 500), (300, 1700), (2000, 2000)])
@pytest.mark.parametrize("mode", CLR_MODES)
def test_asymmetric_cycles_match_pytorch_cyclic_lr(mode, up, down):
    scale, scale_mode = BUILTIN_SCALES[mode]
    lr = S.CyclicalLearningRate(B, M, up, mode=mode, gamma=GAMMA, step_size_down=down)
    np.testing.assert_allclose(
        values(lr, T64.astype(np.int64)),
        torch_clr_ref(T64, B, M, up, down, scale, scale_mode),
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "scale_fn, scale_mode, ref_scale",
    [
        (S.HalvingScale(), "cycle", lambda u: 0.5 ** (u - 1)),
        (S.ExponentialScale(0.9), "cycle", lambda u: 0.9**u),
        (S.ExponentialScale(GAMMA), "iterations", lambda u: GAMMA**u),
        (inverse_cycle, None, lambda u: 1.0 / u),  # None: 'cycle' for a custom scale_fn
        (slow_decay, "iterations", lambda u: 1.0 / (1.0 + u / 10000.0)),
    ],
)
def test_custom_scale_fn_matches_reference(scale_fn, scale_mode, ref_scale):
    lr = S.CyclicalLearningRate(B, M, 700, scale_fn=scale_fn, scale_mode=scale_mode,
                                step_size_down=1300)
    ref = torch_clr_ref(T64, B, M, 700, 1300, ref_scale, scale_mode or "cycle")
    np.testing.assert_allclose(values(lr, T64.astype(np.int64)), ref, rtol=1e-6)


def test_scale_fn_receives_float32_not_the_raw_step():
    seen = []

    def checking_scale(u):
        seen.append(u.dtype)
        return tf.ones_like(u)

    for scale_mode in SCALE_MODES:
        lr = S.CyclicalLearningRate(scale_fn=checking_scale, scale_mode=scale_mode)
        lr(tf.constant(5, tf.int64))
    assert seen == [tf.float32, tf.float32]


def test_height_relates_lr_and_matches_pytorch_factor():
    lr = S.CyclicalLearningRate(B, M, 300, mode="triangular2", step_size_down=1700)
    steps = T64[:10_000].astype(np.int64)
    height = values(lr.height, steps)
    assert height.min() >= 0.0 and height.max() <= 1.0
    ref = torch_height(T64[:10_000], 300, 1700, BUILTIN_SCALES["triangular2"][0], "cycle")
    np.testing.assert_allclose(height, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(values(lr, steps), B + (M - B) * height, rtol=1e-6)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("anneal", ANNEAL_STRATEGIES)
@pytest.mark.parametrize("total, pct", [(1000, 0.3), (1001, 0.25), (37, 0.45)])
def test_one_cycle_matches_pytorch_over_all_steps(total, pct, anneal, three_phase):
    kwargs = dict(max_lr=0.1, total_steps=total, pct_start=pct, anneal_strategy=anneal,
                  three_phase=three_phase)
    lr = S.OneCycle(**kwargs)
    mom = S.CyclicalMomentum(lr, base_momentum=0.85, max_momentum=0.95)
    ref_lr, ref_mom = one_cycle_ref(total, 0.1, pct=pct, anneal=anneal, three_phase=three_phase)
    steps = np.arange(total + 5)  # five steps past the end hold the last value
    ref_lr = np.concatenate([ref_lr, np.full(5, ref_lr[-1])])
    ref_mom = np.concatenate([ref_mom, np.full(5, ref_mom[-1])])
    np.testing.assert_allclose(values(lr, steps), ref_lr, rtol=1e-6)
    np.testing.assert_allclose(values(mom, steps), ref_mom, rtol=1e-6)
    height = values(lr.height, steps)
    assert height.min() >= 0.0 and height.max() <= 1.0


def test_one_cycle_zero_length_first_phase_is_finite():
    # pct_start * total_steps == 1: PyTorch divides 0 by 0 at step 0; clrlab gives the phase's end.
    lr = S.OneCycle(max_lr=0.1, total_steps=10, pct_start=0.1)
    got = values(lr, np.arange(10))
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[0], 0.1, rtol=1e-6)
    ref, _ = one_cycle_ref(10, 0.1, pct=0.1, first_step=1)  # PyTorch is defined from step 1
    np.testing.assert_allclose(got[1:], ref, rtol=1e-6)


def test_cyclical_momentum_matches_pytorch_cyclic_lr_momentum():
    for mode in CLR_MODES:
        scale, scale_mode = BUILTIN_SCALES[mode]
        lr = S.CyclicalLearningRate(B, M, 2000, mode=mode, gamma=GAMMA, step_size_down=500)
        mom = S.CyclicalMomentum(lr, base_momentum=0.8, max_momentum=0.9)
        # PyTorch CyclicLR: momentum = max_m - (max_m - base_m) * h * scale_fn(cycle | t)
        ref = 0.9 - (0.9 - 0.8) * torch_height(T64[:20_000], 2000, 500, scale, scale_mode)
        got = values(mom, T64[:20_000].astype(np.int32))
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(values(S.CyclicalMomentum(S.Constant(0.1)), [0, 7]), [0.95, 0.95])


def torch_cyclic_momentum_ref(t, base_m, max_m, up, down, scale, scale_mode):
    """PyTorch CyclicLR.get_lr with cycle_momentum=True, literally: for every step `last_epoch = t`,
    cycle = floor(1 + t / total_size), x = 1 + t / total_size - cycle, scale_factor = x / step_ratio
    (rising) or (x - 1) / (step_ratio - 1), base_height = (max_m - base_m) * scale_factor and
    momentum = max_m - base_height * scale_fn(cycle | t)."""
    total_size = float(up + down)
    step_ratio = up / total_size
    out = []
    for step in np.asarray(t, np.float64):
        cycle = math.floor(1 + step / total_size)
        x = 1.0 + step / total_size - cycle
        scale_factor = x / step_ratio if x <= step_ratio else (x - 1) / (step_ratio - 1)
        base_height = (max_m - base_m) * scale_factor
        out.append(max_m - base_height * float(scale(np.float64(cycle if scale_mode == "cycle" else step))))
    return np.array(out)


@pytest.mark.parametrize("mode", CLR_MODES)
@pytest.mark.parametrize("up, down", [(2000, None), (300, 1700)], ids=["symmetric", "asymmetric"])
def test_cyclical_momentum_trace_matches_pytorch_cyclic_lr_over_20000_steps(mode, up, down):
    scale, scale_mode = BUILTIN_SCALES[mode]
    lr = S.CyclicalLearningRate(B, M, up, mode=mode, gamma=GAMMA, step_size_down=down)
    mom = S.CyclicalMomentum(lr, base_momentum=0.8, max_momentum=0.9)  # CyclicLR's defaults
    ref = torch_cyclic_momentum_ref(T64[:20_000], 0.8, 0.9, up, down or up, scale, scale_mode)
    got = values(mom, np.arange(20_000))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert got.max() == np.float32(0.9) and got.min() < 0.82  # the trace really cycles (exp_range decays)


@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("anneal", ANNEAL_STRATEGIES)
def test_cyclical_momentum_trace_matches_pytorch_one_cycle_over_20000_steps(anneal, three_phase):
    lr = S.OneCycle(max_lr=0.1, total_steps=20_000, anneal_strategy=anneal, three_phase=three_phase)
    mom = S.CyclicalMomentum(lr, base_momentum=0.85, max_momentum=0.95)  # OneCycleLR's defaults
    _, ref = one_cycle_ref(20_000, 0.1, anneal=anneal, three_phase=three_phase, base_m=0.85, max_m=0.95)
    got = values(mom, np.arange(20_000))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert abs(got.min() - 0.85) < 1e-6 and got[0] == np.float32(0.95)


def test_constant_and_sweeps():
    np.testing.assert_array_equal(values(S.Constant(0.01), [0, 10**6]), np.float32([0.01, 0.01]))
    np.testing.assert_array_equal(values(S.Constant(0.01).height, [3]), [0.0])
    n = 1000
    i = np.arange(n + 10, dtype=np.float64)
    f = np.minimum(i, n - 1) / (n - 1)
    lin = S.LinearSweep(1e-4, 1.0, n)
    got = values(lin, i.astype(np.int64))
    np.testing.assert_allclose(got, 1e-4 + (1.0 - 1e-4) * f, rtol=1e-6)
    assert got[0] == np.float32(1e-4) and got[n - 1] == np.float32(1.0) and got[-1] == got[n - 1]
    np.testing.assert_allclose(values(lin.height, i.astype(np.int64)), f, rtol=1e-6)
    np.testing.assert_allclose(values(S.LinearSweep(0, 2.0, 3), [0, 1, 2, 9]), [0, 1, 2, 2])
    exp = S.ExponentialSweep(1e-7, 10.0, n)
    got = values(exp, i.astype(np.int64))
    np.testing.assert_allclose(got, 1e-7 * (10.0 / 1e-7) ** f, rtol=2e-6)
    assert got[0] == np.float32(1e-7) and got[n - 1] == np.float32(10.0) and got[-1] == got[n - 1]
    height = values(exp.height, i.astype(np.int64))
    np.testing.assert_allclose(height, (got - 1e-7) / (10.0 - 1e-7), rtol=1e-5, atol=1e-9)
    assert height[0] == 0.0 and height[-1] == pytest.approx(1.0, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Execution contexts and dtypes.
# ------------------------------------------------------------------------------------------------
def _all_schedules():
    clr_asym = S.CyclicalLearningRate(B, M, 300, mode="exp_range", gamma=GAMMA, step_size_down=1700)
    return [
        S.CyclicalLearningRate(B, M, STEP),
        S.CyclicalLearningRate(B, M, STEP, mode="triangular2"),
        clr_asym,
        S.CyclicalLearningRate(B, M, 500, scale_fn=S.HalvingScale()),
        S.OneCycle(0.1, 30_000),
        S.OneCycle(0.1, 30_000, anneal_strategy="linear", three_phase=True),
        S.CyclicalMomentum(clr_asym),
        S.Constant(0.01),
        S.LinearSweep(1e-4, 1.0, 20_000),
        S.ExponentialSweep(1e-6, 1.0, 20_000),
    ]


@pytest.mark.parametrize("dtype", [tf.int32, tf.int64, tf.float32, tf.float64])
def test_eager_graph_xla_and_vectorised_agree(dtype):
    schedules = _all_schedules()
    steps = np.arange(0, 45_000, 97)
    steps_t = tf.constant(steps, dtype=dtype)
    reference = [values(s, steps) for s in schedules]  # eager, int64, vectorised

    def run_all(x):
        return [s(x) for s in schedules]

    graph = tf.function(run_all)(steps_t)
    xla = tf.function(run_all, jit_compile=True)(steps_t)
    eager = run_all(steps_t)
    scalar_fn = tf.function(run_all, jit_compile=True)
    for k, ref in enumerate(reference):
        for got in (eager[k], graph[k], xla[k]):
            assert got.dtype == tf.float32 and got.shape == steps.shape
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, err_msg=repr(schedules[k]))
    for step in (0, 2000, 31_337):  # scalars: eager tensor, Python int, and XLA scalar
        scalar_xla = scalar_fn(tf.constant(step, dtype=dtype))
        for k, schedule in enumerate(schedules):
            want = reference[k][np.searchsorted(steps, step)] if step in steps else None
            eager_scalar = schedule(tf.constant(step, dtype=dtype))
            python_scalar = schedule(step)
            assert eager_scalar.shape == () and python_scalar.dtype == tf.float32
            np.testing.assert_allclose(scalar_xla[k].numpy(), eager_scalar.numpy(), rtol=1e-6)
            np.testing.assert_allclose(python_scalar.numpy(), eager_scalar.numpy(), rtol=1e-6)
            if want is not None:
                np.testing.assert_allclose(eager_scalar.numpy(), want, rtol=1e-6)


def test_any_shape_and_optimizer_iterations():
    lr = S.CyclicalLearningRate()
    steps = np.array([[0, 1000], [2000, 3000], [4000, 5000]])
    out = lr(tf.constant(steps))
    assert out.shape == (3, 2) and out.dtype == tf.float32
    np.testing.assert_allclose(out.numpy(), smith_ref(steps, B, M, STEP, np.ones_like, "cycle"),
                               rtol=1e-6)
    opt = keras.optimizers.SGD(learning_rate=S.OneCycle(0.1, 100))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(opt.learning_rate), 0.004, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Serialization.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls",
    [S.CyclicalLearningRate, S.OneCycle, S.CyclicalMomentum, S.Constant, S.LinearSweep,
     S.ExponentialSweep],
)
def test_get_config_has_exactly_the_constructor_args(cls):
    examples = {
        S.OneCycle: dict(max_lr=0.1, total_steps=10),
        S.CyclicalMomentum: dict(lr_schedule=S.CyclicalLearningRate()),
        S.Constant: dict(learning_rate=0.1),
        S.LinearSweep: dict(start_lr=0.0, end_lr=1.0, num_steps=5),
        S.ExponentialSweep: dict(start_lr=1e-5, end_lr=1.0, num_steps=5),
    }
    obj = cls(**examples.get(cls, {}), name="sched")
    config = obj.get_config()
    assert set(config) == set(inspect.signature(cls).parameters)
    assert config["name"] == "sched"
    json.dumps(config)
    clone = cls.from_config(config)
    assert clone.get_config() == config
    np.testing.assert_array_equal(values(clone, [0, 3, 4000]), values(obj, [0, 3, 4000]))


def test_builtin_modes_serialize_as_name_and_gamma():
    config = S.CyclicalLearningRate(mode="exp_range", gamma=0.999).get_config()
    assert config["mode"] == "exp_range" and config["gamma"] == 0.999
    assert config["scale_fn"] is None and config["scale_mode"] is None


def _round_trip(tmp_path, schedule):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule), loss="mse")
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: registration only
    return loaded.optimizer._learning_rate


@pytest.mark.parametrize(
    "schedule",
    [
        S.CyclicalLearningRate(B, M, 300, mode="exp_range", gamma=0.999, step_size_down=700,
                               name="clr"),
        S.CyclicalLearningRate(B, M, 300, scale_fn=S.ExponentialScale(0.999),
                               scale_mode="iterations"),
        S.CyclicalLearningRate(B, M, 300, scale_fn=inverse_cycle),
        S.OneCycle(0.1, 1000, anneal_strategy="linear", three_phase=True),
        S.Constant(0.02),
        S.LinearSweep(0.0, 1.0, 100),
        S.ExponentialSweep(1e-6, 1.0, 100),
    ],
    ids=["clr", "clr-registered-class", "clr-registered-fn", "one-cycle", "constant", "linear",
         "exponential"],
)
def test_keras_file_round_trip(tmp_path, schedule):
    restored = _round_trip(tmp_path, schedule)
    assert type(restored) is type(schedule) and restored is not schedule
    assert restored.get_config() == schedule.get_config()
    steps = [0, 1, 150, 299, 300, 999, 1000, 2345]
    np.testing.assert_array_equal(values(restored, steps), values(schedule, steps))


def test_unregistered_scale_fn_fails_at_save_with_instructions(tmp_path):
    path = tmp_path / "m.keras"
    for scale_fn in (lambda u: 1.0 / u, unregistered_scale, NoFromConfig()):
        lr = S.CyclicalLearningRate(scale_fn=scale_fn)
        assert values(lr, [2000]).shape == (1,)  # usable in memory
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr), loss="mse")
        with pytest.raises(ValueError, match="register_keras_serializable") as info:
            model.save(path)  # fails at save time, from the schedule's get_config
        assert "built-in mode" in str(info.value) and "Received: scale_fn=" in str(info.value)
        assert info.traceback[-1].name == "get_config"
        assert not path.exists() or path.stat().st_size == 0  # nothing loadable left behind


def test_cyclical_momentum_serialize_round_trip():
    mom = S.CyclicalMomentum(
        S.CyclicalLearningRate(B, M, 300, scale_fn=slow_decay, scale_mode="iterations"),
        base_momentum=0.8, max_momentum=0.9, name="mom",
    )
    config = keras.saving.serialize_keras_object(mom)
    restored = keras.saving.deserialize_keras_object(json.loads(json.dumps(config)))
    assert type(restored) is S.CyclicalMomentum
    assert type(restored.lr_schedule) is S.CyclicalLearningRate
    assert restored.lr_schedule.scale_fn is slow_decay
    steps = [0, 150, 300, 777, 5000]
    np.testing.assert_array_equal(values(restored, steps), values(mom, steps))


# ------------------------------------------------------------------------------------------------
# Validation.
# ------------------------------------------------------------------------------------------------
CLR = S.CyclicalLearningRate


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CLR(base_lr=-0.1), r">= 0\. Received: base_lr=-0\.1\.$"),
        (lambda: CLR(base_lr=0.01, max_lr=0.01), r"> base_lr .*Received: max_lr=0\.01\.$"),
        (lambda: CLR(max_lr=0.0005), r"Received: max_lr=0\.0005\.$"),
        (lambda: CLR(step_size=0), r"> 0\. Received: step_size=0\.$"),
        (lambda: CLR(step_size=-5), r"Received: step_size=-5\.$"),
        (lambda: CLR(step_size_down=0), r"Received: step_size_down=0\.$"),
        (lambda: CLR(gamma=0.0), r"\(0, 1\]\. Received: gamma=0\.0\.$"),
        (lambda: CLR(gamma=1.5), r"Received: gamma=1\.5\.$"),
        (lambda: CLR(mode="triangle"), r"one of \('triangular'.*Received: mode='triangle'\.$"),
        (lambda: CLR(scale_mode="epoch"), r"Received: scale_mode='epoch'\.$"),
        (lambda: CLR(mode="exp_range", scale_mode="cycle"), r"implies scale_mode='iterations'"),
        (lambda: CLR(mode="triangular2", scale_mode="iterations"), r"conflicts with mode="),
        (lambda: CLR(scale_fn=0.5), r"a callable or None\. Received: scale_fn=0\.5\.$"),
        (lambda: CLR(base_lr=float("nan")), r"Received: base_lr=nan\.$"),
        (lambda: CLR(max_lr=float("inf")), r"Received: max_lr=inf\.$"),
        (lambda: CLR(step_size=float("inf")), r"Received: step_size=inf\.$"),
        (lambda: CLR(gamma=float("nan")), r"Received: gamma=nan\.$"),
        (lambda: CLR(base_lr="0.1"), r"Received: base_lr='0\.1'\.$"),
        (lambda: S.OneCycle(0.1, 0), r">= 1\. Received: total_steps=0\.$"),
        (lambda: S.OneCycle(0.1, 10.5), r"integer >= 1\. Received: total_steps=10\.5\.$"),
        (lambda: S.OneCycle(0.0, 10), r"> 0\. Received: max_lr=0\.0\.$"),
        (lambda: S.OneCycle(float("nan"), 10), r"Received: max_lr=nan\.$"),
        (lambda: S.OneCycle(0.1, 10, pct_start=0.0), r"\(0, 1\)\. Received: pct_start=0\.0\.$"),
        (lambda: S.OneCycle(0.1, 10, pct_start=1.0), r"Received: pct_start=1\.0\.$"),
        (lambda: S.OneCycle(0.1, 10, div_factor=0), r"> 0\. Received: div_factor=0\.$"),
        (lambda: S.OneCycle(0.1, 10, final_div_factor=-1), r"Received: final_div_factor=-1\.$"),
        (lambda: S.OneCycle(0.1, 10, final_div_factor=float("inf")),
         r"Received: final_div_factor=inf\.$"),
        (lambda: S.OneCycle(0.1, 10, anneal_strategy="cosine"),
         r"one of \('cos', 'linear'\)\. Received: anneal_strategy='cosine'\.$"),
        (lambda: S.CyclicalMomentum(lambda t: t), r"height.*Received: lr_schedule="),
        (lambda: S.CyclicalMomentum(CLR(), base_momentum=0.96), r"Received: base_momentum=0\.96"),
        (lambda: S.CyclicalMomentum(CLR(), base_momentum=-0.1), r"Received: base_momentum=-0\.1"),
        (lambda: S.CyclicalMomentum(CLR(), max_momentum=1.0),
         r"\[0, 1\)\. Received: max_momentum=1\.0\.$"),
        (lambda: S.Constant(-1.0), r">= 0\. Received: learning_rate=-1\.0\.$"),
        (lambda: S.Constant(float("nan")), r"Received: learning_rate=nan\.$"),
        (lambda: S.LinearSweep(-1e-3, 1.0, 10), r">= 0\. Received: start_lr=-0\.001\.$"),
        (lambda: S.LinearSweep(0.1, 0.1, 10), r"> start_lr .*Received: end_lr=0\.1\.$"),
        (lambda: S.LinearSweep(0.1, 1.0, 1), r">= 2\. Received: num_steps=1\.$"),
        (lambda: S.ExponentialSweep(0.0, 1.0, 10), r"> 0\. Received: start_lr=0\.0\.$"),
        (lambda: S.ExponentialSweep(1.0, 0.1, 10), r"Received: end_lr=0\.1\.$"),
        (lambda: S.ExponentialSweep(1e-5, float("inf"), 10), r"Received: end_lr=inf\.$"),
        (lambda: S.ExponentialScale(0.0), r"Received: gamma=0\.0\.$"),
    ],
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_scale_mode_rules():
    assert CLR(mode="exp_range", scale_mode="iterations")._scale_mode == "iterations"  # matching
    assert CLR(mode="triangular2", scale_mode="cycle")._scale_mode == "cycle"
    # A custom scale_fn chooses freely, whatever `mode` says.
    lr = CLR(mode="exp_range", scale_fn=S.HalvingScale())
    assert lr._scale_mode == "cycle"
    np.testing.assert_allclose(values(lr, [6000]), [0.0035], rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# make_schedule.
# ------------------------------------------------------------------------------------------------
def test_make_schedule_each_policy():
    common = dict(base_lr=0.002, max_lr=0.01, step_size=100, step_size_down=300, gamma=0.999,
                  total_steps=1000, pct_start=0.25, epochs=3, scale_mode=None)
    for mode in CLR_MODES:
        lr = S.make_schedule(mode, **common)
        assert isinstance(lr, CLR)
        config = lr.get_config()
        assert (config["mode"], config["base_lr"], config["max_lr"]) == (mode, 0.002, 0.01)
        assert (config["step_size"], config["step_size_down"], config["gamma"]) == (100, 300, 0.999)
    one = S.make_schedule("one_cycle", **common)
    assert isinstance(one, S.OneCycle)
    assert one.div_factor == pytest.approx(5.0) and one.pct_start == 0.25
    np.testing.assert_allclose(values(one, [0]), [0.002], rtol=1e-6)  # base_lr = starting LR
    explicit = S.make_schedule("one_cycle", max_lr=0.1, total_steps=100, div_factor=10,
                               base_lr=0.05, anneal_strategy="linear", three_phase=True)
    assert explicit.div_factor == 10 and explicit.three_phase
    assert explicit.anneal_strategy == "linear"
    assert S.make_schedule("one_cycle", max_lr=0.1, total_steps=100).div_factor == 25.0
    const = S.make_schedule("constant", **common)
    assert isinstance(const, S.Constant) and const.learning_rate == 0.002
    assert S.make_schedule("triangular").get_config() == CLR().get_config()


def test_make_schedule_errors():
    allowed = r"one of \('triangular', 'triangular2', 'exp_range', 'one_cycle', 'constant', 'piecewise'\)"
    with pytest.raises(ValueError, match=allowed + r"\. Received: policy='1cycle'\.$"):
        S.make_schedule("1cycle")
    with pytest.raises(ValueError, match="total_steps"):
        S.make_schedule("one_cycle", max_lr=0.1)
    with pytest.raises(ValueError, match="Received: base_lr=0.5"):
        S.make_schedule("one_cycle", max_lr=0.1, total_steps=10, base_lr=0.5)
    with pytest.raises(ValueError, match="Received: step_size=0"):
        S.make_schedule("triangular", step_size=0)


# ------------------------------------------------------------------------------------------------
# PiecewiseConstant: the CLR paper's staged "fixed" baseline (Caffe's `cifar10_full` solvers).
# ------------------------------------------------------------------------------------------------
CAFFE_FIXED = dict(boundaries=[60_000, 65_000], values=[1e-3, 1e-4, 1e-5])


def test_piecewise_values_switch_at_the_boundary_step_as_caffe():
    lr = S.make_schedule("piecewise", base_lr=0.5, max_lr=0.9, step_size=10, **CAFFE_FIXED)
    assert isinstance(lr, S.PiecewiseConstant)
    steps = [0, 1, 59_999, 60_000, 64_999, 65_000, 69_999, 70_000, 10**6]
    want = np.float32([1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-5])
    for dtype in (np.int32, np.int64, np.float32, np.float64):
        np.testing.assert_array_equal(values(lr, steps, dtype), want)  # a lookup: exact float32 values
    counts = np.unique(values(lr, np.arange(70_000)), return_counts=True)
    assert dict(zip(counts[0].tolist(), counts[1].tolist())) == {
        np.float32(1e-5).item(): 5_000, np.float32(1e-4).item(): 5_000, np.float32(1e-3).item(): 60_000}
    xla = tf.function(lambda t: lr(t), jit_compile=True)
    assert xla(tf.constant(60_000, tf.int64)).numpy() == np.float32(1e-4)
    assert lr(tf.constant([[0, 60_000]])).shape == (1, 2) and lr(7).dtype == tf.float32
    np.testing.assert_array_equal(lr.height(tf.constant([0, 60_000, 70_000])).numpy(), [0.0, 0.0, 0.0])
    momentum = S.CyclicalMomentum(lr, 0.85, 0.95)  # height 0: momentum holds its maximum
    np.testing.assert_allclose(values(momentum, [0, 65_000]), [0.95, 0.95], rtol=1e-7)
    one_stage = S.PiecewiseConstant([], [0.02])
    np.testing.assert_array_equal(values(one_stage, [0, 10**6]), np.float32([0.02, 0.02]))


def test_piecewise_serialization_round_trip(tmp_path):
    lr = S.PiecewiseConstant(name="fixed", **CAFFE_FIXED)
    config = lr.get_config()
    assert config == {"boundaries": [60_000, 65_000], "values": [1e-3, 1e-4, 1e-5], "name": "fixed"}
    assert set(config) == set(inspect.signature(S.PiecewiseConstant).parameters)
    assert S.PiecewiseConstant.from_config(json.loads(json.dumps(config))).get_config() == config
    restored = _round_trip(tmp_path, lr)  # .keras file, no custom_objects
    assert type(restored) is S.PiecewiseConstant and restored.get_config() == config
    steps = [0, 59_999, 60_000, 65_000, 70_000]
    np.testing.assert_array_equal(values(restored, steps), values(lr, steps))


@pytest.mark.parametrize("kwargs, match", [
    (dict(boundaries=[0], values=[1e-3, 1e-4]), r"boundaries.*> 0.*Received: boundaries=0\."),
    (dict(boundaries=[5, 5], values=[1, 2, 3]), r"above the previous one \(5\)\. Received: boundaries=5\."),
    (dict(boundaries=[5, 3], values=[1, 2, 3]), r"Received: boundaries=3\."),
    (dict(boundaries=[5.5], values=[1, 2]), r"Received: boundaries=5\.5\."),
    (dict(boundaries=[5], values=[1]), r"2 numbers \(one more than the 1 boundaries\)"),
    (dict(boundaries=[5], values=[1, 2, 3]), r"2 numbers"),
    (dict(boundaries=[5], values=[1, float("nan")]), r"finite numbers >= 0\. Received: values=nan\."),
    (dict(boundaries=[5], values=[1, -1e-3]), r"Received: values=-0\.001\."),
    (dict(boundaries="60000", values=[1, 2]), r"sequence"),
    (dict(boundaries=[5], values=None), r"sequence"),
])
def test_piecewise_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.PiecewiseConstant(**kwargs)


def test_make_schedule_piecewise_needs_values():
    with pytest.raises(ValueError, match="needs `values`"):
        S.make_schedule("piecewise", boundaries=[10])


# ------------------------------------------------------------------------------------------------
# Large steps: exact to float32 precision for any integer step below 2**53.
# ------------------------------------------------------------------------------------------------
LARGE = (2**24, 2**31, 2**40, 2**52)
LARGE_STEPS = np.array(sorted({s + d for s in LARGE for d in range(-3, 45)}), np.int64)


def exact_clr_height(steps, up, down, mode="triangular", gamma=1.0, scale=None):
    """The cycle position with Python integers (exact at any step), then the factor in float64."""
    out = []
    for t in (int(s) for s in steps):
        pos, cycle = t % (up + down), t // (up + down) + 1
        h = pos / up if pos <= up else (up + down - pos) / down
        if scale is not None:
            h *= scale(cycle)
        elif mode == "triangular2":
            h *= 0.5 ** (cycle - 1)
        elif mode == "exp_range":
            h *= math.exp(t * math.log(gamma))
        out.append(h)
    return np.array(out)


@pytest.mark.parametrize("mode,gamma,up,down", [
    ("triangular", 1.0, 10, None), ("triangular", 1.0, 7, 13), ("triangular2", 1.0, 10, None),
    ("exp_range", 1 - 1e-12, 10, 17), ("custom", 1.0, 6, 9),
])
def test_cyclical_lr_and_momentum_are_exact_at_large_steps(mode, gamma, up, down):
    if mode == "custom":
        lr = S.CyclicalLearningRate(B, M, up, scale_fn=inverse_cycle, step_size_down=down)
        ref = exact_clr_height(LARGE_STEPS, up, down or up, scale=lambda c: 1.0 / c)
    else:
        lr = S.CyclicalLearningRate(B, M, up, mode=mode, gamma=gamma, step_size_down=down)
        ref = exact_clr_height(LARGE_STEPS, up, down or up, mode, gamma)
    np.testing.assert_allclose(values(lr, LARGE_STEPS), B + (M - B) * ref, rtol=1e-6)
    np.testing.assert_allclose(values(lr.height, LARGE_STEPS), ref, rtol=1e-6, atol=1e-7)
    mom = S.CyclicalMomentum(lr, 0.85, 0.95)
    np.testing.assert_allclose(values(mom, LARGE_STEPS), 0.95 - 0.1 * ref, rtol=1e-6)
    # the example: base 0.001, max 0.006, step_size 10 at step 2**24 + 1
    assert values(S.CyclicalLearningRate(B, M, 10), [2**24 + 1]) == pytest.approx(0.0025, rel=1e-6)


def one_cycle_at(step, total, max_lr, pct=0.3, div=25.0, final_div=1e4, anneal="cos", three_phase=False):
    """PyTorch OneCycleLR's value (and momentum height) at one step, in float64 (as one_cycle_ref)."""
    lr0, lr_min = max_lr / div, max_lr / div / final_div
    phases = [(float(pct * total) - 1, lr0, max_lr, 0.0, 1.0)]
    if three_phase:
        phases += [(float(2 * pct * total) - 2, max_lr, lr0, 1.0, 0.0), (total - 1, lr0, lr_min, 0.0, 0.0)]
    else:
        phases += [(total - 1, max_lr, lr_min, 1.0, 0.0)]
    step, start = min(max(step, 0), total - 1), 0.0
    for i, (end, lr_a, lr_b, h_a, h_b) in enumerate(phases):
        if step <= end or i == len(phases) - 1:
            p = (step - start) / (end - start)
            if anneal == "cos":
                w = math.sin(math.pi / 2 * p) ** 2
            else:
                w = p
            return lr_a + (lr_b - lr_a) * w, h_a + (h_b - h_a) * w
        start = end


@pytest.mark.parametrize("anneal,three_phase", [("cos", False), ("linear", True), ("linear", False)])
def test_one_cycle_is_exact_at_large_steps(anneal, three_phase):
    total = 2**41 + 3
    e1 = int(0.3 * total)
    steps = np.array(sorted(set(LARGE_STEPS[LARGE_STEPS < 2**41]) | set(range(e1 - 3, e1 + 4))
                            | set(range(total - 40, total + 2)) | {2**52}), np.int64)
    lr = S.OneCycle(0.1, total, anneal_strategy=anneal, three_phase=three_phase)
    ref = np.array([one_cycle_at(int(t), total, 0.1, anneal=anneal, three_phase=three_phase) for t in steps])
    np.testing.assert_allclose(values(lr, steps), ref[:, 0], rtol=1e-6)
    np.testing.assert_allclose(values(lr.height, steps), ref[:, 1], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(values(S.CyclicalMomentum(lr, 0.85, 0.95), steps), 0.95 - 0.1 * ref[:, 1], rtol=1e-6)


def test_piecewise_and_sweeps_are_exact_at_large_steps():
    boundaries = [2**24 + 1, 2**31 + 1, 2**40 + 1, 2**52 + 1]
    pw = S.PiecewiseConstant(boundaries, [1.0, 0.5, 0.25, 0.125, 0.0625])
    steps = np.array([b + d for b in boundaries for d in (-2, -1, 0, 1)], np.int64)
    want = np.float32([[1.0, 0.5, 0.25, 0.125, 0.0625][int(np.searchsorted(boundaries, t, side="right"))]
                       for t in steps])
    np.testing.assert_array_equal(values(pw, steps), want)
    n = 2**41
    steps = np.array(sorted(set(LARGE_STEPS[LARGE_STEPS < n]) | set(range(n - 40, n + 2))), np.int64)
    f = np.array([min(int(t), n - 1) / (n - 1) for t in steps])
    g = np.array([(n - 1 - min(int(t), n - 1)) / (n - 1) for t in steps])
    lin = S.LinearSweep(0.0, 1.0, n)
    np.testing.assert_allclose(values(lin, steps), f, rtol=1e-6)
    np.testing.assert_allclose(values(S.LinearSweep(1.0, 2.0, n), steps), 1.0 + f, rtol=1e-6)
    exp = S.ExponentialSweep(1e-7, 10.0, n)
    np.testing.assert_allclose(values(exp, steps), 10.0 * np.exp(-g * math.log(1e8)), rtol=1e-6)


def test_large_steps_agree_across_dtypes_graph_xla_and_vectorised():
    schedules = [S.CyclicalLearningRate(B, M, 10), S.CyclicalLearningRate(B, M, 7, step_size_down=13),
                 S.OneCycle(0.1, 2**41 + 3, anneal_strategy="linear"), S.LinearSweep(0.0, 1.0, 2**41),
                 S.PiecewiseConstant([2**24 + 1, 2**40 + 1], [1.0, 0.5, 0.25])]
    steps = np.array([2**24 + 1, 2**31 + 5, 2**40 + 7, 2**52 + 3], np.int64)

    def run_all(x):
        return [s(x) for s in schedules]

    graph = tf.function(run_all, autograph=False)
    reference = [v.numpy() for v in graph(tf.constant(steps))]  # vectorised, in graph
    as_float64 = graph(tf.constant(steps.astype(np.float64)))
    xla = tf.function(run_all, jit_compile=True)(tf.constant(steps))
    for k, ref in enumerate(reference):
        for i, t in enumerate(steps):  # one step alone gives the vectorised value bit for bit
            assert graph(tf.constant(t))[k].numpy() == ref[i]
        np.testing.assert_array_equal(as_float64[k].numpy(), ref)
        np.testing.assert_allclose(xla[k].numpy(), ref, rtol=1e-6)
        np.testing.assert_allclose(values(schedules[k], steps), ref, rtol=1e-6)  # eager
