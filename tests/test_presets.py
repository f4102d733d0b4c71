"""The presets in flags/.

Every preset parses (absl --flagfile, in process) into a valid TrainConfig that holds its source's
settings and round-trips through flags.txt, and trains a couple of steps with --steps/--batch_size
overridden. The datasets are tiny fakes written in the REAL formats (pickled CIFAR-10 batches,
mnist.npz, Fashion-MNIST IDX files) into a temporary Keras cache (KERAS_HOME); no download is tried.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
import pytest

from clrlab import config as config_lib
from clrlab import data, job
from clrlab import train as train_mod
from conftest import ROOT, parse_config
from helpers_data import IDX_FILES, tiny_mnist, write_cifar_folder, write_idx

PRESET_DIR = os.path.join(ROOT, "flags")
PRESETS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(PRESET_DIR, "*.cfg")))
TRAIN_SIZE = {"cifar10": 50_000, "mnist": 60_000, "fashion_mnist": 60_000, "digits": 1437, "mnist1d": 4000}

# The settings each preset must hold (from the source named in its header).
EXPECTED = {
    "cifar10_minigooglenet_triangular.cfg": dict(
        dataset="cifar10", model="minigooglenet", policy="triangular", base_lr=1e-7, max_lr=1e-2,
        step_size_epochs=8.0, epochs=96, steps=None, batch_size=64, optimizer="sgd", momentum=0.9,
        weight_decay=5e-4, augment=True, normalization="mean"),
    "cifar10_minigooglenet_triangular2.cfg": dict(
        dataset="cifar10", model="minigooglenet", policy="triangular2", base_lr=1e-7, max_lr=1e-2,
        step_size_epochs=8.0, epochs=96, steps=None, batch_size=64, optimizer="sgd", momentum=0.9,
        weight_decay=5e-4, augment=True, normalization="mean"),
    "clr_paper_cifar10_fixed.cfg": dict(
        dataset="cifar10", model="small_cnn", policy="piecewise", lr_boundaries=(60_000, 65_000),
        lr_values=(1e-3, 1e-4, 1e-5), steps=70_000, batch_size=100, momentum=0.9, augment=False),
    "clr_paper_cifar10_triangular2.cfg": dict(
        dataset="cifar10", model="small_cnn", policy="triangular2", base_lr=0.001, max_lr=0.006,
        step_size=2000, steps=25_000, batch_size=100, momentum=0.9, augment=False),
    "clr_paper_cifar10_exp_range.cfg": dict(
        dataset="cifar10", model="small_cnn", policy="exp_range", base_lr=0.001, max_lr=0.006,
        step_size=2000, gamma=0.99994, steps=42_000, batch_size=100, momentum=0.9, augment=False),
    "superconvergence_resnet56.cfg": dict(
        dataset="cifar10", model="resnet56", policy="triangular", base_lr=0.1, max_lr=3.0, step_size=5000,
        steps=10_000, batch_size=1000, optimizer="sgd", weight_decay=1e-4,
        cycle_momentum=True, base_momentum=0.85, max_momentum=0.95),  # Smith 2018 (arXiv 1803.09820), section 4
    "quick_digits.cfg": dict(dataset="digits"),
    "quick_cifar10.cfg": dict(dataset="cifar10"),
    "quick_mnist.cfg": dict(dataset="mnist"),
    "quick_fashion_mnist.cfg": dict(dataset="fashion_mnist"),
    "mnist1d_cnn_baseline.cfg": dict(dataset="mnist1d", model="mnist1d_cnn", policy="constant", base_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none", augment=False),
    "mnist1d_mlp_baseline.cfg": dict(dataset="mnist1d", model="mnist1d_mlp", policy="constant", base_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none", augment=False),
    "mnist1d_linear_baseline.cfg": dict(dataset="mnist1d", model="linear", policy="constant", base_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none", augment=False),
    "mnist1d_cnn_triangular.cfg": dict(dataset="mnist1d", model="mnist1d_cnn", policy="triangular",
        base_lr=0.001, max_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none"),
    "mnist1d_cnn_triangular2.cfg": dict(dataset="mnist1d", model="mnist1d_cnn", policy="triangular2",
        base_lr=0.001, max_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none"),
    "mnist1d_cnn_exp_range.cfg": dict(dataset="mnist1d", model="mnist1d_cnn", policy="exp_range",
        base_lr=0.001, max_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none"),
    "mnist1d_cnn_one_cycle.cfg": dict(dataset="mnist1d", model="mnist1d_cnn", policy="one_cycle",
        base_lr=0.001, max_lr=0.01,
        steps=8000, batch_size=100, optimizer="adam", weight_decay=0.0, normalization="none"),
}

# LR at chosen steps of the full-size runs: {step: lr} (float64 references).
_TUTORIAL_S = 8 * (50_000 // 64)  # 6248 steps, the tutorial's STEP_SIZE * len(trainX) // BATCH_SIZE
EXPECTED_LR = {
    "cifar10_minigooglenet_triangular.cfg": {0: 1e-7, _TUTORIAL_S: 1e-2, 2 * _TUTORIAL_S: 1e-7,
                                             5 * _TUTORIAL_S: 1e-2},
    "cifar10_minigooglenet_triangular2.cfg": {_TUTORIAL_S: 1e-2, 3 * _TUTORIAL_S: 1e-7 + (1e-2 - 1e-7) / 2,
                                              5 * _TUTORIAL_S: 1e-7 + (1e-2 - 1e-7) / 4},
    "clr_paper_cifar10_fixed.cfg": {0: 1e-3, 59_999: 1e-3, 60_000: 1e-4, 64_999: 1e-4, 65_000: 1e-5,
                                    69_999: 1e-5},
    "clr_paper_cifar10_triangular2.cfg": {0: 0.001, 2000: 0.006, 4000: 0.001, 6000: 0.0035},
    "clr_paper_cifar10_exp_range.cfg": {0: 0.001, 2000: 0.001 + 0.005 * 0.99994 ** 2000,
                                        6000: 0.001 + 0.005 * 0.99994 ** 6000},
    "superconvergence_resnet56.cfg": {0: 0.1, 2500: 1.55, 5000: 3.0, 9999: 0.1 + 2.9 / 5000},
    "mnist1d_cnn_baseline.cfg": {0: 0.01, 7999: 0.01},
    "mnist1d_cnn_triangular.cfg": {0: 1e-3, 400: 1e-2, 800: 1e-3},
    "mnist1d_cnn_triangular2.cfg": {400: 1e-2, 1200: 1e-3 + 9e-3 / 2, 2000: 1e-3 + 9e-3 / 4},
    "mnist1d_cnn_exp_range.cfg": {0: 1e-3, 400: 1e-3 + 9e-3 * 0.99971 ** 400, 7600: 1e-3 + 9e-3 * 0.99971 ** 7600},
    "mnist1d_cnn_one_cycle.cfg": {0: 1e-3, 2400: 1e-2},
}
# Momentum at chosen steps of the presets that cycle it: {step: momentum}; every other preset keeps it constant.
EXPECTED_MOMENTUM = {
    "superconvergence_resnet56.cfg": {0: 0.95, 2500: 0.9, 5000: 0.85, 9999: 0.95 - 0.1 / 5000},
    # one_cycle cycles Adam's beta_1 by default (PyTorch OneCycleLR's 0.95 -> 0.85 -> 0.95).
    "mnist1d_cnn_one_cycle.cfg": {0: 0.95, 2400: 0.85},
}


def preset_path(name: str) -> str:
    return os.path.join(PRESET_DIR, name)


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    """A Keras cache holding tiny CIFAR-10 / MNIST / Fashion-MNIST copies in their real formats."""
    home = tmp_path_factory.mktemp("keras_home")
    datasets = home / "datasets"
    write_cifar_folder(str(datasets / "cifar-10-batches-py"))  # 5 x 2 train images, 3 test, python-2 pickles
    rng = np.random.default_rng(4)
    xtr, ytr, xte, yte = tiny_mnist(rng, n_train=12, n_test=4)
    np.savez(datasets / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    (datasets / "fashion-mnist").mkdir()
    for name, array in zip(IDX_FILES, tiny_mnist(rng, n_train=12, n_test=4), strict=True):
        write_idx(datasets / "fashion-mnist" / f"{name}.gz", array)
    return home


@pytest.fixture
def offline(fake_cache, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(fake_cache))

    import keras

    def no_download():
        raise AssertionError("a preset test tried to download a dataset")

    for name in ("cifar10", "mnist", "fashion_mnist"):
        monkeypatch.setattr(getattr(keras.datasets, name), "load_data", no_download)
    return fake_cache


def test_every_expected_preset_exists():
    assert PRESETS == sorted(EXPECTED)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_into_its_sources_config_and_round_trips(name, tmp_path, train_flags):
    text = open(preset_path(name), encoding="utf-8").read()
    header = [line for line in text.splitlines() if line.startswith("#")]
    body = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert text.startswith("# Source:")
    for needle in ("# Source:", "# Reproduces:", "# Expected runtime:", "# Compare with:"):
        assert any(line.startswith(needle) for line in header), f"{name} lacks {needle!r}"
    assert all(line.startswith("--") for line in body), body  # absl flagfiles: one --flag per line
    assert not any(line.startswith(("--logdir", "--nologdir")) for line in body), "presets leave --logdir default"

    config = parse_config(train_flags, f"--flagfile={preset_path(name)}")
    assert isinstance(config, config_lib.TrainConfig) and config.logdir.startswith("runs" + os.sep)
    for field, want in EXPECTED[name].items():
        assert getattr(config, field) == want, (name, field)
    # The run's flags.txt reproduces the preset exactly (list flags as --lr_boundaries=60000,65000).
    flags_txt = tmp_path / "flags.txt"
    flags_txt.write_text(config_lib.flagfile_text(config))
    assert parse_config(train_flags, f"--flagfile={flags_txt}") == config
    # The LR policy the job builds from it, at the full-size run's steps per epoch.
    spe = TRAIN_SIZE[config.dataset] // config.batch_size
    schedule, _ = job.make_lr_schedule(config, spe)
    for step, lr in EXPECTED_LR.get(name, {}).items():
        assert float(schedule(step)) == pytest.approx(lr, rel=2e-5), (name, step)
    momentum = job.make_momentum_schedule(config, schedule)
    assert (momentum is not None) == (name in EXPECTED_MOMENTUM), name
    for step, want in EXPECTED_MOMENTUM.get(name, {}).items():
        assert float(momentum(step)) == pytest.approx(want, rel=1e-6), (name, step)


# ResNet-56 only: tracing its training step alone takes ~25 s on 2 shared cores, a third of this file's
# budget. Its preset runs with resnet20 (the same builder with 3 blocks per stage instead of 9); a
# ResNet-56 training step is covered by tests/test_models.py. MiniGoogLeNet keeps its model.
RUN_MODEL = {"superconvergence_resnet56.cfg": "resnet20"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_a_few_steps(name, offline, tmp_path, train_flags):
    # Two steps at batch 4 on tiny fake data in the real format.
    overrides = ["--steps=2", "--batch_size=4", "--steps_per_loop=2", f"--logdir={tmp_path / 'run'}"]
    if name in RUN_MODEL:
        overrides.append(f"--model={RUN_MODEL[name]}")
    config = parse_config(train_flags, f"--flagfile={preset_path(name)}", *overrides)
    preset = parse_config(train_flags, f"--flagfile={preset_path(name)}")
    assert config == dataclasses.replace(preset, steps=2, batch_size=4, steps_per_loop=2, logdir=config.logdir,
                                         model=RUN_MODEL.get(name, preset.model))
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 2
    history = json.load(open(os.path.join(result.logdir, "history.json"), encoding="utf-8"))
    n_train = data.load(config.dataset, normalization="none").x_train.shape[0]
    schedule, _ = job.make_lr_schedule(config, n_train // 4)
    np.testing.assert_array_equal(np.float32(history["steps"]["lr"]), np.float32(schedule(np.arange(2))))
    assert np.isfinite(history["steps"]["loss"]).all()
