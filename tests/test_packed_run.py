"""clrlab.packed_run: which configs may share a pack (one-line refusals); each member's run folder holds what
an unpacked run's holds (files, TensorBoard tags, history layout, reports, a loadable model.keras, a final
checkpoint that `clrlab.train` accepts as a complete run); an interrupted pack resumes exactly; a diverging
member fails alone."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time

import numpy as np
import pytest

from clrlab import packed_run, run_dir, train
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from conftest import read_scalars

TINY = TrainConfig(dataset="mnist1d:num_samples=400", normalization="none", model="mnist1d_mlp", batch_size=40,
                   optimizer="adam", weight_decay=0.0, base_lr=1e-3, max_lr=1e-2, step_size=8, steps=24,
                   steps_per_loop=5, checkpoint_every=10, momentum=0.9)
# Tolerance of per-step losses and test metrics against the unpacked run: see tests/test_packed.py (float32
# rounding of batched kernels, not bit for bit).
LOSS_RTOL = 1e-5


def packing_ok(*configs):
    return packed_run.packing_refusal(list(configs)) is None


def _members(tmp_path, *points):
    return [dataclasses.replace(TINY, logdir=str(tmp_path / f"m{i}"), **p) for i, p in enumerate(points)]


@pytest.mark.parametrize("change, expected", [
    (dict(model="linear"), "--model differs between the runs (mnist1d_mlp, linear)"),
    (dict(batch_size=20), "--batch_size differs between the runs (40, 20)"),
    (dict(optimizer="sgd"), "--optimizer differs between the runs (adam, sgd)"),
    (dict(steps=30), "--steps differs between the runs (24, 30)"),
    (dict(dataset="digits"), "--dataset differs between the runs (mnist1d:num_samples=400, digits)"),
])
def test_members_must_share_everything_but_policy_and_seed(tmp_path, change, expected):
    a, b = _members(tmp_path, {}, dict(policy="one_cycle", seed=1))
    assert packing_ok(a, b)
    assert packing_ok(*(dataclasses.replace(c, model="auto") for c in (a, b)))  # mnist1d_cnn
    assert packed_run.packing_refusal([a, dataclasses.replace(b, **change)]) == expected


@pytest.mark.parametrize("change, expected", [
    (dict(trainer="keras_fit"), "--trainer=keras_fit (packed runs use the custom loop)"),
    (dict(distribute="mirrored"), "--distribute=mirrored (packed runs train on one device)"),
    (dict(mixed_precision="mixed_float16"), "--mixed_precision=mixed_float16 (packed runs train in float32)"),
    (dict(augment=True), "--augment (per-member augmentation is not implemented)"),
    (dict(model="small_cnn"), "--model=small_cnn has no packed form (packable: "),
    (dict(model="auto", dataset="digits"), "--model=auto (small_cnn for digits) has no packed form (packable: "),
    (dict(optimizer="rmsprop"), "--optimizer=rmsprop has no packed update (packable: sgd, nesterov, adam, adamw)"),
])
def test_settings_a_pack_cannot_train_are_refused(tmp_path, change, expected):
    configs = [dataclasses.replace(c, **change) for c in _members(tmp_path, {}, dict(seed=1))]
    assert packed_run.packing_refusal(configs).startswith(expected)


def test_a_model_with_an_unpackable_layer_is_refused_before_any_output(tmp_path, monkeypatch):
    from clrlab import packed_models

    monkeypatch.setattr(packed_models, "refusal", lambda model: "layer x (Dropout) has no packed form")
    configs = _members(tmp_path, {}, dict(seed=1))
    with pytest.raises(packed_run.PackingRefused, match=r"^layer x \(Dropout\) has no packed form$"):
        packed_run.run_packed(configs, pack_dir=str(tmp_path / "pack"))
    assert not (tmp_path / "m0").exists() and not (tmp_path / "pack").exists()


def _tree(logdir):
    """Relative paths of a run folder's files; event files by folder (their names hold host and time), and
    checkpoints without their step (an unpacked run keeps its last 3, a packed member its final one)."""
    out = set()
    for root, _, names in os.walk(logdir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), logdir)
            rel = os.path.join(os.path.dirname(rel), "events") if "tfevents" in name else re.sub(r"-\d+\.", ".", rel)
            out.add(rel)
    return out - {".lock"}


def _tags(event_dir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(event_dir, size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return set(acc.Tags()["tensors"]) | set(acc.Tags()["scalars"])


def _layout(value):
    """history.json's structure: keys and list lengths, not the values."""
    if isinstance(value, dict):
        return {k: _layout(v) for k, v in value.items()}
    return len(value) if isinstance(value, list) else type(value).__name__


@pytest.mark.slow
def test_member_folders_are_ordinary_run_folders(tmp_path):
    points = (dict(policy="constant", base_lr=1e-2), dict(policy="one_cycle", seed=1))
    members = _members(tmp_path, *points)
    began = time.monotonic()
    results = packed_run.run_packed(members, pack_dir=str(tmp_path / "pack"))
    wall = time.monotonic() - began
    assert [r.status for r in results] == ["completed", "completed"]
    for i, (config, result) in enumerate(zip(members, results)):
        alone = train.run(dataclasses.replace(config, logdir=str(tmp_path / f"alone{i}")), progress="log")
        packed_dir, alone_dir = config.logdir, alone.logdir
        assert _tree(packed_dir) == _tree(alone_dir)
        for sub in ("train", "validation"):
            assert _tags(os.path.join(packed_dir, sub)) == _tags(os.path.join(alone_dir, sub))
        packed_history = json.load(open(os.path.join(packed_dir, "history.json")))
        alone_history = json.load(open(os.path.join(alone_dir, "history.json")))
        assert _layout(packed_history) == _layout(alone_history)
        for key in ("seconds", "eval_seconds"):  # the member's shares of the pack's training and evaluation time
            assert all(v is not None and 0 <= v <= wall for v in packed_history["epochs"][key]), key
        assert packed_history["steps"]["lr"] == alone_history["steps"]["lr"]  # bit for bit (JSON floats)
        assert packed_history["steps"].get("momentum") == alone_history["steps"].get("momentum")
        np.testing.assert_allclose(packed_history["steps"]["loss"], alone_history["steps"]["loss"], rtol=1e-4)
        assert packed_history["epochs"]["step"] == alone_history["epochs"]["step"]
        np.testing.assert_allclose(packed_history["epochs"]["val_loss"], alone_history["epochs"]["val_loss"],
                                   rtol=1e-4)
        assert result.test_metrics["accuracy"] == pytest.approx(alone.test_metrics["accuracy"], abs=0.02)
        assert read_scalars(os.path.join(packed_dir, "train"), "learning_rate") == \
            read_scalars(os.path.join(alone_dir, "train"), "learning_rate")
        assert json.load(open(os.path.join(packed_dir, "run_config.json"))) == \
            json.load(open(os.path.join(alone_dir, "run_config.json")))
        # The folder is an ordinary complete run: clrlab.train finds nothing to do there.
        again = train.run(config, progress="log")
        assert again.status == "already_complete"
        import keras

        model = keras.models.load_model(os.path.join(packed_dir, "model.keras"))
        np.testing.assert_allclose(model.get_weights()[0], result.model.get_weights()[0])
    assert [r.status for r in packed_run.run_packed(members, pack_dir=str(tmp_path / "pack"))] == \
        ["already_complete"] * 2


@pytest.mark.slow
def test_an_interrupted_pack_resumes_exactly(tmp_path, monkeypatch):
    from trainers.packed import PackedTrainer

    points = (dict(policy="triangular"), dict(policy="one_cycle", seed=1), dict(policy="exp_range", seed=2))
    straight = packed_run.run_packed(_members(tmp_path / "a", *points), pack_dir=str(tmp_path / "a" / "pack"))
    members = _members(tmp_path / "b", *points)
    original, calls = PackedTrainer.train_steps, []

    def stop_after_three(self, n):  # SIGTERM in the third call (steps 8..9): the pack saves at step 10, stops
        calls.append(n)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
        return original(self, n)

    monkeypatch.setattr(PackedTrainer, "train_steps", stop_after_three)
    first = packed_run.run_packed(members, pack_dir=str(tmp_path / "b" / "pack"))
    assert [r.status for r in first] == ["interrupted"] * 3 and first[0].step == 10
    monkeypatch.setattr(PackedTrainer, "train_steps", original)
    resumed = packed_run.run_packed(members, pack_dir=str(tmp_path / "b" / "pack"))
    assert [r.resumed_from for r in resumed] == [10] * 3
    for a, b in zip(straight, resumed):
        ha, hb = (json.load(open(os.path.join(r.logdir, "history.json"))) for r in (a, b))
        assert ha["steps"]["step"] == hb["steps"]["step"] == list(range(24))
        for key in ("lr", "loss", "accuracy", "momentum"):
            assert ha["steps"].get(key) == hb["steps"].get(key), key
        assert ha["epochs"]["val_loss"] == hb["epochs"]["val_loss"]
        for wa, wb in zip(a.model.get_weights(), b.model.get_weights()):
            np.testing.assert_array_equal(wa, wb)
        assert sorted(read_scalars(os.path.join(b.logdir, "train"), "loss")) == list(range(24))


def test_a_diverging_member_fails_alone(tmp_path):
    members = _members(tmp_path, dict(policy="constant", base_lr=1e-3), dict(policy="constant", base_lr=1e12, seed=1))
    members = [dataclasses.replace(c, steps=16) for c in members]
    ok, bad = packed_run.run_packed(members, pack_dir=str(tmp_path / "pack"))
    assert ok.status == "completed" and os.path.exists(os.path.join(ok.logdir, "model.keras"))
    assert bad.status == "failed" and bad.error.startswith("NonFiniteLossError: loss became ")
    assert "(learning rate 1e+12)" in bad.error
    assert not os.path.exists(os.path.join(bad.logdir, "model.keras"))
    assert json.load(open(tmp_path / "pack" / packed_run.FAILURES_FILE)) == {"1": bad.error}
    again = packed_run.run_packed(members, pack_dir=str(tmp_path / "pack"))
    assert [r.status for r in again] == ["already_complete", "failed"] and again[1].error == bad.error


@pytest.mark.slow
def test_a_pack_folder_with_other_members_is_refused(tmp_path, monkeypatch):
    from trainers.packed import PackedTrainer

    members = [dataclasses.replace(c, steps=10, checkpoint_every=5)
               for c in _members(tmp_path, dict(policy="constant"), dict(seed=1))]
    real = PackedTrainer.train_steps

    def stop(self, n):  # SIGTERM in the first call: the pack saves at step 5
        signal.raise_signal(signal.SIGTERM)
        return real(self, n)

    monkeypatch.setattr(PackedTrainer, "train_steps", stop)
    assert {r.status for r in packed_run.run_packed(members, pack_dir=str(tmp_path / "pack"))} == {"interrupted"}
    monkeypatch.setattr(PackedTrainer, "train_steps", real)
    other = [members[0], dataclasses.replace(members[1], policy="exp_range")]
    with pytest.raises(UserError, match="holds a pack with other members or settings"):
        packed_run.run_packed(other, pack_dir=str(tmp_path / "pack"))


@pytest.mark.slow
def test_the_pack_checkpoints_on_the_run_cadence(tmp_path):
    """As an ordinary run: with --checkpoint_secs only at the end (for a short pack), with neither cadence at
    every epoch end."""
    by_time = _members(tmp_path / "secs", dict(policy="triangular"), dict(policy="triangular", seed=1))
    by_time = [dataclasses.replace(c, checkpoint_every=0, checkpoint_secs=3600.0) for c in by_time]
    packed_run.run_packed(by_time, pack_dir=str(tmp_path / "secs" / "pack"))
    assert run_dir.checkpoint_steps(str(tmp_path / "secs" / "pack" / "checkpoints")) == [TINY.steps]

    by_epoch = [dataclasses.replace(c, logdir=c.logdir.replace("secs", "epochs"), checkpoint_secs=0.0)
                for c in by_time]
    packed_run.run_packed(by_epoch, pack_dir=str(tmp_path / "epochs" / "pack"))
    epoch_ends = json.load(open(os.path.join(by_epoch[0].logdir, "history.json")))["epochs"]["step"]
    saved = run_dir.checkpoint_steps(str(tmp_path / "epochs" / "pack" / "checkpoints"))
    assert len(saved) > 1 and saved == epoch_ends[-len(saved):]
