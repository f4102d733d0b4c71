"""The LR range test command (`python -m clrlab.range_finder`): the sweep runs the training step, restores
exactly, writes its outputs, and its bounds round-trip into training."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from clrlab import lr_suggest, range_finder
from conftest import parse_config, read_scalars, run_module, user_lines


@pytest.mark.slow
def test_command_line_writes_outputs_and_bounds_round_trip_into_training(tmp_path, train_flags):
    logdir = tmp_path / "rt"
    proc = run_module("clrlab.range_finder", "--sweep=exponential", "--steps=60", "--start_lr=1e-4",
                      "--end_lr=1", "--eval_every=10", f"--logdir={logdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "python -m clrlab.train" in proc.stdout and "--bounds_from=" in proc.stdout
    assert (logdir / "range_test.png").stat().st_size > 10_000
    result = json.loads((logdir / "range_test.json").read_text())
    for key in ("lrs", "loss_raw", "loss_smooth", "loss_trend", "accuracy", "suggestions", "base_lr", "max_lr",
                "rule", "base_rule", "max_rule", "warnings", "stopped_early", "reason", "command", "eval", "setup"):
        assert key in result, key
    assert result["setup"] == {"dataset": "digits", "model": "auto", "batch_size": 32, "optimizer": "sgd"}
    assert 0 < result["base_lr"] < result["max_lr"]
    assert result["max_lr"] / result["base_lr"] >= 3 or result["warnings"]
    assert f"base_lr={result['base_lr']:.3g} ({result['base_rule']})" in proc.stdout
    assert f"max_lr={result['max_lr']:.3g} ({result['max_rule']})" in proc.stdout
    assert len(result["eval"]["accuracy"]) >= 1
    assert not result["stopped_early"] and len(result["lrs"]) == 60  # LR 1 at the end does not diverge here
    lrs = read_scalars(str(logdir / "range_test"), "range_test/learning_rate")
    assert sorted(lrs) == list(range(60))
    np.testing.assert_allclose([lrs[i] for i in range(60)], result["lrs"], rtol=1e-6)
    from tensorboard.backend.event_processing import event_accumulator as ea
    acc = ea.EventAccumulator(str(logdir / "range_test"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    # Every tag in its own range_test/ card (the plot as an image), none of a training run's tags.
    assert set(acc.Tags()["tensors"]) == {"range_test/learning_rate", "range_test/loss", "range_test/accuracy",
                                          "range_test/loss_smooth", "range_test/loss_trend", "range_test/plot"}

    # --bounds_from hands the bounds to training.
    assert f"--bounds_from={logdir / 'range_test.json'}" in result["command_bounds_from"]
    trained = parse_config(train_flags, f"--bounds_from={logdir / 'range_test.json'}",
                           f"--logdir={tmp_path / 'train'}")
    assert (trained.base_lr, trained.max_lr) == (result["base_lr"], result["max_lr"])


@pytest.mark.slow
@pytest.mark.parametrize("args,needle", [
    (["--start_lr=0.1", "--end_lr=0.01"], "--end_lr"),
    (["--steps=5"], "--steps"),
    (["--steps=100", "--epochs=2"], "not both"),
    (["--sweep=cosine"], "sweep"),
    (["--repeats=0"], "--repeats"),
])
def test_command_line_rejects_bad_values_in_one_line(tmp_path, args, needle):
    proc = run_module("clrlab.range_finder", *args, f"--logdir={tmp_path / 'x'}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flags_given,steps_per_epoch,want", [
    ({"sweep": "linear"}, 22, dict(start_lr=1e-4, end_lr=0.1, num_steps=176)),  # 8 epochs, the CLR paper's
    ({"sweep": "linear", "epochs": 0.1}, 22, dict(num_steps=10)),  # at least 10 steps
    ({"sweep": "exponential"}, 22, dict(start_lr=1e-6, end_lr=1.0, num_steps=300)),
    ({"sweep": "exponential", "epochs": 2.0, "start_lr": 1e-5}, 22, dict(start_lr=1e-5, num_steps=44)),
    ({"sweep": "linear", "steps": 90, "eval_every": 9, "beta": 0.5, "smoother": "none"}, 22,
     dict(num_steps=90, eval_every=9, beta=0.5, smoother="none", check_every=3)),
])
def test_sweep_options_fill_the_per_sweep_defaults_and_convert_epochs(flags_given, steps_per_epoch, want):
    options = range_finder.sweep_options(flags_given, steps_per_epoch)
    for field, value in want.items():
        assert getattr(options, field) == value, field


def test_main_builds_the_job_from_the_flags_and_writes_the_outputs(tmp_path, capsys, range_test_flags):
    logdir = tmp_path / "rt"
    range_test_flags(["prog", "--sweep=exponential", "--steps=20", "--start_lr=1e-3", "--end_lr=0.5",
                      "--model=mlp", "--batch_size=64", "--step_size_epochs=2", f"--logdir={logdir}"])
    try:
        assert range_finder.main(["prog"]) == 0
    finally:
        range_test_flags.unparse_flags()
    out = capsys.readouterr().out
    result = json.loads((logdir / "range_test.json").read_text())
    assert (result["dataset"], result["options"]["num_steps"], result["options"]["sweep"]) == ("digits", 20,
                                                                                             "exponential")
    assert len(result["lrs"]) == 20 and (logdir / "range_test.png").exists()
    # The data/model flags reached the job (and the printed train command); the half cycle is the flag's.
    assert result["command"].startswith("python -m clrlab.train --model=mlp --batch_size=64 --policy=triangular")
    assert result["command"].endswith("--step_size_epochs=2")
    assert "Train with them:" in out and result["command"] in out
    # The suggestion names are explained, one line each; the bounds name their rules.
    for name in ("steep", "minimum", "valley", "slide"):
        if result["suggestions"][name] is not None:
            assert f"  {name}: " in out
    assert f"({result['base_rule']})" in out and f"({result['max_rule']})" in out
    # ... and the rules behind the bounds are explained too, one line each.
    helps = lr_suggest.rule_help(result["max_rule"])
    assert helps and all(f"  {line}\n" in out for line in helps)
    assert sum(line.startswith("warning: ") for line in out.splitlines()) == len(result["warnings"])
    assert result["setup"] == {"dataset": "digits", "model": "mlp", "batch_size": 64, "optimizer": "sgd"}


def test_default_logdir_says_it_is_a_range_test(range_test_flags):
    config = parse_config(range_test_flags)
    assert os.path.basename(config.logdir).startswith("range_test-")


def _range_test_json(path, **setup):
    path.write_text(json.dumps({"base_lr": 0.01, "max_lr": 0.04, "model": "mlp",
                                "setup": {"dataset": "digits", "model": "auto", "batch_size": 32, "optimizer": "sgd",
                                          **setup}}))
    return path


@pytest.mark.parametrize("given", [["--base_lr=0.1"], ["--max_lr=0.5"], ["--base_lr=0.001", "--max_lr=0.006"]])
def test_bounds_from_with_explicit_bounds_is_a_one_line_error(tmp_path, capsys, train_flags, given):
    from clrlab import cli

    path = _range_test_json(tmp_path / "range_test.json")
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags_or_exit(["prog", f"--bounds_from={path}", *given])
    train_flags.unparse_flags()
    assert exit_info.value.code == 1
    lines = user_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--bounds_from takes base_lr and max_lr" in lines[0]
    assert all(flag.split("=")[0] in lines[0] for flag in given)


def test_bounds_from_warns_in_one_line_when_the_range_test_had_another_setup(tmp_path, capsys, train_flags):
    path = _range_test_json(tmp_path / "range_test.json", batch_size=128, optimizer="adam")
    config = parse_config(train_flags, f"--bounds_from={path}", "--model=small_cnn")
    assert (config.base_lr, config.max_lr) == (0.01, 0.04)
    lines = user_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("warning: --bounds_from="), lines
    for part in ("model mlp (this run: small_cnn)", "batch_size 128 (this run: 32)", "optimizer adam (this run: sgd)"):
        assert part in lines[0]
    assert "dataset" not in lines[0]


@pytest.mark.parametrize("model", ["auto", "mlp"])  # "auto" and the model it resolved to match
def test_bounds_from_is_silent_when_the_setup_matches(tmp_path, capsys, train_flags, model):
    path = _range_test_json(tmp_path / "range_test.json")
    parse_config(train_flags, f"--bounds_from={path}", f"--model={model}")
    assert user_lines(capsys.readouterr().err) == []


def test_main_reports_a_data_problem_in_one_line(tmp_path, capsys, range_test_flags):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x_train=np.zeros((4, 2, 2)))  # no y_train, x_test, y_test
    range_test_flags(["prog", f"--dataset=npz:{bad}", f"--logdir={tmp_path / 'rt'}"])
    try:
        assert range_finder.main(["prog"]) == 1
    finally:
        range_test_flags.unparse_flags()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.npz" in err[0], err


def test_range_test_runs_on_one_dimensional_mnist1d_signals(tmp_path, capsys, range_test_flags, monkeypatch):
    # MNIST-1D: (40, 1) signals, generated offline into a temporary cache; the 1-D CNN is picked by auto.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    logdir = tmp_path / "rt"
    range_test_flags(["prog", "--dataset=mnist1d:num_samples=300", "--sweep=exponential", "--steps=30",
                      "--start_lr=1e-4", "--end_lr=1",
                      "--optimizer=adam", "--batch_size=50", "--eval_every=5", f"--logdir={logdir}"])
    try:
        assert range_finder.main(["prog"]) == 0
    finally:
        range_test_flags.unparse_flags()
    out = capsys.readouterr().out
    assert "model mnist1d_cnn" in out and "mnist1d" in out
    result = json.loads((logdir / "range_test.json").read_text())
    assert len(result["lrs"]) == 30 and result["base_lr"] * 3 <= result["max_lr"]
    assert (logdir / "range_test.png").stat().st_size > 10_000
    assert sorted(read_scalars(str(logdir / "range_test"), "range_test/loss")) == list(range(30))


def test_repeats_average_the_sweeps_and_record_each_sweeps_bounds(tmp_path):
    from clrlab.config import TrainConfig

    out = range_finder.run(TrainConfig(model="mlp", batch_size=64, logdir=str(tmp_path / "rt")),
                           {"sweep": "exponential", "steps": 20, "start_lr": 1e-3, "end_lr": 0.5, "repeats": 2},
                           progress=False)
    assert out["repeats"] == 2 and len(out["spread"]["base_lr"]) == len(out["spread"]["max_lr"]) == 2
    saved = json.loads((tmp_path / "rt" / "range_test.json").read_text())
    assert saved["spread"] == out["spread"] and saved["base_rule"] == out["base_rule"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_sweep_restores_and_writes_what_was_swept_marked_incomplete(tmp_path, capsys, range_test_flags,
                                                                                 monkeypatch, sig, code):
    from trainers import range_sweep

    real_run_sweep = range_sweep.run_sweep
    seen = {}

    def run_sweep(model, optimizer, *args, stop_requested, **kwargs):
        seen["before"] = [w.copy() for w in model.get_weights()]
        calls = []

        def hook():  # the signal arrives after the third chunk (10 steps each)
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), sig)
            return stop_requested()

        result = real_run_sweep(model, optimizer, *args, stop_requested=hook, **kwargs)
        seen["after"] = model.get_weights()
        return result

    monkeypatch.setattr(range_sweep, "run_sweep", run_sweep)  # range_finder.run imports it when it runs
    logdir = tmp_path / "rt"
    range_test_flags(["prog", "--sweep=exponential", "--steps=300", "--start_lr=1e-3", "--end_lr=0.5",
                      "--model=mlp", "--batch_size=64", f"--logdir={logdir}"])
    try:
        assert range_finder.main(["prog"]) == code
    finally:
        range_test_flags.unparse_flags()
    result = json.loads((logdir / "range_test.json").read_text())
    name = signal.Signals(sig).name
    assert result["complete"] is False and result["incomplete_reason"] == f"interrupted by {name} after 30 of 300 steps"
    assert len(result["lrs"]) == 30 and result["options"]["num_steps"] == 300
    for a, b in zip(seen["after"], seen["before"], strict=True):
        np.testing.assert_array_equal(a, b)  # the model is restored
    assert f"Sweep interrupted by {name}" in capsys.readouterr().out


def test_a_finished_sweep_is_marked_complete(tmp_path, range_test_flags):
    logdir = tmp_path / "rt"
    range_test_flags(["prog", "--sweep=exponential", "--steps=20", "--model=mlp", f"--logdir={logdir}"])
    try:
        assert range_finder.main(["prog"]) == 0
    finally:
        range_test_flags.unparse_flags()
    result = json.loads((logdir / "range_test.json").read_text())
    assert result["complete"] is True and "incomplete_reason" not in result
