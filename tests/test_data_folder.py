"""clrlab.data.readers.folder (folder:PATH): one sub-folder per class through image_dataset_from_directory."""

import pytest

from clrlab import data
from helpers_data import assert_one_line, write_pngs


def test_folder_loads_through_image_dataset_from_directory(tmp_path):
    write_pngs(tmp_path / "imgs", ["cat", "dog"], per_class=5, size=(6, 5))
    s = data.load(f"folder:{tmp_path / 'imgs'}", validation_split=0.2, seed=1, normalization="none")
    assert s.class_names == ("cat", "dog") and s.num_classes == 2
    assert s.input_shape == (6, 5, 3)  # the first image's size
    assert len(s.x_train) == 8 and len(s.x_test) == 2
    assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
    write_pngs(tmp_path / "gray", ["a", "b"], per_class=3, size=(4, 4), channels=1)
    g = data.load(f"folder:{tmp_path / 'gray'}", image_size=(8, 8))
    assert g.input_shape == (8, 8, 1)


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    write_pngs(tmp_path / "one", ["only"], per_class=2)
    write_pngs(tmp_path / "hole", ["a"], per_class=2)
    (tmp_path / "hole" / "b").mkdir()
    write_pngs(tmp_path / "corrupt", ["a", "b"], per_class=3)
    (tmp_path / "corrupt" / "b" / "2.png").write_bytes(b"this is not a png")
    cases = {"empty": "no class sub-folders", "one": "only one class", "hole": "has no images",
             "corrupt": "corrupt", "nope": "not found"}
    for folder, fragment in cases.items():
        with pytest.raises(data.DataError) as err:
            data.load(f"folder:{tmp_path / folder}", validation_split=0.5)
        assert fragment in assert_one_line(err), folder
