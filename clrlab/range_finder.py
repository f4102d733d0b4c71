"""The LR range test (Smith 2015, section 3.3): sweep the LR upwards, watch loss and accuracy, recommend
`base_lr`/`max_lr`, and print the command that trains with them.

    python scripts/range_test.py --sweep=linear                 # Smith's test: judged on accuracy
    python -m clrlab.range_test --sweep=exponential --steps=200  # fastai-style: judged on the loss

The sweep runs the SAME compiled training step as `python -m clrlab.train` (`CustomLoopTrainer`, with a
`LinearSweep`/`ExponentialSweep` policy assigned every step in graph); it records per step the LR used,
that batch's loss and accuracy (not Keras running means) and, with `--eval_every`, a held-out accuracy.
It stops early when the smoothed loss exceeds `--divergence_factor` x its best (sound for negative
losses) and at once on NaN/inf. Afterwards every model weight (batch-norm statistics included), every
optimizer variable (slots, iterations, the LR variable, loss-scale state) and the step counter are
restored bitwise, so a sweep can run inside a session before training (`run_sweep`).

The analysis is `clrlab.lr_suggest.recommend` (pure numpy). Outputs in --logdir: range_test.png,
range_test.json (every series, every suggestion, the chosen bounds, the rule used, whether and why it
stopped early, and the train command), TensorBoard scalars per step and the plot as an image.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from typing import Any

from absl import app, flags, logging

from clrlab import cli
from clrlab.sweep_state import SWEEPS, RangeTestResult, StateSnapshot, SweepOptions  # noqa: F401  (public here too)

FLAGS = flags.FLAGS

# Defaults per sweep: Smith's linear test is long and judged on accuracy (the CLR paper runs 8 epochs);
# the exponential test covers many decades in a few hundred steps.
SWEEP_DEFAULTS = {
    "linear": {"start_lr": 1e-4, "end_lr": 0.1, "epochs": 8.0},
    "exponential": {"start_lr": 1e-6, "end_lr": 1.0, "steps": 300},
}


def _sweep_schedule(options: SweepOptions):
    from clrlab import schedules

    cls = schedules.LinearSweep if options.sweep == "linear" else schedules.ExponentialSweep
    return cls(options.start_lr, options.end_lr, options.num_steps)


def run_sweep(model, optimizer, train_dataset, options: SweepOptions, *, strategy=None, eval_dataset=None,
              summary_writer=None, restore: bool = True, progress: bool = False) -> RangeTestResult:
    """Runs the sweep on `model`/`optimizer` (eager driver; compiled steps), then restores their state.

    Args:
      model, optimizer: as for `CustomLoopTrainer` (float LR optimizer; built or not).
      train_dataset: an (infinite or long enough) dataset of (x, y) training batches.
      options: the sweep.
      eval_dataset: finite held-out dataset, used every `options.eval_every` steps.
      summary_writer: per-step `learning_rate`/`loss`/`accuracy` scalars go here (None: none).
      restore: put weights and optimizer state back afterwards (default; the point of the test).
      progress: show a Keras Progbar.
    """
    import keras
    import numpy as np

    from clrlab import lr_suggest
    from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError

    trainer = CustomLoopTrainer(model, optimizer, _sweep_schedule(options), strategy=strategy,
                                summary_writer=summary_writer)
    snapshot = StateSnapshot(model, optimizer)
    lrs, losses, accs, eval_steps, eval_lrs, eval_accs = [], [], [], [], [], []
    bar = keras.utils.Progbar(options.num_steps, stateful_metrics=["lr", "loss"]) if progress else None
    try:
        iterator = trainer.make_iterator(train_dataset)
        step = 0
        while step < options.num_steps:
            n = min(options.check_every, options.num_steps - step)
            if options.eval_every:
                n = min(n, options.eval_every - step % options.eval_every)
            try:
                records = trainer.train_steps(iterator, n)
                bad = None
            except NonFiniteLossError as e:
                records, bad = e.records, int(np.flatnonzero(~np.isfinite(e.records.loss))[0])
            lrs.extend(records.lr.tolist())
            losses.extend(records.loss.tolist())
            accs.extend(records.accuracy.tolist())
            step += n
            if bar is not None:
                bar.update(step, [("lr", float(records.lr[-1])), ("loss", float(records.loss[-1]))])
            if bad is not None:
                break  # NaN/inf: recommend() truncates at the first non-finite value
            if options.eval_every and eval_dataset is not None and step % options.eval_every == 0:
                eval_steps.append(step - 1)
                eval_lrs.append(float(records.lr[-1]))
                eval_accs.append(trainer.evaluate(eval_dataset)["accuracy"])
            smoothed = lr_suggest.smooth(losses, options.smoother, options.beta)
            if lr_suggest.divergence_index(smoothed, options.divergence_factor) is not None:
                break
    finally:
        if restore:
            snapshot.restore()
    recommendation = lr_suggest.recommend(np.asarray(lrs), np.asarray(losses), np.asarray(accs),
                                          sweep=options.sweep, smoother=options.smoother, beta=options.beta,
                                          divergence_factor=options.divergence_factor)
    bounds = None
    if eval_accs:  # Smith's rule on held-out accuracy beats the noisier per-batch training accuracy
        try:
            bounds = lr_suggest.suggest_from_accuracy(eval_lrs, eval_accs, sweep=options.sweep)
        except ValueError as e:  # too few evaluations: keep the per-batch recommendation
            logging.warning("Held-out accuracy not used for the bounds: %s", e)
    if bounds is not None:
        if bounds.base_lr is not None and bounds.max_lr is not None:
            suggestions = dict(recommendation.suggestions, accuracy_base=bounds.base_lr, accuracy_max=bounds.max_lr)
            recommendation = dataclasses.replace(recommendation, base_lr=bounds.base_lr, max_lr=bounds.max_lr,
                                                 rule=f"heldout_{bounds.rule}", suggestions=suggestions)
    return RangeTestResult(recommendation=recommendation, eval_steps=tuple(eval_steps),
                           eval_lrs=tuple(eval_lrs), eval_accuracies=tuple(eval_accs))


# ------------------------------------------------------------------------------------ command line
def define_flags() -> None:
    cli.define_data_model_flags()
    flags.DEFINE_enum("sweep", "linear", list(SWEEPS),
                      "linear: Smith's test, LR rises linearly (judge it on accuracy: see --eval_every); exponential: "
                      "the LR rises by a constant factor per step. Bounds come from Smith's accuracy rule when the "
                      "accuracy rises, else from the loss curve (valley).")
    flags.DEFINE_float("start_lr", None, "First LR of the sweep (default: 1e-4 linear, 1e-6 exponential).")
    flags.DEFINE_float("end_lr", None, "Last LR of the sweep (default: 0.1 linear, 1.0 exponential).")
    flags.DEFINE_integer("steps", None, "Sweep length in steps (default: 300 for exponential).")
    flags.DEFINE_float("epochs", None, "Sweep length in epochs (default: 8 for linear, as in the CLR paper).")
    flags.DEFINE_integer("eval_every", 0, "Evaluate held-out accuracy every N steps (0: off; Smith's rule then "
                         "uses the per-batch training accuracy).", lower_bound=0)
    flags.DEFINE_enum("smoother", "ema_debiased", ["none", "ema_seeded", "ema_debiased"], "Loss smoothing.")
    flags.DEFINE_float("beta", 0.98, "Smoothing factor of the moving average (0 <= beta < 1).")
    flags.DEFINE_float("divergence_factor", 4.0, "Stop when the smoothed loss exceeds this x its best (> 1).")
    flags.DEFINE_string("logdir", None, "Output folder (default: runs/range_test-<timestamp>).")
    flags.DEFINE_float("step_size_epochs", 4.0, "Half-cycle length (epochs) in the printed train command.",
                       lower_bound=0.0)

    def check(f):
        for name in ("start_lr", "end_lr", "beta", "divergence_factor"):
            if f[name] is not None:
                cli._finite(name, f[name])
        defaults = SWEEP_DEFAULTS[f["sweep"]]
        start = f["start_lr"] if f["start_lr"] is not None else defaults["start_lr"]
        end = f["end_lr"] if f["end_lr"] is not None else defaults["end_lr"]
        cli._error_unless(start > 0, f"--start_lr must be > 0. Received: {start}.")
        cli._error_unless(end > start, f"--end_lr must be greater than --start_lr. Received: --start_lr={start}, --end_lr={end}.")
        cli._error_unless(not (f["steps"] is not None and f["epochs"] is not None),
                          "Give either --steps or --epochs, not both.")
        cli._error_unless(f["steps"] is None or f["steps"] >= 10, f"--steps must be >= 10. Received: {f['steps']}.")
        cli._error_unless(f["epochs"] is None or f["epochs"] > 0, f"--epochs must be > 0. Received: {f['epochs']}.")
        cli._error_unless(0 <= f["beta"] < 1, f"--beta must be in [0, 1). Received: {f['beta']}.")
        cli._error_unless(f["divergence_factor"] > 1, f"--divergence_factor must be > 1. Received: {f['divergence_factor']}.")
        return True

    flags.register_multi_flags_validator(
        ["sweep", "start_lr", "end_lr", "steps", "epochs", "beta", "divergence_factor"], check)
    flags.register_validator("logdir", cli.check_logdir)
    flags.register_multi_flags_validator(
        ["dataset", "data_dir", "model", "weight_decay", "momentum", "distribute", "jit_compile"],
        cli._check_data_model)


def _train_command(config: cli.TrainConfig, base_lr: float, max_lr: float, step_size_epochs: float,
                   json_path: str) -> tuple[str, str]:
    defaults = cli.TrainConfig()
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


def run(config: cli.TrainConfig, options_flags: dict[str, Any], *, progress: bool = True) -> dict[str, Any]:
    """Builds the job of `config` (data/model/optimizer flags), sweeps, writes the outputs, returns the
    JSON dict written to `range_test.json` (eager)."""
    import keras
    import tensorflow as tf

    from clrlab import job as job_lib, plots

    policy = keras.mixed_precision.global_policy().name
    try:
        job_lib.setup_runtime(config)
        job = job_lib.build_job(config)
        sweep = options_flags["sweep"]
        defaults = SWEEP_DEFAULTS[sweep]
        if options_flags.get("steps"):
            num_steps = int(options_flags["steps"])
        elif options_flags.get("epochs") or "epochs" in defaults:
            epochs = options_flags.get("epochs") or defaults["epochs"]
            num_steps = max(10, int(round(epochs * job.steps_per_epoch)))
        else:
            num_steps = int(defaults["steps"])
        options = SweepOptions(
            sweep=sweep, start_lr=options_flags.get("start_lr") or defaults["start_lr"],
            end_lr=options_flags.get("end_lr") or defaults["end_lr"], num_steps=num_steps,
            eval_every=int(options_flags.get("eval_every") or 0),
            smoother=options_flags.get("smoother", "ema_debiased"), beta=float(options_flags.get("beta", 0.98)),
            divergence_factor=float(options_flags.get("divergence_factor", 4.0)),
            check_every=max(1, min(25, num_steps // 30)))
        logdir = os.path.abspath(config.logdir)
        os.makedirs(logdir, exist_ok=True)
        writer = tf.summary.create_file_writer(os.path.join(logdir, "range_test"))
        print(f"clrlab range test: {sweep} sweep {options.start_lr:g} -> {options.end_lr:g} over {num_steps} steps "
              f"({num_steps / job.steps_per_epoch:.2g} epochs of {job.splits.name}); model {job.model.name}; "
              f"logdir {logdir}", flush=True)
        result = run_sweep(job.model, job.optimizer, job.train_data_fn(0), options, strategy=job.strategy,
                           eval_dataset=job.eval_dataset() if options.eval_every else None,
                           summary_writer=writer, progress=progress and sys.stdout.isatty())
    finally:
        keras.mixed_precision.set_global_policy(policy)
    rec = result.recommendation
    png = plots.plot_range_test(rec.lrs, rec.loss_raw, rec.loss_smooth, os.path.join(logdir, "range_test.png"),
                                accuracy=rec.accuracy, base_lr=rec.base_lr, max_lr=rec.max_lr,
                                log_x=(sweep == "exponential"), suggestions=rec.suggestions,
                                title=f"LR range test ({sweep}, {job.splits.name}, {job.model.name})")
    with writer.as_default():
        for i, value in enumerate(rec.loss_smooth):
            tf.summary.scalar("smoothed_loss", value, step=i)
        if isinstance(png, (bytes, bytearray)):
            tf.summary.image("range_test", tf.image.decode_png(png)[tf.newaxis], step=0)
    writer.flush()
    out = result.to_dict()
    json_path = os.path.join(logdir, "range_test.json")
    if rec.base_lr is not None and rec.max_lr is not None:
        explicit, from_file = _train_command(config, rec.base_lr, rec.max_lr,
                                             options_flags.get("step_size_epochs", 4.0), json_path)
        out["command"], out["command_bounds_from"] = explicit, from_file
    out["options"] = dataclasses.asdict(options)
    out["dataset"], out["model"] = job.splits.name, job.model.name
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, allow_nan=False)
    return out


def _report(out: dict[str, Any], logdir: str) -> None:
    stop = f"stopped early ({out['reason']} at step {out['stop_index']})" if out["stopped_early"] else "ran to the end"
    print(f"Sweep {stop}. Suggestions: " + ", ".join(
        f"{k}={v:.3g}" for k, v in out["suggestions"].items() if v is not None))
    if out.get("command"):
        print(f"Recommended bounds ({out['rule']}): base_lr={out['base_lr']:.3g} max_lr={out['max_lr']:.3g}")
        print(f"Plot: {os.path.join(logdir, 'range_test.png')}   Result: {os.path.join(logdir, 'range_test.json')}")
        print("Train with them:\n  " + out["command"] + "\nor:\n  " + out["command_bounds_from"])
    else:
        print("No bounds could be recommended (the loss never fell): widen --start_lr/--end_lr or sweep longer.")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (see --help)", file=sys.stderr)
        return 1
    from clrlab.data import DataError

    names = [f.name for f in dataclasses.fields(cli.TrainConfig)]
    values = {n: FLAGS[n].value for n in names if n in FLAGS and n != "epochs"}
    values["logdir"] = FLAGS.logdir or os.path.join(
        "runs", "range_test-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    config = dataclasses.replace(cli.TrainConfig(), **values)
    options_flags = {n: FLAGS[n].value for n in ("sweep", "start_lr", "end_lr", "steps", "epochs", "eval_every",
                                                 "smoother", "beta", "divergence_factor", "step_size_epochs")}
    try:
        out = run(config, options_flags)
    except (cli.UserError, DataError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    _report(out, os.path.abspath(config.logdir))
    return 0


def run_main() -> None:
    """Console-script entry point (`clrlab-range-test`)."""
    define_flags()
    flags.adopt_module_key_flags(cli)
    flags.adopt_module_key_flags(sys.modules[__name__])
    app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
    run_main()
