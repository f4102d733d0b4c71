"""`python -m clrlab.train`: train with a cyclical learning-rate policy.

    python -m clrlab.train --policy=exp_range --gamma=0.99994          # offline default dataset
    python -m clrlab.train --flagfile=flags/cifar10_minigooglenet_triangular.cfg
    python -m clrlab.train --help                                      # clrlab's flags, grouped, with units

Flags (clrlab.cli) -> `TrainConfig` (clrlab.config) -> data, model, optimizer, policy (clrlab.job) ->
trainer (trainers/) -> report. A run leaves in --logdir: TensorBoard events (train/, validation/), checkpoints/,
clr_plot.png, training_plot.png, history.json, flags.txt, run_config.json, classification_report.txt and,
once it completed, model.keras. The console ends with a summary (`summary`).
Rerunning the same command with the same --logdir resumes from the last checkpoint (a stop by Ctrl-C or
SIGTERM prints that command, with the --logdir a default run got: runs/<policy>-<model>-<time>[-N]).

Exit codes: 0 done (or stopped by SIGTERM after saving a checkpoint), 1 bad input or a NaN/inf loss,
130 Ctrl-C (after saving a checkpoint).

TensorFlow, Keras and scikit-learn are imported inside the functions that use them: they take seconds
to load, and `--help` (or importing this module for `RunResult`) answers without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
import time
from collections.abc import Iterable
from typing import Any

from absl import app, flags

from clrlab import cli, files, run_dir
from clrlab import config as config_lib
from clrlab.config import TrainConfig
from clrlab.errors import UserError

EXIT_INTERRUPTED = 130


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What `run` returns: how it ended (`status`: completed, stopped or interrupted), the final global
    step, the logdir, the test metrics ({"accuracy", "loss"}; None when interrupted), the history
    (`trainers.run_state.History`: `.steps`, `.epochs` and `.test` dicts, as in history.json), the step
    the run resumed from, the signal that stopped it, the trained Keras `model` (also saved as
    `<logdir>/model.keras` when the run completed) and the wall-clock `seconds` of this call.

    `status` "already_complete" (a rerun of a finished --logdir): nothing was trained or evaluated,
    `test_metrics` and `history` are None."""

    status: str
    step: int
    logdir: str
    test_metrics: dict[str, float] | None
    history: Any
    resumed_from: int | None
    signal: str | None = None
    model: Any = None
    seconds: float | None = None


def run(config: TrainConfig, *, callbacks: Iterable[Any] | None = None, progress: str = "auto") -> RunResult:
    """Runs (or resumes) the training job of `config`, writing everything under `config.logdir` (an empty
    logdir, `TrainConfig()`'s default, gets a new folder under runs/, as on the command line).

    Library entry point behind the command line (eager). Raises `UserError` for problems the user can
    fix, `trainers.custom_loop.NonFiniteLossError` when the loss diverges in full precision.
    """
    import keras  # deferred: see the module docstring

    from clrlab import multi_worker  # deferred: it imports TensorFlow

    if not config.logdir:  # never the current directory itself
        config = dataclasses.replace(config, logdir=config_lib.default_logdir())
    policy = keras.mixed_precision.global_policy().name
    try:
        # multi_worker: the chief runs in --logdir, other workers quietly in a temporary folder
        with multi_worker.worker_scope(config, callbacks) as worker, contextlib.ExitStack() as run_scope:
            result = _run(worker.config, callbacks=worker.callbacks, progress=progress, run_scope=run_scope)
            return worker.result(result)  # holds the logdir lock (run_scope) until the run ends
    finally:
        keras.mixed_precision.set_global_policy(policy)  # setup_runtime changed it for this run only


def _run(config: TrainConfig, *, callbacks, progress, run_scope: contextlib.ExitStack) -> RunResult:
    import tensorflow as tf  # deferred, with the modules below that import it: see the module docstring

    from clrlab import job as job_lib
    from clrlab import plots
    from trainers.controller import Controller
    from trainers.custom_loop import CustomLoopTrainer
    from trainers.keras_fit import KerasFitTrainer
    from trainers.run_state import check_folders

    started = time.monotonic()
    job_lib.setup_runtime(config)
    job = job_lib.build_job(config)
    lr_callback = job_lib.make_lr_callback(config, job.step_size)  # before any output: it may refuse the policy
    logdir = os.path.abspath(config.logdir)
    identity = run_dir.run_identity(config, job.schedule, job.momentum_schedule)
    check_folders([logdir] + [os.path.join(logdir, d) for d in ("checkpoints", "train", "validation")],
                  [os.path.join(logdir, "history.json")])  # before any write: a fault is one line, not a traceback
    os.makedirs(logdir, exist_ok=True)
    run_scope.enter_context(run_dir.lock_logdir(logdir))  # one run per folder; the kernel frees it on exit
    run_dir.check_resumable(logdir, identity, total_steps=job.total_steps, steps_per_epoch=job.steps_per_epoch)
    reached = run_dir.checkpoint_steps(os.path.join(logdir, "checkpoints"))
    # Nothing left to train and every output written (model.keras is the run's last write; a kill after the
    # final checkpoint but before it goes on below: restore, evaluate, write the outputs): say so.
    if reached and reached[-1] == job.total_steps and os.path.exists(os.path.join(logdir, "model.keras")):
        print(f"--logdir={logdir} already holds a complete run (step {job.total_steps} of {job.total_steps}); "
              "nothing to do. For a new run, leave out --logdir (a new folder under runs/) or give a new one; "
              "to train this one longer, rerun with a larger --epochs/--steps.", flush=True)
        return RunResult(status="already_complete", step=job.total_steps, logdir=logdir, test_metrics=None,
                         history=None, resumed_from=job.total_steps)
    files.write_json(os.path.join(logdir, run_dir.RUN_CONFIG), identity)
    files.write_atomic(os.path.join(logdir, "flags.txt"),
                       config_lib.flagfile_text(dataclasses.replace(config, logdir=logdir)))

    train_writer = tf.summary.create_file_writer(os.path.join(logdir, "train"))
    val_writer = tf.summary.create_file_writer(os.path.join(logdir, "validation"))
    history_path = os.path.join(logdir, "history.json")
    job.model.compile(optimizer=job.optimizer,
                      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

    checkpoint_dir = os.path.join(logdir, "checkpoints")
    eval_dataset = job.eval_dataset()  # one object: the evaluator keeps its batches for every later pass
    if config.trainer == "keras_fit":  # model.fit, same outputs; it is its own controller (restore/run)
        trainer = controller = KerasFitTrainer(
            job.model, job.optimizer, train_data_fn=job.train_data_fn, eval_dataset=eval_dataset,
            steps_per_epoch=job.steps_per_epoch, total_steps=job.total_steps, strategy=job.strategy,
            lr_callback=lr_callback, steps_per_loop=config.steps_per_loop,
            checkpoint_every=config.checkpoint_every, checkpoint_secs=config.checkpoint_secs,
            summary_every=config.summary_every,
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
                                eval_dataset=eval_dataset, checkpoint_dir=checkpoint_dir,
                                checkpoint_every=config.checkpoint_every,
                                checkpoint_secs=config.checkpoint_secs, history_path=history_path,
                                validation_writer=val_writer, callbacks=callbacks, progress=progress)
    resumed_from = controller.restore()
    _announce(config, job, logdir, resumed_from)
    outcome = controller.run()
    train_writer.flush()
    val_writer.flush()
    test_metrics = None
    if outcome.status != "interrupted":
        test_metrics = finish(job, logdir, trainer.predict_classes(eval_dataset))
        test_metrics["loss"] = trainer.evaluate(eval_dataset)["loss"]
        outcome.history.test = test_metrics
        outcome.history.save(history_path)
    steps = outcome.history.steps
    plots.plot_lr(steps["step"], steps["lr"], os.path.join(logdir, "clr_plot.png"),
                  title=f"{config.policy} learning rate", momentum=steps.get("momentum"))
    plots.plot_history(outcome.history.epochs, os.path.join(logdir, "training_plot.png"))
    if outcome.status == "completed":  # the LAST write: a model.keras means every output of the run is there
        model_path = os.path.join(logdir, "model.keras")
        job.model.save(f"{model_path}.tmp.keras")  # loads back with `import clrlab` + load_model
        os.replace(f"{model_path}.tmp.keras", model_path)
    return RunResult(status=outcome.status, step=outcome.step, logdir=logdir, test_metrics=test_metrics,
                     history=outcome.history, resumed_from=resumed_from, signal=outcome.signal, model=job.model,
                     seconds=time.monotonic() - started)


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
    files.write_atomic(os.path.join(logdir, "classification_report.txt"), report)
    print(report)
    print(f"test accuracy {accuracy:.4f}", flush=True)
    return {"accuracy": accuracy}


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f"error: unexpected arguments {' '.join(argv[1:])} (flags look like --name=value; see --help)",
              file=sys.stderr)
        return 1
    from trainers.custom_loop import NonFiniteLossError

    config = None
    try:
        config = cli.config_from_flags()
        if flags.FLAGS.logdir is None:  # a new, unique folder runs/<policy>-<model>-<time>[-N], created now
            config = dataclasses.replace(config, logdir=run_dir.new_run_dir(config.policy, config.model))
        result = run(config)
    except UserError as e:
        if flags.FLAGS.logdir is None and config is not None:
            run_dir.remove_if_unused(config.logdir)  # a refused run leaves no empty runs/ folder behind
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except OSError as e:  # a write outside the run state (run_config.json, the report, the plots): disk full, ...
        from trainers.run_state import write_error

        print(f"error: {write_error(e.filename or 'the run folder', 'the file', e)}", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:
        print(f"error: {e}; {_after_divergence(os.path.abspath(config.logdir))} Lower --max_lr "
              "(python -m clrlab.range_finder suggests bounds).", file=sys.stderr)
        return 1
    if result.status == "interrupted":
        again = (f"run: {_rerun_command(result.logdir)}" if config.distribute != "multi_worker" else
                 "rerun the same launch command (python -m clrlab.launch ..., or every worker with its TF_CONFIG)")
        print(f"Stopped by {result.signal} at step {result.step}; checkpoint saved in "
              f"{os.path.join(result.logdir, 'checkpoints')}. To resume, {again}", flush=True)
        return EXIT_INTERRUPTED if result.signal == "SIGINT" else 0
    print(summary(result), flush=True)
    return 0


def _after_divergence(logdir: str) -> str:
    """What a NaN/inf stop left in `logdir` and how to rerun: the identity binds only with a checkpoint."""
    checkpoint_dir = os.path.join(logdir, "checkpoints")
    steps = run_dir.checkpoint_steps(checkpoint_dir)
    if not steps:
        return (f"training stopped and no checkpoint was written, so --logdir={logdir} holds nothing to resume: "
                "a rerun there with other flags starts afresh.")
    return (f"training stopped; the last good checkpoint (step {steps[-1]}) is kept in {checkpoint_dir}. A rerun "
            f"with other settings needs a new --logdir (or delete {logdir} to start over there).")


def _rerun_command(logdir: str) -> str:
    """The command line of this process, with --logdir=`logdir` added when it was not given."""
    prog = sys.argv[0]
    if os.path.basename(prog) in ("train.py", "__main__.py"):  # python -m clrlab.train
        head = ["python", "-m", "clrlab.train"]
    else:
        head = [os.path.basename(prog)]
    args = list(sys.argv[1:])
    if flags.FLAGS.logdir is None:
        args.append(f"--logdir={logdir}")
    return shlex.join(head + args)


def summary(result: RunResult) -> str:
    """The end-of-run lines: test accuracy and loss, time taken, the outputs and how to view them."""
    minutes, seconds = divmod(round(result.seconds or 0.0), 60)
    lines = [f"Done: {result.status} at step {result.step} in {minutes}m{seconds:02d}s"]
    if result.test_metrics is not None:
        lines[0] += (f"; test accuracy {result.test_metrics['accuracy']:.4f}, "
                     f"test loss {result.test_metrics['loss']:.4f}")
    outputs = [name for name in ("model.keras", "history.json", "training_plot.png", "clr_plot.png",
                                 "classification_report.txt", "checkpoints")
               if os.path.exists(os.path.join(result.logdir, name))]
    lines.append(f"Outputs in {result.logdir}: {', '.join(outputs)}")
    lines.append(f"View them: tensorboard --logdir {result.logdir}")
    return "\n".join(lines)


def run_main() -> None:
    """Console-script entry point (`clrlab-train`): defines the flags, parses them, runs `main`."""
    cli.define_train_flags()  # --help: cli.parse_flags_or_exit prints them, grouped (clrlab.console)
    app.run(main, flags_parser=cli.parse_flags_or_exit)


if __name__ == "__main__":
    run_main()
