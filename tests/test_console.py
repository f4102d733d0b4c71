"""clrlab.console and the console behaviour of the entry points: quiet TensorFlow logging, grouped
--help for every entry point, presets, one-line validator errors and inapplicable-flag warnings."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from clrlab import cli, console
from conftest import ROOT, parse_config, subprocess_env

NOISE = re.compile(r"I0000|W0000 |cuInit|Sharding callback|All log messages before absl")


def _quiet_env(**extra: str) -> dict[str, str]:
    env = subprocess_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the user's shell does not set it
    env.pop(console.VERBOSE_ENV, None)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or _quiet_env(), cwd=ROOT)


@pytest.mark.slow
def test_training_console_is_quiet_by_default_and_verbose_on_request(tmp_path):
    args = ["-m", "clrlab.train", "--model=mlp", "--steps=12", "--checkpoint_every=5", "--steps_per_loop=5"]
    quiet = _run([*args, f"--logdir={tmp_path / 'quiet'}"])
    assert quiet.returncode == 0, quiet.stderr
    noisy = [line for line in (quiet.stderr + quiet.stdout).splitlines() if NOISE.search(line)]
    assert noisy == []
    assert "test accuracy" in quiet.stdout
    # The end-of-run summary: test accuracy, time, the outputs and the tensorboard command.
    summary = quiet.stdout.strip().splitlines()[-3:]
    assert re.match(r"Done: completed at step 12 in \dm\d\ds; test accuracy \d\.\d{4}, test loss ", summary[0])
    assert summary[1].startswith(f"Outputs in {tmp_path / 'quiet'}: model.keras, history.json"), summary
    assert summary[2] == f"View them: tensorboard --logdir {tmp_path / 'quiet'}"
    loud = _run([*args, f"--logdir={tmp_path / 'loud'}"], env=_quiet_env(CLRLAB_VERBOSE="1"))
    assert loud.returncode == 0, loud.stderr
    assert "Sharding callback" in loud.stderr  # absl INFO per checkpoint is back
    assert "I0000" in loud.stderr  # and TensorFlow's C++ start-up lines


def test_quiet_tensorflow_respects_verbosity_requests(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert not console.verbose_requested(["prog", "--policy=triangular"])
    assert console.verbose_requested(["prog", "--verbosity=0"])
    assert console.verbose_requested(["prog", "-v", "1"])
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.verbose_requested(["prog"])
    assert console.quiet_tensorflow(["prog"]) is False
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    assert not console.verbose_requested(["prog"])


def _help_text(args: list[str]) -> str:
    proc = _run(args, env=_quiet_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


_CONSOLE_SCRIPT = "import sys; from {module} import run_main; sys.argv[0] = '{name}'; run_main()"


def test_help_is_the_same_grouped_list_for_every_train_entry_point():
    by_module = _help_text(["-m", "clrlab.train", "--help"])
    by_script = _help_text(["-c", _CONSOLE_SCRIPT.format(module="clrlab.train", name="clrlab-train"), "--help"])
    short = _help_text(["-m", "clrlab.train", "-h"])
    assert by_module == by_script == short
    for heading in ("data and model:", "learning-rate policy:", "run:", "output:"):
        assert heading in by_module
    assert by_module.index("data and model:") < by_module.index("  --dataset=") < by_module.index("run:")
    assert by_module.index("learning-rate policy:") < by_module.index("  --gamma=") < by_module.index("run:")
    assert by_module.index("output:") < by_module.index("  --logdir=")
    assert "--preset=" in by_module and "cifar10_minigooglenet_triangular" in by_module
    assert "--tpu" not in by_module and "absl.flags" not in by_module  # only clrlab's flags


def test_help_is_the_same_for_every_range_test_entry_point():
    by_module = _help_text(["-m", "clrlab.range_finder", "--help"])
    by_script = _help_text([os.path.join("scripts", "range_test.py"), "-h"])
    by_console = _help_text(["-c", _CONSOLE_SCRIPT.format(module="clrlab.range_finder", name="clrlab-range-test"),
                             "--help"])
    assert by_module == by_script == by_console
    assert "sweep (range test):" in by_module and "  --start_lr=" in by_module
    assert "  --policy=" not in by_module  # the training flags are not defined by the range test


def test_help_lists_each_defined_flag_once(train_flags):
    text = console.format_help("title", list(cli._Defined.names), train_flags)
    for name in cli._Defined.names:
        heads = re.findall(rf"^  --(?:\[no\])?{name}(?:=|$)", text, flags=re.M)
        assert len(heads) == 1, name


def test_validator_error_leads_with_the_message(train_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags_or_exit(["prog", "--base_lr=0.01", "--max_lr=0.001"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --max_lr must be greater than --base_lr."), err
    assert "gamma=" not in err and "bounds_from" not in err  # absl's dump of the checked flags is gone


@pytest.mark.parametrize(("argv", "expected"), [
    (["--policy=one_cycle", "--gamma=0.99", "--step_size_epochs=2"], "--gamma, --step_size_epochs"),
    (["--policy=triangular", "--pct_start=0.4"], "--pct_start"),
    (["--policy=constant", "--base_lr=0.01", "--max_lr=0.1"], "--max_lr"),
])
def test_flags_the_policy_ignores_warn_in_one_line(train_flags, capsys, argv, expected):
    try:
        cli.parse_flags_or_exit(["prog", *argv])
    finally:
        train_flags.unparse_flags()
    lines = capsys.readouterr().err.strip().splitlines()
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings == [f"warning: {expected} {'does' if ',' not in expected else 'do'} not apply to "
                        f"{argv[0]} and {'is' if ',' not in expected else 'are'} ignored."]


def test_flags_that_apply_do_not_warn(train_flags, capsys):
    try:
        cli.parse_flags_or_exit(["prog", "--policy=exp_range", "--gamma=0.997", "--step_size=10"])
    finally:
        train_flags.unparse_flags()
    assert "warning" not in capsys.readouterr().err


def test_preset_parses_to_the_same_config_as_its_flagfile(train_flags):
    name = "cifar10_minigooglenet_triangular"
    by_file = parse_config(train_flags, f"--flagfile={os.path.join(ROOT, 'flags', name + '.cfg')}",
                           "--logdir=/tmp/x")
    argv = console.expand_presets(["prog", f"--preset={name}", "--logdir=/tmp/x"])
    by_preset = parse_config(train_flags, *argv[1:])
    assert by_preset == by_file
    assert by_preset.model == "minigooglenet"


def test_unknown_preset_is_one_line_error(train_flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags_or_exit(["prog", "--preset=nope"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --preset=nope: no such preset. Available: ")
    assert "quick_digits" in err[0]


def test_presets_resolve_from_the_installed_package_folder(tmp_path, monkeypatch):
    # A wheel installs flags/*.cfg as clrlab/presets/*.cfg (pyproject.toml's package-dir); no checkout around.
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        setuptools_cfg = tomllib.load(fh)["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"]["clrlab.presets"] == "flags"
    assert "clrlab.presets" in setuptools_cfg["packages"]
    assert setuptools_cfg["package-data"]["clrlab.presets"] == ["*.cfg"]
    installed = tmp_path / "site-packages" / "clrlab" / "presets"
    installed.mkdir(parents=True)
    (installed / "mine.cfg").write_text("--policy=one_cycle\n")
    monkeypatch.setattr(console, "PRESET_DIRS", (str(installed), str(tmp_path / "no_checkout")))
    assert console.preset_names() == ["mine"]
    assert console.expand_presets(["prog", "--preset", "mine", "--epochs=2"]) == [
        "prog", f"--flagfile={installed / 'mine.cfg'}", "--epochs=2"]


def test_start_up_filter_drops_only_tensorflows_start_up_noise():
    noise = ["WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
             "I0000 00:00:1796119487.747055   10772 port.cc:153] oneDNN custom operations are on.",
             "W0000 00:00:1796119487.747055   10772 cpu.cc:1] something at start-up",
             "E0000 00:00:1796119494.546663   10772 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error",
             "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow", ""]
    kept = ["E0000 00:00:1796119494.546663   10772 gpu_device.cc:9] Could not load dynamic library libcudnn.so.9",
            "F0000 00:00:1796119494.546663   10772 check.cc:1] Check failed",
            "/x/y.py:3: UserWarning: a Python warning", "Traceback (most recent call last):"]
    assert [line for line in noise + kept if not console._START_UP_NOISE.match(line)] == kept
