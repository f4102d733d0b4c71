"""A study's aggregates and their outputs: the per-group statistics (`aggregate`), the readable study.md,
the study.png figure (held-out accuracy and loss against iterations, mean with a +-1 sd band over seeds per
group, and each group's LR curve), and the TensorBoard HParams experiment config at the study root.

Runs in the study's parent process after the runs, eagerly, on history.json data (plain Python/NumPy).
Iterations are optimizer steps; held-out curves have one point per epoch (clrlab evaluates at every epoch
end), so iterations-to-target has a resolution of one epoch's steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from clrlab import files
from clrlab import study_stats as stats


def load_history(logdir: str) -> dict[str, Any] | None:
    return files.read_json(os.path.join(logdir, "history.json"), "the run's history")


def group_label(point: Mapping[str, str], varying: Sequence[str]) -> str:
    """A group = one grid point (all its seeds), named by its varying values ("all" without any)."""
    return ",".join(f"{k}={point[k]}" for k in varying) or "all"


def aggregate(runs: Sequence[Mapping[str, Any]], varying: Sequence[str], baseline: str,
              target_accuracy: float | None) -> dict[str, Any]:
    """Per-group statistics over seeds.

    runs: [{"name", "point", "seed", "record" (study_result.json or None), "history" (history.json or None)}].
    baseline: the label of the baseline group. target_accuracy: None = the baseline's mean final test
    accuracy. Final accuracy is the run's test accuracy at the end of training; best accuracy the best
    per-epoch held-out accuracy; iterations-to-target uses the per-epoch held-out accuracy (None = not
    reached); the ratio against the baseline counts a seed that did not reach the target at its step budget
    (so `censored` marks a ratio that is then a bound, not an estimate).
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(group_label(r["point"], varying), []).append(r)

    def finished(label):
        return [r for r in groups[label] if r["record"] and r["record"]["status"] == "finished"]

    if target_accuracy is None:
        base = [r["record"]["test_accuracy"] for r in finished(baseline)] if baseline in groups else []
        target, source = (stats.mean_ci(base)["mean"], f"mean final test accuracy of {baseline}") if base \
            else (None, "none (the baseline has no finished run)")
    else:
        target, source = float(target_accuracy), "--target_accuracy"

    def iterations(label):
        rows = finished(label)
        per_seed = [stats.iterations_to_target(r["history"]["epochs"], target) if target is not None else None
                    for r in rows]
        budgets = [int(r["history"]["epochs"]["step"][-1]) for r in rows]
        cens = [b if v is None else v for v, b in zip(per_seed, budgets)]
        return per_seed, cens

    base_iters, base_cens = iterations(baseline) if baseline in groups else ([], [])
    out = []
    for label, members in groups.items():
        done = finished(label)
        per_seed, cens = iterations(label)
        reached = [v for v in per_seed if v is not None]
        ratio = stats.ratio_ci(cens, base_cens) if reached and base_cens else \
            {"ratio": None, "ci_low": None, "ci_high": None}
        out.append({
            "group": label, "point": dict(members[0]["point"]), "runs": len(members), "finished": len(done),
            "failed": {r["name"]: r["record"]["error"] for r in members
                       if r["record"] and r["record"]["status"] == "failed"},
            "final_test_accuracy": stats.mean_ci([r["record"]["test_accuracy"] for r in done]),
            "best_val_accuracy": stats.mean_ci([r["record"]["best_val_accuracy"] for r in done]),
            "iterations_to_target": {
                "per_seed": dict(zip([r["name"] for r in done], per_seed)),
                "reached": len(reached), "fraction_reached": len(reached) / len(done) if done else None,
                "reached_mean": stats.mean_ci(reached)},
            "ratio_vs_baseline": {**ratio, "censored": len(reached) < len(done) or len(
                [v for v in base_iters if v is not None]) < len(base_iters)},
            "wall_seconds": stats.mean_ci([r["record"]["wall_seconds"] for r in done]),
            "train_seconds": stats.mean_ci([r["record"]["train_seconds"] for r in done]),
            "curves": {"val_accuracy": stats.group_curves([r["history"] for r in done], "val_accuracy"),
                       "val_loss": stats.group_curves([r["history"] for r in done], "val_loss")},
        })
    return {"baseline": baseline, "target_accuracy": target, "target_source": source,
            "eval_resolution_steps": _resolution(runs), "groups": out}


def _resolution(runs) -> int | None:
    for r in runs:
        steps = (r["history"] or {}).get("epochs", {}).get("step", [])
        if steps:
            return int(steps[0])
    return None


def _pct(ci: Mapping[str, Any]) -> str:
    if ci["mean"] is None:
        return "-"
    text = f"{100 * ci['mean']:.1f}"
    if ci["std"] is not None:
        text += f" ± {100 * ci['std']:.1f} ({100 * ci['ci_low']:.1f}–{100 * ci['ci_high']:.1f})"
    return text


def _num(ci: Mapping[str, Any], digits: int = 0) -> str:
    if ci["mean"] is None:
        return "-"
    text = f"{ci['mean']:.{digits}f}"
    if ci["std"] is not None:
        text += f" ({ci['ci_low']:.{digits}f}–{ci['ci_high']:.{digits}f})"
    return text


def _factor(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(aggregates: Mapping[str, Any]) -> str:
    """The results table (Markdown) of `aggregate`'s output."""
    rows = ["| group | runs | final test acc. %, mean ± sd (95% CI) | best held-out acc. % | iterations to "
            "target, mean over reached (95% CI) | reached | ratio vs baseline (95% bootstrap CI) | wall s/run |",
            "|---|---|---|---|---|---|---|---|"]
    for g in aggregates["groups"]:
        it = g["iterations_to_target"]
        r = g["ratio_vs_baseline"]
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f} ({r['ci_low']:.2f}–{r['ci_high']:.2f})"
        if r["ratio"] is not None and r["censored"]:
            ratio += " censored"
        failed = f", {len(g['failed'])} failed" if g["failed"] else ""
        reached = "-" if it["fraction_reached"] is None else f"{it['reached']}/{g['finished']}"
        rows.append(f"| {g['group']} | {g['finished']}/{g['runs']}{failed} | {_pct(g['final_test_accuracy'])} | "
                    f"{_pct(g['best_val_accuracy'])} | {_num(it['reached_mean'])} | {reached} | {ratio} | "
                    f"{_num(g['wall_seconds'], 1)} |")
    return "\n".join(rows)


def markdown(aggregates: Mapping[str, Any], identity: Mapping[str, Any], throughput: Mapping[str, Any]) -> str:
    t = aggregates["target_accuracy"]
    lines = [
        "# Study", "",
        "Grid: " + "; ".join(f"--grid={n}={','.join(v)}" for n, v in identity["grid"])
        + f"; --seeds={identity['seeds']}", "",
        "Common flags: " + (" ".join(f"`{a}`" for a in identity["common"]) or "(defaults)"), "",
        f"Baseline: {aggregates['baseline']}. Target accuracy: "
        + ("none" if t is None else f"{100 * t:.2f}%") + f" ({aggregates['target_source']}).", "",
        table(aggregates), "",
        "Final test accuracy: at the end of training. Best held-out accuracy: the best per-epoch evaluation on "
        "the same held-out split. Iterations to target: the first epoch-end step whose held-out accuracy "
        f"reaches the target (resolution: one evaluation every {aggregates['eval_resolution_steps']} steps, "
        "clrlab evaluates at each epoch end); `reached` = seeds that reached it (\"not reached\" is a result). "
        "Ratio: mean iterations-to-target of the group / the baseline's, percentile bootstrap over seeds "
        f"({stats.BOOTSTRAP_SAMPLES} resamples); `censored`: some seed did not reach the target and counts "
        "at its step budget, so the ratio is a bound.", "",
    ]
    if throughput:
        t = throughput
        p = t["parallel"]
        lines += [f"Throughput (this invocation): wall {t['wall_seconds']:.1f} s for {t['runs_executed']} runs on "
                  f"{p} workers. Sum over runs / workers: in-loop training and evaluation "
                  f"{t['in_loop_seconds'] / p:.1f} s (training {t['train_seconds'] / p:.1f} s, evaluation "
                  f"{t.get('eval_seconds', 0.0) / p:.1f} s; history.json epochs.seconds and eval_seconds): wall / "
                  f"that = {_factor(t.get('wall_vs_in_loop'))} (the rest is start-up, set-up, checkpoints, "
                  f"history writes and final reports), {_factor(t.get('wall_vs_in_loop_untraced'))} with the "
                  f"first compiled calls' tracing ({t.get('trace_seconds', 0.0) / p:.1f} s) counted as overhead "
                  f"too; training loops with their "
                  f"bookkeeping {t['loop_seconds'] / p:.1f} s (wall / that = {_factor(t['wall_vs_loop'])}).", ""]
    for g in aggregates["groups"]:
        for name, error in g["failed"].items():
            lines.append(f"- failed: {name}: {error}")
    return "\n".join(lines).rstrip() + "\n"


def throughput(records: Sequence[Mapping[str, Any]], wall: float, parallel: int) -> dict[str, Any]:
    """Wall time of an invocation against the runs' own times divided by the parallelism P (the workers):
    `wall_vs_in_loop` = wall / ((sum of the runs' in-loop training `train_seconds` + evaluation
    `eval_seconds`) / P), so 1.25 means start-up, checkpoints, history writes and the runs' set-up and final
    reports cost 25% on top of training and evaluating; `wall_vs_in_loop_untraced` also counts the tracing in
    the first compiled calls (`trace_seconds`, an estimate) as overhead rather than as training; and against
    the training loops (`loop_seconds`: in-loop time plus its bookkeeping) and the training steps alone."""
    loop = sum(r.get("loop_seconds") or 0.0 for r in records)
    train = sum(r.get("train_seconds") or 0.0 for r in records)
    evaluation = sum(r.get("eval_seconds") or 0.0 for r in records)
    in_loop = train + evaluation
    untraced = in_loop - sum(r.get("trace_seconds") or 0.0 for r in records)
    return {"wall_seconds": wall, "runs_executed": len(records), "parallel": parallel, "loop_seconds": loop,
            "train_seconds": train, "eval_seconds": evaluation, "in_loop_seconds": in_loop,
            "run_wall_seconds": sum(r.get("wall_seconds") or 0.0 for r in records),
            "trace_seconds": in_loop - untraced,
            "wall_vs_in_loop": wall * parallel / in_loop if in_loop else None,
            "wall_vs_in_loop_untraced": wall * parallel / untraced if untraced > 0 else None,
            "wall_vs_loop": wall * parallel / loop if loop else None,
            "wall_vs_train": wall * parallel / train if train else None}


def plot(aggregates: Mapping[str, Any], lr_curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
         path: str) -> None:
    """study.png: held-out accuracy and loss (mean, +-1 sd band over seeds) and the LR per group."""
    fig = Figure(figsize=(15, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for i, g in enumerate(aggregates["groups"]):
        color = f"C{i % 10}"
        for ax, key in zip(axes[:2], ("val_accuracy", "val_loss")):
            c = g["curves"][key]
            if not c:
                continue
            lo = [m - s for m, s in zip(c["mean"], c["std"])]
            hi = [m + s for m, s in zip(c["mean"], c["std"])]
            ax.plot(c["step"], c["mean"], color=color, label=f"{g['group']} (n={g['finished']})")
            ax.fill_between(c["step"], lo, hi, color=color, alpha=0.2, linewidth=0)
        if g["group"] in lr_curves:
            steps, lrs = lr_curves[g["group"]]
            axes[2].plot(steps, lrs, color=color, label=g["group"])
    t = aggregates["target_accuracy"]
    if t is not None and math.isfinite(t):
        axes[0].axhline(t, color="k", linestyle=":", linewidth=1, label=f"target {100 * t:.1f}%")
    for ax, title in zip(axes, ("held-out accuracy (mean ± 1 sd over seeds)", "held-out loss", "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("Training iterations (steps)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if axes[2].lines:
        axes[2].set_yscale("log")  # one_cycle ends at base_lr / final_div_factor, decades below the rest
    fig.savefig(path, format="png")


def write_hparams_config(study_dir: str, values: Mapping[str, Sequence[str]], seeds: int) -> None:
    """The HParams experiment at the study root (once): each varying grid flag and the seed as an HParam,
    the runs' held-out curves and study metrics as Metrics. Each run holds its own session summary.

    values: {varying flag: its values in the grid, as given}."""
    import tensorflow as tf  # deferred: only the study's parent needs it here, once
    from tensorboard.plugins.hparams import api as hp

    if any(f.startswith("events.out.tfevents") for f in os.listdir(study_dir)):
        return
    hparams = [hp.HParam(name, hp.Discrete(list(v))) for name, v in values.items()]
    hparams.append(hp.HParam("seed", hp.Discrete(list(range(seeds)))))
    metrics = [hp.Metric("accuracy", group="validation", display_name="held-out accuracy"),
               hp.Metric("loss", group="validation", display_name="held-out loss"),
               hp.Metric("study/test_accuracy", display_name="final test accuracy"),
               hp.Metric("study/best_val_accuracy", display_name="best held-out accuracy"),
               hp.Metric("study/wall_seconds", display_name="wall seconds")]
    writer = tf.summary.create_file_writer(study_dir)
    with writer.as_default():
        hp.hparams_config(hparams=hparams, metrics=metrics)
    writer.close()
