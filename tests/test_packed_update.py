"""Packed optimizer updates (trainers/packed_update.py) are each member's own Keras update, bit for bit.

Each test packs three MNIST-1D models (different seeds), feeds the same random gradients to the packed
optimizer (one update of all members, inside a tf.function) and to each member's own Keras / clrlab
optimizer (`optimizer.apply`, inside a tf.function, as a compiled training step calls it), with a different
learning rate and momentum per member, and compares weights and slots as raw bits.
(Both sides are compiled: Keras' own eager and compiled updates can differ in the last bit when weight
decay multiplies by two scalars, so eager vs compiled would not test the packed arithmetic.)
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import models, optimizers
from clrlab.packed_models import pack, unpack_into
from trainers.packed_update import PackedOptimizer, make_packed_optimizer, optimizer_settings

SGD_LRS, ADAM_LRS = (0.1, 0.05, 0.01), (1e-3, 5e-4, 2e-3)
MOMENTA = (0.9, 0.0, 0.5)


def _bits(x):
    return np.ascontiguousarray(keras.ops.convert_to_numpy(x)).view(np.uint8)


def _setup(make, lrs, name="mnist1d_cnn"):
    members = [models.build_model(name, (40, 1), 10, seed=5 + i) for i in range(3)]
    packed = pack(members)
    opts = [make(lrs[i], MOMENTA[i]) for i in range(3)]
    for o, m in zip(opts, members, strict=True):
        o.build(m.trainable_variables)
    return members, packed, opts


def _member_steps(members, opts):
    return [tf.function(lambda grads, o=o, m=m: o.apply(grads, m.trainable_variables))
            for o, m in zip(opts, members, strict=True)]


def _grads(packed, rng):
    return [tf.constant(rng.normal(size=v.shape).astype(np.float32)) for v in packed.variables_by_member_order]


def _assert_same_weights(packed, members):
    for i, model in enumerate(members):
        for stacked, own in zip(packed.variables_by_member_order, model.trainable_variables, strict=True):
            np.testing.assert_array_equal(_bits(stacked[i]), _bits(own), err_msg=f"member {i} {own.path}")


def _slots(opt):
    if isinstance(opt, keras.optimizers.SGD):
        return [getattr(opt, "momentums", None) or []]
    return [opt._momentums, opt._velocities] + ([opt._velocity_hats] if opt.amsgrad else [])


def _assert_same_slots(popt, opts):
    packed_slots = [popt.momentums] if popt.kind == "sgd" else \
        [popt.momentums, popt.velocities] + ([popt.velocity_hats] if popt.amsgrad else [])
    for i, opt in enumerate(opts):
        for keras_slots, stacked in zip(_slots(opt), packed_slots, strict=True):
            for slot, s in zip(keras_slots, stacked, strict=False):  # Keras SGD at momentum 0: no slots
                np.testing.assert_array_equal(_bits(s[i]), _bits(slot))
        assert int(opt.iterations.numpy()) == int(popt.iterations.numpy())


CASES = {
    "keras_sgd": (lambda lr, m: keras.optimizers.SGD(lr, momentum=m), SGD_LRS),
    "keras_sgd_nesterov": (lambda lr, m: keras.optimizers.SGD(lr, momentum=m, nesterov=True), SGD_LRS),
    "keras_sgd_weight_decay": (lambda lr, m: keras.optimizers.SGD(lr, momentum=m, weight_decay=1e-3), SGD_LRS),
    "clrlab_sgd": (lambda lr, m: optimizers.SGD(lr, momentum=m), SGD_LRS),
    "clrlab_sgd_nesterov": (lambda lr, m: optimizers.SGD(lr, momentum=m, nesterov=True), SGD_LRS),
    "keras_adam": (lambda lr, m: keras.optimizers.Adam(lr, beta_1=m), ADAM_LRS),
    "keras_adam_amsgrad": (lambda lr, m: keras.optimizers.Adam(lr, beta_1=m, amsgrad=True, epsilon=1e-5),
                           ADAM_LRS),
    "keras_adamw": (lambda lr, m: keras.optimizers.AdamW(lr, beta_1=m, weight_decay=0.01, beta_2=0.99), ADAM_LRS),
    "clrlab_adam": (lambda lr, m: optimizers.Adam(lr, beta_1=m), ADAM_LRS),
    "clrlab_adamw": (lambda lr, m: optimizers.AdamW(lr, beta_1=m, weight_decay=0.02), ADAM_LRS),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_packed_update_equals_each_members_optimizer_bitwise(case):
    make, lrs = CASES[case]
    members, packed, opts = _setup(make, lrs)
    popt = make_packed_optimizer(opts, packed.variables_by_member_order)
    step = tf.function(popt.apply)
    own_steps = _member_steps(members, opts)
    rng = np.random.default_rng(0)
    lr, momentum = tf.constant(lrs, tf.float32), tf.constant(MOMENTA, tf.float64)
    for _ in range(4):
        grads = _grads(packed, rng)
        step(grads, packed.variables_by_member_order, lr, momentum)
        for i, own in enumerate(own_steps):
            own([g[i] for g in grads])
    _assert_same_weights(packed, members)
    _assert_same_slots(popt, opts)
    assert int(popt.iterations.numpy()) == 4


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_momentum_and_lr_changing_every_step_match_clrlab_optimizers(kind):
    """Cyclical momentum: the loop assigns each member's momentum variable (float64) and LR every step."""
    cls = optimizers.SGD if kind == "sgd" else optimizers.Adam
    lrs = SGD_LRS if kind == "sgd" else ADAM_LRS
    members, packed, opts = _setup(lambda lr, m: cls(lr, m), lrs, name="mnist1d_mlp")
    popt = make_packed_optimizer(opts[0], packed.variables_by_member_order)  # one optimizer: shared settings
    step = tf.function(popt.apply)
    own_steps = _member_steps(members, opts)
    rng = np.random.default_rng(1)
    for t in range(5):
        lr = np.array(lrs, np.float32) * np.float32(1 + 0.3 * t)
        momentum = np.array([0.95 - 0.05 * t, 0.85 + 0.02 * t, 0.9], np.float32)  # a float32 schedule's values
        grads = _grads(packed, rng)
        step(grads, packed.variables_by_member_order, tf.constant(lr), tf.constant(momentum))
        for i, (opt, own) in enumerate(zip(opts, own_steps, strict=True)):
            opt.learning_rate.assign(lr[i])
            opt.momentum_variable.assign(tf.cast(momentum[i], tf.float64))
            own([g[i] for g in grads])
    _assert_same_weights(packed, members)
    _assert_same_slots(popt, opts)


@pytest.mark.filterwarnings("ignore:Gradients do not exist")
def test_default_momentum_comes_from_the_configured_optimizers_and_none_grads_are_skipped():
    members, packed, opts = _setup(lambda lr, m: keras.optimizers.SGD(lr, momentum=m), SGD_LRS, name="linear")
    popt = make_packed_optimizer(opts, packed.variables_by_member_order)
    rng = np.random.default_rng(2)
    kernel, bias = packed.variables_by_member_order
    before = bias.numpy()
    g = _grads(packed, rng)
    popt.apply([g[0], None], [kernel, bias], tf.constant(SGD_LRS))
    for i, o in enumerate(opts):
        o.apply([g[0][i], None], members[i].trainable_variables)
    _assert_same_weights(packed, members)
    np.testing.assert_array_equal(bias.numpy(), before)


def test_checkpoint_restores_slots_weights_and_iterations_exactly(tmp_path):
    def build():
        members = [models.build_model("mnist1d_cnn", (40, 1), 10, seed=7 + i) for i in range(3)]
        packed = pack(members)
        opt = make_packed_optimizer(keras.optimizers.Adam(1e-3), packed.variables_by_member_order)
        return packed, opt, tf.train.Checkpoint(model=packed, optimizer=opt)

    rng = np.random.default_rng(3)
    grads = [_grads(build()[0], rng) for _ in range(4)]
    lr = tf.constant(ADAM_LRS)
    packed, opt, checkpoint = build()
    for g in grads[:2]:
        opt.apply(g, packed.variables_by_member_order, lr)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    for g in grads[2:]:
        opt.apply(g, packed.variables_by_member_order, lr)
    restored, ropt, rcheckpoint = build()
    rcheckpoint.read(path).assert_consumed()
    assert int(ropt.iterations.numpy()) == 2
    for g in grads[2:]:
        ropt.apply(g, restored.variables_by_member_order, lr)
    for a, b in zip(packed.variables_by_member_order + tuple(opt.momentums + opt.velocities),
                    restored.variables_by_member_order + tuple(ropt.momentums + ropt.velocities), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_unpack_slots_into_lets_a_member_continue_unpacked(kind):
    make = (lambda: keras.optimizers.SGD(0.05, momentum=0.9)) if kind == "sgd" else \
        (lambda: keras.optimizers.Adam(1e-3))
    members = [models.build_model("mnist1d_mlp", (40, 1), 10, seed=i) for i in range(2)]
    packed = pack(members)
    popt = make_packed_optimizer(make(), packed.variables_by_member_order)
    rng = np.random.default_rng(4)
    lr = tf.constant([0.05, 0.05] if kind == "sgd" else [1e-3, 1e-3])
    for _ in range(3):
        popt.apply(_grads(packed, rng), packed.variables_by_member_order, lr)
    # Member 1 continues alone: its weights and slots go into an ordinary model and a fresh optimizer.
    model = models.build_model("mnist1d_mlp", (40, 1), 10, seed=99)
    unpack_into(packed, 1, model)
    opt = make()
    popt.unpack_slots_into(1, opt, model.trainable_variables)
    assert int(opt.iterations.numpy()) == 3
    g = _grads(packed, rng)
    popt.apply(g, packed.variables_by_member_order, lr)
    opt.apply([x[1] for x in g], model.trainable_variables)
    for stacked, own in zip(packed.variables_by_member_order, model.trainable_variables, strict=True):
        np.testing.assert_array_equal(_bits(stacked[1]), _bits(own))


def _one_line_error(fn, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        fn()
    assert "\n" not in str(info.value)


def test_unpackable_optimizers_and_settings_are_refused_in_one_line():
    packed = pack([models.build_model("linear", (40, 1), 10, seed=i) for i in range(2)])
    variables = packed.variables_by_member_order
    cases = [
        (keras.optimizers.RMSprop(), "packed updates exist for keras/clrlab SGD, Adam and AdamW"),
        (keras.optimizers.SGD(clipnorm=1.0), "clipnorm=1.0"),
        (keras.optimizers.Adam(global_clipnorm=2.0), "global_clipnorm=2.0"),
        (keras.optimizers.SGD(use_ema=True), "use_ema=True"),
        (keras.optimizers.SGD(gradient_accumulation_steps=2), "gradient_accumulation_steps=2"),
        (keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), "LossScaleOptimizer"),
    ]
    excluded = keras.optimizers.AdamW()
    excluded.exclude_from_weight_decay(var_names=["bias"])
    cases.append((excluded, "exclude_from_weight_decay"))
    for opt, fragment in cases:
        _one_line_error(lambda opt=opt: make_packed_optimizer(opt, variables), fragment)
    _one_line_error(lambda: make_packed_optimizer(
        [keras.optimizers.SGD(nesterov=True), keras.optimizers.SGD()], variables), "differ in nesterov")
    _one_line_error(lambda: make_packed_optimizer(
        [keras.optimizers.SGD(), keras.optimizers.Adam()], variables), "differ in kind")
    _one_line_error(lambda: make_packed_optimizer([keras.optimizers.SGD()] * 3, variables), "3 optimizers for 2")


def test_settings_read_from_the_optimizer():
    s = optimizer_settings(keras.optimizers.AdamW(1e-3, weight_decay=0.1, beta_1=0.8, beta_2=0.95, epsilon=1e-6,
                                                  amsgrad=True))
    assert s == {"kind": "adam", "nesterov": False, "beta_2": 0.95, "epsilon": 1e-6, "amsgrad": True,
                 "weight_decay": 0.1, "momentum": 0.8}
    schedule = optimizers.SGD(0.1, momentum=lambda step: 0.9, nesterov=True)
    assert optimizer_settings(schedule)["momentum"] is None and optimizer_settings(schedule)["nesterov"]
    variables = pack([models.build_model("linear", (40, 1), 10, seed=0)]).variables_by_member_order
    popt = make_packed_optimizer(schedule, variables)
    assert isinstance(popt, PackedOptimizer) and popt.nesterov
    _one_line_error(lambda: popt.apply([None, None], variables, tf.constant([0.1])), "needs momentum")
