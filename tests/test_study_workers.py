"""clrlab.study_workers: the progress line, and the Ray backend against a local Ray started here."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from clrlab import cli, study, study_workers
from conftest import ROOT


def test_progress_line_counts_and_eta(monkeypatch):
    p = study_workers.Progress(total=10, started=100.0)
    p.done, p.running = 3, 2
    assert p.line() == "study: 3 done / 2 running / 5 left, ETA ?"
    p.completed_now, p.failed = 2, 1
    monkeypatch.setattr(study_workers.time, "monotonic", lambda: 160.0)
    # 2 runs completed in 60 s: (5 left + 2 running) * 30 s = 210 s.
    assert p.line() == "study: 3 done (1 failed) / 2 running / 5 left, ETA 3m30s"


def test_train_seconds_count_only_the_epochs_trained_in_this_call():
    epochs = {"step": [40, 80, 120], "seconds": [1.0, 2.0, 4.0]}
    assert study_workers._seconds_since(epochs, None) == 7.0
    assert study_workers._seconds_since(epochs, 80) == 4.0  # resumed at the end of epoch 2
    evals = {"step": [40, 80, 120], "eval_seconds": [None, 0.5, 0.25]}  # null: an epoch from before the column
    assert study_workers._seconds_since(evals, None, "eval_seconds") == 0.75
    # The first epoch's excess over the later epochs' median: tracing (training 3.0 - 1.0, evaluation 0.5 - 0.25).
    traced = {"step": [40, 80, 120, 160], "seconds": [3.0, 1.0, 1.2, 0.9], "eval_seconds": [0.5, 0.25, 0.25, 0.3]}
    assert study_workers._first_call_seconds(traced, None) == pytest.approx(2.25)
    assert study_workers._first_call_seconds(traced, 40) == 0.0  # resumed: 1.0 is not above median(1.2, 0.9)
    assert study_workers._first_call_seconds(evals, None) == 0.0  # fewer than 3 full columns


def test_final_accuracy_of_a_run_found_complete_is_its_last_evaluation():
    epochs = {"step": [40, 80], "val_accuracy": [0.5, 0.75]}
    assert study_workers._test_accuracy({"accuracy": 0.7}, epochs) == 0.7
    assert study_workers._test_accuracy(None, epochs) == 0.75
    assert study_workers._test_accuracy(None, {}) is None


@pytest.mark.slow
def test_ray_backend_runs_each_run_as_a_task_with_the_same_resume(tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))  # Ray's workers
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        study.reset_flags()
        study.define_study_flags()
        argv = ["clrlab.study", "--dataset=mnist1d:num_samples=300", "--model=mnist1d_cnn", "--batch_size=50",
                "--optimizer=sgd", "--policy=constant", "--steps=8", "--grid=base_lr=0.01,1e12",
                "--backend=ray", f"--study_dir={tmp_path}"]
        cli.FLAGS(argv)
        assert study.main(["clrlab.study"]) == 1  # the diverging run failed; the other finished
        manifest = json.loads((tmp_path / "study.json").read_text())
        assert {n: r["status"] for n, r in manifest["runs"].items()} == {
            "base_lr=0.01,seed=0": "finished", "base_lr=1e12,seed=0": "failed"}
        assert manifest["runs"]["base_lr=1e12,seed=0"]["error"].startswith("NonFiniteLossError: ")
        finished = tmp_path / "base_lr=0.01,seed=0"
        assert json.loads((finished / "history.json").read_text())["epochs"]["step"][-1] == 8
        (pack,) = (tmp_path / "packs").iterdir()  # --pack=auto: the two runs were one packed Ray task
        assert json.loads((pack / "pack.json").read_text())["members"] == [
            str(tmp_path / "base_lr=0.01,seed=0"), str(tmp_path / "base_lr=1e12,seed=0")]
        before = (finished / "study_result.json").read_bytes()
        capsys.readouterr()
        cli.FLAGS.unparse_flags()
        cli.FLAGS(argv)
        assert study.main(["clrlab.study"]) == 1  # rerun: both skipped (finished, failed), nothing submitted
        assert "study: 2 runs (2 already done)" in capsys.readouterr().err
        assert (finished / "study_result.json").read_bytes() == before
    finally:
        ray.shutdown()
        study.reset_flags()


def test_a_pack_refused_once_built_trains_its_runs_alone(tmp_path, monkeypatch, capfd):
    from clrlab import packed_models
    from clrlab.config import TrainConfig

    monkeypatch.setattr(packed_models, "refusal", lambda model: "layer d (Dropout) has no packed form")
    base = TrainConfig(dataset="mnist1d:num_samples=300", normalization="none", model="mnist1d_mlp", batch_size=50,
                       optimizer="sgd", weight_decay=0.0, policy="constant", steps=4, checkpoint_every=2)
    members = tuple((f"seed={s}", {}, dataclasses.replace(base, seed=s, logdir=str(tmp_path / f"seed={s}")))
                    for s in range(2))
    job = study_workers.PackJob("pack-x", str(tmp_path / "packs" / "pack-x"), members, ("seed=0", "seed=1"))
    records = study_workers.execute_pack(job)
    assert [(r["name"], r["status"], r["step"]) for r in records] == [("seed=0", "finished", 4),
                                                                      ("seed=1", "finished", 4)]
    assert "study: pack-x not packed: layer d (Dropout) has no packed form; its 2 runs train unpacked." in \
        capfd.readouterr().err.splitlines()
    for name in ("seed=0", "seed=1"):  # ordinary unpacked runs: their own checkpoints
        assert (tmp_path / name / "checkpoints").is_dir()
        assert json.loads((tmp_path / name / study_workers.RESULT_FILE).read_text())["status"] == "finished"
