"""The LR range test (Smith 2015, section 3.3): sweep the LR upwards, watch loss and accuracy, recommend
`base_lr`/`max_lr`, and print the command that trains with them.

    python -m clrlab.range_finder --sweep=linear                   # Smith's test: judged on accuracy
    python -m clrlab.range_finder --sweep=exponential --steps=200  # fastai-style: judged on the loss
    clrlab-range-test --helpfull          # the installed console script; also scripts/range_test.py

The sweep runs the SAME compiled training step as `python -m clrlab.train` (`CustomLoopTrainer`, with a
`LinearSweep`/`ExponentialSweep` policy assigned every step in graph); it records per step the LR used,
that batch's loss and accuracy (not Keras running means) and, with `--eval_every`, a held-out accuracy.
It stops early when the smoothed loss exceeds `--divergence_factor` x its best (sound for negative
losses) and at once on NaN/inf. Afterwards every model weight (batch-norm statistics included), every
optimizer variable (slots, iterations, the LR variable, loss-scale state) and the step counter are
restored bitwise, so a sweep can run inside a session before training (`run_sweep`).

The analysis is `clrlab.lr_suggest.recommend` (pure numpy) on zero-lag, noise-aware trends: max_lr is half the
sweep's top, the lower of where the accuracy peaks (Smith's accuracy rule) and where the loss reaches its bottom
(the loss rule, Smith 2018, sec. 4.1), base_lr max_lr/3 or where the accuracy starts to rise when that lies 3-4x
below (`clrlab.lr_suggest.choose_bounds`); each bound names the rule that produced it
(fallbacks say so) and every doubt is a printed `warning:` line (disagreeing rules, a short, flat or at once
diverging curve, a range under 3x). The other suggestions, printed for reference:

* steep: the LR where the smoothed loss falls fastest against log(LR) (fastai).
* minimum: the LR of the lowest smoothed loss, divided by 10 (fastai).
* valley: the middle of the longest stretch where the smoothed loss keeps falling (fastai's default).
* slide: where the loss gradient stops changing, sliding left from the end of the sweep (fastai).

`--repeats=N` runs N sweeps (other batches), recommends on their mean curve and reports each sweep's bounds.

Outputs in --logdir: range_test.png, range_test.json (every series, every suggestion, the chosen bounds
and the rule of each, the warnings, whether and why it stopped early, the setup --bounds_from checks, and
the train command), and in --logdir/range_test TensorBoard scalars under their own `range_test/` tags
(`range_test/learning_rate`, `range_test/loss`, `range_test/accuracy` per sweep step, the smoothed curves)
and the plot as the image `range_test/plot`, so `tensorboard --logdir runs/` never mixes a sweep into the
training cards. The default --logdir is runs/range_test-<timestamp>.

Ctrl-C (SIGINT) or SIGTERM during the sweep ends it after the current compiled chunk: the model is restored,
what was swept is analysed and written (range_test.json with `"complete": false` and `"incomplete_reason"`), and the
command exits with 130 (SIGINT) or 143 (SIGTERM), the shell's 128 + signal number. A second Ctrl-C stops at
once (exit 130); an interrupt before or after the sweep exits 130 without a traceback.

The command: flags (`clrlab.cli.define_range_test_flags`) -> `TrainConfig` (`cli.config_from_flags`, the
same conversion as `python -m clrlab.train`) and the sweep settings (`cli.sweep_options_from_flags`) ->
job (`clrlab.job.build_job`) -> `trainers.range_sweep.run_sweep` -> outputs and report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

from absl import app, flags

from clrlab import cli, lr_curves, lr_suggest
from clrlab import config as config_lib
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from clrlab.sweep import SWEEP_DEFAULTS, SweepOptions

EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal number, as a shell reports a process it killed


# ------------------------------------------------------------------------------------ command line
def _train_command(config: TrainConfig, base_lr: float, max_lr: float, step_size_epochs: float,
                   json_path: str) -> tuple[str, str]:
    defaults = TrainConfig()
    parts = ["python -m clrlab.train"]
    for name in ("dataset", "data_dir", "normalization", "model", "weight_decay", "batch_size", "optimizer",
                 "momentum", "mixed_precision"):
        value = getattr(config, name)
        if value != getattr(defaults, name):
            parts.append(f"--{name}={value}")
    if config.augment:
        parts.append("--augment")
    explicit = " ".join(parts + ["--policy=triangular", f"--base_lr={base_lr:.3g}", f"--max_lr={max_lr:.3g}",
                                 f"--step_size_epochs={step_size_epochs:g}"])
    from_file = " ".join(parts + ["--policy=triangular", f"--bounds_from={json_path}",
                                  f"--step_size_epochs={step_size_epochs:g}"])
    return explicit, from_file


def sweep_options(options_flags: dict[str, Any], steps_per_epoch: int) -> SweepOptions:
    """`SweepOptions` from the range test's flags (`cli.sweep_options_from_flags`; None or missing entries
    take `SWEEP_DEFAULTS`). A sweep length in epochs becomes steps with `steps_per_epoch` (at least 10)."""
    sweep = options_flags["sweep"]
    defaults = SWEEP_DEFAULTS[sweep]
    if options_flags.get("steps"):
        num_steps = int(options_flags["steps"])
    elif options_flags.get("epochs") or "epochs" in defaults:
        epochs = options_flags.get("epochs") or defaults["epochs"]
        num_steps = max(10, int(round(epochs * steps_per_epoch)))
    else:
        num_steps = int(defaults["steps"])
    return SweepOptions(
        sweep=sweep, start_lr=options_flags.get("start_lr") or defaults["start_lr"],
        end_lr=options_flags.get("end_lr") or defaults["end_lr"], num_steps=num_steps,
        eval_every=int(options_flags.get("eval_every") or 0),
        smoother=options_flags.get("smoother", "ema_debiased"), beta=float(options_flags.get("beta", 0.98)),
        divergence_factor=float(options_flags.get("divergence_factor", 4.0)),
        check_every=max(1, min(25, num_steps // 30)))


def run(config: TrainConfig, options_flags: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Builds the job of `config` (data/model/optimizer settings), sweeps, writes the outputs, returns the
    JSON dict written to `range_test.json` (eager)."""
    import keras  # deferred, with the modules below that import it: --help answers without TensorFlow
    import tensorflow as tf

    from clrlab import job as job_lib
    from clrlab import plots
    from trainers.range_sweep import run_sweep
    from trainers.run_state import StopRequests, check_folders

    policy = keras.mixed_precision.global_policy().name
    stops = StopRequests("ending the sweep after the current steps; the model is restored.")
    try:
        job_lib.setup_runtime(config)
        job = job_lib.build_job(config)
        options = sweep_options(options_flags, job.steps_per_epoch)
        sweep, num_steps = options.sweep, options.num_steps
        logdir = os.path.abspath(config.logdir)
        check_folders([logdir, os.path.join(logdir, "range_test")], [os.path.join(logdir, "range_test.json")])
        writer = tf.summary.create_file_writer(os.path.join(logdir, "range_test"))
        print(f"clrlab range test: {sweep} sweep {options.start_lr:g} -> {options.end_lr:g} over {num_steps} steps "
              f"({num_steps / job.steps_per_epoch:.2g} epochs of {job.splits.name}); model {job.model.name}; "
              f"logdir {logdir}", flush=True)
        repeats = max(1, int(options_flags.get("repeats") or 1))
        results = []
        with stops:
            for r in range(repeats):
                results.append(run_sweep(job.model, job.optimizer, job.train_data_fn(r), options,
                                         strategy=job.strategy,
                                         eval_dataset=job.eval_dataset() if options.eval_every else None,
                                         summary_writer=writer if r == 0 else None,
                                         progress=progress and sys.stdout.isatty(),
                                         stop_requested=lambda: stops.name))
                if stops.name is not None:  # interrupted: analyse what was swept so far
                    break
    except ValueError as e:  # too few steps swept to analyse: only after an interrupt (a sweep has >= 10 steps)
        if stops.name is None:
            raise
        out = {"complete": False, "incomplete_reason": f"interrupted by {stops.name}", "error": str(e)}
        _write_json(os.path.join(logdir, "range_test.json"), out)
        return out
    finally:
        keras.mixed_precision.set_global_policy(policy)
    result = results[0]
    if len(results) > 1 and stops.name is None:
        # The mean curve of the sweeps (same schedule, other batches); spread = each sweep's bounds.
        recs = [r.recommendation for r in results]
        combined = lr_suggest.recommend_repeats([(r.lrs, r.loss_raw, r.accuracy) for r in recs], sweep=sweep,
                                                smoother=options.smoother, beta=options.beta,
                                                divergence_factor=options.divergence_factor)
        result = dataclasses.replace(result, recommendation=combined)
    rec = result.recommendation
    png = plots.plot_range_test(rec.lrs, rec.loss_raw, rec.loss_trend or None, os.path.join(logdir, "range_test.png"),
                                accuracy=rec.accuracy, accuracy_trend=rec.accuracy_trend, base_lr=rec.base_lr,
                                max_lr=rec.max_lr, base_rule=rec.base_rule, max_rule=rec.max_rule,
                                log_x=(sweep == "exponential"), suggestions=rec.suggestions,
                                title=f"LR range test ({sweep}, {job.splits.name}, {job.model.name})")
    with writer.as_default():
        for i, (smoothed, trend) in enumerate(zip(rec.loss_smooth, rec.loss_trend, strict=True)):
            tf.summary.scalar("range_test/loss_smooth", smoothed, step=i)
            tf.summary.scalar("range_test/loss_trend", trend, step=i)
        if isinstance(png, (bytes, bytearray)):
            tf.summary.image("range_test/plot", tf.image.decode_png(png)[tf.newaxis], step=0)
    writer.flush()
    out = result.to_dict()
    json_path = os.path.join(logdir, "range_test.json")
    if rec.base_lr is not None and rec.max_lr is not None:
        explicit, from_file = _train_command(config, rec.base_lr, rec.max_lr,
                                             options_flags.get("step_size_epochs", 4.0), json_path)
        out["command"], out["command_bounds_from"] = explicit, from_file
    out["options"] = dataclasses.asdict(options)
    out["dataset"], out["model"] = job.splits.name, job.model.name
    out["repeats"] = len(results)
    # The settings a training run with --bounds_from is checked against (clrlab.config.bounds_mismatch).
    out["setup"] = {name: getattr(config, name) for name in config_lib.BOUNDS_SETUP_FIELDS}
    out["complete"] = stops.name is None
    if stops.name is not None:
        out["incomplete_reason"] = f"interrupted by {stops.name} after {len(rec.lrs)} of {num_steps} steps"
    _write_json(json_path, out)
    return out


def _write_json(path: str, out: dict[str, Any]) -> None:
    """range_test.json, atomically; a failed write (disk full, read-only, ...) is a one-line UserError."""
    from trainers.run_state import write_text  # deferred: it imports TensorFlow (see run)

    write_text(path, json.dumps(out, indent=1, allow_nan=False))


def _report(out: dict[str, Any], logdir: str) -> None:
    if not out["complete"]:
        print(f"Sweep {out['incomplete_reason']}; the model is restored. What was swept is in "
              f"{os.path.join(logdir, 'range_test.json')} (marked incomplete).", flush=True)
        if "error" in out:
            return
    stop = f"stopped early ({out['reason']} at step {out['stop_index']})" if out["stopped_early"] else "ran to the end"
    print(f"Sweep {stop}. Suggestions: " + ", ".join(
        f"{k}={v:.3g}" for k, v in out["suggestions"].items() if v is not None))
    for name in lr_curves.SUGGESTION_HELP:
        if out["suggestions"].get(name) is not None:
            print("  " + lr_curves.SUGGESTION_HELP[name])
    for warning in out.get("warnings", ()):
        print(f"warning: {warning}")
    if out.get("command"):
        print(f"Recommended bounds: base_lr={out['base_lr']:.3g} ({out['base_rule']}), "
              f"max_lr={out['max_lr']:.3g} ({out['max_rule']})")
        for line in lr_suggest.rule_help(f"{out['base_rule']} {out['max_rule']}"):
            print("  " + line)
        if out.get("spread"):
            spread = out["spread"]
            print(f"Spread over {out['repeats']} sweeps: base_lr " + ", ".join(
                "none" if v is None else f"{v:.3g}" for v in spread["base_lr"]) + "; max_lr " + ", ".join(
                "none" if v is None else f"{v:.3g}" for v in spread["max_lr"]))
        print(f"Plot: {os.path.join(logdir, 'range_test.png')}   Result: {os.path.join(logdir, 'range_test.json')}")
        print("Train with them:\n  " + out["command"] + "\nor:\n  " + out["command_bounds_from"])
    else:
        print("No bounds could be recommended (neither loss nor accuracy changed clearly): widen "
              "--start_lr/--end_lr or sweep longer.")


def main(argv: list[str]) -> int:
    """The command after flag parsing: 0 done, 1 a problem the user can fix (one line on stderr), 130 Ctrl-C,
    143 SIGTERM (during the sweep: what was swept is written, marked incomplete)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (see --help)", file=sys.stderr)
        return 1
    try:
        config = cli.config_from_flags()
        options_flags = cli.sweep_options_from_flags()
        out = run(config, options_flags)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:  # a write outside range_test.json (the plot, the events): disk full, ...
        from trainers.run_state import write_error

        print(f"error: {write_error(e.filename or 'the run folder', 'the file', e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside the sweep (loading data, building, plotting)
        print("Interrupted (Ctrl-C) outside the sweep; range_test.json was not written.", file=sys.stderr)
        return EXIT_SIGINT
    _report(out, os.path.abspath(config.logdir))
    if not out["complete"]:
        return EXIT_SIGTERM if "SIGTERM" in out["incomplete_reason"] else EXIT_SIGINT
    return 0


def run_main() -> None:
    """Console-script entry point (`clrlab-range-test`; also `python -m clrlab.range_finder` and
    scripts/range_test.py): defines the flags, parses them, runs `main`."""
    cli.define_range_test_flags(SWEEP_DEFAULTS)
    flags.adopt_module_key_flags(cli)  # so that --help lists them (absl shows the main module's key flags)
    app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
    run_main()
