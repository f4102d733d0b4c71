"""clrlab.data.readers.mnist1d: generated offline, cached by its arguments, validated spec options."""

import os
import random
import socket

import mnist1d.data
import numpy as np
import pytest

from clrlab import data
from clrlab.data.readers import mnist1d as reader
from helpers_data import assert_one_line

SMALL = "mnist1d:num_samples=300"  # 30 signals per class: 240 train / 60 test


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def generator_calls(monkeypatch):
    """Counts the calls of mnist1d's generator (still running it)."""
    calls = []
    real = mnist1d.data.make_dataset

    def counting(args=None, template=None):
        calls.append(dict(vars(args)))
        return real(args, template)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    return calls


def test_loads_offline_with_shapes_classes_and_train_only_normalisation(tmp_path, no_network):
    none = data.load(SMALL, data_dir=str(tmp_path), normalization="none")
    assert none.name == "mnist1d" and none.class_names == tuple("0123456789") and none.num_classes == 10
    assert none.x_train.shape == (240, 40, 1) and none.x_test.shape == (60, 40, 1) and none.input_shape == (40, 1)
    assert none.x_train.dtype == np.float32 and none.y_train.dtype == np.int32
    assert set(np.unique(none.y_train)) == set(range(10))
    args = mnist1d.data.get_dataset_args()
    args.num_samples = 300
    direct = mnist1d.data.make_dataset(args)  # the package's own arrays, untouched but for the channel axis
    np.testing.assert_array_equal(none.x_train[..., 0], direct["x"].astype(np.float32))
    np.testing.assert_array_equal(none.y_test, direct["y_test"])
    mean = data.load(SMALL, data_dir=str(tmp_path), normalization="mean")
    train_mean = none.x_train.mean(axis=0, dtype=np.float64).astype(np.float32)
    np.testing.assert_allclose(mean.x_train, none.x_train - train_mean, atol=1e-6)
    np.testing.assert_allclose(mean.x_test, none.x_test - train_mean, atol=1e-6)  # train statistics only
    std = data.load(SMALL, data_dir=str(tmp_path), normalization="standardize")
    np.testing.assert_allclose(std.x_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(std.x_train.std(), 1.0, atol=1e-5)


def test_second_load_reads_the_cache(tmp_path, generator_calls, monkeypatch):
    first = data.load(SMALL, data_dir=str(tmp_path))
    assert len(generator_calls) == 1 and generator_calls[0]["num_samples"] == 300
    path = reader.cache_path(reader.parse_options("num_samples=300"), str(tmp_path))
    assert os.path.dirname(path) == str(tmp_path / "mnist1d") and os.path.isfile(path)
    assert os.listdir(tmp_path / "mnist1d") == [os.path.basename(path)]  # no temporary file left behind
    again = data.load(SMALL, data_dir=str(tmp_path))
    assert len(generator_calls) == 1  # read back, not regenerated
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    other = data.load(SMALL + ",seed=7", data_dir=str(tmp_path))  # other arguments, other cache entry
    assert len(generator_calls) == 2 and generator_calls[1]["seed"] == 7
    assert not np.array_equal(other.x_train, first.x_train) and len(os.listdir(tmp_path / "mnist1d")) == 2
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))  # no data_dir: the Keras cache
    data.load(SMALL)
    assert os.path.isfile(reader.cache_path(reader.parse_options("num_samples=300"), None))
    assert reader.cache_path({}, None).startswith(str(tmp_path / "kh" / "datasets" / "mnist1d") + os.sep)


def test_corrupt_cache_entry_is_regenerated(tmp_path, generator_calls):
    path = reader.cache_path(reader.parse_options("num_samples=300"), str(tmp_path))
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"not an npz")
    assert data.load(SMALL, data_dir=str(tmp_path)).x_train.shape == (240, 40, 1)
    assert len(generator_calls) == 1
    data.load(SMALL, data_dir=str(tmp_path))
    assert len(generator_calls) == 1


def test_defaults_are_the_papers_and_the_packages():
    package = mnist1d.data.get_dataset_args(as_dict=True)
    defaults = reader.parse_options("")
    assert defaults == {key: package[key] for key in reader.OPTIONS}
    assert (defaults["num_samples"], defaults["train_split"], defaults["final_seq_length"], defaults["seed"]) == (
        5000, 0.8, 40, 42)  # 4000 train / 1000 test signals of length 40
    assert reader.parse_options("num_samples=10000, seed=7,shuffle_seq=true")["seed"] == 7


def test_global_random_state_is_left_alone(tmp_path):
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.get_state()[1].copy(), random.getstate()
    data.load(SMALL, data_dir=str(tmp_path))
    np.testing.assert_array_equal(np.random.get_state()[1], expected_np)
    assert random.getstate() == expected_py


@pytest.mark.parametrize("options,fragment", [
    ("num_sample=100", "unknown mnist1d option 'num_sample'"),
    ("num_samples=abc", "num_samples must be an integer"),
    ("num_samples=1.5", "num_samples must be an integer"),
    ("num_samples=0", "num_samples must be >= 1"),
    ("train_split=1.0", "train_split must be in (0, 1)"),
    ("train_split=0", "train_split must be in (0, 1)"),
    ("train_split=half", "train_split must be a number"),
    ("seed", "seed has no value"),
    ("seed=1,seed=2", "seed is given twice"),
    ("shuffle_seq=maybe", "shuffle_seq must be true or false"),
    ("num_samples=10,train_split=0.05", "leaves 0 train"),
])
def test_bad_options_are_one_line_errors_naming_the_key(options, fragment, tmp_path):
    for call in (data.validate_spec, lambda spec: data.load(spec, data_dir=str(tmp_path))):
        with pytest.raises(data.DataError) as err:
            call(f"mnist1d:{options}")
        assert fragment in assert_one_line(err)
    assert not (tmp_path / "mnist1d").exists()  # nothing generated


def test_train_dataset_over_signals_and_no_augmentation(tmp_path):
    splits = data.load(SMALL, data_dir=str(tmp_path))
    assert not data.default_flip(splits.name)
    ds = data.train_dataset(splits, 32, seed=0)
    assert ds.element_spec[0].shape == (32, 40, 1)
    for x, y in ds.take(8):  # 7 full batches per epoch: crosses an epoch boundary
        assert x.shape == (32, 40, 1) and y.shape == (32,)
    evaluated = [x.shape[0] for x, _ in data.eval_dataset(splits, 25)]
    assert evaluated == [25, 25, 10]
    with pytest.raises(data.DataError) as err:
        data.train_dataset(splits, 32, seed=0, augment=True)
    assert "1-D data" in assert_one_line(err)
