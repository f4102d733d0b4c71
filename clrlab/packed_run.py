"""Packed runs: several ordinary clrlab runs that differ only in their LR policy, schedule arguments, momentum
or seed, trained together by `trainers.packed.PackedTrainer` (weights stacked on a member axis, one compiled
step for all), each writing its OWN ordinary run folder.

    results = run_packed([config_a, config_b, ...], pack_dir="runs/study/packs/pack-1a2b3c4d5e")

`packing_refusal(configs)` says in one line why configs cannot share a pack (None when they can).

Each member's `config.logdir` gets what `clrlab.train.run` writes there: run_config.json and flags.txt, the
TensorBoard train/ (per-step learning_rate, [momentum,] loss, accuracy[, l2_loss, total_loss]; epoch_loss,
epoch_accuracy) and validation/ (loss, accuracy per epoch) scalars with the same tags, history.json in the
same layout, clr_plot.png, training_plot.png, classification_report.txt, and once complete a final
unpacked checkpoint in checkpoints/ (its weights, optimizer slots and global step: the folder resumes or
extends as an ordinary run) and model.keras (the member's weights in an ordinary Keras model), written last.
A member's per-epoch `seconds` are its share of the pack's epoch time (pack time / members), so sums over a
study's runs stay the machine time they took.

The shared state lives in `pack_dir`: pack.json (the members and their settings: a rerun with other
members or settings is refused), checkpoints/ (a `tf.train.CheckpointManager` over the stacked weights,
the optimizer slots, the global step, the epoch and the members' active mask) and failures.json. The pack
is checkpointed as an ordinary run (`checkpoint_every` steps, `checkpoint_secs` wall seconds, or every epoch end
when both are 0) and at the end, each member's
history.json just before, so a rerun after kill -9 resumes exactly: the same batches (a function of the
global step and the seed), the same LR and momentum traces (functions of the global step) and, with
`--deterministic`, the same final weights as an uninterrupted packed run. TensorBoard replays are purged
as for an ordinary run (`RunState.mark_restart`).

A member whose loss becomes NaN/inf fails alone (`trainers.packed`): its result has status "failed" and
the error line of an unpacked run's `NonFiniteLossError`; the others go on.

Layer 4, like `clrlab.train`: TrainConfigs in, files out. TensorFlow is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from clrlab import config as config_lib
from clrlab import files, run_dir
from clrlab.config import TrainConfig
from clrlab.errors import UserError
from clrlab.train import RunResult

PACK_FILE = "pack.json"
FAILURES_FILE = "failures.json"
# What members of one pack may differ in: the LR policy and its arguments, the momentum (constant or its
# cycle), the seed (initial weights and batch order), and of course the run folder.
MEMBER_FIELDS = ("policy", "base_lr", "max_lr", "step_size", "step_size_epochs", "step_size_down", "gamma",
                 "scale_mode", "pct_start", "final_div_factor", "anneal_strategy", "three_phase", "lr_boundaries",
                 "lr_values", "cycle_momentum", "base_momentum", "max_momentum", "momentum", "seed", "logdir",
                 "bounds_from")
PACKED_OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
# Training settings a packed run supports only at one value: (field, value, why).
_REQUIRED = (("trainer", "custom_loop", "packed runs use the custom loop"),
             ("distribute", "default", "packed runs train on one device"),
             ("cpu_devices", 1, "packed runs train on one device"),
             ("mixed_precision", "none", "packed runs train in float32"),
             ("augment", False, "per-member augmentation is not implemented"),
             ("jit_compile", False, "packed runs are not XLA-compiled"))


class PackingRefused(UserError):
    """These configs cannot be trained as one pack (the message says why, in one line)."""


@dataclasses.dataclass(frozen=True)
class MemberResult(RunResult):
    """One member's outcome: `clrlab.train.RunResult` plus `error` (the one-line reason of a failed member) and
    `loop_seconds`. `status`: completed, failed, interrupted or already_complete. `seconds` and
    `loop_seconds` are the member's share (/ members) of the call's wall time and of its training loop (steps,
    evaluations, checkpoints; None when nothing was trained)."""

    error: str | None = None
    loop_seconds: float | None = None


def _show(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def packing_refusal(configs: Sequence[TrainConfig]) -> str | None:
    """Why `configs` cannot share one pack (one line), or None when they can: members must differ only in
    `MEMBER_FIELDS` (policy, schedule arguments, momentum, seed, logdir), use the custom loop on one device in
    float32 without augmentation, and a packable model and optimizer (`clrlab.packed_models.PACKABLE`,
    `PACKED_OPTIMIZERS`). Config-level checks only (no data or model is built): `run_packed` also checks the
    built model layer by layer and the optimizer's settings, raising `PackingRefused`."""
    from clrlab import models, packed_models  # deferred: they import TensorFlow

    if not configs:
        return "no runs to pack"
    first = configs[0]
    for field in dataclasses.fields(TrainConfig):
        if field.name in MEMBER_FIELDS:
            continue
        values = list(dict.fromkeys(getattr(c, field.name) for c in configs))
        if len(values) > 1:
            return f"--{field.name} differs between the runs ({', '.join(_show(v) for v in values[:4])})"
    for name, value, why in _REQUIRED:
        if getattr(first, name) != value:
            shown = (f"--{name}" if getattr(first, name) else f"--no{name}") if isinstance(value, bool) \
                else f"--{name}={getattr(first, name)}"
            return f"{shown} ({why})"
    model = first.model
    if model == "auto" and first.dataset.split(":")[0] in ("mnist1d", "digits", "mnist", "fashion_mnist", "cifar10"):
        # The built-in datasets' default model is known without loading them (clrlab.models.auto_model_name).
        shapes = {"mnist1d": (40, 1), "digits": (8, 8, 1), "mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1),
                  "cifar10": (32, 32, 3)}
        name = first.dataset.split(":")[0]
        model = models.auto_model_name(name, shapes[name])
    if model != "auto" and model not in packed_models.PACKABLE:  # auto on other data: run_packed checks the model
        shown = f"--model={model}" if model == first.model else f"--model=auto ({model} for {first.dataset})"
        return f"{shown} has no packed form (packable: {', '.join(packed_models.PACKABLE)})"
    if first.optimizer not in PACKED_OPTIMIZERS:
        return f"--optimizer={first.optimizer} has no packed update (packable: {', '.join(PACKED_OPTIMIZERS)})"
    kind = first.dataset.split(":")[0]
    if kind in ("folder", "tfds") and len({c.seed for c in configs}) > 1:
        return f"--dataset={first.dataset} holds out a test split by --seed: members with other seeds see other data"
    if len({os.path.abspath(c.logdir) for c in configs}) != len(configs) or not all(c.logdir for c in configs):
        return "every member needs its own --logdir"
    return None


def _member_state_class():
    """`RunState` for one member of a pack (defined lazily: trainers.run_state imports TensorFlow)."""
    from trainers.run_state import RunState

    class MemberState(RunState):
        """A member's history, TensorBoard writers and epoch records; the pack saves (no own checkpoint
        until the end), and its held-out metrics come from the packed evaluation."""

        _val: dict[str, float] | None = None

        def evaluate(self, dataset):  # noqa: ARG002 - the Evaluator interface RunState.end_epoch calls
            return self._val

        def save(self):
            return None  # the pack checkpoints: `_Pack.save`

        def end_member_epoch(self, epoch: int, val: dict[str, float], seconds: float,
                             eval_seconds: float) -> dict[str, float]:
            """RunState.end_epoch with these held-out metrics, `seconds` as the epoch's training time and
            `eval_seconds` as its evaluation time (the member's shares of the pack's)."""
            self._val = val
            self._epoch_start = self._clock() - seconds
            self._epoch_bookkeeping = 0.0
            logs = self.end_epoch(epoch)
            self.history.epochs["eval_seconds"][-1] = round(eval_seconds, 3)
            return logs

    return MemberState


def _read_history(path: str, step: int, steps_per_epoch: int, total_steps: int):
    """history.json of a member cut to the pack checkpoint's `step` (as `RunState.restore` does)."""
    from trainers.run_state import History

    if not os.path.exists(path):
        print(f"warning: no {path} next to the pack's checkpoint: the history restarts at step {step}.",
              file=sys.stderr, flush=True)
        return History()
    try:
        with open(path, encoding="utf-8") as fh:
            history = History.from_json(json.load(fh))
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}) but the pack's checkpoint at step {step} is fine: "
                        f"restore the file from a backup, or move it away to resume with the per-step history "
                        f"restarting at step {step}.") from None
    done = step // steps_per_epoch + (1 if step % steps_per_epoch and step >= total_steps else 0)
    history.truncate(step, done)
    return history


def run_packed(configs: Sequence[TrainConfig], *, pack_dir: str, progress: str = "log") -> list[MemberResult]:
    """Trains (or resumes) the pack of `configs` (one per member, see `packing_refusal`); returns one
    `MemberResult` per config, in order. Eager. Raises `PackingRefused` when the configs, the built model or
    the optimizer cannot be packed (before any output), `UserError` for problems the user can fix.
    `progress`: 'log' prints one line per epoch for the pack; 'bar' keeps quiet."""
    import keras  # deferred: see the module docstring

    reason = packing_refusal(configs)
    if reason is not None:
        raise PackingRefused(reason)
    configs = [dataclasses.replace(c, logdir=os.path.abspath(c.logdir)) for c in configs]
    policy = keras.mixed_precision.global_policy().name
    try:
        with contextlib.ExitStack() as scope:
            return _Pack(configs, os.path.abspath(pack_dir), progress, scope).run()
    finally:
        keras.mixed_precision.set_global_policy(policy)


class _Pack:
    """One call of `run_packed` (eager)."""

    def __init__(self, configs: list[TrainConfig], pack_dir: str, progress: str, scope: contextlib.ExitStack):
        import tensorflow as tf

        from clrlab import data, packed_models
        from clrlab import job as job_lib
        from trainers import packed_update
        from trainers.packed import PackedTrainer
        from trainers.run_state import check_folders

        self.started = time.monotonic()
        self.configs, self.pack_dir, self.progress = configs, pack_dir, progress
        self.members = len(configs)
        first = configs[0]
        job_lib.setup_runtime(first)
        splits = data.load(first.dataset, data_dir=first.data_dir, normalization=first.normalization,
                           seed=first.seed)
        self.jobs = [job_lib.build_job(c, splits=splits) for c in configs]
        self.splits = splits
        why = packed_models.refusal(self.jobs[0].model)
        if why is not None:
            raise PackingRefused(why)
        packed = packed_models.pack([j.model for j in self.jobs])
        try:
            optimizer = packed_update.make_packed_optimizer(self.jobs[0].optimizer, packed.variables_by_member_order)
        except ValueError as e:
            raise PackingRefused(" ".join(str(e).split())) from None
        self.packed, self.packed_optimizer = packed, optimizer
        job = self.jobs[0]
        self.steps_per_epoch, self.total_steps = job.steps_per_epoch, job.total_steps

        # The member folders, as clrlab.train.run prepares one (identity, folders, lock, settings files).
        self.identities = []
        for c, j in zip(configs, self.jobs):
            self.identities.append(run_dir.run_identity(c, j.schedule, j.momentum_schedule))
            check_folders([c.logdir] + [os.path.join(c.logdir, d) for d in ("checkpoints", "train", "validation")],
                          [os.path.join(c.logdir, "history.json")])
        check_folders([pack_dir, os.path.join(pack_dir, "checkpoints")], [os.path.join(pack_dir, PACK_FILE)])
        scope.enter_context(run_dir.lock_logdir(pack_dir))
        for c in configs:
            scope.enter_context(run_dir.lock_logdir(c.logdir))
        # A complete member (final checkpoint and model.keras) is left untouched; one with its final checkpoint
        # but no model.keras (a kill while the pack wrote its outputs) is finished again from the pack.
        self.complete = [self._complete(c) for c in configs]
        if all(self.complete):
            return
        self._check_pack_file()
        for c, ident, done in zip(configs, self.identities, self.complete):
            if not done:
                files.write_json(os.path.join(c.logdir, run_dir.RUN_CONFIG), ident)
                files.write_atomic(os.path.join(c.logdir, "flags.txt"), config_lib.flagfile_text(c))

        self.train_writers = [None if done else tf.summary.create_file_writer(os.path.join(c.logdir, "train"))
                              for c, done in zip(configs, self.complete)]
        self.val_writers = [None if done else tf.summary.create_file_writer(os.path.join(c.logdir, "validation"))
                            for c, done in zip(configs, self.complete)]
        for j in self.jobs:  # as train.run: the saved model.keras carries this compile config
            j.model.compile(optimizer=j.optimizer,
                            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                            metrics=["accuracy"])
        momentum = [j.momentum_schedule if j.momentum_schedule is not None else float(c.momentum)
                    for c, j in zip(configs, self.jobs)]
        self.trainer = PackedTrainer(packed, optimizer, [j.schedule for j in self.jobs], momentum=momentum,
                                     seeds=[c.seed for c in configs], x_train=splits.x_train, y_train=splits.y_train,
                                     batch_size=first.batch_size, regularized=bool(job.model.losses),
                                     summary_writers=self.train_writers, summary_every=first.summary_every)
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.checkpoint = tf.train.Checkpoint(**self.trainer.checkpoint_objects(), epoch=self.epoch)
        self.manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(pack_dir, "checkpoints"),
                                                  max_to_keep=3, step_counter=self.trainer.global_step)
        state_class = _member_state_class()
        self.states = [state_class(j.model, j.optimizer, steps_per_epoch=self.steps_per_epoch,
                                   total_steps=self.total_steps, global_step=self.trainer.global_step,
                                   history_path=os.path.join(c.logdir, "history.json"), summary_writer=tw,
                                   validation_writer=vw, evaluator=None, eval_dataset=None, progress="bar")
                       for c, j, tw, vw in zip(configs, self.jobs, self.train_writers, self.val_writers)]
        for s in self.states:  # the packed evaluation supplies each member's held-out metrics
            s.evaluator, s.eval_dataset = s, True
        self.eval_dataset = job.eval_dataset()
        self.failures: dict[int, str] = {}

    # ----------------------------------------------------------------------------------- folders
    def _complete(self, c: TrainConfig) -> bool:
        reached = run_dir.checkpoint_steps(os.path.join(c.logdir, "checkpoints"))
        return bool(reached) and reached[-1] == self.total_steps and os.path.exists(os.path.join(c.logdir,
                                                                                               "model.keras"))

    def _pack_identity(self) -> dict[str, Any]:
        return {"members": [c.logdir for c in self.configs], "settings": self.identities,
                "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def _check_pack_file(self) -> None:
        path = os.path.join(self.pack_dir, PACK_FILE)
        identity = self._pack_identity()
        previous = files.read_json(path, "the pack's members and settings")
        has_checkpoint = bool(run_dir.checkpoint_steps(os.path.join(self.pack_dir, "checkpoints")))
        if previous is not None and has_checkpoint and previous != identity:
            diffs = run_dir.differences(previous, identity)
            raise UserError(f"{self.pack_dir} holds a pack with other members or settings ({'; '.join(diffs[:3])}); "
                            "rerun with the same runs, or move that folder away to start the pack afresh.")
        files.write_json(path, identity)

    # ----------------------------------------------------------------------------------- run
    def restore(self) -> int | None:
        """Restores the pack's latest checkpoint and the members' histories saved with it; returns its step."""

        path = self.manager.latest_checkpoint
        own = [c.logdir for c, done in zip(self.configs, self.complete)
               if not done and run_dir.checkpoint_steps(os.path.join(c.logdir, "checkpoints"))]
        if path is None:
            if own:
                raise UserError(f"--logdir={own[0]} holds a checkpoint of its own (an unpacked run) but the pack "
                                f"{self.pack_dir} has none: resume that run alone (python -m clrlab.train "
                                f"--flagfile={own[0]}/flags.txt).")
            for s in self._live_states():
                s.mark_restart(0)
            return None
        try:
            self.checkpoint.restore(path).assert_existing_objects_matched()
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: one line, not a traceback
            reason = " ".join((getattr(e, "message", None) or str(e) or type(e).__name__).split())[:200]
            raise UserError(f"cannot restore the pack's checkpoint {path}: {reason}. Move {self.pack_dir} away to "
                            "start the pack afresh.") from None
        step = self.trainer.step
        if own and step != self.total_steps:
            raise UserError(f"--logdir={own[0]} holds a checkpoint of its own but the pack {self.pack_dir} is at step "
                            f"{step} of {self.total_steps}: resume that run alone (python -m clrlab.train "
                            f"--flagfile={own[0]}/flags.txt), or move the pack folder away.")
        for s in self._live_states():
            s.history = _read_history(s.history_path, step, self.steps_per_epoch, self.total_steps)
            s.mark_restart(step)
        stored = files.read_json(os.path.join(self.pack_dir, FAILURES_FILE), "the pack's failed members") or {}
        active = self.trainer.active.numpy()
        self.failures = {int(k): v for k, v in stored.items() if not active[int(k)]}
        return step

    def _live_states(self):
        """The states of the members this call trains or finishes (not those already complete)."""
        return [s for s, done in zip(self.states, self.complete) if not done]

    def _save_due(self, step: int, epoch_done: bool) -> bool:
        """As `RunState.save_due`: at the last step, every `checkpoint_every` steps, and with `checkpoint_secs`
        at the first chunk end at least that many wall seconds after the last save; with neither, every
        epoch end."""
        first = self.configs[0]
        if step == self.total_steps or (first.checkpoint_every and step % first.checkpoint_every == 0):
            return True
        if first.checkpoint_secs:
            return time.monotonic() - self._last_save >= first.checkpoint_secs
        return not first.checkpoint_every and epoch_done

    def save(self) -> None:
        """Each active member's events and history, then the pack's checkpoint at the global step."""
        import tensorflow as tf

        from trainers.run_state import write_error

        for m, s in enumerate(self.states):
            if m in self.failures or self.complete[m]:
                continue
            for writer in (s.summary_writer, s.validation_writer):
                writer.flush()
            s.save_history()
        try:
            self.manager.save(checkpoint_number=self.trainer.global_step)
        except (OSError, tf.errors.OpError) as e:
            raise write_error(os.path.join(self.pack_dir, "checkpoints"), "a checkpoint in", e) from None
        self._last_save = time.monotonic()

    def run(self) -> list[MemberResult]:
        from trainers.run_state import StopRequests

        if all(self.complete):
            print(f"pack {self.pack_dir}: every member already holds a complete run; nothing to do.", flush=True)
            return [MemberResult(status="already_complete", step=self.total_steps, logdir=c.logdir,
                                 test_metrics=None, history=None, resumed_from=self.total_steps)
                    for c in self.configs]
        from clrlab import train

        resumed_from = self.restore()
        for c, j in zip(self.configs, self.jobs):
            train._announce(c, j, c.logdir, resumed_from)  # noqa: SLF001 - the same line as an unpacked run
        print(f"pack {self.pack_dir}: {self.members} members trained together"
              + (f", resuming at step {resumed_from}" if resumed_from is not None else ""), flush=True)
        first = self.configs[0]
        spe, total = self.steps_per_epoch, self.total_steps
        step = self.trainer.step
        status, received = "completed", None
        epoch_started = None
        loop_start = self._last_save = time.monotonic()
        with StopRequests() as stops:
            while step < total and len(self.failures) < self.members:
                epoch, in_epoch = divmod(step, spe)
                epoch_len = min(spe, total - epoch * spe)
                if epoch_started is None:
                    self.epoch.assign(epoch)
                    for m, s in enumerate(self.states):
                        if m not in self.failures and not self.complete[m]:
                            s.begin_epoch(epoch)
                    epoch_started = time.monotonic()
                chunk = min(first.steps_per_loop, epoch_len - in_epoch)
                if first.checkpoint_every:
                    chunk = min(chunk, first.checkpoint_every - step % first.checkpoint_every)
                records, failures = self.trainer.train_steps(chunk)
                for m, s in enumerate(self.states):
                    if m not in self.failures and m not in failures and not self.complete[m]:
                        s.history.add_steps(records.member(m, with_momentum=self.trainer.cycling[m]))
                step += chunk
                if failures:
                    for m, error in failures.items():
                        self.failures[m] = f"{type(error).__name__}: {' '.join(str(error).split())}"
                        self.states[m].save_history()
                        print(f"pack: member {m} ({self.configs[m].logdir}) failed: {self.failures[m]}", flush=True)
                    files.write_json(os.path.join(self.pack_dir, FAILURES_FILE),
                                     {str(k): v for k, v in self.failures.items()})
                epoch_done = in_epoch + chunk == epoch_len
                if epoch_done:
                    self._end_epoch(epoch, time.monotonic() - epoch_started)
                    epoch_started = None
                if self._save_due(step, epoch_done):
                    self.save()
                if stops.received is not None:
                    status, received = "interrupted", stops.name
                    self.save()
                    break
        self.loop_seconds = (time.monotonic() - loop_start) / self.members
        for s in self._live_states():
            s.summary_writer.flush()
            s.validation_writer.flush()
        results = [self._finish(m, status, received, resumed_from) for m in range(self.members)]
        return results

    def _end_epoch(self, epoch: int, seconds: float) -> None:
        began = time.monotonic()
        val = self.trainer.evaluate(self.eval_dataset)
        eval_share = (time.monotonic() - began) / self.members
        share = seconds / self.members
        accuracies = []
        for m, s in enumerate(self.states):
            if m in self.failures or self.complete[m]:
                continue
            s.end_member_epoch(epoch, {"loss": float(val["loss"][m]), "accuracy": float(val["accuracy"][m])}, share,
                               eval_share)
            accuracies.append(float(val["accuracy"][m]))
        if self.progress == "log":
            print(f"pack epoch {epoch + 1}/{self.states[0].total_epochs} step {self.trainer.step}: "
                  f"{len(accuracies)} members, val_accuracy {min(accuracies):.4f}..{max(accuracies):.4f} "
                  f"({seconds:.1f}s)", flush=True)

    def _finish(self, m: int, status: str, received: str | None, resumed_from: int | None) -> MemberResult:
        """Member m's final outputs (as clrlab.train.run writes them; model.keras last) and result."""
        from clrlab import packed_models, plots, train
        from trainers.evaluation import Evaluator

        c, j, s = self.configs[m], self.jobs[m], self.states[m]
        seconds = (time.monotonic() - self.started) / self.members
        if self.complete[m]:
            return MemberResult(status="already_complete", step=self.total_steps, logdir=c.logdir,
                                test_metrics=None, history=None, resumed_from=self.total_steps)
        if m in self.failures:
            return MemberResult(status="failed", step=self.trainer.step, logdir=c.logdir, test_metrics=None,
                                history=s.history, resumed_from=resumed_from, seconds=seconds,
                                error=self.failures[m], loop_seconds=self.loop_seconds)
        test_metrics = None
        if status == "completed":
            packed_models.unpack_into(self.packed, m, j.model)
            self._unpack_optimizer(m)
            self._member_checkpoint(m)
            evaluator = Evaluator(j.model, j.strategy, self.trainer.loss_fn)
            test_metrics = train.finish(j, c.logdir, evaluator.predict_classes(self.eval_dataset))
            test_metrics["loss"] = evaluator.evaluate(self.eval_dataset)["loss"]
            s.history.test = test_metrics
            s.history.save(s.history_path)
        steps = s.history.steps
        plots.plot_lr(steps["step"], steps["lr"], os.path.join(c.logdir, "clr_plot.png"),
                      title=f"{c.policy} learning rate", momentum=steps.get("momentum"))
        plots.plot_history(s.history.epochs, os.path.join(c.logdir, "training_plot.png"))
        if status == "completed":  # the LAST write: a model.keras means every output of the run is there
            model_path = os.path.join(c.logdir, "model.keras")
            j.model.save(f"{model_path}.tmp.keras")
            os.replace(f"{model_path}.tmp.keras", model_path)
        return MemberResult(status=status, step=self.trainer.step, logdir=c.logdir, test_metrics=test_metrics,
                            history=s.history, resumed_from=resumed_from, signal=received, model=j.model,
                            seconds=seconds, loop_seconds=self.loop_seconds)

    def _unpack_optimizer(self, m: int) -> None:
        """Member m's Keras optimizer as the unpacked run would hold it: its slots (when the packed optimizer
        can unpack them), its step count, last LR and momentum."""
        from clrlab import optimizers

        j, s = self.jobs[m], self.states[m]
        unpack_slots = getattr(self.packed_optimizer, "unpack_slots_into", None)
        if unpack_slots is not None:
            unpack_slots(m, j.optimizer)
        j.optimizer.iterations.assign(self.total_steps)
        j.optimizer.learning_rate.assign(s.history.steps["lr"][-1])
        if j.momentum_schedule is not None:
            optimizers.momentum_variable(j.optimizer).assign(float(s.history.steps["momentum"][-1]))

    def _member_checkpoint(self, m: int) -> None:
        """The final checkpoint of member m in its own checkpoints/, with RunState's layout (model, optimizer,
        global step, epoch): the folder is then an ordinary complete run."""
        import tensorflow as tf

        from trainers.run_state import write_error

        c, j, s = self.configs[m], self.jobs[m], self.states[m]
        checkpoint = tf.train.Checkpoint(model=j.model, optimizer=j.optimizer, global_step=s.global_step,
                                         epoch=s.epoch)
        manager = tf.train.CheckpointManager(checkpoint, os.path.join(c.logdir, "checkpoints"), max_to_keep=3,
                                             step_counter=s.global_step)
        try:
            manager.save(checkpoint_number=s.global_step)
        except (OSError, tf.errors.OpError) as e:
            raise write_error(os.path.join(c.logdir, "checkpoints"), "a checkpoint in", e) from None

