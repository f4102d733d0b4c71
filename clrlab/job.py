"""Builds the pieces of one training job from a `clrlab.config.TrainConfig`: runtime settings, data,
strategy, model, optimizer, LR policy, the momentum cycle (`--cycle_momentum`) and (for `model.fit` with
`--lr_control=callback`) the classic `CyclicLR` callback. Shared by `clrlab.train` and the range test
(`clrlab.range_finder`, whose momentum stays fixed) so both build the same job; the trainers get the
pieces as explicit arguments and never see the config.

All of it runs eagerly, once, before training. Step sizes and lengths are in steps (batches).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from clrlab import config as config_lib
from clrlab import data, models, multi_worker, optimizers, schedules
from clrlab.callbacks import CyclicLR
from clrlab.config import TrainConfig
from clrlab.errors import UserError


@dataclasses.dataclass
class Job:
    """One configured job. `steps_per_epoch`, `total_steps` and `step_size` are in steps (batches).

    `momentum_schedule` is the `clrlab.schedules.CyclicalMomentum` of the run when momentum cycles (the
    optimizer is then a `clrlab.optimizers` one), else None (a stock Keras optimizer, constant momentum).
    """

    config: TrainConfig
    splits: data.Splits
    strategy: tf.distribute.Strategy
    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    schedule: keras.optimizers.schedules.LearningRateSchedule
    steps_per_epoch: int
    total_steps: int
    step_size: int
    momentum_schedule: schedules.CyclicalMomentum | None = None

    def train_data_fn(self, start_step: int) -> tf.data.Dataset:
        """The training batches from global step `start_step` on (infinite, resume-exact)."""
        c = self.config
        ds = data.train_dataset(self.splits, c.batch_size, seed=c.seed, start_step=start_step, augment=c.augment)
        return multi_worker.shard_by_data(ds) if c.distribute == "multi_worker" else ds

    def eval_dataset(self) -> tf.data.Dataset:
        return data.eval_dataset(self.splits, max(self.config.batch_size, 256))


def setup_runtime(config: TrainConfig) -> None:
    """Process-wide settings: logical CPU devices, seeds, op determinism, the mixed-precision policy.

    Call before any model is built. Logical devices can only be configured before TensorFlow's runtime
    starts; if it already has, a mismatch raises RuntimeError. Under `--distribute=multi_worker` the
    strategy is created first of all (MultiWorkerMirroredStrategy must exist before other TF ops run).
    """
    if config.distribute == "multi_worker":
        make_strategy(config)
    if config.cpu_devices > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * config.cpu_devices)
        except RuntimeError:
            if len(tf.config.list_logical_devices("CPU")) != config.cpu_devices:
                raise RuntimeError(f"--cpu_devices={config.cpu_devices} must be set before TensorFlow "
                                   "starts (it already has, with a different device count).") from None
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(
        "float32" if config.mixed_precision == "none" else config.mixed_precision)


def make_strategy(config: TrainConfig) -> tf.distribute.Strategy:
    """The strategy of `config.distribute`; multi_worker: the process's one MultiWorkerMirroredStrategy
    (`clrlab.multi_worker.strategy`, over TF_CONFIG)."""
    if config.distribute == "multi_worker":
        return multi_worker.strategy(config.collective, config.collective_timeout)
    if config.distribute == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices=devices)
    return tf.distribute.get_strategy()


def make_optimizer(name: str, learning_rate, momentum, *, variable_momentum: bool = False,
                   loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """A Keras optimizer with a FLOAT learning rate (a variable the loop assigns every step).

    `learning_rate` may also be a `LearningRateSchedule`, passed through unchanged: the optimizer then
    computes the LR from its own `iterations` (the `model.fit` path, `--trainer=keras_fit`).
    `momentum` is SGD/RMSprop momentum or Adam's beta_1: a float, or (with `variable_momentum`) a
    momentum schedule such as `clrlab.schedules.CyclicalMomentum`, evaluated at `iterations` each update.
    With `variable_momentum` the optimizer is `clrlab.optimizers.SGD/Adam/AdamW`, whose momentum lives in
    a variable a loop or callback may assign every step (RMSprop: ValueError); otherwise the stock Keras
    one, so runs without a momentum cycle are unchanged. With `loss_scaling`, the optimizer is wrapped in
    `keras.optimizers.LossScaleOptimizer` (dynamic scaling, for mixed_float16).
    """
    is_schedule = isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule)
    lr = learning_rate if is_schedule else float(learning_rate)
    if not variable_momentum:
        momentum = float(momentum)
    kinds = optimizers if variable_momentum else keras.optimizers
    if name == "sgd":
        opt = kinds.SGD(learning_rate=lr, momentum=momentum)
    elif name == "nesterov":
        opt = kinds.SGD(learning_rate=lr, momentum=momentum, nesterov=True)
    elif name == "adam":
        opt = kinds.Adam(learning_rate=lr, beta_1=momentum)
    elif name == "adamw":
        opt = kinds.AdamW(learning_rate=lr, beta_1=momentum)
    elif name == "rmsprop" and not variable_momentum:
        opt = keras.optimizers.RMSprop(learning_rate=lr, momentum=momentum)
    elif name == "rmsprop":
        raise ValueError("RMSprop has no momentum that can cycle: use sgd, nesterov, adam or adamw.")
    else:
        raise ValueError(f"Unknown optimizer. Expected one of {', '.join(config_lib.OPTIMIZERS)}. Received: {name}.")
    return keras.optimizers.LossScaleOptimizer(opt) if loss_scaling else opt


def make_lr_schedule(config: TrainConfig,
                     steps_per_epoch: int) -> tuple[keras.optimizers.schedules.LearningRateSchedule, int]:
    """The LR policy of `config` and its half-cycle length in steps."""
    step_size = config.resolve_step_size(steps_per_epoch)
    total = config.total_steps(steps_per_epoch)
    try:
        schedule = schedules.make_schedule(
            config.policy, base_lr=config.base_lr, max_lr=config.max_lr, step_size=step_size,
            step_size_down=config.step_size_down, gamma=config.gamma, scale_mode=config.scale_mode,
            total_steps=total, pct_start=config.pct_start, final_div_factor=config.final_div_factor,
            anneal_strategy=config.anneal_strategy, three_phase=config.three_phase,
            boundaries=list(config.lr_boundaries), values=list(config.lr_values) or None)
    except ValueError as e:  # values the flag validators cannot see (e.g. a step size from epochs)
        raise UserError(f"invalid policy settings: {e}") from None
    return schedule, step_size


def make_momentum_schedule(config: TrainConfig, lr_schedule) -> schedules.CyclicalMomentum | None:
    """The momentum cycle of `config` over `lr_schedule` (`CyclicalMomentum`), or None when momentum is
    constant. Raises `UserError` when cycling is asked of rmsprop or a policy without a cycle."""
    bounds = config.momentum_cycle()
    if bounds is None:
        return None
    return schedules.CyclicalMomentum(lr_schedule, base_momentum=bounds[0], max_momentum=bounds[1])


def build_job(config: TrainConfig, *, splits: data.Splits | None = None) -> Job:
    """Loads the data and builds strategy, model, optimizer and policy (call `setup_runtime` first)."""
    if splits is None:
        splits = data.load(config.dataset, data_dir=config.data_dir, normalization=config.normalization,
                           seed=config.seed)
    steps_per_epoch = data.steps_per_epoch(len(splits.x_train), config.batch_size)
    total_steps = config.total_steps(steps_per_epoch)
    schedule, step_size = make_lr_schedule(config, steps_per_epoch)
    momentum_schedule = make_momentum_schedule(config, schedule)
    strategy = make_strategy(config)
    model_name = config.model if config.model != "auto" else models.auto_model_name(splits.name, splits.input_shape)
    with strategy.scope():
        try:
            model = models.build_model(model_name, splits.input_shape, splits.num_classes,
                                       weight_decay=config.weight_decay, seed=config.seed)
        except ValueError as e:  # the data decides what the flags cannot: e.g. images too small for the model
            raise UserError(f"--model={model_name} cannot take {splits.name}: {e}") from None
        # model.fit with the in-graph schedule: the optimizer holds the LR schedule (and the momentum
        # schedule next to it); otherwise a float LR (and a momentum variable the loop/callback assigns).
        in_graph = config.trainer == "keras_fit" and config.lr_control == "schedule"
        if momentum_schedule is None:
            momentum = config.momentum
        else:
            momentum = momentum_schedule if in_graph else float(momentum_schedule(0))
        optimizer = make_optimizer(config.optimizer, schedule if in_graph else float(schedule(0)), momentum,
                                   variable_momentum=momentum_schedule is not None,
                                   loss_scaling=config.mixed_precision == "mixed_float16")
    return Job(config=config, splits=splits, strategy=strategy, model=model, optimizer=optimizer,
               schedule=schedule, steps_per_epoch=steps_per_epoch, total_steps=total_steps, step_size=step_size,
               momentum_schedule=momentum_schedule)


def make_lr_callback(config: TrainConfig, step_size: int) -> CyclicLR | None:
    """The classic `CyclicLR` callback that drives the LR per batch for `model.fit`, or None.

    Only for `--trainer=keras_fit --lr_control=callback`; otherwise the optimizer holds the schedule
    (keras_fit) or the custom loop assigns it in graph. `step_size` is the half cycle in steps (from
    `make_lr_schedule`). The callback has only bckenstler's symmetric cycles (clr_callback.py of
    github.com/bckenstler/CLR): any other policy, or `step_size_down`, is a `UserError`. When momentum
    cycles, the callback cycles it too (PyTorch-style `cycle_momentum=True` and the config's bounds).
    """
    if config.trainer != "keras_fit" or config.lr_control != "callback":
        return None
    if config.policy not in config_lib.CLR_MODES or config.step_size_down is not None:
        raise UserError(
            f"--lr_control=callback uses the classic CyclicLR callback, which has only the symmetric "
            f"triangular, triangular2 and exp_range cycles. Received: --policy={config.policy}"
            + (f", --step_size_down={config.step_size_down}" if config.step_size_down is not None else "")
            + "; use --lr_control=schedule for it.")
    bounds = config.momentum_cycle()
    momentum = {} if bounds is None else {"cycle_momentum": True, "base_momentum": bounds[0],
                                          "max_momentum": bounds[1]}
    return CyclicLR(base_lr=config.base_lr, max_lr=config.max_lr, step_size=step_size, mode=config.policy,
                    gamma=config.gamma, **momentum)
