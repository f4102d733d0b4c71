"""clrlab.data.readers.npz (npz:PATH) and, through it, every array check of clrlab.data.splits."""

import numpy as np
import pytest

from clrlab import data
from conftest import run_module, user_lines
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


def test_zero_size_image_dimension(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load(write_npz(tmp_path, x_train=np.zeros((4, 0, 3), np.uint8), x_test=np.zeros((2, 0, 3), np.uint8)))
    assert "zero-size dimension (4, 0, 3, 1)" in assert_one_line(err)


def _npz_with_header(path, name, header_shape, payload=b"\0" * 16):
    """An .npz whose member ``name`` has a .npy header claiming ``header_shape`` (uint8) over ``payload``."""
    import io
    import zipfile

    arrays = dict(x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.array([0, 1, 0, 1]),
                  x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.array([0, 1]))
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            buffer = io.BytesIO()
            if key == name:
                np.lib.format.write_array_header_1_0(
                    buffer, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
                buffer.write(payload)
            else:
                np.lib.format.write_array(buffer, value)
            archive.writestr(f"{key}.npy", buffer.getvalue())
    return f"npz:{path}"


def test_npz_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    spec = _npz_with_header(tmp_path / "huge.npz", "x_train", (1000, 1000, 1000, 1000))  # 931 GiB of uint8
    with pytest.raises(data.DataError) as err:
        data.load(spec)
    message = assert_one_line(err)
    assert "x_train.npy declares" in message and "931 GiB" in message and "16 bytes" in message
    deflated = tmp_path / "deflated.npz"  # the same check for np.savez_compressed archives
    np.savez_compressed(deflated, x_train=np.zeros((4, 3, 3), np.uint8), y_train=np.array([0, 1, 0, 1]),
                        x_test=np.zeros((2, 3, 3), np.uint8), y_test=np.array([0, 1]))
    assert data.load(f"npz:{deflated}").x_train.shape == (4, 3, 3, 1)


def test_npz_truncated_member_is_named(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load(_npz_with_header(tmp_path / "short.npz", "x_test", (2, 3, 3)))
    assert "x_test.npy declares a uint8 array of shape (2, 3, 3) (18 bytes) but holds 16 bytes" in assert_one_line(err)


@pytest.mark.parametrize("label", [2**31 + 5, 2**32 + 1, 2**63 - 1])
def test_labels_beyond_int32_are_refused_not_wrapped(tmp_path, label):
    with pytest.raises(data.DataError) as err:
        data.load(write_npz(tmp_path, y_train=np.array([0, 1, 0, label], np.int64)))
    assert f"y_train contains label {label}, larger than the largest class id 2147483646" in assert_one_line(err)
    with pytest.raises(data.DataError) as err:
        data.from_arrays("x", np.zeros((2, 3, 3), np.uint8), np.array([0, 1]), np.zeros((1, 3, 3), np.uint8),
                         np.array([label], np.uint64), None)
    assert f"y_test contains label {label}" in assert_one_line(err)


def test_huge_number_of_classes_warns_in_one_line(tmp_path, caplog):
    spec = write_npz(tmp_path, y_train=np.array([0, 1, 0, 1_000_000]))
    with caplog.at_level("WARNING"):
        s = data.load(spec)
    assert s.num_classes == 1_000_001 and s.y_train.dtype == np.int32
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "has 1000001 classes (largest label 1000000, 3 distinct labels occur)" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        data.load(write_npz(tmp_path, y_train=np.array([0, 1, 0, 9]), y_test=np.array([2, 3])))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


@pytest.mark.slow
def test_images_too_small_for_the_model_end_in_one_line_on_the_command_line(tmp_path):
    spec = write_npz(tmp_path, x_train=np.zeros((4, 1, 1), np.uint8), x_test=np.zeros((2, 1, 1), np.uint8))
    proc = run_module("clrlab.train", f"--dataset={spec}", "--epochs=1", "--batch_size=2",
                      f"--logdir={tmp_path / 'run'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert user_lines(proc.stderr) == [
        f"error: --model=small_cnn cannot take {spec}: small_cnn needs inputs of at least 2x2. "
        "Received: input_shape=(1, 1, 1)"]
