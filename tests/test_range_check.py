"""scripts/range_check.py: the follow-up bookkeeping (mean over training seeds, the JSON-lines cache).

No training here: ``_train`` is replaced by a deterministic fake, so the tests check what is averaged and
what is reused, in-process. The check itself trains for minutes (BENCHMARKS.md, range-test section).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from conftest import ROOT

_spec = importlib.util.spec_from_file_location("clrlab_range_check_script", os.path.join(ROOT, "scripts",
                                                                                          "range_check.py"))
range_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(range_check)


def _fake_train(calls):
    def train(dataset, model, seed, base_lr, max_lr, epochs, root):
        calls.append((dataset, model, seed, base_lr, max_lr, epochs))
        return 0.9 + 0.01 * seed
    return train


def test_mean_over_training_seeds(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(range_check, "_train", _fake_train(calls))
    runs = range_check.FollowUps("digits", "mlp", 6, str(tmp_path))
    mean, accs = runs.mean([1, 2, 3], 0.01, 0.03)
    assert accs == [0.91, 0.92, 0.93] and abs(mean - 0.92) < 1e-12
    assert [c[2] for c in calls] == [1, 2, 3]
    runs.mean([1, 2], 0.01, 0.03)  # known in-process: not trained again
    assert len(calls) == 3


def test_cache_is_reused_across_processes_and_keyed_by_setup(monkeypatch, tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    calls = []
    monkeypatch.setattr(range_check, "_train", _fake_train(calls))
    range_check.FollowUps("digits", "mlp", 6, str(tmp_path), cache).mean([1, 2], 0.01, 0.03)
    with open(cache) as f:
        assert len([json.loads(line) for line in f]) == 2
    # A new process (a new FollowUps) reads the cache: the same runs are not trained again; the bounds are
    # matched to 6 significant digits (a grid pair printed and parsed back is the same pair).
    again = range_check.FollowUps("digits", "mlp", 6, str(tmp_path), cache)
    assert again.mean([1, 2], 0.01 * (1 + 1e-9), 0.03)[1] == [0.91, 0.92]
    assert len(calls) == 2
    # Another model, epoch count or seed is another run.
    range_check.FollowUps("digits", "small_cnn", 6, str(tmp_path), cache).accuracy(1, 0.01, 0.03)
    range_check.FollowUps("digits", "mlp", 8, str(tmp_path), cache).accuracy(1, 0.01, 0.03)
    again.accuracy(3, 0.01, 0.03)
    assert [c[1:3] + (c[5],) for c in calls[2:]] == [("small_cnn", 1, 6), ("mlp", 1, 8), ("mlp", 3, 6)]


def test_a_failed_run_counts_as_zero_and_is_not_cached(monkeypatch, tmp_path):
    cache = str(tmp_path / "cache.jsonl")
    calls = []

    def failing(*args):
        calls.append(args)
        raise range_check._Failed()
    monkeypatch.setattr(range_check, "_train", failing)
    runs = range_check.FollowUps("digits", "mlp", 6, str(tmp_path), cache)
    assert runs.mean([1, 2], 0.01, 0.03) == (0.0, [0.0, 0.0])
    runs.accuracy(1, 0.01, 0.03)  # tried again: a failure is not a result
    assert len(calls) == 3 and not (tmp_path / "cache.jsonl").exists()


def test_numpy_scalar_bounds_reach_train_config_as_floats(monkeypatch, tmp_path):
    # TrainConfig's flagfile writer compares each value with (): a numpy scalar there raises ValueError.
    import numpy as np

    from clrlab import train
    seen = {}

    def fake_run(config, progress):
        seen["bounds"] = (config.base_lr, config.max_lr)
        raise RuntimeError("stop here")
    monkeypatch.setattr(train, "run", fake_run)
    with pytest.raises(range_check._Failed):
        range_check._train("digits", "mlp", 1, np.float64(0.01), np.float32(0.03), 6, str(tmp_path))
    assert [type(v) for v in seen["bounds"]] == [float, float]


@pytest.mark.parametrize("argv, says", [
    (["--seeds=1,x"], "--seeds must be comma-separated integers"),
    (["--seeds=-1"], "--seeds must be >= 0"),
    (["--grid=0.1,0"], "--grid values must be finite and > 0"),
    (["--grid=a"], "--grid must be comma-separated"),
    (["--epochs=0"], "--epochs must be >= 1"),
    (["--train_seeds=-2"], "--train_seeds must be >= 0"),
])
def test_a_bad_value_is_one_line_and_exit_1_before_any_training(monkeypatch, capsys, argv, says):
    calls = []
    monkeypatch.setattr(range_check, "_train", _fake_train(calls))
    assert range_check.main(["--setup=digits_mlp_exp", *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {says}") and not calls
