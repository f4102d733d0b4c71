"""README.md and BUILD.md say what a new user types, and what they say holds."""

from __future__ import annotations

import dataclasses
import os
import re

from clrlab.config import TrainConfig
from conftest import ROOT


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as fh:
        return " ".join(fh.read().split())


def test_readme_points_to_help_and_presets_not_helpfull_alone():
    text = _read("README.md")
    assert "python -m clrlab.train --help " in text and "-h" in text
    assert "--helpfull" not in text.split("--help ")[0]  # --help comes first; --helpfull only as the extra
    assert "--preset=cifar10_minigooglenet_triangular" in text
    assert "CLRLAB_VERBOSE=1" in text


def test_readme_states_how_little_the_headline_gamma_decays():
    text = _read("README.md")
    steps = 16 * (1437 // 32)  # the headline run: 16 epochs of the digits' 1437 training images, batch 32
    assert steps == 704
    assert "--policy=exp_range --gamma=0.99994" in text
    assert f"0.99994^{steps} ≈ {0.99994 ** steps:.2f}" in text
    assert f"--gamma=0.997` (0.997^{steps} ≈ {0.997 ** steps:.2f})" in text


def test_readme_lists_model_keras_and_the_python_api_uses_real_names():
    text = _read("README.md")
    assert "`model.keras`" in text and '"test": {"accuracy": ..., "loss": ...}' in text
    assert "`l2_loss`" in text and "`total_loss`" in text
    call = re.search(r"run\(TrainConfig\((.*?)\)\)", text).group(1)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    for name in re.findall(r"(\w+)=", call):
        assert name in fields, name
    for attribute in ("result.model", "result.history", "result.test_metrics"):
        assert attribute in text


def test_build_says_how_a_wheel_installs_presets_and_the_top_level_trainers():
    text = _read("BUILD.md")
    assert "clrlab/presets/*.cfg" in text and "`trainers`" in text and "clash" in text
    assert "clrlab-train --preset=" in text
