"""`python -m clrlab.train`: train with a cyclical learning-rate policy.

    python -m clrlab.train --policy=exp_range --gamma=0.99994          # offline default dataset
    python -m clrlab.train --flagfile=flags/cifar10_minigooglenet_triangular.cfg
    python -m clrlab.train --helpfull                                  # every flag, with units

Flags (clrlab.cli) -> `TrainConfig` (clrlab.config) -> data, model, optimizer, policy (clrlab.job) ->
trainer (trainers/) -> report. A run leaves in --logdir: TensorBoard events (train/, validation/), checkpoints/,
clr_plot.png, training_plot.png, history.json, flags.txt, run_config.json, classification_report.txt.
Rerunning the same command with the same --logdir resumes from the last checkpoint.

Exit codes: 0 done (or stopped by SIGTERM after saving a checkpoint), 1 bad input or a NaN/inf loss,
130 Ctrl-C (after saving a checkpoint).

TensorFlow, Keras and scikit-learn are imported inside the functions that use them: they take seconds
to load, and `--help` (or importing this module for `RunResult`) answers without them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from absl import app, flags

from clrlab import cli
from clrlab import config as config_lib
from clrlab.config import TrainConfig
from clrlab.errors import UserError

EXIT_INTERRUPTED = 130

# Settings that must match for a --logdir to be resumed (the LR policy is compared by its config).
_RESUME_KEYS = ("dataset", "normalization", "augment", "model", "weight_decay", "batch_size", "optimizer",
                "momentum", "mixed_precision", "seed", "trainer", "lr_control")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns: how it ended, the final step, the test metrics, and the history."""

    status: str
    step: int
    logdir: str
    test_metrics: dict[str, float] | None
    history: Any
    resumed_from: int | None
    signal: str | None = None


def _run_identity(config: TrainConfig, schedule, momentum_schedule=None) -> dict[str, Any]:
    """The settings a resume must match. The momentum cycle is a key only when momentum cycles, so the
    run_config.json of a run with constant momentum keeps its layout."""
    import keras  # deferred: see the module docstring

    ident = {k: getattr(config, k) for k in _RESUME_KEYS}
    ident["schedule"] = keras.saving.serialize_keras_object(schedule)
    if momentum_schedule is not None:
        ident["momentum_schedule"] = keras.saving.serialize_keras_object(momentum_schedule)
    return json.loads(json.dumps(ident))


def _check_resumable(logdir: str, identity: dict[str, Any]) -> None:
    path = os.path.join(logdir, "run_config.json")
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        previous = json.load(fh)
    changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
    if changed:
        raise UserError(f"--logdir={logdir} holds a run with different settings ({', '.join(changed)}); "
                        "rerun with the same flags to resume it, or use a new --logdir.")


def run(config: TrainConfig, *, callbacks: Iterable[Any] | None = None, progress: str = "auto") -> RunResult:
    """Runs (or resumes) the training job of `config`, writing everything under `config.logdir`.

    Library entry point behind the command line (eager). Raises `UserError` for problems the user can
    fix, `trainers.custom_loop.NonFiniteLossError` when the loss diverges in full precision.
    """
    import keras  # deferred: see the module docstring

    policy = keras.mixed_precision.global_policy().name
    try:
        return _run(config, callbacks=callbacks, progress=progress)
    finally:
        keras.mixed_precision.set_global_policy(policy)  # setup_runtime changed it for this run only


def _run(config: TrainConfig, *, callbacks, progress) -> RunResult:
    import tensorflow as tf  # deferred, with the modules below that import it: see the module docstring

    from clrlab import job as job_lib
    from clrlab import plots
    from trainers.controller import Controller
    from trainers.custom_loop import CustomLoopTrainer
    from trainers.keras_fit import KerasFitTrainer
    from trainers.run_state import check_folders

    job_lib.setup_runtime(config)
    job = job_lib.build_job(config)
    lr_callback = job_lib.make_lr_callback(config, job.step_size)  # before any output: it may refuse the policy
    logdir = os.path.abspath(config.logdir)
    identity = _run_identity(config, job.schedule, job.momentum_schedule)
    _check_resumable(logdir, identity)
    check_folders([logdir] + [os.path.join(logdir, d) for d in ("checkpoints", "train", "validation")],
                  [os.path.join(logdir, "history.json")])  # before any write: a fault is one line, not a traceback
    os.makedirs(logdir, exist_ok=True)
    with open(os.path.join(logdir, "run_config.json"), "w", encoding="utf-8") as fh:
        json.dump(identity, fh, indent=1)
    with open(os.path.join(logdir, "flags.txt"), "w", encoding="utf-8") as fh:
        fh.write(config_lib.flagfile_text(dataclasses.replace(config, logdir=logdir)))

    train_writer = tf.summary.create_file_writer(os.path.join(logdir, "train"))
    val_writer = tf.summary.create_file_writer(os.path.join(logdir, "validation"))
    history_path = os.path.join(logdir, "history.json")
    job.model.compile(optimizer=job.optimizer,
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    checkpoint_dir = os.path.join(logdir, "checkpoints")
    if config.trainer == "keras_fit":  # model.fit, same outputs; it is its own controller (restore/run)
        trainer = controller = KerasFitTrainer(
            job.model, job.optimizer, train_data_fn=job.train_data_fn, eval_dataset=job.eval_dataset(),
            steps_per_epoch=job.steps_per_epoch, total_steps=job.total_steps, strategy=job.strategy,
            lr_callback=lr_callback, steps_per_loop=config.steps_per_loop,
            checkpoint_every=config.checkpoint_every, summary_every=config.summary_every,
            jit_compile=config.jit_compile, summary_writer=train_writer, validation_writer=val_writer,
            checkpoint_dir=checkpoint_dir, history_path=history_path, callbacks=callbacks, progress=progress)
    else:
        # momentum_schedule only when momentum cycles: the loop then assigns it in graph each step, next to the LR.
        momentum = {} if job.momentum_schedule is None else {"momentum_schedule": job.momentum_schedule}
        trainer = CustomLoopTrainer(job.model, job.optimizer, job.schedule, strategy=job.strategy,
                                    jit_compile=config.jit_compile, summary_writer=train_writer,
                                    summary_every=config.summary_every, fused_updates=config.fused_updates,
                                    **momentum)
        controller = Controller(trainer, train_data_fn=job.train_data_fn, steps_per_epoch=job.steps_per_epoch,
                                total_steps=job.total_steps, steps_per_loop=config.steps_per_loop,
                                eval_dataset=job.eval_dataset(), checkpoint_dir=checkpoint_dir,
                                checkpoint_every=config.checkpoint_every, history_path=history_path,
                                validation_writer=val_writer, callbacks=callbacks, progress=progress)
    resumed_from = controller.restore()
    _announce(config, job, logdir, resumed_from)
    outcome = controller.run()
    train_writer.flush()
    val_writer.flush()
    test_metrics = None
    if outcome.status != "interrupted":
        test_metrics = finish(job, logdir, trainer.predict_classes(job.eval_dataset()))
    steps = outcome.history.steps
    plots.plot_lr(steps["step"], steps["lr"], os.path.join(logdir, "clr_plot.png"),
                  title=f"{config.policy} learning rate", momentum=steps.get("momentum"))
    plots.plot_history(outcome.history.epochs, os.path.join(logdir, "training_plot.png"))
    return RunResult(status=outcome.status, step=outcome.step, logdir=logdir, test_metrics=test_metrics,
                     history=outcome.history, resumed_from=resumed_from, signal=outcome.signal)


def _announce(config: TrainConfig, job, logdir: str, resumed_from: int | None) -> None:
    s = job.splits
    if config.policy == "piecewise":
        policy = (f"piecewise policy, lr {', '.join(f'{v:g}' for v in config.lr_values)} switching at steps "
                  f"{', '.join(str(b) for b in config.lr_boundaries)}")
    elif config.policy == "constant":
        policy = f"constant policy, lr {config.base_lr:g}"
    elif config.policy == "one_cycle":
        policy = (f"one_cycle policy, lr {config.base_lr:g} -> {config.max_lr:g} -> "
                  f"{config.base_lr / config.final_div_factor:g} over {job.total_steps} steps")
    else:
        policy = (f"{config.policy} policy, lr {config.base_lr:g}..{config.max_lr:g}, half cycle {job.step_size} "
                  f"steps ({job.step_size / job.steps_per_epoch:.3g} epochs)")
    if job.momentum_schedule is not None:
        m = job.momentum_schedule
        name = "beta_1" if config.optimizer in ("adam", "adamw") else "momentum"
        policy += f", {name} cycling {m.max_momentum:g} -> {m.base_momentum:g} inversely to the lr"
    print(f"clrlab: {policy}; {s.name}: "
          f"{len(s.x_train)} train / {len(s.x_test)} test examples, {job.steps_per_epoch} steps per epoch, "
          f"{job.total_steps} steps; model {job.model.name} ({job.model.count_params():,} parameters); "
          f"logdir {logdir}", flush=True)
    if resumed_from is not None:
        print(f"Resuming from the checkpoint at step {resumed_from} (epoch {resumed_from // job.steps_per_epoch + 1}).",
              flush=True)


def finish(job, logdir: str, predictions) -> dict[str, float]:
    """Per-class precision/recall/F1 on the test split: printed and saved. Returns accuracy."""
    import numpy as np
    from sklearn.metrics import classification_report  # deferred: see the module docstring

    y_true = np.asarray(job.splits.y_test)
    report = classification_report(y_true, predictions, labels=list(range(job.splits.num_classes)),
                                   target_names=[str(n) for n in job.splits.class_names], digits=4,
                                   zero_division=0)
    accuracy = float(np.mean(predictions == y_true))
    with open(os.path.join(logdir, "classification_report.txt"), "w", encoding="utf-8") as fh:
        fh.write(report)
    print(report)
    print(f"test accuracy {accuracy:.4f}", flush=True)
    return {"accuracy": accuracy}


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value; see --help)",
              file=sys.stderr)
        return 1
    from trainers.custom_loop import NonFiniteLossError

    try:
        config = cli.config_from_flags()
        result = run(config)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:  # a write outside the run state (run_config.json, the report, the plots): disk full, ...
        from trainers.run_state import write_error

        print(f"error: {write_error(e.filename or 'the run folder', 'the file', e)}", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:
        print(f"error: {e}; training stopped and the last good checkpoint is kept in "
              f"{os.path.join(os.path.abspath(config.logdir), 'checkpoints')}. Lower --max_lr "
              "(python -m clrlab.range_finder suggests bounds).", file=sys.stderr)
        return 1
    if result.status == "interrupted":
        print(f"Stopped by {result.signal} at step {result.step}; checkpoint saved. Run the same command "
              "again to resume.", flush=True)
        return EXIT_INTERRUPTED if result.signal == "SIGINT" else 0
    return 0


def run_main() -> None:
    """Console-script entry point (`clrlab-train`): defines the flags, parses them, runs `main`."""
    cli.define_train_flags()
    flags.adopt_module_key_flags(cli)  # so that --help lists them (absl shows the main module's key flags)
    app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
    run_main()
