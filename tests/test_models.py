"""Tests for clrlab.models: sizes, logits dtype, weight decay, one training step per dtype policy, and the
MNIST-1D models against their PyTorch definitions (greydanus/mnist1d notebooks/models.py)."""

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
    "mnist1d_cnn": (40, 1),
    "mnist1d_mlp": (40, 1),
    "linear": (40, 1),
}
# The parameter counts greydanus/mnist1d's models print for (40, 1) inputs and 10 classes.
MNIST1D_PARAMS = {"mnist1d_cnn": 5210, "mnist1d_mlp": 15210, "linear": 410}
# A layer that runs in half precision under a mixed policy (linear has none: Flatten + float32 logits).
HALF_PRECISION_LAYER = {"mnist1d_cnn": "conv1", "mnist1d_mlp": "hidden1", "linear": "flatten"}
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
        body = model.get_layer(HALF_PRECISION_LAYER[name]) if name in HALF_PRECISION_LAYER else model.get_layer(index=2)
        assert body.compute_dtype == policy.split("_")[1]  # body runs in half precision
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
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables, strict=True)]
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
    for va, vb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert not np.array_equal(a.weights[0].numpy(), c.weights[0].numpy())
    names = ("stage1_block1_conv1", "stage1_block1_conv2")
    same_shape = [layer.kernel.numpy() for layer in a.layers if layer.name in names]
    assert not np.array_equal(*same_shape)  # each layer gets its own seed


def test_auto_model_name_and_auto_build():
    assert models.auto_model_name("digits", (8, 8, 1)) == "small_cnn"
    assert models.auto_model_name("mnist", (28, 28, 1)) == "small_cnn"
    assert models.auto_model_name("cifar10", (32, 32, 3)) == "resnet20"
    assert models.auto_model_name("npz:x.npz", (64, 64, 3)) == "small_cnn"
    model = models.build_model("auto", (8, 8, 1), 10, dataset_name="digits")
    assert model.name == "small_cnn"
    assert models.auto_model_name("mnist1d", (40, 1)) == "mnist1d_cnn"
    assert models.auto_model_name("mnist1d:num_samples=500,seed=7", (40, 1)) == "mnist1d_cnn"
    assert models.auto_model_name("npz:x.npz", (100, 3)) == "mnist1d_cnn"  # any (length, channels) input
    model = models.build_model("auto", (40, 1), 10, dataset_name="mnist1d")
    assert model.name == "mnist1d_cnn"
    assert model.count_params() == MNIST1D_PARAMS["mnist1d_cnn"]


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


@pytest.mark.parametrize(
    "name, shape, message",
    [
        ("mnist1d_cnn", (32, 32, 3), r"mnist1d_cnn needs an input_shape of \(length, channels\)\. Received"),
        ("small_cnn", (40, 1), r"small_cnn needs an input_shape of \(H, W, C\)\. Received"),
        ("resnet20", (40, 1), r"resnet20 needs an input_shape of \(H, W, C\)\. Received"),
        ("mnist1d_cnn", (2, 1), r"mnist1d_cnn needs inputs of at least 3\. Received: input_shape=\(2, 1\)"),
        ("linear", (40,), r"input_shape must be \(H, W, C\) or \(length, channels\)"),
        ("mnist1d_mlp", (40, 1, 1, 1), r"input_shape must be"),
        ("mnist1d_mlp", (40, 0), r"positive sizes"),
    ],
)
def test_input_shape_that_does_not_fit_the_model_is_a_clear_error(name, shape, message):
    with pytest.raises(ValueError, match=message) as err:
        models.build_model(name, shape, 10)
    assert "\n" not in str(err.value)


def test_saved_model_reloads_without_custom_objects(tmp_path):
    model = models.build_model("resnet20", (16, 16, 3), 10, weight_decay=1e-4, seed=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MNIST1D_PARAMS))
def test_mnist1d_parameter_counts_match_the_pytorch_source(name):
    model = models.build_model(name, (40, 1), 10, seed=0)
    assert model.count_params() == MNIST1D_PARAMS[name]
    assert model.name == name
    assert model.input.name == "sequences"


def test_mnist1d_cnn_layer_sizes_follow_pytorch_padding():
    model = models.build_model("mnist1d_cnn", (40, 1), 10, seed=0)
    # PyTorch Conv1d(padding=1, stride=2): 40 -> 19 -> 10 -> 5 (Keras "same" would give 20 -> 10 -> 5).
    assert [tuple(model.get_layer(f"conv{i}").output.shape) for i in (1, 2, 3)] == [
        (None, 19, 25), (None, 10, 25), (None, 5, 25)]
    assert [model.get_layer(f"conv{i}").kernel_size for i in (1, 2, 3)] == [(5,), (3,), (3,)]
    assert tuple(model.get_layer("flatten").output.shape) == (None, 125)  # the source's linear_in=125


def _conv1d_torch(x, kernel, bias, stride=2, padding=1):
    """nn.Conv1d's arithmetic in NumPy on channels-last x (B, L, C); kernel (k, C, F) as Keras stores it."""
    xp = np.pad(x, ((0, 0), (padding, padding), (0, 0)))
    k = kernel.shape[0]
    n = (xp.shape[1] - k) // stride + 1
    windows = np.stack([xp[:, i * stride:i * stride + k, :] for i in range(n)], axis=1)  # (B, n, k, C)
    return np.einsum("bnkc,kcf->bnf", windows, kernel) + bias


def _relu(v):
    return np.maximum(v, 0.0)


def _weights(model, layer):
    return [v.numpy().astype(np.float64) for v in model.get_layer(layer).weights]


def test_mnist1d_forward_passes_match_the_pytorch_source():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 40, 1)).astype(np.float32)

    cnn = models.build_model("mnist1d_cnn", (40, 1), 10, seed=0)
    h = x.astype(np.float64)
    for i in (1, 2, 3):
        h = _relu(_conv1d_torch(h, *_weights(cnn, f"conv{i}")))
    kernel, bias = _weights(cnn, "logits")
    np.testing.assert_allclose(cnn(x).numpy(), h.reshape(3, -1) @ kernel + bias, rtol=1e-4, atol=1e-5)

    mlp = models.build_model("mnist1d_mlp", (40, 1), 10, seed=0)
    (w1, b1), (w2, b2), (w3, b3) = (_weights(mlp, n) for n in ("hidden1", "hidden2", "logits"))
    h = _relu(x.reshape(3, 40) @ w1 + b1)
    h = h + _relu(h @ w2 + b2)  # MLPBase.forward: the residual second layer
    np.testing.assert_allclose(mlp(x).numpy(), h @ w3 + b3, rtol=1e-4, atol=1e-5)

    linear = models.build_model("linear", (40, 1), 10, seed=0)
    kernel, bias = _weights(linear, "logits")
    np.testing.assert_allclose(linear(x).numpy(), x.reshape(3, 40) @ kernel + bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MNIST1D_PARAMS))
def test_mnist1d_models_use_pytorch_default_init(name):
    # nn.Linear / nn.Conv1d: weight kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)), bias the same bound.
    model = models.build_model(name, (40, 1), 10, seed=0)
    layers = [layer for layer in model.layers if layer.weights]
    for layer in layers:
        kernel, bias = (v.numpy() for v in layer.weights)
        fan_in = int(np.prod(kernel.shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        for values in (kernel, bias):
            assert np.abs(values).max() <= bound
        assert np.abs(kernel).max() > 0.9 * bound  # uniform up to the bound, not a narrower law
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3.0), rel=0.15)
        assert np.abs(bias).max() > 0.5 * bound  # biases are not zero-initialised (Keras' default)
    first = [v.numpy() for v in models.build_model(name, (40, 1), 10, seed=0).weights]
    for a, b in zip(first, model.weights, strict=True):
        np.testing.assert_array_equal(a, b.numpy())  # seeded
    other = models.build_model(name, (40, 1), 10, seed=1)
    assert not np.array_equal(other.weights[0].numpy(), model.weights[0].numpy())


def test_mnist1d_weight_decay_covers_kernels_only():
    model = models.build_model("mnist1d_cnn", (40, 1), 10, weight_decay=1e-3, seed=0)
    kernels = [layer.kernel for layer in model.layers if hasattr(layer, "kernel")]
    assert len(model.losses) == len(kernels) == 4  # 3 convs + logits
    expected = 0.5 * 1e-3 * sum(float(np.sum(np.square(k.numpy()))) for k in kernels)
    assert float(tf.add_n(model.losses)) == pytest.approx(expected, rel=1e-5)
    assert models.build_model("mnist1d_cnn", (40, 1), 10).losses == []


@pytest.mark.parametrize("policy", POLICIES, indirect=True)
@pytest.mark.parametrize("name", sorted(MNIST1D_PARAMS))
def test_mnist1d_models_output_float32_logits(name, policy):
    model = models.build_model(name, (40, 1), 10, seed=0)
    logits = model(np.random.default_rng(0).normal(size=(5, 40, 1)).astype(np.float32))
    assert tuple(logits.shape) == (5, 10)
    assert logits.dtype == tf.float32
    assert model.count_params() == MNIST1D_PARAMS[name]  # the policy does not change the architecture
