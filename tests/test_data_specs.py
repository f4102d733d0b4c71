"""clrlab.data.specs: spec parsing, validate_spec, load's arguments, default_flip; the digits reader."""

import numpy as np
import pytest

from clrlab import data
from helpers_data import assert_one_line


def test_digits_split_shapes_and_determinism():
    s = data.load("digits", normalization="none")
    assert (s.x_train.shape, s.x_test.shape) == ((1437, 8, 8, 1), (360, 8, 8, 1))
    assert s.x_train.dtype == np.float32 and s.y_train.dtype == np.int32
    assert s.input_shape == (8, 8, 1) and s.num_classes == 10 and s.name == "digits"
    assert 0.0 <= s.x_train.min() and s.x_train.max() == 1.0  # /16
    assert np.abs(np.bincount(s.y_test) * 4 - np.bincount(s.y_train)).max() <= 4  # stratified 80/20
    again = data.load("digits", normalization="none")
    np.testing.assert_array_equal(s.x_train, again.x_train)
    np.testing.assert_array_equal(s.y_test, again.y_test)


def test_every_builtin_has_one_record():
    assert data.BUILTIN_DATASETS == tuple(data.DATASETS)
    assert data.DEFAULT_DATASET in data.DATASETS
    assert {"digits", "cifar10", "mnist", "fashion_mnist"} <= set(data.DATASETS)
    for name, record in data.DATASETS.items():
        assert record.name == name and len(record.class_names) >= 2


@pytest.mark.parametrize("spec,fragment", [
    ("cifar100", "unknown dataset"), ("Digits", "did you mean 'digits'"), ("", "empty dataset spec"),
    ("digits:seed=1", "takes no options"),
])
def test_bad_specs(spec, fragment):
    for call in (data.validate_spec, data.load):
        with pytest.raises(data.DataError) as err:
            call(spec)
        assert fragment in assert_one_line(err), spec


def test_validate_spec_is_cheap_and_checks_paths(tmp_path):
    garbage = tmp_path / "x.npz"
    garbage.write_bytes(b"never read by validate_spec")
    data.validate_spec(f"npz:{garbage}")  # does not load
    data.validate_spec("cifar10")  # nothing is looked up or downloaded
    data.validate_spec("digits", data_dir="/does/not/matter")
    with pytest.raises(data.DataError) as err:
        data.validate_spec("cifar10", data_dir=str(tmp_path / "missing"))
    assert "does not exist" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.validate_spec(f"folder:{garbage}")
    assert "image folder not found" in assert_one_line(err)


def test_bad_arguments():
    for kwargs, fragment in [(dict(normalization="zscore"), "normalization"),
                             (dict(validation_split=1.0), "validation_split"),
                             (dict(image_size=(0, 4)), "image_size")]:
        with pytest.raises(data.DataError) as err:
            data.load("digits", **kwargs)
        assert fragment in assert_one_line(err)


def test_default_flip_is_off_for_digits():
    assert not data.default_flip("digits") and not data.default_flip("mnist")
    assert not data.default_flip("tfds:mnist") and not data.default_flip("tfds:emnist/letters")
    assert data.default_flip("cifar10") and data.default_flip("fashion_mnist")
    assert data.default_flip("npz:/x/mnist_like.npz") and data.default_flip("tfds:cifar100")
