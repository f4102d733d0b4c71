"""clrlab.config: TrainConfig's step arithmetic, the flags.txt text (a usable --flagfile) and read_bounds."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from clrlab import config
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from conftest import ROOT, parse_config, subprocess_env


def test_import_needs_neither_absl_nor_tensorflow():
    code = ("import sys, clrlab.config; bad = [m for m in ('absl', 'tensorflow', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_step_size_in_steps_from_steps_or_epochs_default_four_epochs():
    assert TrainConfig(step_size=123).resolve_step_size(50) == 123
    assert TrainConfig(step_size_epochs=2.5).resolve_step_size(10) == 25
    assert TrainConfig().resolve_step_size(10) == int(config.DEFAULT_STEP_SIZE_EPOCHS * 10) == 40
    assert TrainConfig(step_size_epochs=0.01).resolve_step_size(10) == 1  # never a zero half cycle


def test_total_steps_from_steps_or_epochs():
    assert TrainConfig(epochs=3).total_steps(22) == 66
    assert TrainConfig(epochs=3, steps=7).total_steps(22) == 7


@pytest.mark.parametrize("policy,expected", [
    ("one_cycle", (0.85, 0.95)),  # PyTorch OneCycleLR (cycle_momentum=True by default) and fastai fit_one_cycle
    ("triangular", None), ("triangular2", None), ("exp_range", None),  # bckenstler's CyclicLR, Smith 2015
    ("constant", None), ("piecewise", None),
])
def test_momentum_cycle_default_per_policy(policy, expected):
    assert TrainConfig(policy=policy).momentum_cycle() == expected


@pytest.mark.parametrize("policy", config.CLR_MODES)
def test_cycling_the_clr_modes_uses_pytorch_cyclic_lr_defaults(policy):
    assert TrainConfig(policy=policy, cycle_momentum=True).momentum_cycle() == (0.8, 0.9)
    assert TrainConfig(policy=policy, cycle_momentum=True, base_momentum=0.7).momentum_cycle() == (0.7, 0.9)


def test_momentum_cycle_explicit_off_and_explicit_bounds():
    assert TrainConfig(policy="one_cycle", cycle_momentum=False).momentum_cycle() is None
    assert TrainConfig(policy="one_cycle", base_momentum=0.8, max_momentum=0.99).momentum_cycle() == (0.8, 0.99)
    # bounds alone do not switch cycling on for a CLR mode (its default is off)
    assert TrainConfig(policy="triangular", base_momentum=0.8).momentum_cycle() is None


@pytest.mark.parametrize("policy", ["constant", "piecewise"])
def test_cycling_a_policy_without_a_cycle_is_a_one_line_user_error(policy):
    with pytest.raises(UserError, match=f"--cycle_momentum needs a cyclical policy.*--policy={policy}") as info:
        TrainConfig(policy=policy, cycle_momentum=True).momentum_cycle()
    assert "\n" not in str(info.value)


def test_flagfile_text_leaves_the_policy_default_momentum_cycle_unsaid():
    assert not any("momentum" in line and not line.startswith("--momentum=")
                   for line in config.flagfile_text(TrainConfig()).splitlines())
    body = config.flagfile_text(TrainConfig(cycle_momentum=False)).splitlines()
    assert "--nocycle_momentum" in body


def test_default_logdir_is_a_timestamped_folder_under_runs():
    assert config.default_logdir().startswith("runs/2")
    assert config.default_logdir("range_test-").startswith("runs/range_test-2")


def test_flagfile_text_lists_every_setting_in_flag_form():
    c = TrainConfig(policy="piecewise", lr_boundaries=(10, 20), lr_values=(0.1, 0.01, 0.001), augment=True,
                    fused_updates=False, bounds_from="r.json", logdir="/tmp/x")
    lines = config.flagfile_text(c).splitlines()
    assert lines[0].startswith("# Written by clrlab.train")
    body = lines[1:]
    assert "--policy=piecewise" in body and "--lr_boundaries=10,20" in body and "--lr_values=0.1,0.01,0.001" in body
    assert "--augment" in body and "--nofused_updates" in body and "--logdir=/tmp/x" in body
    # None = the flag's default; bounds_from was already resolved into base_lr/max_lr.
    assert not any(line.startswith(("--step_size=", "--bounds_from", "--scale_mode")) for line in body)
    assert all(line.startswith("--") for line in body)


@pytest.mark.parametrize("overrides", [
    {},
    {"policy": "exp_range", "gamma": 0.999, "step_size": 7, "augment": True, "mixed_precision": "mixed_bfloat16"},
    {"policy": "piecewise", "lr_boundaries": (3, 5), "lr_values": (0.05, 0.01, 0.002), "fused_updates": False},
    {"policy": "one_cycle", "three_phase": True, "anneal_strategy": "linear", "steps": 100, "step_size_down": 4},
    {"policy": "triangular2", "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95},
    {"policy": "one_cycle", "cycle_momentum": False, "optimizer": "rmsprop"},
    {"policy": "one_cycle", "max_momentum": 0.99},
])
def test_flagfile_text_round_trips_through_the_flag_parser(tmp_path, train_flags, overrides):
    original = dataclasses.replace(TrainConfig(), logdir=str(tmp_path / "run"), **overrides)
    path = tmp_path / "flags.txt"
    path.write_text(config.flagfile_text(original))
    assert parse_config(train_flags, f"--flagfile={path}") == original


def test_read_bounds_returns_the_range_tests_bounds(tmp_path):
    good = tmp_path / "range_test.json"
    good.write_text(json.dumps({"base_lr": 0.002, "max_lr": 0.03, "rule": "valley"}))
    assert config.read_bounds(str(good)) == (0.002, 0.03)


@pytest.mark.parametrize("content,needle", [
    ("{not json", "cannot read it as JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"lrs": []}), "needs numeric 'base_lr' and 'max_lr'"),
    (json.dumps({"base_lr": "fast", "max_lr": 0.1}), "needs numeric 'base_lr' and 'max_lr'"),
    (json.dumps({"base_lr": 0.1, "max_lr": 0.01}), "need 0 < base_lr < max_lr"),
    (json.dumps({"base_lr": 0.0, "max_lr": 0.01}), "need 0 < base_lr < max_lr"),
    (json.dumps({"base_lr": 0.001, "max_lr": float("inf")}), "need 0 < base_lr < max_lr"),
])
def test_read_bounds_rejects_bad_content_in_one_line(tmp_path, content, needle):
    bad = tmp_path / "r.json"
    bad.write_text(content)
    with pytest.raises(UserError, match=needle) as info:
        config.read_bounds(str(bad))
    assert "\n" not in str(info.value) and str(info.value).startswith(f"--bounds_from={bad}: ")


def test_read_bounds_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read it as JSON"):
        config.read_bounds(str(tmp_path / "missing.json"))
