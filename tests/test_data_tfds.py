"""clrlab.data.readers.tfds (tfds:NAME): the glue, with a stand-in module (no tfds in CI)."""

import sys
import types

import numpy as np
import pytest

from clrlab import data
from clrlab.data.readers import tfds as tfds_reader
from helpers_data import assert_one_line


def test_tfds_not_installed(monkeypatch):
    monkeypatch.setattr(tfds_reader, "available", lambda: False)
    for call in (lambda: data.validate_spec("tfds:cifar100"), lambda: data.load("tfds:cifar100")):
        with pytest.raises(data.DataError) as err:
            call()
        assert "pip install clrlab[tfds]" in assert_one_line(err)


def test_tfds_glue_with_a_fake_module(monkeypatch):
    """A stand-in with tfds.load's return shapes exercises the glue."""
    rng = np.random.default_rng(0)
    fake = types.ModuleType("tensorflow_datasets")
    label = types.SimpleNamespace(names=["x", "y"])
    info = types.SimpleNamespace(features={"label": label})
    fake.load = lambda name, **kw: ({"train": (rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8),
                                               np.arange(10) % 2)}, info)
    fake.as_numpy = lambda t: t
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    s = data.load("tfds:toy", validation_split=0.2)
    assert (len(s.x_train), len(s.x_test)) == (8, 2) and s.class_names == ("x", "y") and s.name == "tfds:toy"
    with pytest.raises(data.DataError) as err:
        data.load("tfds:")
    assert "names no dataset" in assert_one_line(err)
