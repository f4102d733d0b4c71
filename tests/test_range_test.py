"""The LR range test (issue 6): the sweep through the training step, exact restore, outputs, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import read_scalars, run_module, user_lines


@pytest.mark.slow
def test_command_line_writes_outputs_and_bounds_round_trip_into_training(tmp_path):
    logdir = tmp_path / "rt"
    proc = run_module("clrlab.range_test", "--sweep=exponential", "--steps=60", "--start_lr=1e-4",
                      "--end_lr=1", "--eval_every=10", f"--logdir={logdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m clrlab.train" in proc.stdout and "--bounds_from=" in proc.stdout
    assert (logdir / "range_test.png").stat().st_size > 10_000
    result = json.loads((logdir / "range_test.json").read_text())
    for key in ("lrs", "loss_raw", "loss_smooth", "accuracy", "suggestions", "base_lr", "max_lr", "rule",
                "stopped_early", "reason", "command", "eval"):
        assert key in result, key
    assert 0 < result["base_lr"] < result["max_lr"]
    assert len(result["eval"]["accuracy"]) >= 1
    lrs = read_scalars(str(logdir / "range_test"), "learning_rate")
    assert len(lrs) == len(result["lrs"]) or result["stopped_early"]
    np.testing.assert_allclose([lrs[i] for i in range(len(result["lrs"]))], result["lrs"], rtol=1e-6)
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(logdir / "range_test"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert "range_test" in acc.Tags()["tensors"]  # the plot as an image summary

    # --bounds_from hands the bounds to training.
    from clrlab import cli
    cli.FLAGS.unparse_flags()
    try:
        cli.FLAGS(["prog", f"--bounds_from={logdir / 'range_test.json'}", f"--logdir={tmp_path / 'train'}"])
        config = cli.config_from_flags()
    finally:
        cli.FLAGS.unparse_flags()
    assert (config.base_lr, config.max_lr) == (result["base_lr"], result["max_lr"])


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--start_lr=0.1", "--end_lr=0.01"], "--end_lr"),
    (["--steps=5"], "--steps"),
    (["--steps=100", "--epochs=2"], "not both"),
    (["--sweep=cosine"], "sweep"),
])
def test_command_line_rejects_bad_values_in_one_line(tmp_path, args, needle):
    proc = run_module("clrlab.range_test", *args, f"--logdir={tmp_path / 'x'}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


def test_bounds_from_rejects_malformed_json(tmp_path):
    from clrlab import cli

    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"base_lr": 0.1, "max_lr": 0.01}))
    with pytest.raises(ValueError, match="0 < base_lr < max_lr"):
        cli.read_bounds(str(bad))
    bad.write_text(json.dumps({"lrs": []}))
    with pytest.raises(ValueError, match="base_lr"):
        cli.read_bounds(str(bad))
