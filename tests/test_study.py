"""python -m clrlab.study: grid validation before any run (one-line errors), the manifest's refusal of a
changed study, and end to end on a tiny grid: kill -9 mid-way then rerun gives exactly the uninterrupted
set of runs with the finished ones untouched; a diverging run is recorded as failed and the study goes on;
TensorBoard's reader finds the HParams config and one session per run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clrlab import cli, study
from conftest import ROOT, subprocess_env, user_lines

TINY = ["--dataset=mnist1d:num_samples=300", "--model=mnist1d_cnn", "--batch_size=50", "--optimizer=sgd",
        "--base_lr=0.01", "--max_lr=0.05", "--step_size=8", "--checkpoint_every=4", "--steps_per_loop=4"]


@pytest.fixture
def study_flags():
    study.reset_flags()
    study.define_study_flags()
    yield cli.FLAGS
    study.reset_flags()


def _main_in_process(flag_values, capsys, *argv):
    flag_values.unparse_flags()
    flag_values(["clrlab.study", *argv])
    code = study.main(["clrlab.study"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("grid, expected", [
    (["--grid=nosuchflag=1,2"], "error: --grid=nosuchflag=1,2: unknown training flag --nosuchflag"),
    (["--grid=policy="], "error: --grid=policy=: empty value"),
    (["--grid=policy=constant,,triangular"], "error: --grid=policy=constant,,triangular: empty value"),
    (["--grid=policy=constant,nope"], "error: --grid point policy=nope: flag --policy=nope: value should be one of"),
    (["--grid=base_lr=0.01,-1", "--policy=constant"],  # absl's multi-flag message, as clrlab.train prints it
     "error: --grid point base_lr=-1: flags policy=constant, base_lr=-1.0, "),
    (["--grid=base_lr=0.01,1e-2"], "error: --grid: the points base_lr=0.01 and base_lr=1e-2 are the same run"),
    (["--grid=policy=constant,constant"], "error: --grid=policy=constant,constant: a value is given twice."),
    (["--grid=policy=constant", "--grid=policy=triangular"], "error: --grid: --policy is given twice"),
    (["--grid=seed=1,2"], "error: --grid=seed=1,2: --seed is set by the study"),
    (["--grid=policy|base_lr=constant|0.01,triangular"], "error: --grid=policy|base_lr=constant|0.01,triangular: "
                                                         "each value needs 2 parts"),
    (["--grid=policy=constant,triangular", "--baseline=policy=exp_range"],
     "error: --baseline=policy=exp_range must name exactly one grid point"),
    ([], "error: --grid is required"),
])
def test_bad_grids_are_one_line_errors_before_any_run(study_flags, capsys, tmp_path, grid, expected):
    study_dir = tmp_path / "s"
    code, err = _main_in_process(study_flags, capsys, *TINY, *grid, f"--study_dir={study_dir}")
    assert code == 1
    lines = user_lines(err)
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert not study_dir.exists()  # nothing started, nothing written


@pytest.mark.parametrize("args, expected", [
    (["--seeds=0"], "error: --seeds must be >= 1. Received: 0."),
    (["--parallel=0"], "error: --parallel must be >= 1. Received: 0."),
    (["--target_accuracy=1.5"], "error: --target_accuracy must be a fraction in (0, 1]. Received: 1.5."),
    (["--target_accuracy=nan"], "error: --target_accuracy must be a fraction in (0, 1]. Received: nan."),
    (["--pack=0"], "error: --pack must be auto, off or a number of members >= 1. Received: 0."),
    (["--pack=lots"], "error: --pack must be auto, off or a number of members >= 1. Received: lots."),
    (["--pack=-3"], "error: --pack must be auto, off or a number of members >= 1. Received: -3."),
])
def test_bad_study_options_are_one_line_errors_before_any_run(study_flags, capsys, tmp_path, args, expected):
    study_dir = tmp_path / "s"
    code, err = _main_in_process(study_flags, capsys, *TINY, "--grid=policy=constant,triangular", *args,
                                 f"--study_dir={study_dir}")
    assert code == 1 and user_lines(err) == [expected]
    assert not study_dir.exists()


def test_seed_and_logdir_are_the_studys(study_flags, capsys, tmp_path):
    code, err = _main_in_process(study_flags, capsys, "--grid=policy=constant,triangular", "--seed=3",
                                 f"--study_dir={tmp_path}")
    assert code == 1 and user_lines(err) == ["error: --seed is set by the study for each run (use --seeds and "
                                             "--study_dir)."]


def test_changed_grid_or_common_flags_are_refused(study_flags, capsys, tmp_path):
    manifest = {"grid": [["policy", ["constant", "triangular"]]], "seeds": 2, "common": ["--steps=8"]}
    (tmp_path / "study.json").write_text(json.dumps(manifest))
    code, err = _main_in_process(study_flags, capsys, "--grid=policy=constant,triangular", "--seeds=2",
                                 "--steps=9", f"--study_dir={tmp_path}")
    assert code == 1
    assert user_lines(err)[-1].startswith(f"error: --study_dir={tmp_path} holds a study with a different common;")
    assert json.loads((tmp_path / "study.json").read_text()) == manifest  # untouched
    assert sorted(os.listdir(tmp_path)) == [".study.lock", "study.json"]


def test_run_names_and_configs(study_flags, tmp_path):
    study_flags(["x", *TINY, "--grid=policy|base_lr=constant|0.02,triangular|0.01", "--grid=batch_size=50",
                 "--seeds=2", f"--study_dir={tmp_path}"])
    options, plan = study.plan_from_flags()
    assert [r.name for r in plan.runs] == [
        "policy=constant,base_lr=0.02,seed=0", "policy=constant,base_lr=0.02,seed=1",
        "policy=triangular,base_lr=0.01,seed=0", "policy=triangular,base_lr=0.01,seed=1"]
    c = plan.runs[1].config
    assert (c.policy, c.base_lr, c.seed, c.logdir) == ("constant", 0.02, 1,
                                                        str(tmp_path / "policy=constant,base_lr=0.02,seed=1"))
    assert study.baseline_label(plan, None) == "policy=constant,base_lr=0.02"
    assert plan.identity()["common"] == sorted(plan.identity()["common"])


def _study(study_dir, *args, popen=False):
    argv = [sys.executable, "-m", "clrlab.study", *TINY, f"--study_dir={study_dir}", *args]
    if popen:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=subprocess_env(), cwd=ROOT)
    return subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=ROOT, timeout=300)


def _snapshot(run_dir):
    return {f: (run_dir / f).read_bytes() for f in ("study_result.json", "history.json", "classification_report.txt")}


@pytest.mark.slow
def test_kill_9_mid_way_then_rerun_completes_exactly_the_study(tmp_path):
    study_dir = tmp_path / "s"
    grid = ("--grid=policy=constant,triangular", "--seeds=2", "--steps=48", "--parallel=1", "--pack=off")
    names = ["policy=constant,seed=0", "policy=constant,seed=1", "policy=triangular,seed=0",
             "policy=triangular,seed=1"]
    proc = _study(study_dir, *grid, popen=True)
    first, second = study_dir / names[0], study_dir / names[1]
    deadline = time.monotonic() + 240
    # One worker runs the runs in order: kill once the first has finished and the second has a checkpoint.
    while time.monotonic() < deadline and not (
            (first / "study_result.json").exists() and (second / "checkpoints" / "checkpoint").exists()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not (second / "study_result.json").exists()
    before = _snapshot(first)
    time.sleep(1)  # the worker got SIGKILL with its parent (PR_SET_PDEATHSIG)

    done = _study(study_dir, *grid)
    assert done.returncode == 0, done.stderr
    assert sorted(d for d in os.listdir(study_dir) if (study_dir / d).is_dir()) == names
    assert _snapshot(first) == before  # skipped, untouched
    manifest = json.loads((study_dir / "study.json").read_text())
    assert sorted(manifest["runs"]) == names
    assert all(r["status"] == "finished" and r["step"] == 48 for r in manifest["runs"].values())
    assert manifest["runs"][names[1]]["resumed_from"] > 0  # continued from its checkpoint
    assert f"study: 4 runs (1 already done) in {study_dir}" in done.stderr
    history = json.loads((second / "history.json").read_text())
    assert history["epochs"]["step"] == [4 * (i + 1) for i in range(12)]  # every epoch once, none twice

    again = _study(study_dir, *grid)  # nothing left: every run is skipped
    assert again.returncode == 0 and "study: 4 runs (4 already done)" in again.stderr
    assert _snapshot(first) == before


@pytest.mark.slow
@pytest.mark.parametrize("pack", ["auto", "off"])  # the two runs trained as one pack, or alone
def test_a_diverging_run_is_recorded_failed_and_hparams_are_found(tmp_path, pack):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import metadata

    study_dir = tmp_path / "s"
    done = _study(study_dir, "--grid=base_lr=0.01,1e12", "--policy=constant", "--steps=8", "--parallel=1",
                  f"--pack={pack}")
    assert ("1 packed job of 2 members" in done.stderr) == (pack == "auto")
    assert "I0000" not in done.stderr  # the workers' TensorFlow start-up lines are filtered, as in train
    assert done.returncode == 1  # a failed run: the study finished, but not every run did
    ok, bad = study_dir / "base_lr=0.01,seed=0", study_dir / "base_lr=1e12,seed=0"
    assert json.loads((ok / "study_result.json").read_text())["status"] == "finished"
    failed = json.loads((bad / "study_result.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("NonFiniteLossError: ")
    assert [line for line in user_lines(done.stderr) if "failed:" in line] == [
        f"study: base_lr=1e12,seed=0 failed: {failed['error']}"]
    manifest = json.loads((study_dir / "study.json").read_text())
    assert manifest["aggregates"]["groups"][1]["failed"] == {"base_lr=1e12,seed=0": failed["error"]}
    assert "- failed: base_lr=1e12,seed=0: NonFiniteLossError" in (study_dir / "study.md").read_text()
    assert (study_dir / "study.png").exists()

    root = ea.EventAccumulator(str(study_dir))
    root.Reload()
    experiment = metadata.parse_experiment_plugin_data(
        root.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content)
    assert [h.name for h in experiment.hparam_infos] == ["base_lr", "seed"]
    for run, value in ((ok, "0.01"), (bad, "1e12")):
        acc = ea.EventAccumulator(str(run), size_guidance={ea.TENSORS: 0})
        acc.Reload()
        assert metadata.SESSION_START_INFO_TAG in acc.Tags()["tensors"]
        info = metadata.parse_session_start_info_plugin_data(
            acc.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
        assert info.hparams["base_lr"].string_value == value and info.hparams["seed"].number_value == 0
        assert "flags" in acc.Tags()["tensors"]  # the run's flags as a text summary
    tags = ea.EventAccumulator(str(ok), size_guidance={ea.TENSORS: 0})
    tags.Reload()
    assert "study/test_accuracy" in tags.Tags()["tensors"]


# ----------------------------------------------------------------------------- packed runs
def _plan(study_flags, tmp_path, *argv):
    study_flags.unparse_flags()
    study_flags(["x", *TINY, f"--study_dir={tmp_path}", *argv])
    return study.plan_from_flags()


def test_runs_that_share_everything_but_policy_and_seed_form_one_pack(study_flags, tmp_path):
    from clrlab import study_grid

    options, plan = _plan(study_flags, tmp_path, "--grid=policy=constant,triangular", "--seeds=3")
    assert options.pack is None  # --pack=auto
    packs, note = study_grid.plan_packs(plan.runs, None, str(tmp_path))
    assert note is None and [[r.name for r in p.runs] for p in packs] == [[r.name for r in plan.runs]]
    assert packs[0].pack_dir == str(tmp_path / "packs" / packs[0].name)
    again, _ = study_grid.plan_packs(plan.runs, None, str(tmp_path))
    assert again == packs  # a rerun finds the same packs (names from the members)
    packs, _ = study_grid.plan_packs(plan.runs, 4, str(tmp_path))
    assert [len(p.runs) for p in packs] == [4, 2]  # at most 4; the 2 left form a second pack
    assert [len(p.runs) for p in study_grid.plan_packs(plan.runs, 5, str(tmp_path))[0]] == [5]  # 1 left: alone
    assert study_grid.plan_packs(plan.runs, 0, str(tmp_path)) == ([], None)  # --pack=off


@pytest.mark.parametrize("argv, sizes, note", [
    (["--grid=model=mnist1d_cnn,linear"], [],
     "not packed: --model differs between the runs (mnist1d_cnn, linear); the runs train unpacked."),
    (["--grid=policy=constant,triangular", "--trainer=keras_fit"], [],
     "not packed: --trainer=keras_fit (packed runs use the custom loop); the runs train unpacked."),
    (["--grid=batch_size=25,50", "--seeds=2"], [2, 2],
     "not packed together: --batch_size differs between the runs (25, 50); packed in 2 packs of runs that share "
     "the rest."),
    (["--grid=optimizer=sgd,rmsprop", "--seeds=2"], [2],
     "not packed together: --optimizer differs between the runs (sgd, rmsprop); packed in 1 packs of runs that "
     "share the rest (1 group(s) unpacked: --optimizer=rmsprop has no packed update (packable: sgd, nesterov, "
     "adam, adamw))."),
])
def test_a_grid_that_cannot_pack_says_why_in_one_line(study_flags, tmp_path, argv, sizes, note):
    from clrlab import study_grid

    _, plan = _plan(study_flags, tmp_path, *argv)
    packs, got = study_grid.plan_packs(plan.runs, None, str(tmp_path))
    assert [len(p.runs) for p in packs] == sizes and got == note


def test_a_run_started_alone_resumes_alone(study_flags, tmp_path):
    from clrlab import study_workers

    options, plan = _plan(study_flags, tmp_path, "--grid=policy=constant,triangular")
    records = {r.name: None for r in plan.runs}
    todo = [(r.name, r.point, r.config) for r in plan.runs]
    tasks, _ = study.pack_tasks(options, plan, todo, records)
    assert len(tasks) == 1 and isinstance(tasks[0], study_workers.PackJob)
    assert tasks[0].todo == ("policy=constant,seed=0", "policy=triangular,seed=0")
    own = tmp_path / "policy=triangular,seed=0" / "checkpoints"  # an earlier --pack=off run's checkpoint
    own.mkdir(parents=True)
    (own / "ckpt-4.index").write_text("")
    tasks, _ = study.pack_tasks(options, plan, todo, records)
    assert tasks == todo  # the pack never started: both runs alone
    (tmp_path / "packs" / tasks_pack_name(options, plan) / "checkpoints").mkdir(parents=True)
    (tmp_path / "packs" / tasks_pack_name(options, plan) / "checkpoints" / "ckpt-8.index").write_text("")
    tasks, _ = study.pack_tasks(options, plan, todo[1:], {**records, "policy=constant,seed=0": {"status": "finished"}})
    assert len(tasks) == 1 and tasks[0].todo == ("policy=triangular,seed=0",)  # a started pack finishes whole
    assert [m[0] for m in tasks[0].members] == ["policy=constant,seed=0", "policy=triangular,seed=0"]


def tasks_pack_name(options, plan):
    from clrlab import study_grid

    return study_grid.plan_packs(plan.runs, options.pack, options.study_dir)[0][0].name


def test_progress_line_says_how_many_members_each_packed_job_holds():
    from clrlab import study_workers

    p = study_workers.Progress(total=30, started=100.0)
    p.done, p.running, p.packs = 0, 25, {"pack-a": 13, "pack-b": 12}
    assert p.line() == "study: 0 done / 25 running (packed: 2 jobs of 13, 12 members) / 5 left, ETA ?"
    p.packs = {"pack-a": 25}
    assert p.line() == "study: 0 done / 25 running (packed: 1 job of 25 members) / 5 left, ETA ?"


def _results(study_dir, names):
    out = {}
    for name in names:
        run = study_dir / name
        record = json.loads((run / "study_result.json").read_text())
        history = json.loads((run / "history.json").read_text())
        out[name] = (record["status"], record["step"], record["test_accuracy"], history["steps"], history["epochs"]
                     ["val_loss"], history["test"], (run / "classification_report.txt").read_text())
    return out


@pytest.mark.slow
def test_kill_9_during_a_packed_study_then_rerun_gives_the_uninterrupted_results(tmp_path):
    grid = ("--grid=policy=constant,triangular", "--seeds=2", "--steps=80", "--checkpoint_every=8")
    names = ["policy=constant,seed=0", "policy=constant,seed=1", "policy=triangular,seed=0",
             "policy=triangular,seed=1"]
    straight = _study(tmp_path / "straight", *grid)
    assert straight.returncode == 0, straight.stderr
    assert "1 packed job of 4 members" in straight.stderr
    assert "running (packed: 1 job of 4 members)" in straight.stderr

    study_dir = tmp_path / "s"
    proc = _study(study_dir, *grid, popen=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not list(study_dir.glob("packs/*/checkpoints/ckpt-16.index")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert not list(study_dir.glob("*/study_result.json"))  # killed mid-way: no member finished
    time.sleep(1)  # the worker got SIGKILL with its parent (PR_SET_PDEATHSIG)

    done = _study(study_dir, *grid)
    assert done.returncode == 0, done.stderr
    assert sorted(d for d in os.listdir(study_dir) if (study_dir / d).is_dir() and d != "packs") == names
    manifest = json.loads((study_dir / "study.json").read_text())
    assert all(r["status"] == "finished" and r["resumed_from"] >= 16 for r in manifest["runs"].values())
    assert _results(study_dir, names) == _results(tmp_path / "straight", names)  # identical, bit for bit
    again = _study(study_dir, *grid)
    assert again.returncode == 0 and "study: 4 runs (4 already done)" in again.stderr


@pytest.mark.slow
def test_a_grid_that_cannot_pack_trains_unpacked_after_one_line(tmp_path):
    study_dir = tmp_path / "s"
    done = _study(study_dir, "--grid=model=mnist1d_cnn,linear", "--steps=4", "--parallel=1")
    assert done.returncode == 0, done.stderr
    assert [line for line in user_lines(done.stderr) if "packed" in line] == [
        "study: not packed: --model differs between the runs (mnist1d_cnn, linear); the runs train unpacked."]
    assert not (study_dir / "packs").exists()
    for name in ("model=mnist1d_cnn,seed=0", "model=linear,seed=0"):
        assert json.loads((study_dir / name / "study_result.json").read_text())["status"] == "finished"
        assert (study_dir / name / "checkpoints").is_dir()  # an ordinary unpacked run's own checkpoints
