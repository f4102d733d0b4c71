"""The LR range test's custom-loop driver: the sweep of `clrlab.sweep` trained with
`trainers.custom_loop.CustomLoopTrainer`, the training step of `python -m clrlab.train` (Smith 2015, section 3.3).

`clrlab.sweep` holds the engine every driver shares (options, schedule, recorder and stop rule, state
snapshot); `clrlab.callbacks.LRRangeTest` is the `model.fit` driver. Steps are 0-based sweep steps
(batches); `run_sweep` is an eager driver of compiled `train_steps` calls.
"""

from __future__ import annotations

import keras

from clrlab.sweep import (
    RangeTestResult,
    StateSnapshot,
    SweepOptions,
    SweepRecorder,
    sweep_schedule,
    write_sweep_scalars,
)
from trainers.custom_loop import CustomLoopTrainer, NonFiniteLossError

__all__ = ["run_sweep"]


def run_sweep(model, optimizer, train_dataset, options: SweepOptions, *, strategy=None, eval_dataset=None,
              summary_writer=None, restore: bool = True, progress: bool = False,
              stop_requested=None) -> RangeTestResult:
    """Runs the sweep on `model`/`optimizer` (eager driver; compiled steps), then restores their state.

    The steps are `CustomLoopTrainer.train_steps` calls of `SweepRecorder.next_chunk()` steps each, with
    the sweep schedule assigned in graph every step; the recorder gets each call's per-step records.

    Args:
      model, optimizer: as for `CustomLoopTrainer` (float LR optimizer; built or not). The momentum (or
        `beta_1`) stays at the optimizer's value for the whole sweep: only the LR moves, as in Smith's
        range test (no momentum schedule is given to the trainer).
      train_dataset: an (infinite or long enough) dataset of (x, y) training batches.
      options: the sweep.
      strategy: optional `tf.distribute` strategy, as for `CustomLoopTrainer`.
      eval_dataset: finite held-out dataset, used every `options.eval_every` steps.
      summary_writer: per-step scalars go here under the range test's own tags `range_test/learning_rate`,
        `range_test/loss` and `range_test/accuracy` (step = sweep step), never the training run's
        `learning_rate`/`loss`/`accuracy`, so TensorBoard keeps sweeps out of the training cards (None: none).
      restore: put weights and optimizer state back afterwards (default; the point of the test).
      progress: show a Keras Progbar.
      stop_requested: optional `() -> str | None`, called after every chunk; a returned reason (e.g.
        'SIGINT') ends the sweep there with that `stop_reason` (what was swept is kept and analysed).
    """
    trainer = CustomLoopTrainer(model, optimizer, sweep_schedule(options), strategy=strategy)
    snapshot = StateSnapshot(model, optimizer)
    recorder = SweepRecorder(options)
    evaluate = (lambda: trainer.evaluate(eval_dataset)["accuracy"]) if eval_dataset is not None else None
    bar = keras.utils.Progbar(options.num_steps, stateful_metrics=["lr", "loss"]) if progress else None
    try:
        iterator = trainer.make_iterator(train_dataset)
        while not recorder.done:
            try:
                records = trainer.train_steps(iterator, recorder.next_chunk())
            except NonFiniteLossError as e:  # full precision: the chunk up to the bad step, then stop
                records = e.records
            if bar is not None:
                bar.update(recorder.steps + len(records.lr),
                           [("lr", float(records.lr[-1])), ("loss", float(records.loss[-1]))])
            first = recorder.steps
            recorder.record(records.lr.tolist(), records.loss.tolist(), records.accuracy.tolist(), evaluate)
            if summary_writer is not None:
                write_sweep_scalars(summary_writer, first, records.lr, records.loss, records.accuracy)
            if stop_requested is not None and not recorder.done and (reason := stop_requested()):
                recorder.stop(reason)
    finally:
        if restore:
            snapshot.restore()
    return recorder.result()
