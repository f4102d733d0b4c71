"""scripts/bench.py: the --quick smoke run writes well-formed JSON; bad flags are one-line errors.

Never asserts a speed: timings on a shared CI machine mean nothing. The smoke run covers the MLP
workload only (every contender and every ratio; the other workloads differ only in the model): 15-45 s
on 2 CPU cores, so it is marked slow. The statistics helpers are tested in-process, without TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env, user_lines

SCRIPT = os.path.join(ROOT, "scripts", "bench.py")

# The script's tables (it imports TensorFlow only inside its functions, so loading it is cheap).
_spec = importlib.util.spec_from_file_location("clrlab_bench_script", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TARGET_RATIOS = ("a_over_c", "a_over_d", "a_over_b", "g_over_train_step", "log_every_step_over_every_100",
                 "momentum_cycle_over_const")
SUMMARIES = ("steps_per_s", "examples_per_s", "ms_per_step")


def run_bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), cwd=ROOT)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_quick_run_writes_every_workload_contender_and_ratio(tmp_path):
    out = tmp_path / "new_folder" / "bench.json"  # the folder is created
    proc = run_bench("--quick", "--workloads=mlp", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "results written to" in proc.stdout and "a_over_c" in proc.stdout  # the table went to stdout
    result = json.loads(out.read_text())

    meta = result["meta"]
    assert meta["quick"] is True and meta["tensorflow"] and meta["keras"] and meta["cpu_model"]
    assert meta["cpu_count"] >= 1 and isinstance(meta["gpus"], list)
    assert meta["cli_defaults"]["steps_per_loop"] == 100 and meta["cli_defaults"]["summary_every"] == 1

    assert list(result["workloads"]) == ["mlp"]
    w = result["workloads"]["mlp"]
    assert w["model"] == "mlp" and w["input_shape"] == [28, 28, 1] and positive(w["parameters"])
    assert positive(w["batch_size"]) and positive(w["steps_per_repeat"]) and positive(w["repeats"])
    assert set(w["contenders"]) == set(bench.WORKLOADS["mlp"]["contenders"]) == set(bench.ALL_CONTENDERS)
    for name, c in w["contenders"].items():
        for key in (*SUMMARIES, "cpu_ms_per_step"):
            stats = c[key]
            assert all(positive(stats[k]) for k in ("median", "min", "max")), (name, key, stats)
            assert stats["min"] <= stats["median"] <= stats["max"]
            assert len(stats["values"]) == w["repeats"] and all(positive(v) for v in stats["values"])
            assert stats["spread_pct"] >= 0
        assert positive(c["peak_rss_mb"]) and c["peak_rss_delta_mb"] >= 0 and c["build_rss_delta_mb"] >= 0
        assert positive(c["build_and_warmup_s"]) and c["description"] and c["config"]
        # Exactly one trace (model.fit's counted inside Keras' train_function): no retracing between calls.
        assert c["traces"] == 1, (name, c["traces"])
        # examples/s = steps/s x batch size
        assert c["examples_per_s"]["median"] == pytest.approx(c["steps_per_s"]["median"] * w["batch_size"])

    # The cycling-momentum pair: same clrlab SGD, fused, the loop assigning the momentum only in i_mom_cycle.
    for name in ("i_mom_const", "i_mom_cycle"):
        assert w["contenders"][name]["config"]["fused_update_reason"] is None, name
    assert w["contenders"]["i_mom_cycle"]["config"]["momentum_schedule"] == "CyclicalMomentum"
    assert w["contenders"]["i_mom_const"]["config"]["momentum_schedule"] is None
    assert set(w["ratios"]) == set(bench.RATIOS)  # every ratio: all its contenders ran
    for key, r in w["ratios"].items():
        assert positive(r["value"]) and positive(r["min"]) and positive(r["max"]), key
        assert r["comparison"] in (">=", "<=") and len(r["values"]) == w["repeats"]
        low, high = r["ci95"]
        assert positive(low) and low <= r["value"] <= high and positive(r["cpu_time_value"]), key
        if key in TARGET_RATIOS:
            assert positive(r["target"]) and isinstance(r["pass"], bool), key
            assert r["verdict"].split()[0] == ("PASS" if r["pass"] else "MISS"), key
        else:
            assert r["target"] is None and r["pass"] is None and r["verdict"] is None, key
    assert {(t["workload"], t["ratio"]) for t in result["targets"]} == {("mlp", k) for k in TARGET_RATIOS}


@pytest.mark.parametrize("args,needle", [
    (["--repeats=0"], "--repeats"),
    (["--steps=-3"], "--steps"),
    (["--workloads=resnet9000"], "--workloads"),
    (["--contenders=a_default,zzz"], "--contenders"),
    (["--batch_size=abc"], "--batch_size"),
    (["--no_such_flag"], "unrecognized"),
])
def test_invalid_argument_is_one_line_error_exit_1(tmp_path, args, needle):
    out = tmp_path / "never.json"
    proc = run_bench(*args, f"--out={out}", timeout=60)
    lines = user_lines(proc.stderr)
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not out.exists()


def test_help_describes_the_flags_and_contenders():
    proc = run_bench("--help", timeout=60)
    assert proc.returncode == 0
    for flag in ("--quick", "--out", "--repeats", "--steps", "--workloads", "--contenders", "--batch_size"):
        assert flag in proc.stdout
    assert "c_fit_cb" in proc.stdout and "d_fit_sched" in proc.stdout


def test_median_ci_is_the_order_statistic_interval_of_the_binomial():
    # n = 10 at 95%: P(Binomial(10, 1/2) <= 1) = 11/1024 <= 0.025 < P(<= 2) = 56/1024, so k = 2: the
    # interval is (x_(2), x_(9)) of the sorted values.
    values = [9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0, 5.0, 10.0]
    assert bench.median_ci(values) == (2.0, 9.0)
    # Too few points for the level: the whole range.
    assert bench.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert bench.median_ci([4.0]) == (4.0, 4.0)


def test_summary_median_min_max_and_spread():
    summary = bench._summary([2.0, 1.0, 4.0])
    assert summary == {"median": 2.0, "min": 1.0, "max": 4.0, "spread_pct": 150.0, "values": [2.0, 1.0, 4.0]}
