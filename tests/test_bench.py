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
    proc = run_bench("--quick", "--workloads=mlp", "--op_counts", f"--out={out}")
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

    # The cycling-momentum pair: same clrlab SGD, fused, the loop assigning the momentum only in i_mom_cycle;
    # each as copies (2 under --quick), every other contender as one.
    for name in ("i_mom_const", "i_mom_cycle"):
        assert w["contenders"][name]["config"]["fused_update_reason"] is None, name
        assert w["contenders"][name]["copies"] == w["contenders"][name]["config"]["copies"] == 2
    assert all(c["copies"] == 1 for n, c in w["contenders"].items() if not n.startswith("i_mom"))
    # --op_counts: every custom-loop contender, none of model.fit's; the difference per ratio.
    for name, c in w["contenders"].items():
        if c["config"]["trainer"] != "CustomLoopTrainer":
            assert "loop_ops" not in c, name
            continue
        ops = c["loop_ops"]
        assert positive(ops["traced_body_ops"]) and positive(ops["executed_ops_per_step"]), name
        assert sum(ops["executed_by_type"].values()) == ops["executed_ops_per_step"], name
        summaries = ops["executed_by_type"].get("WriteSummary", 0)  # lr, loss, accuracy, l2_loss, total_loss..
        assert summaries >= 5 if c["config"]["summary_writer"] else summaries == 0, name
    diff = w["ratios"]["momentum_cycle_over_const"]["loop_ops_difference"]
    cycle, const = (w["contenders"][n]["loop_ops"] for n in ("i_mom_cycle", "i_mom_const"))
    assert diff["executed_ops_per_step"] == cycle["executed_ops_per_step"] - const["executed_ops_per_step"]
    assert diff["executed_by_type"]["WriteSummary"] == 1  # the momentum scalar
    assert "loop_ops_difference" not in w["ratios"]["a_over_c"]  # c_fit_cb is model.fit
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


def test_copies_split_the_steps_rotate_and_sum_the_seconds():
    calls = []

    def copy(i, traces=1):
        def run(n):
            calls.append((i, n))
            return 0.5 * n
        return bench.Contender("x", run, lambda: traces, {"a": 1}, call_size=3)

    both = bench.copies_contender([copy(0), copy(1)])
    assert both.config == {"a": 1, "copies": 2} and both.call_size == 6 and both.traces() == 1
    assert both.run(8) == 4.0 and both.run(4) == 2.0
    assert calls == [(0, 4), (1, 4), (1, 2), (0, 2)]  # n // copies each, the first copy rotating
    with pytest.raises(ValueError, match="do not split"):
        both.run(5)
    assert bench.copies_contender([copy(0), copy(1, traces=2)]).traces() == 2  # a retrace in any copy shows
    assert bench.copies_contender([copy(0), copy(1, traces=None)]).traces() is None


def test_while_frame_ops_counts_the_nodes_between_enter_and_exit():
    from types import SimpleNamespace as Node

    nodes = [Node(op="Const", name="outside", input=[]),
             Node(op="Enter", name="enter", input=["outside"]),
             Node(op="Merge", name="merge", input=["enter", "next"]),
             Node(op="Switch", name="switch", input=["merge", "cond"]),
             Node(op="Identity", name="body", input=["switch:1"]),
             Node(op="Const", name="in_frame", input=["^body"]),  # a control edge keeps it in the frame
             Node(op="AddV2", name="add", input=["body", "in_frame"]),
             Node(op="NextIteration", name="next", input=["add"]),
             Node(op="Exit", name="exit", input=["switch"]),
             Node(op="Identity", name="after", input=["exit"])]
    counts = bench._while_frame_ops(Node(node=nodes))
    assert counts == {"Merge": 1, "Switch": 1, "Identity": 1, "Const": 1, "AddV2": 1, "NextIteration": 1}


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
