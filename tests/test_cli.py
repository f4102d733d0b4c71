"""clrlab.cli: flag definition and reset, validators (one-line errors, exit 1, nothing written), parsing
into a TrainConfig for both entry points, and the range test's sweep settings."""

from __future__ import annotations

import json

import pytest

from clrlab import cli, range_finder
from clrlab.config import TrainConfig
from conftest import parse_config, run_module, user_lines


def _parse_error(argv, capsys) -> str:
    """The one stderr line of a rejected parse (asserts exit code 1 and exactly one `error: ` line)."""
    try:
        with pytest.raises(SystemExit) as info:
            cli.parse_flags_or_exit(["prog", *argv])
    finally:
        cli.FLAGS.unparse_flags()
    assert info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ----------------------------------------------------------------------------- definition and reset
def test_define_is_idempotent_and_reset_removes_the_flags_and_their_validators():
    cli.reset_flags()
    try:
        cli.define_train_flags()
        cli.define_train_flags()  # a second call is a no-op, not a DuplicateFlagError
        assert "policy" in cli.FLAGS and "bounds_from" in cli.FLAGS
        with pytest.raises(RuntimeError, match="already defined"):
            cli.define_range_test_flags(range_finder.SWEEP_DEFAULTS)  # --epochs means another thing there
        cli.reset_flags()
        assert "policy" not in cli.FLAGS and "dataset" not in cli.FLAGS
        with pytest.raises(RuntimeError, match="No flags defined"):
            cli.config_from_flags()
        cli.define_range_test_flags(range_finder.SWEEP_DEFAULTS)
        assert cli.FLAGS["epochs"].flag_type() == "float" and "policy" not in cli.FLAGS
        cli.FLAGS(["prog", "--steps=20"])  # the training validators went with their flags
        assert cli.FLAGS.steps == 20
    finally:
        cli.reset_flags()


def test_reset_restores_defaults(train_flags):
    train_flags(["prog", "--batch_size=7"])
    assert train_flags.batch_size == 7
    cli.reset_flags()
    cli.define_train_flags()
    train_flags(["prog"])
    assert train_flags.batch_size == 32


# ----------------------------------------------------------------------------- training flags
def test_defaults_parse_into_the_default_config(train_flags):
    config = parse_config(train_flags)
    assert config.logdir.startswith("runs/2")
    assert config == TrainConfig(logdir=config.logdir)


def test_bounds_from_replaces_base_and_max_lr(tmp_path, train_flags):
    path = tmp_path / "range_test.json"
    path.write_text(json.dumps({"base_lr": 0.002, "max_lr": 0.03}))
    config = parse_config(train_flags, f"--bounds_from={path}")
    assert (config.base_lr, config.max_lr, config.bounds_from) == (0.002, 0.03, str(path))


def test_bounds_from_replaces_the_bounds_of_a_preset(tmp_path, train_flags):
    # A preset (a flagfile) sets --base_lr/--max_lr; --bounds_from typed next to it replaces them. Only
    # bounds typed on the command line itself conflict with it (tests/test_range_finder.py).
    path = tmp_path / "range_test.json"
    path.write_text(json.dumps({"base_lr": 0.002, "max_lr": 0.03}))
    cli.parse_flags_or_exit(["prog", "--preset=mnist1d_cnn_triangular", f"--bounds_from={path}",
                             f"--logdir={tmp_path / 'run'}"])
    try:
        config = cli.config_from_flags()
    finally:
        train_flags.unparse_flags()
    assert (config.base_lr, config.max_lr, config.policy, config.model) == (0.002, 0.03, "triangular",
                                                                          "mnist1d_cnn")


BAD_FLAGS = {
    "non-boolean fused_updates": (["--fused_updates=maybe"], "fused_updates"),
    "negative collective_timeout": (["--collective_timeout=-1"], "--collective_timeout"),
    "unknown collective": (["--collective=nccl2"], "--collective"),
    "unknown policy": (["--policy=cosine"], "--policy"),
    "negative base_lr": (["--base_lr=-0.1"], "--base_lr must be >= 0"),
    "inverted bounds": (["--base_lr=0.01", "--max_lr=0.001"], "--max_lr must be greater than --base_lr"),
    "equal bounds": (["--base_lr=0.01", "--max_lr=0.01"], "--max_lr must be greater than --base_lr"),
    "zero step size": (["--step_size=0"], "--step_size must be > 0 steps"),
    "zero step size epochs": (["--step_size_epochs=0"], "--step_size_epochs must be > 0"),
    "both step size flags": (["--step_size=100", "--step_size_epochs=2"], "not both"),
    "gamma zero": (["--policy=exp_range", "--gamma=0"], "--gamma must be in (0, 1]"),
    "gamma above one": (["--policy=exp_range", "--gamma=1.5"], "--gamma must be in (0, 1]"),
    "nan base_lr": (["--base_lr=nan"], "--base_lr must be a finite number"),
    "conflicting scale mode": (["--policy=triangular2", "--scale_mode=iterations"],
                               "--policy=triangular2 implies --scale_mode=cycle"),
    "scale mode for one_cycle": (["--policy=one_cycle", "--scale_mode=cycle"],
                                 "--scale_mode only applies to"),
    "unknown dataset": (["--dataset=imagenet42"], "imagenet42"),
    "missing npz": (["--dataset=npz:/nonexistent/file.npz"], "/nonexistent/file.npz"),
    "unknown model": (["--model=vgg99"], "--model must be one of"),
    "zero epochs": (["--epochs=0"], "epochs"),
    "zero batch": (["--batch_size=0"], "batch_size"),
    "zero steps per loop": (["--steps_per_loop=0"], "steps_per_loop"),
    "negative checkpoint_secs": (["--checkpoint_secs=-1"], "checkpoint_secs"),
    "nan checkpoint_secs": (["--checkpoint_secs=nan"], "--checkpoint_secs must be a finite number"),
    "inf checkpoint_secs": (["--checkpoint_secs=inf"], "--checkpoint_secs must be a finite number"),
    "text checkpoint_secs": (["--checkpoint_secs=often"], "checkpoint_secs"),
    "negative checkpoint_every": (["--checkpoint_every=-1"], "checkpoint_every"),
    "pct_start out of range": (["--policy=one_cycle", "--pct_start=1.0"], "--pct_start must be in (0, 1)"),
    "momentum out of range": (["--momentum=1.5"], "--momentum must be in [0, 1)"),
    "unknown optimizer": (["--optimizer=lbfgs"], "optimizer"),
    "unknown precision": (["--mixed_precision=fp8"], "mixed_precision"),
    "callback lr control on custom loop": (["--lr_control=callback"], "--lr_control=callback needs --trainer"),
    "xla with mirrored": (["--distribute=mirrored", "--jit_compile"], "--jit_compile is not supported"),
    "missing bounds file": (["--bounds_from=/nonexistent/range_test.json"], "no such file"),
    # --cycle_momentum and its bounds
    "non-boolean cycle_momentum": (["--cycle_momentum=maybe"], "cycle_momentum"),
    "nan base_momentum": (["--policy=one_cycle", "--base_momentum=nan"], "--base_momentum must be a finite number"),
    "inf max_momentum": (["--policy=one_cycle", "--max_momentum=inf"], "--max_momentum must be a finite number"),
    "text base_momentum": (["--policy=one_cycle", "--base_momentum=high"], "base_momentum"),
    "negative base_momentum": (["--policy=one_cycle", "--base_momentum=-0.1"], "--base_momentum must be in [0, 1)"),
    "max_momentum of one": (["--policy=one_cycle", "--max_momentum=1"], "--max_momentum must be in [0, 1)"),
    "base above max": (["--policy=one_cycle", "--base_momentum=0.95", "--max_momentum=0.85"],
                       "--base_momentum must be <= --max_momentum. Received: --base_momentum=0.95, "
                       "--max_momentum=0.85"),
    "base above the policy default max": (["--cycle_momentum", "--base_momentum=0.92"],
                                          "Received: --base_momentum=0.92, --max_momentum=0.9"),
    "cycling rmsprop": (["--policy=one_cycle", "--optimizer=rmsprop", "--cycle_momentum"],
                        "--cycle_momentum needs an optimizer with a momentum that can cycle "
                        "(sgd, nesterov, adam, adamw). Received: --optimizer=rmsprop"),
    "cycling constant": (["--policy=constant", "--cycle_momentum"],
                         "--cycle_momentum needs a cyclical policy (triangular, triangular2, exp_range, "
                         "one_cycle). Received: --policy=constant"),
    "cycling piecewise": (["--policy=piecewise", "--lr_values=0.1", "--cycle_momentum"],
                          "Received: --policy=piecewise"),
    "bounds without cycling": (["--policy=triangular", "--base_momentum=0.8"],
                               "--base_momentum=0.8 only apply when momentum cycles"),
    "bounds with nocycle": (["--policy=one_cycle", "--nocycle_momentum", "--max_momentum=0.9"],
                            "--nocycle_momentum."),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_invalid_flag_is_one_line_error_exit_1_and_no_logdir(tmp_path, capsys, train_flags, case):
    argv, needle = BAD_FLAGS[case]
    logdir = tmp_path / "never"
    line = _parse_error([*argv, f"--logdir={logdir}"], capsys)
    assert needle in line, line
    assert not logdir.exists()


def test_unwritable_logdir_is_rejected(tmp_path, capsys, train_flags):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "is not a folder" in _parse_error([f"--logdir={blocker}/sub"], capsys)


def test_malformed_bounds_file_is_rejected(tmp_path, capsys, train_flags):
    bad = tmp_path / "range_test.json"
    bad.write_text("{not json")
    assert "cannot read it as JSON" in _parse_error([f"--bounds_from={bad}", f"--logdir={tmp_path / 'x'}"], capsys)


def test_cycle_momentum_is_a_tristate_boolean(train_flags):
    assert parse_config(train_flags).cycle_momentum is None  # unset: the policy's default
    assert parse_config(train_flags, "--cycle_momentum").cycle_momentum is True
    assert parse_config(train_flags, "--policy=one_cycle", "--nocycle_momentum").cycle_momentum is False
    config = parse_config(train_flags, "--policy=one_cycle", "--base_momentum=0.8", "--max_momentum=0.99")
    assert (config.cycle_momentum, config.momentum_cycle()) == (None, (0.8, 0.99))
    # one_cycle's default does not cycle rmsprop (which has no momentum variable), so it still runs
    assert parse_config(train_flags, "--policy=one_cycle", "--optimizer=rmsprop").momentum_cycle() is None
    assert parse_config(train_flags, "--cycle_momentum", "--base_momentum=0", "--max_momentum=0").momentum_cycle() \
        == (0.0, 0.0)


# ----------------------------------------------------------------------------- --policy=piecewise
BAD_PIECEWISE = {
    "no values": (["--policy=piecewise"], "needs --lr_values"),
    "too few values": (["--policy=piecewise", "--lr_boundaries=10,20", "--lr_values=0.1,0.01"],
                       "one more entry than --lr_boundaries. Received: 2 values, 2 boundaries"),
    "too many values": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=0.1,0.01,0.001"],
                        "3 values, 1 boundaries"),
    "zero boundary": (["--policy=piecewise", "--lr_boundaries=0", "--lr_values=0.1,0.01"],
                      "--lr_boundaries must be increasing whole numbers of steps > 0"),
    "decreasing boundaries": (["--policy=piecewise", "--lr_boundaries=20,10", "--lr_values=1,2,3"],
                              "Received: 20,10."),
    "repeated boundary": (["--policy=piecewise", "--lr_boundaries=10,10", "--lr_values=1,2,3"], "increasing"),
    "fractional boundary": (["--policy=piecewise", "--lr_boundaries=1e4", "--lr_values=1,2"], "whole numbers"),
    "text value": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=0.1,fast"],
                   "--lr_values must be finite learning rates > 0"),
    "nan value": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=0.1,nan"], "finite"),
    "inf value": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=inf,0.1"], "finite"),
    "zero value": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=0.1,0"], "> 0"),
    "negative value": (["--policy=piecewise", "--lr_boundaries=10", "--lr_values=0.1,-0.01"], "> 0"),
    "values for another policy": (["--policy=triangular", "--lr_values=0.1"], "only apply to --policy=piecewise"),
    "boundaries for another policy": (["--lr_boundaries=10"], "only apply to --policy=piecewise"),
}


@pytest.mark.parametrize("case", sorted(BAD_PIECEWISE))
def test_piecewise_flag_errors_are_one_line_exit_1(tmp_path, capsys, train_flags, case):
    argv, needle = BAD_PIECEWISE[case]
    line = _parse_error([*argv, f"--logdir={tmp_path / 'never'}"], capsys)
    assert needle in line, line
    assert not (tmp_path / "never").exists()


def test_piecewise_flags_parse_and_ignore_the_cycle_bounds(train_flags):
    from clrlab.config import flagfile_text

    # --base_lr > --max_lr: bounds the cyclical policies would reject.
    config = parse_config(train_flags, "--policy=piecewise", "--lr_boundaries=60000, 65000",
                          "--lr_values=1e-3,1e-4,1e-5", "--base_lr=0.5", "--max_lr=0.1")
    assert config.lr_boundaries == (60_000, 65_000) and config.lr_values == (1e-3, 1e-4, 1e-5)
    assert "--lr_boundaries=60000,65000\n" in flagfile_text(config)
    assert "--lr_values=0.001,0.0001,1e-05\n" in flagfile_text(config)
    one_stage = parse_config(train_flags, "--policy=piecewise", "--lr_values=0.02")
    assert one_stage.lr_boundaries == () and one_stage.lr_values == (0.02,)
    default = parse_config(train_flags)
    assert default.lr_boundaries == () and default.lr_values == ()
    assert "lr_boundaries" not in flagfile_text(default) and "lr_values" not in flagfile_text(default)


# ----------------------------------------------------------------------------- range test flags
def test_range_test_config_holds_the_data_model_settings_and_its_own_logdir(range_test_flags):
    config = parse_config(range_test_flags, "--batch_size=64", "--model=mlp", "--optimizer=adam",
                          "--epochs=2.5", "--steps_per_loop=4")
    assert config.logdir.startswith("runs/range_test-2")
    # --epochs is the sweep's length here, not the training length: the config keeps the default.
    assert config == TrainConfig(batch_size=64, model="mlp", optimizer="adam", steps_per_loop=4,
                                 logdir=config.logdir)


def test_sweep_options_from_flags_are_the_parsed_sweep_flags(range_test_flags):
    range_test_flags(["prog", "--sweep=exponential", "--steps=60", "--eval_every=10", "--beta=0.9", "--repeats=3"])
    try:
        options = cli.sweep_options_from_flags()
    finally:
        range_test_flags.unparse_flags()
    assert options == {"sweep": "exponential", "start_lr": None, "end_lr": None, "steps": 60, "epochs": None,
                       "eval_every": 10, "smoother": "ema_debiased", "beta": 0.9, "divergence_factor": 4.0,
                       "step_size_epochs": 4.0, "repeats": 3}


def test_sweep_options_need_the_range_test_flags(train_flags):
    train_flags(["prog"])
    try:
        with pytest.raises(RuntimeError, match="range test flags are not defined"):
            cli.sweep_options_from_flags()
    finally:
        train_flags.unparse_flags()


@pytest.mark.parametrize("args,needle", [
    (["--start_lr=0.1", "--end_lr=0.01"], "--end_lr must be greater than --start_lr"),
    (["--sweep=exponential", "--end_lr=1e-7"], "Received: --start_lr=1e-06, --end_lr=1e-07"),  # vs the default
    (["--start_lr=0"], "--start_lr must be > 0"),
    (["--steps=5"], "--steps must be >= 10"),
    (["--steps=100", "--epochs=2"], "not both"),
    (["--epochs=0"], "--epochs must be > 0"),
    (["--beta=1"], "--beta must be in [0, 1)"),
    (["--divergence_factor=1"], "--divergence_factor must be > 1"),
    (["--start_lr=nan"], "--start_lr must be a finite number"),
    (["--sweep=cosine"], "sweep"),
    (["--model=vgg99"], "--model must be one of"),
])
def test_range_test_rejects_bad_values_in_one_line(tmp_path, capsys, range_test_flags, args, needle):
    line = _parse_error([*args, f"--logdir={tmp_path / 'x'}"], capsys)
    assert needle in line, line
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- through the entry point
@pytest.mark.slow
def test_cli_bad_flag_subprocess_prints_one_line_and_touches_nothing(tmp_path):
    logdir = tmp_path / "untouched"
    proc = run_module("clrlab.train", "--base_lr=0.01", "--max_lr=0.001", f"--logdir={logdir}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--max_lr" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not logdir.exists()


def test_help_states_units():
    proc = run_module("clrlab.train", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for needle in ("HALF a cycle", "epochs", "--gamma", "per STEP", "--steps_per_loop", "--cycle_momentum",
                   "ON for --policy=one_cycle", "0.85 for one_cycle", "0.95 for one_cycle", "0.8 for the CLR modes",
                   "0.9 for the CLR modes", "constant SGD/RMSprop momentum", "Seconds (wall clock) between checkpoints",
                   "0: at every epoch end"):
        assert needle in text, needle


def test_checkpoint_secs_parses_into_the_config_and_its_flag_file(train_flags):
    from clrlab import config as config_lib

    assert parse_config(train_flags).checkpoint_secs == config_lib.DEFAULT_CHECKPOINT_SECS
    config = parse_config(train_flags, "--checkpoint_secs=2.5", "--checkpoint_every=0")
    assert (config.checkpoint_secs, config.checkpoint_every) == (2.5, 0)
    text = config_lib.flagfile_text(config)
    assert "--checkpoint_secs=2.5" in text.splitlines() and "--checkpoint_every=0" in text.splitlines()
    assert parse_config(train_flags, "--checkpoint_secs=0").checkpoint_secs == 0.0
