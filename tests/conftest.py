"""Shared test helpers: run the command line in a subprocess, filter TensorFlow's start-up chatter,
read TensorBoard events with TensorBoard's own reader, and keep global Keras state isolated."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
    import numpy as np

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
