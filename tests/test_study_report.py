"""clrlab.study_report: the aggregates over seeds on synthetic histories, study.md, study.png, and the
HParams experiment config read back with TensorBoard's own reader."""

from __future__ import annotations

import os

import pytest

from clrlab import study_report


def _run(policy, seed, accuracies, test_accuracy, status="finished", error=None):
    steps = [40 * (i + 1) for i in range(len(accuracies))]
    history = {"epochs": {"step": steps, "val_accuracy": accuracies, "val_loss": [1 - a for a in accuracies]},
               "steps": {"step": steps, "lr": [0.01] * len(steps)}}
    record = {"status": status, "error": error, "test_accuracy": test_accuracy,
              "best_val_accuracy": max(accuracies) if accuracies else None, "wall_seconds": 10.0 + seed,
              "train_seconds": 5.0}
    return {"name": f"policy={policy},seed={seed}", "point": {"policy": policy}, "seed": seed,
            "record": record, "history": history if status == "finished" else None}


@pytest.fixture
def runs():
    return [
        _run("constant", 0, [0.5, 0.7, 0.8, 0.9], 0.9),
        _run("constant", 1, [0.5, 0.6, 0.7, 0.8], 0.8),  # baseline mean final = 0.85
        _run("triangular", 0, [0.6, 0.86, 0.9, 0.95], 0.95),  # reaches 0.85 at step 80
        _run("triangular", 1, [0.6, 0.7, 0.8, 0.84], 0.84),  # never reaches 0.85
        _run("triangular", 2, [], None, status="failed", error="NonFiniteLossError: loss is nan"),
    ]


def _group(agg, label):
    return next(g for g in agg["groups"] if g["group"] == label)


def test_aggregate_target_defaults_to_the_baseline_mean_final_accuracy(runs):
    agg = study_report.aggregate(runs, ["policy"], "policy=constant", None)
    assert agg["target_accuracy"] == pytest.approx(0.85)
    assert agg["eval_resolution_steps"] == 40
    base, tri = _group(agg, "policy=constant"), _group(agg, "policy=triangular")
    assert base["iterations_to_target"]["per_seed"] == {"policy=constant,seed=0": 160, "policy=constant,seed=1": None}
    assert tri["iterations_to_target"]["per_seed"] == {"policy=triangular,seed=0": 80,
                                                      "policy=triangular,seed=1": None}
    assert tri["iterations_to_target"]["fraction_reached"] == 0.5
    assert tri["iterations_to_target"]["reached_mean"]["mean"] == 80
    # Not reached counts at the run's budget (160): (80 + 160) / 2 vs (160 + 160) / 2, flagged censored.
    assert tri["ratio_vs_baseline"]["ratio"] == pytest.approx(0.75)
    assert tri["ratio_vs_baseline"]["censored"] is True
    assert tri["finished"] == 2 and tri["runs"] == 3
    assert tri["failed"] == {"policy=triangular,seed=2": "NonFiniteLossError: loss is nan"}
    assert tri["final_test_accuracy"]["mean"] == pytest.approx(0.895)
    assert base["final_test_accuracy"]["ci_low"] < 0.85 < base["final_test_accuracy"]["ci_high"]


def test_aggregate_with_an_explicit_target_none_reaching_it(runs):
    agg = study_report.aggregate(runs, ["policy"], "policy=constant", 0.99)
    assert agg["target_source"] == "--target_accuracy"
    for g in agg["groups"]:
        assert g["iterations_to_target"]["reached"] == 0
        assert g["iterations_to_target"]["fraction_reached"] == 0.0
        assert g["ratio_vs_baseline"]["ratio"] is None  # nothing reached: no ratio
    text = study_report.table(agg)
    assert "| policy=triangular | 2/3, 1 failed |" in text
    assert "| 0/2 |" in text


def test_markdown_and_plot(runs, tmp_path):
    agg = study_report.aggregate(runs, ["policy"], "policy=constant", None)
    identity = {"grid": [["policy", ["constant", "triangular"]]], "seeds": 3, "common": ["--steps=160"]}
    md = study_report.markdown(agg, identity, {})
    assert "--grid=policy=constant,triangular; --seeds=3" in md
    assert "Target accuracy: 85.00% (mean final test accuracy of policy=constant)" in md
    assert "- failed: policy=triangular,seed=2: NonFiniteLossError: loss is nan" in md
    path = tmp_path / "study.png"
    study_report.plot(agg, {"policy=constant": ([1, 2], [0.01, 0.02])}, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_throughput_compares_wall_time_with_the_runs_own_time_per_worker():
    records = [{"loop_seconds": 30.0, "train_seconds": 20.0, "eval_seconds": 5.0, "trace_seconds": 2.5,
                "wall_seconds": 40.0}] * 4
    t = study_report.throughput(records, wall=75.0, parallel=2)
    assert (t["loop_seconds"], t["train_seconds"], t["run_wall_seconds"]) == (120.0, 80.0, 160.0)
    assert (t["eval_seconds"], t["in_loop_seconds"]) == (20.0, 100.0)
    assert t["wall_vs_in_loop"] == pytest.approx(75.0 / 50.0)  # wall / ((training + evaluation) / P)
    assert t["wall_vs_in_loop_untraced"] == pytest.approx(75.0 / 45.0)  # tracing counted as overhead
    assert t["wall_vs_loop"] == pytest.approx(75.0 / 60.0)
    assert t["wall_vs_train"] == pytest.approx(75.0 / 40.0)
    md = study_report.markdown({"groups": [], "baseline": "x", "target_accuracy": None, "target_source": "none",
                                "eval_resolution_steps": 40}, {"grid": [], "seeds": 1, "common": []}, t)
    assert ("in-loop training and evaluation 50.0 s (training 40.0 s, evaluation 10.0 s; history.json "
            "epochs.seconds and eval_seconds): wall / that = 1.50") in md
    assert "1.67 with the first compiled calls' tracing (5.0 s) counted as overhead" in md
    assert "training loops with their bookkeeping 60.0 s (wall / that = 1.25)" in md
    assert study_report.throughput([{"wall_seconds": 1.0}], wall=1.0, parallel=1)["wall_vs_loop"] is None


def test_hparams_config_is_found_by_the_plugin(tmp_path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.hparams import metadata

    study_report.write_hparams_config(str(tmp_path), {"policy": ["constant", "triangular"]}, seeds=2)
    study_report.write_hparams_config(str(tmp_path), {"policy": ["constant", "triangular"]}, seeds=2)  # once
    assert len([f for f in os.listdir(tmp_path) if f.startswith("events")]) == 1
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    content = acc.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content
    experiment = metadata.parse_experiment_plugin_data(content)
    hparams = {h.name: [v.string_value if v.HasField("string_value") else v.number_value
                        for v in h.domain_discrete.values] for h in experiment.hparam_infos}
    assert hparams == {"policy": ["constant", "triangular"], "seed": [0.0, 1.0]}
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos][:3] == [
        ("validation", "accuracy"), ("validation", "loss"), ("", "study/test_accuracy")]
