"""clrlab.data.readers.npz (npz:PATH) and, through it, every array check of clrlab.data.splits."""

import numpy as np
import pytest

from clrlab import data
from helpers_data import assert_one_line, write_npz


def test_npz_grayscale_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (8, 5, 4), dtype=np.uint8), y_train=np.arange(8) % 3,
             x_test=rng.integers(0, 256, (3, 5, 4), dtype=np.uint8), y_test=np.array([0, 1, 2]),
             class_names=np.array(["a", "b", "c"]))
    s = data.load(f"npz:{path}", normalization="none")
    assert s.x_train.shape == (8, 5, 4, 1) and s.input_shape == (5, 4, 1)
    assert s.class_names == ("a", "b", "c") and s.name == f"npz:{path}"
    assert s.x_train.max() <= 1.0
    path2 = tmp_path / "f.npz"
    np.savez(path2, x_train=rng.random((4, 3, 3, 2)), y_train=np.array([[0], [1], [1], [0]], np.float32),
             x_test=rng.random((2, 3, 3, 2)), y_test=np.array([1, 0]))
    f = data.load(f"npz:{path2}", normalization="none")
    assert f.num_classes == 2 and f.class_names == ("0", "1") and f.y_train.dtype == np.int32


NPZ_CASES = {
    "missing_arrays": (dict(y_test=None), "lacks y_test"),
    "length_mismatch": (dict(y_train=np.array([0, 1, 0])), "3 labels for 4 images"),
    "wrong_ndim": (dict(x_train=np.zeros((4, 9), np.uint8)), "got shape (4, 9)"),
    "label_out_of_range": (dict(class_names=np.array(["a", "b"]), y_test=np.array([0, 2])), "label 2"),
    "negative_label": (dict(y_train=np.array([0, -1, 0, 1])), "negative"),
    "non_integer_label": (dict(y_train=np.array([0.0, 0.5, 1.0, 1.0])), "non-integer"),
    "one_hot_labels": (dict(y_train=np.eye(2)[[0, 1, 0, 1]]), "one-hot"),
    "nan_pixels": (dict(x_train=np.full((4, 3, 3), np.nan, np.float32)), "NaN"),
    "pixels_over_255": (dict(x_test=np.full((2, 3, 3), 300, np.int32)), "0..255"),
    "shape_mismatch": (dict(x_test=np.zeros((2, 4, 4), np.uint8)), "same image shape"),
    "empty_split": (dict(x_test=np.zeros((0, 3, 3), np.uint8), y_test=np.zeros((0,), np.int64)), "empty"),
    "single_class": (dict(y_train=np.zeros(4, np.int64), y_test=np.zeros(2, np.int64)), "single class"),
    "object_array": (dict(class_names=np.array(["a", None], dtype=object)), "pickles"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
def test_corrupt_npz(tmp_path, case):
    overrides, fragment = NPZ_CASES[case]
    with pytest.raises(data.DataError) as err:
        data.load(write_npz(tmp_path, **overrides))
    assert fragment in assert_one_line(err)


def test_unreadable_and_missing_npz(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    for spec, fragment in {f"npz:{garbage}": "not a valid .npz", f"npz:{tmp_path / 'nope.npz'}": "not found",
                           "npz:": "names no path"}.items():
        with pytest.raises(data.DataError) as err:
            data.load(spec)
        assert fragment in assert_one_line(err), spec
