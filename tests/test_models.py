"""Tests for clrlab.models: sizes, logits dtype, weight decay, one training step per dtype policy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from clrlab import models

# name -> (input shape, published/expected parameter count with 10 classes, relative tolerance)
EXPECTED_PARAMS = {
    "minigooglenet": ((32, 32, 3), 1.6e6, 0.05),  # PyImageSearch / Zhang et al. Inception-small
    "resnet20": ((32, 32, 3), 0.27e6, 0.03),  # He et al. 2016, Table 6
    "resnet56": ((32, 32, 3), 0.85e6, 0.03),
}
STEP_SHAPES = {
    "small_cnn": (8, 8, 1),
    "mlp": (8, 8, 1),
    "minigooglenet": (32, 32, 3),
    "resnet20": (32, 32, 3),
    "resnet56": (32, 32, 3),
}
POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")


@pytest.fixture
def policy(request):
    """Sets the global dtype policy for one test and restores the previous one afterwards."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(previous)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_published_parameter_counts(name):
    shape, expected, tol = EXPECTED_PARAMS[name]
    model = models.build_model(name, shape, 10, seed=0)
    assert model.count_params() == pytest.approx(expected, rel=tol)
    assert model.name == name
    assert tuple(model.output.shape) == (None, 10)


def test_resnet_uses_parameter_free_option_a_shortcuts():
    model = models.build_model("resnet20", (32, 32, 3), 10)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 19  # 1 stem + 3 stages * 3 blocks * 2: no projection convs
    assert all(layer.kernel_size == (3, 3) for layer in convs)
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 9


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_small_models_adapt_to_input_sizes(shape):
    for name in ("small_cnn", "mlp"):
        model = models.build_model(name, shape, 7)
        logits = model(np.zeros((2, *shape), np.float32))
        assert logits.shape == (2, 7)


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
@pytest.mark.parametrize("name", list(STEP_SHAPES))
def test_one_training_step(name, policy):
    shape = STEP_SHAPES[name]
    batch = 2 if name in ("resnet56", "minigooglenet") else 4
    model = models.build_model(name, shape, 10, weight_decay=1e-4, seed=0)
    logits_layer = model.get_layer("logits")
    assert logits_layer.dtype_policy.name == "float32"
    if policy != "float32":
        assert model.get_layer(index=2).compute_dtype == policy.split("_")[1]  # body runs in half precision
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, size=batch).astype(np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    before = [v.numpy().copy() for v in model.trainable_variables]
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = loss_fn(y, logits) + tf.add_n(model.losses)
        scaled = optimizer.scale_loss(loss) if policy == "mixed_float16" else loss
    grads = tape.gradient(scaled, model.trainable_variables)
    optimizer.apply(grads, model.trainable_variables)
    assert logits.dtype == tf.float32
    assert loss.dtype == tf.float32
    assert np.isfinite(loss.numpy())
    assert all(v.dtype == "float32" for v in model.trainable_variables)  # float32 master weights
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert sum(changed) > len(changed) // 2


def test_weight_decay_is_coupled_l2_on_kernels():
    wd = 1e-3
    model = models.build_model("small_cnn", (8, 8, 1), 10, weight_decay=wd, seed=0)
    kernels = [layer.kernel for layer in model.layers if hasattr(layer, "kernel")]
    assert len(model.losses) == len(kernels) == 5  # 4 convs + logits; no biases, no BN
    expected = 0.5 * wd * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)
    # Its gradient is exactly weight_decay * w (Caffe / PyTorch SGD weight_decay).
    kernel = kernels[0]
    with tf.GradientTape() as tape:
        reg = tf.add_n(model.losses)
    np.testing.assert_allclose(tape.gradient(reg, kernel).numpy(), wd * kernel.numpy(), rtol=1e-5)
    assert models.build_model("small_cnn", (8, 8, 1), 10).losses == []


def test_seed_makes_weights_reproducible_and_layers_distinct():
    a = models.build_model("resnet20", (32, 32, 3), 10, seed=3)
    b = models.build_model("resnet20", (32, 32, 3), 10, seed=3)
    c = models.build_model("resnet20", (32, 32, 3), 10, seed=4)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.weights[0].numpy(), c.weights[0].numpy())
    same_shape = [l.kernel.numpy() for l in a.layers if l.name in ("stage1_block1_conv1", "stage1_block1_conv2")]
    assert not np.array_equal(*same_shape)  # each layer gets its own seed


def test_auto_model_name_and_auto_build():
    assert models.auto_model_name("digits", (8, 8, 1)) == "small_cnn"
    assert models.auto_model_name("mnist", (28, 28, 1)) == "small_cnn"
    assert models.auto_model_name("cifar10", (32, 32, 3)) == "resnet20"
    assert models.auto_model_name("npz:x.npz", (64, 64, 3)) == "small_cnn"
    model = models.build_model("auto", (8, 8, 1), 10, dataset_name="digits")
    assert model.name == "small_cnn"


def test_bad_arguments():
    with pytest.raises(ValueError, match="resnet56") as err:
        models.build_model("resnet18", (32, 32, 3), 10)
    assert all(n in str(err.value) for n in models.MODEL_NAMES)
    with pytest.raises(ValueError, match="input_shape"):
        models.build_model("small_cnn", (8, 8), 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.build_model("small_cnn", (8, 8, 1), 1)
    with pytest.raises(ValueError, match="weight_decay"):
        models.build_model("small_cnn", (8, 8, 1), 10, weight_decay=-1.0)
    with pytest.raises(ValueError, match="at least"):
        models.build_model("minigooglenet", (4, 4, 1), 10)


def test_saved_model_reloads_without_custom_objects(tmp_path):
    model = models.build_model("resnet20", (16, 16, 3), 10, weight_decay=1e-4, seed=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
