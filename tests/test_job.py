"""clrlab.job: the optimizer, the LR policy and the classic callback built from a TrainConfig, and the
assembled job (data, model, optimizer holding a schedule or a float LR)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from clrlab import job, optimizers, schedules
from clrlab.callbacks import CyclicLR
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from clrlab.keras_internals import held_schedule, inner_optimizer, read_learning_rate, uses_loss_scaling


@pytest.mark.parametrize("name,cls,attrs", [
    ("sgd", keras.optimizers.SGD, {"momentum": 0.8, "nesterov": False}),
    ("nesterov", keras.optimizers.SGD, {"momentum": 0.8, "nesterov": True}),
    ("adam", keras.optimizers.Adam, {"beta_1": 0.8}),
    ("adamw", keras.optimizers.AdamW, {"beta_1": 0.8}),
    ("rmsprop", keras.optimizers.RMSprop, {"momentum": 0.8}),
])
def test_make_optimizer_builds_each_name_with_a_float_lr(name, cls, attrs):
    opt = job.make_optimizer(name, 0.05, 0.8)
    assert type(opt) is cls
    for attr, want in attrs.items():
        assert getattr(opt, attr) == pytest.approx(want), attr
    assert held_schedule(opt) is None and read_learning_rate(opt) == pytest.approx(0.05)


def test_make_optimizer_passes_a_schedule_through_and_wraps_for_loss_scaling():
    schedule = schedules.Constant(0.01)
    opt = job.make_optimizer("sgd", schedule, 0.9, loss_scaling=True)
    assert uses_loss_scaling(opt) and isinstance(inner_optimizer(opt), keras.optimizers.SGD)
    assert held_schedule(opt) is schedule


def test_make_optimizer_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="Expected one of sgd, nesterov, adam, adamw, rmsprop. Received: lbfgs"):
        job.make_optimizer("lbfgs", 0.1, 0.9)


def test_make_lr_schedule_resolves_the_half_cycle_from_epochs():
    schedule, step_size = job.make_lr_schedule(TrainConfig(step_size_epochs=2.0, base_lr=0.01, max_lr=0.1), 10)
    assert step_size == 20
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 10, 20, 40)], [0.01, 0.055, 0.1, 0.01], rtol=1e-6)


def test_make_lr_schedule_turns_settings_the_flags_cannot_check_into_a_user_error():
    # A config built directly (not from flags): one LR for two piecewise stages.
    with pytest.raises(UserError, match="^invalid policy settings: "):
        job.make_lr_schedule(TrainConfig(policy="piecewise", lr_boundaries=(5,), lr_values=(0.1,)), 10)


@pytest.mark.parametrize("overrides", [{}, {"trainer": "keras_fit"}, {"lr_control": "callback"}])
def test_make_lr_callback_is_none_unless_keras_fit_with_the_callback(overrides):
    assert job.make_lr_callback(TrainConfig(**overrides), 10) is None


@pytest.mark.parametrize("policy", ["triangular", "triangular2", "exp_range"])
def test_make_lr_callback_is_the_classic_cyclic_lr_with_the_configs_cycle(policy):
    config = TrainConfig(trainer="keras_fit", lr_control="callback", policy=policy, base_lr=0.002, max_lr=0.02,
                         gamma=0.99)
    cb = job.make_lr_callback(config, 7)
    assert isinstance(cb, CyclicLR)
    assert (cb.base_lr, cb.max_lr, cb.step_size, cb.mode, cb.gamma) == (0.002, 0.02, 7, policy, 0.99)


@pytest.mark.parametrize("overrides,needle", [
    ({"policy": "one_cycle"}, "Received: --policy=one_cycle; use --lr_control=schedule"),
    ({"policy": "constant"}, "Received: --policy=constant;"),
    ({"step_size_down": 4}, "Received: --policy=triangular, --step_size_down=4; use --lr_control=schedule"),
])
def test_make_lr_callback_refuses_what_the_classic_callback_cannot_express(overrides, needle):
    config = TrainConfig(trainer="keras_fit", lr_control="callback", **overrides)
    with pytest.raises(UserError, match="--lr_control=callback uses the classic CyclicLR callback") as info:
        job.make_lr_callback(config, 10)
    assert needle in str(info.value)


@pytest.mark.parametrize("trainer,lr_control,holds", [
    ("custom_loop", "schedule", False), ("keras_fit", "schedule", True), ("keras_fit", "callback", False),
])
def test_build_job_sizes_the_run_and_gives_the_optimizer_a_schedule_only_for_model_fit(trainer, lr_control, holds):
    config = TrainConfig(model="mlp", batch_size=64, epochs=2, step_size=10, base_lr=0.01, max_lr=0.1,
                         trainer=trainer, lr_control=lr_control)
    built = job.build_job(config)
    assert (built.steps_per_epoch, built.total_steps, built.step_size) == (1437 // 64, 2 * (1437 // 64), 10)
    assert built.model.name and built.splits.name == "digits"
    assert (held_schedule(built.optimizer) is built.schedule) == holds
    if not holds:
        assert read_learning_rate(built.optimizer) == pytest.approx(0.01)  # the policy's LR at step 0
    x, y = next(iter(built.train_data_fn(0)))
    assert x.shape[0] == 64 and y.shape == (64,)


# ----------------------------------------------------------------------------- momentum cycle
@pytest.mark.parametrize("name,cls,attr,nesterov", [
    ("sgd", optimizers.SGD, "momentum", False), ("nesterov", optimizers.SGD, "momentum", True),
    ("adam", optimizers.Adam, "beta_1", None), ("adamw", optimizers.AdamW, "beta_1", None),
])
def test_make_optimizer_with_variable_momentum_builds_the_clrlab_optimizers(name, cls, attr, nesterov):
    opt = job.make_optimizer(name, 0.05, 0.85, variable_momentum=True)
    assert type(opt) is cls and float(optimizers.momentum_variable(opt).numpy()) == pytest.approx(0.85)
    if nesterov is not None:
        assert opt.nesterov is nesterov
    momentum = schedules.CyclicalMomentum(schedules.Constant(0.01), 0.8, 0.9)
    held = job.make_optimizer(name, 0.05, momentum, variable_momentum=True, loss_scaling=True)
    assert uses_loss_scaling(held) and inner_optimizer(held).momentum_schedule is momentum


def test_make_optimizer_without_variable_momentum_is_the_stock_keras_one():
    assert type(job.make_optimizer("sgd", 0.05, 0.8)) is keras.optimizers.SGD
    with pytest.raises(ValueError, match="RMSprop has no momentum that can cycle"):
        job.make_optimizer("rmsprop", 0.05, 0.8, variable_momentum=True)


def test_make_momentum_schedule_is_cyclical_momentum_over_the_lr_schedule_or_none():
    lr = schedules.Constant(0.01)
    assert job.make_momentum_schedule(TrainConfig(), lr) is None  # triangular: off by default
    assert job.make_momentum_schedule(TrainConfig(policy="one_cycle", cycle_momentum=False), lr) is None
    m = job.make_momentum_schedule(TrainConfig(policy="one_cycle"), lr)
    assert isinstance(m, schedules.CyclicalMomentum) and m.lr_schedule is lr
    assert (m.base_momentum, m.max_momentum) == (0.85, 0.95)
    m = job.make_momentum_schedule(TrainConfig(cycle_momentum=True, max_momentum=0.99), lr)
    assert (m.base_momentum, m.max_momentum) == (0.8, 0.99)
    with pytest.raises(UserError, match="--cycle_momentum needs a cyclical policy"):
        job.make_momentum_schedule(TrainConfig(policy="constant", cycle_momentum=True), lr)


def test_make_lr_callback_cycles_momentum_with_the_configs_bounds():
    config = TrainConfig(trainer="keras_fit", lr_control="callback", cycle_momentum=True, base_momentum=0.85,
                         max_momentum=0.95)
    cb = job.make_lr_callback(config, 7)
    assert (cb.cycle_momentum, cb.base_momentum, cb.max_momentum) == (True, 0.85, 0.95)
    assert job.make_lr_callback(TrainConfig(trainer="keras_fit", lr_control="callback"), 7).cycle_momentum is False


@pytest.mark.parametrize("trainer,lr_control", [("custom_loop", "schedule"), ("keras_fit", "schedule"),
                                                ("keras_fit", "callback")])
def test_build_job_without_a_momentum_cycle_keeps_the_stock_optimizer(trainer, lr_control):
    config = TrainConfig(model="mlp", epochs=1, step_size=10, trainer=trainer, lr_control=lr_control, momentum=0.7)
    built = job.build_job(config)
    assert built.momentum_schedule is None
    assert type(built.optimizer) is keras.optimizers.SGD and built.optimizer.momentum == pytest.approx(0.7)


@pytest.mark.parametrize("trainer,lr_control,optimizer", [
    ("custom_loop", "schedule", "sgd"), ("custom_loop", "schedule", "adam"), ("keras_fit", "schedule", "nesterov"),
    ("keras_fit", "schedule", "adamw"), ("keras_fit", "callback", "sgd"),
])
def test_build_job_with_a_momentum_cycle(trainer, lr_control, optimizer):
    policy = "triangular" if lr_control == "callback" else "one_cycle"
    config = TrainConfig(model="mlp", epochs=2, step_size=10, base_lr=0.01, max_lr=0.1, policy=policy,
                         cycle_momentum=True, trainer=trainer, lr_control=lr_control, optimizer=optimizer)
    built = job.build_job(config)
    m = built.momentum_schedule
    assert isinstance(m, schedules.CyclicalMomentum) and m.lr_schedule is built.schedule
    want = (0.85, 0.95) if policy == "one_cycle" else (0.8, 0.9)
    assert (m.base_momentum, m.max_momentum) == want
    kinds = {"sgd": optimizers.SGD, "nesterov": optimizers.SGD, "adam": optimizers.Adam, "adamw": optimizers.AdamW}
    assert type(built.optimizer) is kinds[optimizer]
    steps = [0, 5, built.total_steps // 3, built.total_steps - 1]
    np.testing.assert_allclose([float(m(s)) for s in steps],
                               [want[1] - (want[1] - want[0]) * float(built.schedule.height(s)) for s in steps],
                               rtol=1e-6)
    held = inner_optimizer(built.optimizer).momentum_schedule
    if trainer == "keras_fit" and lr_control == "schedule":  # model.fit: the optimizer evaluates both schedules
        assert held is m and held_schedule(built.optimizer) is built.schedule
    else:  # the loop or the callback assigns the variable; it starts at the step-0 momentum
        assert held is None
        assert float(optimizers.momentum_variable(built.optimizer).numpy()) == pytest.approx(float(m(0)))
