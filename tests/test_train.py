"""The main job end to end: `python -m clrlab.train` and `clrlab.train.run` (outputs, TensorBoard tags,
history.json, resume, exit codes). Flag parsing and validation: test_cli.py."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clrlab import schedules
from clrlab import train as train_mod
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from conftest import ROOT, parse_config, read_scalars, run_module, subprocess_env, user_lines


def tiny(tmp_path, **overrides) -> TrainConfig:
    """A run of a few dozen steps on the offline digits (batch 64 -> 22 steps per epoch)."""
    base = dict(dataset="digits", model="small_cnn", batch_size=64, epochs=2, steps_per_loop=8,
                checkpoint_every=0, logdir=str(tmp_path / "run"), base_lr=0.01, max_lr=0.1, step_size=10)
    base.update(overrides)
    return dataclasses.replace(TrainConfig(), **base)


def load_history(logdir) -> dict:
    with open(os.path.join(logdir, "history.json"), encoding="utf-8") as fh:
        return json.load(fh)


@pytest.mark.slow
def test_readme_main_command_reaches_accuracy_and_writes_outputs(tmp_path):
    # Exactly the README's main job: defaults + --policy=exp_range --gamma=0.99994.
    config = dataclasses.replace(TrainConfig(), policy="exp_range", gamma=0.99994, logdir=str(tmp_path / "main"))
    result = train_mod.run(config, progress="log")
    assert result.status == "completed"
    assert result.test_metrics["accuracy"] >= 0.95, result.test_metrics
    for name in ("clr_plot.png", "training_plot.png", "history.json", "flags.txt", "classification_report.txt",
                 "run_config.json"):
        path = os.path.join(result.logdir, name)
        assert os.path.getsize(path) > 0, name
    assert os.listdir(os.path.join(result.logdir, "train")) and os.listdir(os.path.join(result.logdir, "validation"))
    assert any(n.startswith("ckpt-") for n in os.listdir(os.path.join(result.logdir, "checkpoints")))
    report = open(os.path.join(result.logdir, "classification_report.txt")).read()
    assert "precision" in report and "recall" in report and "f1-score" in report


@pytest.mark.parametrize("policy,extra", [
    ("triangular", {}), ("triangular2", {}), ("exp_range", {"gamma": 0.99}),
    ("one_cycle", {"base_lr": 0.004}), ("constant", {}),
    ("triangular", {"step_size_down": 4}),
])
def test_tensorboard_learning_rate_is_the_schedule_value_every_step(tmp_path, policy, extra):
    config = tiny(tmp_path, policy=policy, **extra)
    result = train_mod.run(config, progress="log")
    steps = np.arange(result.step)
    spe = 1437 // 64
    expected_schedule = schedules.make_schedule(
        policy, base_lr=config.base_lr, max_lr=config.max_lr, step_size=config.step_size,
        step_size_down=config.step_size_down, gamma=config.gamma, total_steps=2 * spe)
    expected = np.asarray(expected_schedule(steps), dtype=np.float32)
    logged = read_scalars(os.path.join(result.logdir, "train"), "learning_rate")
    assert sorted(logged) == list(steps)
    # Equal to float32 rounding: the graph evaluates one scalar step, the reference a whole vector,
    # and the two may differ in the last bits (measured: at most 2.9e-7 relative, for one_cycle's cosine).
    np.testing.assert_allclose(np.array([logged[s] for s in steps], np.float32), expected, rtol=5e-7, atol=0)
    history = load_history(result.logdir)
    assert history["steps"]["step"] == list(steps)
    # history.json holds exactly the tensor that was logged.
    np.testing.assert_array_equal(np.array(history["steps"]["lr"], np.float32),
                                  np.array([logged[s] for s in steps], np.float32))
    # The logged loss is that batch's loss (the same numbers as history.json), not a running mean.
    losses = read_scalars(os.path.join(result.logdir, "train"), "loss")
    np.testing.assert_allclose([losses[s] for s in steps], history["steps"]["loss"], rtol=1e-6)
    assert not np.allclose(np.cumsum(history["steps"]["loss"][:spe]) / np.arange(1, spe + 1),
                           history["steps"]["loss"][:spe])


def test_summary_cadence_epoch_and_validation_scalars(tmp_path):
    result = train_mod.run(tiny(tmp_path, summary_every=5), progress="log")
    logged = read_scalars(os.path.join(result.logdir, "train"), "learning_rate")
    assert sorted(logged) == [s for s in range(result.step) if s % 5 == 0]
    val = read_scalars(os.path.join(result.logdir, "validation"), "accuracy")
    assert sorted(val) == [22, 44]  # global step at each epoch end
    history = load_history(result.logdir)
    assert history["epochs"]["val_accuracy"] == pytest.approx([val[22], val[44]], rel=1e-6)
    assert set(read_scalars(os.path.join(result.logdir, "train"), "epoch_loss")) == {22, 44}


def test_flags_txt_is_a_usable_flagfile(tmp_path, train_flags):
    config = tiny(tmp_path, policy="exp_range", gamma=0.999, augment=False)
    result = train_mod.run(config, progress="log")
    parsed = parse_config(train_flags, f"--flagfile={os.path.join(result.logdir, 'flags.txt')}")
    assert parsed == dataclasses.replace(config, logdir=result.logdir)


def test_fused_updates_flag_reaches_the_trainer_and_keeps_the_numbers(tmp_path, monkeypatch):
    import trainers.custom_loop as custom_loop

    reasons = []

    class Spy(custom_loop.CustomLoopTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            reasons.append(self.fused_update_reason)

    monkeypatch.setattr(custom_loop, "CustomLoopTrainer", Spy)
    # deterministic: bitwise-reproducible ops, so any difference would come from the update itself.
    fused = train_mod.run(tiny(tmp_path, epochs=1, logdir=str(tmp_path / "fused"), deterministic=True),
                          progress="log")
    plain = train_mod.run(tiny(tmp_path, epochs=1, logdir=str(tmp_path / "plain"), fused_updates=False,
                               deterministic=True),
                          progress="log")
    assert reasons == [None, "fused updates turned off"]
    a, b = load_history(fused.logdir)["steps"], load_history(plain.logdir)["steps"]
    # The LR trace is identical; the losses agree to float32 rounding (the unit tests in
    # test_fused_update.py show the update itself is bit for bit; a full CNN+BN run can still differ
    # in the last bit after some steps because the two graphs are scheduled and rewritten differently).
    assert a["lr"] == b["lr"] and len(a["loss"]) == 22
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)


def test_resume_refuses_a_logdir_from_different_settings(tmp_path):
    train_mod.run(tiny(tmp_path, epochs=1), progress="log")
    # The policy is compared by its serialized schedule: only that differs.
    with pytest.raises(UserError, match=r"holds a run with different settings \(schedule\); rerun with the same"):
        train_mod.run(tiny(tmp_path, epochs=1, policy="triangular2"), progress="log")


def test_rerun_in_process_resumes_and_extends(tmp_path):
    first = train_mod.run(tiny(tmp_path, epochs=1), progress="log")
    assert first.resumed_from is None and first.step == 22
    second = train_mod.run(tiny(tmp_path, epochs=2), progress="log")
    assert second.resumed_from == 22 and second.step == 44
    full = train_mod.run(tiny(tmp_path, epochs=2, logdir=str(tmp_path / "full")), progress="log")
    assert load_history(second.logdir)["steps"]["lr"] == load_history(full.logdir)["steps"]["lr"]


def test_nonfinite_loss_stops_with_the_step_and_lr_and_keeps_the_last_good_checkpoint(tmp_path):
    from trainers.custom_loop import NonFiniteLossError

    # An MLP (no batch norm to rescue it) at LR 5 diverges after a dozen steps (measured: step 12).
    config = tiny(tmp_path, policy="constant", base_lr=5.0, max_lr=10.0, weight_decay=0.0, epochs=3, model="mlp",
                  checkpoint_every=2, steps_per_loop=2)
    with pytest.raises(NonFiniteLossError) as info:
        train_mod.run(config, progress="log")
    err = info.value
    assert err.learning_rate == pytest.approx(5.0)
    assert err.step >= 2
    assert f"step {err.step}" in str(err)
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(config.logdir, "checkpoints"))
    assert latest is not None
    # The checkpoint kept predates the bad step and holds finite weights.
    assert int(latest.rsplit("-", 1)[1]) <= err.step
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.all(np.isfinite(value)), name


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_on_cpu(tmp_path, precision):
    # float16 convolutions are emulated on CPU (slow): the loss-scaling run trains the MLP for 10 steps; one
    # training step of a float16 convolutional model is in test_models.
    extra = dict(model="mlp", steps=10) if precision == "mixed_float16" else {}
    result = train_mod.run(tiny(tmp_path, mixed_precision=precision, epochs=1, **extra), progress="log")
    history = load_history(result.logdir)
    assert result.status == "completed" and np.isfinite(history["epochs"]["loss"]).all()
    if precision == "mixed_float16":
        scales = read_scalars(os.path.join(result.logdir, "train"), "loss_scale")
        assert len(scales) == result.step and all(v > 0 for v in scales.values())
        assert len(history["steps"]["loss_scale"]) == result.step
        assert "skipped_steps" in history
    import keras
    assert keras.mixed_precision.global_policy().name == "float32"  # run() restores the global policy


# ----------------------------------------------------------------------------- kill, resume
# The signal tests' runs: 5 epochs of 44 steps. A kill lands at most ~1 s after the first checkpoint (step 6);
# the ~200 steps after it (>= ~2 s on an idle machine) keep it mid-run, and fewer epochs make each run cheaper.
EPOCHS = 5
TOTAL_STEPS = EPOCHS * (1437 // 32)


def _start(logdir, *extra):
    args = [sys.executable, "-m", "clrlab.train", "--dataset=digits", "--model=small_cnn", "--batch_size=32",
            "--policy=triangular", "--base_lr=0.01", "--max_lr=0.1", "--step_size=30", f"--epochs={EPOCHS}",
            "--steps_per_loop=2", "--checkpoint_every=6", "--deterministic", f"--logdir={logdir}", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(), cwd=ROOT)


def _wait_for_checkpoint(logdir, proc, timeout=120):
    deadline = time.time() + timeout
    marker = os.path.join(logdir, "checkpoints", "checkpoint")
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(marker):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared (rc={proc.poll()}): {proc.communicate()[1][-2000:]}")


def _final_weights(logdir):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(logdir, "checkpoints"))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith("model/")}


@pytest.mark.slow
def test_sigterm_mid_epoch_saves_a_checkpoint_exits_cleanly_and_resumes(tmp_path):
    logdir = tmp_path / "term"
    proc = _start(logdir)
    _wait_for_checkpoint(str(logdir), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err
    assert "Stopped by SIGTERM at step" in out
    stopped_at = int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(logdir, "checkpoints"))
    assert latest.endswith(f"ckpt-{stopped_at}")
    rerun = _start(logdir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err[-2000:]
    assert f"Resuming from the checkpoint at step {stopped_at}" in out
    assert load_history(logdir)["steps"]["step"] == list(range(TOTAL_STEPS))


@pytest.mark.slow
def test_nan_loss_on_the_command_line_is_one_line_exit_1(tmp_path):
    proc = run_module("clrlab.train", "--policy=constant", "--base_lr=50", "--weight_decay=0", "--model=mlp",
                      "--epochs=2", "--batch_size=64", f"--logdir={tmp_path / 'nan'}")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and "at step" in lines[0] and "learning rate 50" in lines[0], proc.stderr


@pytest.mark.slow
def test_mirrored_strategy_on_two_cpu_devices_matches_one_device(tmp_path):
    common = ["--dataset=digits", "--model=mlp", "--batch_size=64", "--epochs=2", "--policy=triangular",
              "--base_lr=0.01", "--max_lr=0.1", "--step_size=10", "--weight_decay=0"]
    one = run_module("clrlab.train", *common, f"--logdir={tmp_path / 'one'}")
    two = run_module("clrlab.train", *common, "--distribute=mirrored", "--cpu_devices=2",
                     f"--logdir={tmp_path / 'two'}")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_history(tmp_path / "one"), load_history(tmp_path / "two")
    assert a["steps"]["lr"] == b["steps"]["lr"]
    assert b["epochs"]["loss"][-1] == pytest.approx(a["epochs"]["loss"][-1], rel=0.05)
    assert b["epochs"]["val_accuracy"][-1] == pytest.approx(a["epochs"]["val_accuracy"][-1], abs=0.05)



def test_piecewise_run_logs_the_schedule_every_step(tmp_path, train_flags):
    # 7 steps in chunks of 4: the LR changes inside a compiled call (step 3) and across calls (step 5).
    config = parse_config(train_flags, "--dataset=digits", "--model=small_cnn", "--policy=piecewise",
                          "--lr_boundaries=3,5", "--lr_values=0.05,0.01,0.002", "--steps=7", "--batch_size=64",
                          "--steps_per_loop=4", f"--logdir={tmp_path / 'run'}")
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 7
    want = np.float32([0.05, 0.05, 0.05, 0.01, 0.01, 0.002, 0.002])
    logged = read_scalars(os.path.join(result.logdir, "train"), "learning_rate")
    assert sorted(logged) == list(range(7))
    np.testing.assert_array_equal(np.float32([logged[s] for s in range(7)]), want)
    history = json.load(open(os.path.join(result.logdir, "history.json"), encoding="utf-8"))
    np.testing.assert_array_equal(np.float32(history["steps"]["lr"]), want)
    identity = json.load(open(os.path.join(result.logdir, "run_config.json"), encoding="utf-8"))
    assert identity["schedule"]["class_name"] == "PiecewiseConstant"
    assert identity["schedule"]["config"]["boundaries"] == [3, 5]
    restored = schedules.PiecewiseConstant.from_config(identity["schedule"]["config"])
    np.testing.assert_array_equal(np.float32(restored(np.arange(7))), want)
    # flags.txt reruns the same job.
    rerun = parse_config(train_flags, f"--flagfile={os.path.join(result.logdir, 'flags.txt')}")
    assert rerun == dataclasses.replace(config, logdir=result.logdir)


def test_mnist1d_trains_offline_with_the_1d_cnn_and_reports_ten_classes(tmp_path, train_flags, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    config = parse_config(train_flags, "--dataset=mnist1d:num_samples=400", "--steps=16", "--batch_size=40",
                          "--optimizer=adam", "--policy=triangular", "--base_lr=0.001", "--max_lr=0.01",
                          "--step_size=4", "--steps_per_loop=8", "--normalization=none",
                          f"--logdir={tmp_path / 'run'}")
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 16
    assert 0.0 <= result.test_metrics["accuracy"] <= 1.0
    report = open(os.path.join(result.logdir, "classification_report.txt"), encoding="utf-8").read()
    rows = [line.split()[0] for line in report.splitlines()[2:12]]
    assert rows == [str(i) for i in range(10)]
    history = json.load(open(os.path.join(result.logdir, "history.json"), encoding="utf-8"))
    assert history["steps"]["step"] == list(range(16))
    for png in ("clr_plot.png", "training_plot.png"):
        assert os.path.getsize(os.path.join(result.logdir, png)) > 10_000


# ----------------------------------------------------------------------------- cyclical momentum
def _momentum_reference(config, steps):
    """CyclicalMomentum of `config` at `steps` (float32), built as clrlab.job builds it."""
    from clrlab import job as job_lib

    schedule, _ = job_lib.make_lr_schedule(config, 1437 // config.batch_size)
    momentum = job_lib.make_momentum_schedule(config, schedule)
    return np.asarray(momentum(np.asarray(steps)), np.float32)


def test_keras_fit_callback_run_cycles_the_momentum_variable_and_says_so(tmp_path, capsys):
    import tensorflow as tf

    config = tiny(tmp_path, model="mlp", epochs=1, trainer="keras_fit", lr_control="callback", cycle_momentum=True)
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 22
    assert "momentum cycling 0.9 -> 0.8 inversely to the lr" in capsys.readouterr().out
    # The checkpoint holds the momentum the callback set for the next batch (step 22), from the same cycle.
    reader = tf.train.load_checkpoint(os.path.join(result.logdir, "checkpoints"))
    saved = reader.get_tensor("optimizer/_momentum_variable/.ATTRIBUTES/VARIABLE_VALUE")
    assert saved == pytest.approx(float(_momentum_reference(config, [22])[0]), rel=1e-7) and saved != 0.9
    with open(os.path.join(result.logdir, "run_config.json"), encoding="utf-8") as fh:
        identity = json.load(fh)
    assert identity["momentum_schedule"]["class_name"] == "CyclicalMomentum"
    # A changed momentum cycle is a different run: the logdir refuses it.
    with pytest.raises(UserError, match=r"different settings \(momentum_schedule\)"):
        train_mod.run(dataclasses.replace(config, max_momentum=0.95), progress="log")


def test_keras_fit_schedule_run_gives_the_optimizer_the_momentum_schedule(tmp_path, capsys):
    import tensorflow as tf

    config = tiny(tmp_path, model="mlp", epochs=1, trainer="keras_fit", policy="one_cycle", optimizer="adam",
                  base_lr=0.004)
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 22
    assert "beta_1 cycling 0.95 -> 0.85 inversely to the lr" in capsys.readouterr().out
    # The optimizer evaluated the schedule at its iterations for each update: the last one was step 21.
    reader = tf.train.load_checkpoint(os.path.join(result.logdir, "checkpoints"))
    saved = reader.get_tensor("optimizer/_momentum_variable/.ATTRIBUTES/VARIABLE_VALUE")
    assert saved == pytest.approx(float(_momentum_reference(config, [21])[0]), rel=1e-7)


def test_constant_momentum_run_keeps_the_history_and_run_config_layout(tmp_path):
    result = train_mod.run(tiny(tmp_path, model="mlp", epochs=1, weight_decay=0.0), progress="log")
    assert sorted(load_history(result.logdir)["steps"]) == ["accuracy", "loss", "lr", "step"]
    with open(os.path.join(result.logdir, "run_config.json"), encoding="utf-8") as fh:
        assert "momentum_schedule" not in json.load(fh)
    with pytest.raises(KeyError, match="momentum not in"):
        read_scalars(os.path.join(result.logdir, "train"), "momentum")


# The two tests below need CustomLoopTrainer(..., momentum_schedule=...) from trainers/ (the custom loop
# assigning the momentum variable in graph each step, StepRecords.momentum, history.json's "momentum"
# column, TensorBoard train/momentum). clrlab.train passes that keyword whenever momentum cycles.
@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_one_cycle_run_records_the_cyclical_momentum_every_step(tmp_path, optimizer):
    config = tiny(tmp_path, policy="one_cycle", base_lr=0.004, optimizer=optimizer, model="mlp")
    result = train_mod.run(config, progress="log")
    assert result.status == "completed" and result.step == 44
    steps = np.arange(result.step)
    expected = _momentum_reference(config, steps)
    assert expected[0] == pytest.approx(0.95) and min(expected) == pytest.approx(0.85, abs=1e-3)
    history = load_history(result.logdir)
    np.testing.assert_allclose(np.array(history["steps"]["momentum"], np.float32), expected, rtol=1e-6, atol=0)
    logged = read_scalars(os.path.join(result.logdir, "train"), "momentum")
    assert sorted(logged) == list(steps)
    np.testing.assert_array_equal(np.array([logged[s] for s in steps], np.float32),
                                  np.array(history["steps"]["momentum"], np.float32))
    assert os.path.getsize(os.path.join(result.logdir, "clr_plot.png")) > 0


@pytest.mark.slow
def test_sigkill_mid_cycle_then_rerun_gives_the_same_momentum_lr_and_weights(tmp_path):
    # SIGKILL at an arbitrary step (up to 1 s after the first checkpoint) of a 1cycle run, whose LR and
    # momentum both change every step: the rerun resumes and ends with the uninterrupted run's traces and weights.
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    extra = ("--policy=one_cycle", "--base_lr=0.004")
    full = _start(full_dir, *extra)
    victim = _start(killed_dir, *extra)
    _wait_for_checkpoint(str(killed_dir), victim)
    time.sleep(random.uniform(0.0, 1.0))
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    killed_at = load_history(killed_dir)["steps"]["step"][-1] + 1
    assert killed_at < TOTAL_STEPS, "the run finished before it was killed: slow it down"
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    resumed = _start(killed_dir, *extra)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "Resuming from the checkpoint at step" in out and "momentum cycling 0.95 -> 0.85" in out
    a, b = load_history(full_dir)["steps"], load_history(killed_dir)["steps"]
    assert a["step"] == b["step"] and a["lr"] == b["lr"]
    assert a["momentum"] == b["momentum"] and len(set(a["momentum"])) > 10  # it cycled, identically
    wa, wb = _final_weights(full_dir), _final_weights(killed_dir)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


# ----------------------------------------------------------------------------- the run folder (lock, identity, names)
def test_rerunning_a_finished_run_says_it_is_complete_and_does_not_retrain(tmp_path, capsys):
    first = train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
    assert first.status == "completed" and first.step == 22
    report = os.path.join(first.logdir, "classification_report.txt")
    os.remove(report)  # a re-evaluation would write it again
    history = load_history(first.logdir)
    capsys.readouterr()
    again = train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
    out = capsys.readouterr().out
    assert again.status == "already_complete" and again.step == 22
    assert "already holds a complete run (step 22 of 22)" in out and "For a new run, leave out --logdir" in out
    assert "Resuming" not in out and not os.path.exists(report)
    assert load_history(first.logdir) == history


def test_resume_with_other_settings_names_each_old_and_new_value(tmp_path):
    train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
    with pytest.raises(UserError) as info:
        train_mod.run(tiny(tmp_path, model="mlp", epochs=2, max_lr=0.2, seed=3), progress="log")
    message = str(info.value)
    assert "different settings (schedule, seed)" in message
    assert message.endswith("Differs: schedule.config.max_lr: 0.1 -> 0.2; seed: 0 -> 3.")


def test_resume_with_fewer_epochs_than_reached_says_the_step_and_what_to_do(tmp_path):
    train_mod.run(tiny(tmp_path, model="mlp", epochs=2), progress="log")
    with pytest.raises(UserError, match=r"already reached step 44 \(epoch 2\), past the 22 steps asked for; "
                                        r"to continue it, rerun with at least --epochs=2"):
        train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")


def test_an_empty_run_config_json_is_one_line_not_a_traceback(tmp_path):
    result = train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
    with open(os.path.join(result.logdir, "run_config.json"), "w", encoding="utf-8"):
        pass  # what a SIGKILL mid-write used to leave
    with pytest.raises(UserError, match=r"run_config.json \(the settings of the run in this folder\) is damaged"):
        train_mod.run(tiny(tmp_path, model="mlp", epochs=2), progress="log")


def test_symlinks_planted_at_flags_txt_and_run_config_json_are_replaced(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    text, js = tmp_path / "precious.txt", tmp_path / "precious.json"
    text.write_text("keep me")
    js.write_text("{}")
    (logdir / "flags.txt").symlink_to(text)
    (logdir / "run_config.json").symlink_to(js)
    result = train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
    assert text.read_text() == "keep me" and js.read_text() == "{}"
    assert not (logdir / "run_config.json").is_symlink()
    assert not (logdir / "flags.txt").is_symlink() and "--model=mlp" in (logdir / "flags.txt").read_text()
    with open(os.path.join(result.logdir, "run_config.json"), encoding="utf-8") as fh:
        assert json.load(fh)["model"] == "mlp"


def test_a_second_run_on_a_locked_logdir_names_the_process_holding_it(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    code = ("import sys, time\nfrom clrlab import run_dir\nwith run_dir.lock_logdir(sys.argv[1]):\n"
            "    print('locked', flush=True)\n    time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(logdir)], stdout=subprocess.PIPE, text=True,
                              env=subprocess_env(), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"--logdir={logdir} is in use by process {holder.pid}"):
            train_mod.run(tiny(tmp_path, model="mlp", epochs=1), progress="log")
        assert not (logdir / "run_config.json").exists()  # refused before writing anything
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_nan_stop_without_a_checkpoint_says_so_and_a_sane_rerun_starts_afresh(tmp_path):
    logdir = tmp_path / "nan"
    common = ("--policy=constant", "--weight_decay=0", "--model=mlp", "--dataset=digits", "--batch_size=64",
              "--checkpoint_every=0", f"--logdir={logdir}")
    proc = run_module("clrlab.train", *common, "--base_lr=50", "--epochs=2")
    assert proc.returncode == 1
    lines = user_lines(proc.stderr)
    assert len(lines) == 1 and "no checkpoint was written" in lines[0] and "last good checkpoint" not in lines[0]
    assert not os.path.exists(logdir / "checkpoints" / "checkpoint")
    rerun = run_module("clrlab.train", *common, "--base_lr=0.01", "--epochs=1")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Resuming" not in rerun.stdout
    assert load_history(logdir)["steps"]["step"] == list(range(22))


@pytest.mark.slow
def test_stop_message_prints_the_command_that_resumes_a_default_run_folder(tmp_path):
    args = ["--dataset=digits", "--model=mlp", "--batch_size=32", "--epochs=200", "--steps_per_loop=2",
            "--checkpoint_every=6"]
    proc = subprocess.Popen([sys.executable, "-m", "clrlab.train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("runs/*/checkpoints/checkpoint")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    (folder,) = os.listdir(tmp_path / "runs")
    assert folder.startswith("triangular-mlp-2")
    logdir = os.path.realpath(tmp_path / "runs" / folder)
    command = out.split("To resume, run: ")[1].splitlines()[0]
    assert command == " ".join(["python", "-m", "clrlab.train", *args, f"--logdir={logdir}"])
    stopped_at = int(out.split("Stopped by SIGTERM at step ")[1].split(";")[0])
    # Run exactly that command (this interpreter for "python"): it resumes in the same folder; stop it again.
    rerun = subprocess.Popen([sys.executable, *command.split()[1:]], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=tmp_path)
    line = ""
    while "Resuming" not in line and rerun.poll() is None:
        line = rerun.stdout.readline()
    rerun.send_signal(signal.SIGTERM)
    rest, err = rerun.communicate(timeout=120)
    assert line.startswith(f"Resuming from the checkpoint at step {stopped_at} (epoch "), err[-2000:]
    assert os.listdir(tmp_path / "runs") == [folder]  # no new folder


def test_a_refused_default_run_leaves_no_empty_run_folder(tmp_path):
    (tmp_path / "bad.npz").write_text("not a zip")
    proc = run_module("clrlab.train", f"--dataset=npz:{tmp_path / 'bad.npz'}", "--model=mlp", cwd=str(tmp_path))
    assert proc.returncode == 1 and user_lines(proc.stderr)[-1].startswith("error: cannot read")
    assert os.listdir(tmp_path / "runs") == []


# ----------------------------------------------------------------------------- the result: model, history, summary
def test_run_keeps_the_model_the_test_metrics_and_honest_loss_columns(tmp_path):
    config = tiny(tmp_path, model="mlp", epochs=1, steps=10, weight_decay=5e-3)
    result = train_mod.run(config, progress="log")
    assert result.status == "completed"
    hist = load_history(result.logdir)
    assert hist["epoch_base"] == 0 and hist["epochs"]["epoch"] == [0]  # the console's "epoch 1/1"
    assert hist["test"] == result.test_metrics == result.history.test
    assert set(hist["test"]) == {"accuracy", "loss"} and 0.0 <= hist["test"]["accuracy"] <= 1.0
    assert hist["test"]["loss"] == pytest.approx(hist["epochs"]["val_loss"][-1], rel=1e-6)  # both: the data loss
    steps = hist["steps"]
    assert all(v > 0 for v in steps["l2_loss"])
    np.testing.assert_allclose(np.add(steps["loss"], steps["l2_loss"]), steps["total_loss"], rtol=1e-6)
    assert set(read_scalars(os.path.join(result.logdir, "train"), "l2_loss")) == set(range(10))
    assert result.model is not None and result.model.count_params() > 0
    assert result.seconds > 0
    text = train_mod.summary(result)
    assert f"test accuracy {result.test_metrics['accuracy']:.4f}" in text
    assert f"tensorboard --logdir {result.logdir}" in text and "model.keras" in text
    # model.keras loads in a fresh process with `import clrlab` and predicts what the run's model predicts.
    path = os.path.join(result.logdir, "model.keras")
    x = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 8, 8, 1)
    np.save(tmp_path / "x.npy", x)
    code = ("import sys, numpy as np, clrlab, keras; m = keras.models.load_model(sys.argv[1]); "
            "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]), training=False)))")
    proc = subprocess.run([sys.executable, "-c", code, path, str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                          capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), result.model(x, training=False), rtol=1e-5, atol=1e-6)


def test_run_with_the_default_logdir_writes_under_runs_not_into_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = dataclasses.replace(tiny(tmp_path, model="mlp", steps=3), logdir="")
    assert TrainConfig().logdir == ""
    result = train_mod.run(config, progress="log")
    assert os.path.dirname(result.logdir) == str(tmp_path / "runs")
    assert os.path.isfile(os.path.join(result.logdir, "history.json"))
    assert sorted(os.listdir(tmp_path)) == ["runs"]


@pytest.mark.parametrize("trainer", ["custom_loop", "keras_fit"])
def test_checkpoint_secs_reaches_both_trainers_and_history_records_the_evaluation_seconds(tmp_path, trainer):
    # 30 steps, epochs ending at steps 22 and 30; a day between checkpoints: only the last step saves (the
    # epoch-end cadence of --checkpoint_secs=0: test_controller.py, test_keras_fit.py).
    config = tiny(tmp_path, model="mlp", steps=30, steps_per_loop=2, trainer=trainer, checkpoint_secs=86400.0)
    result = train_mod.run(config, progress="log")
    assert result.status == "completed"
    names = os.listdir(os.path.join(result.logdir, "checkpoints"))
    assert sorted(int(n[5:-6]) for n in names if n.endswith(".index")) == [30]
    epochs = load_history(result.logdir)["epochs"]
    assert epochs["step"] == [22, 30] and all(s > 0 for s in epochs["eval_seconds"])
