"""Shared test helpers: run the command line in a subprocess, filter TensorFlow's start-up chatter,
read TensorBoard events with TensorBoard's own reader, define and reset the absl flags around a test,
write tiny datasets in their real file formats, and keep global Keras state isolated."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lines TensorFlow's C++ runtime prints on import whatever the program does (absl pre-init logging).
_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} \d\d:\d\d:\d\d|"
                       r"To enable the following instructions|\s*$)")


def user_lines(stderr: str) -> list[str]:
    """stderr without TensorFlow's own import-time log lines."""
    return [line for line in stderr.splitlines() if not _TF_NOISE.match(line)]


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def run_module(module: str, *args: str, timeout: float = 300, cwd: str | None = None) -> subprocess.CompletedProcess:
    """`python -m module args...` with captured text output."""
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), cwd=cwd or ROOT)


def read_scalars(event_dir: str, tag: str) -> dict[int, float]:
    """{step: value} of a scalar tag, read with TensorBoard's EventAccumulator (last write wins)."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(event_dir, size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    out = {}
    if tag in acc.Tags().get("tensors", []):
        for event in acc.Tensors(tag):
            out[event.step] = float(np.asarray(__import__("tensorflow").make_ndarray(event.tensor_proto)))
    elif tag in acc.Tags().get("scalars", []):
        for event in acc.Scalars(tag):
            out[event.step] = float(event.value)
    else:
        raise KeyError(f"{tag} not in {event_dir}: {acc.Tags()}")
    return out


@pytest.fixture(autouse=True)
def _restore_keras_policy():
    """Tests that switch the global mixed-precision policy must not leak it into other tests."""
    import keras

    before = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(before)


# ----------------------------------------------------------------------------- absl flags
@pytest.fixture
def train_flags():
    """The flags of `python -m clrlab.train`, defined for this test and at their defaults; removed after.

    Tests parse with `FLAGS([...])` or `cli.parse_flags_or_exit([...])`; nothing leaks into the next test.
    """
    from clrlab import cli

    cli.reset_flags()
    cli.define_train_flags()
    yield cli.FLAGS
    cli.reset_flags()


@pytest.fixture
def range_test_flags():
    """The flags of the range test (`python -m clrlab.range_finder`), as `train_flags` does for training."""
    from clrlab import cli, range_finder

    cli.reset_flags()
    cli.define_range_test_flags(range_finder.SWEEP_DEFAULTS)
    yield cli.FLAGS
    cli.reset_flags()


def parse_config(flag_values, *argv: str):
    """absl parse of argv (in process, like the command line) -> `TrainConfig`; the flags are left unparsed."""
    from clrlab import cli

    flag_values.unparse_flags()
    try:
        flag_values(["prog", *argv])
        return cli.config_from_flags()
    finally:
        flag_values.unparse_flags()


# ----------------------------------------------------------------------------- a small trained model
def trained_conv_bn_model(splits, precision="float32", optimizer="sgd"):
    """(model, optimizer): a conv layer, batch norm and a float32 head (what small_cnn has, much smaller),
    trained 5 steps with the custom loop so that slots, iterations, BN statistics and the LR are all
    non-trivial (for the range-test sweep's restore tests)."""
    import keras

    from clrlab import data, schedules
    from trainers.custom_loop import CustomLoopTrainer

    keras.mixed_precision.set_global_policy(precision)  # conftest restores the global policy
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(splits.input_shape), keras.layers.Conv2D(4, 3, padding="same"),
                              keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(splits.num_classes, dtype="float32")])
    inner = (keras.optimizers.SGD(0.01, momentum=0.9) if optimizer == "sgd" else keras.optimizers.Adam(0.001))
    opt = keras.optimizers.LossScaleOptimizer(inner) if precision == "mixed_float16" else inner
    trainer = CustomLoopTrainer(model, opt, schedules.Constant(0.01))
    trainer.train_steps(iter(data.train_dataset(splits, 64, seed=0)), 5)
    return model, opt


def model_state(model, opt) -> list[np.ndarray]:
    """Copies of every model weight and optimizer variable, in order."""
    return [v.numpy().copy() for v in list(model.weights) + list(opt.variables)]
