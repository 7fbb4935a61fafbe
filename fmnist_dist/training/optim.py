"""Optimizer and learning-rate schedule: scaled with the global batch, with a linear warm-up."""
from __future__ import annotations

import math

import tensorflow as tf

from ..scaling import LARGE_BATCH_WARMUP_EPOCHS, BatchPlan


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from the one-rank rate to the scaled peak, then constant, cosine or linear decay.

    A function of the optimizer's step counter, so it survives per-epoch fit calls and checkpoints.
    Serializable because hvd.DistributedOptimizer rebuilds the optimizer from its config.
    """

    def __init__(self, base_lr: float, peak_lr: float, warmup_steps: int, total_steps: int, cosine: bool,
                 linear: bool = False):
        self.base_lr, self.peak_lr, self.cosine, self.linear = base_lr, peak_lr, cosine, linear
        self.warmup_steps, self.total_steps = int(warmup_steps), max(1, int(total_steps))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.base_lr + (self.peak_lr - self.base_lr) * step / max(1, self.warmup_steps)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        if self.cosine:
            decayed = self.peak_lr * 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            decayed = self.peak_lr * (1.0 - progress) if self.linear else self.peak_lr
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict:
        return {"base_lr": self.base_lr, "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "cosine": self.cosine, "linear": self.linear}


class BiasRate:
    """Mixed into an optimizer: batch norm's shifts (beta) move by bn_bias_lr times the step the
    optimizer computed for them. The step is scaled, not the gradient: Adam's step does not change
    when its gradient is scaled."""

    def __init__(self, *args, bn_bias_lr: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.bn_bias_lr = bn_bias_lr

    def update_step(self, gradient, variable):
        if self.bn_bias_lr == 1.0 or not is_bn_shift(variable):
            return super().update_step(gradient, variable)
        before = tf.identity(variable)
        super().update_step(gradient, variable)
        variable.assign(before + (variable - before) * tf.cast(self.bn_bias_lr, variable.dtype))

    def get_config(self) -> dict:
        return {**super().get_config(), "bn_bias_lr": self.bn_bias_lr}


def is_bn_shift(variable: tf.Variable) -> bool:
    """Keras names a BatchNormalization layer's shift `batch_normalization.../beta:0`."""
    layer, _, name = variable.name.rpartition("/")
    return name.startswith("beta") and "batch_normalization" in layer


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class Adam(BiasRate, tf.keras.optimizers.Adam):
    pass


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class AdamW(BiasRate, tf.keras.optimizers.AdamW):
    pass


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class SGD(BiasRate, tf.keras.optimizers.SGD):
    pass


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class Lamb(BiasRate, tf.keras.optimizers.Adam):
    """Adam with a layer-wise trust ratio (You et al., 2020): each variable moves by the learning rate
    times its own norm, in the direction of Adam's step, so no layer takes a step out of proportion to
    its weights when a large global batch scales the rate up. Weight decay, if any, is part of the step."""

    def __init__(self, learning_rate=0.001, lamb_weight_decay: float = 0.0, **kwargs):
        super().__init__(learning_rate, **kwargs)
        self.lamb_weight_decay = lamb_weight_decay

    def update_step(self, gradient, variable):
        dtype = variable.dtype
        lr = tf.cast(self.learning_rate, dtype)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._index_dict[self._var_key(variable)]
        m, v = self._momentums[index], self._velocities[index]
        m.assign_add((gradient - m) * (1 - beta_1))
        v.assign_add((tf.square(gradient) - v) * (1 - beta_2))
        m_hat, v_hat = m / (1 - tf.pow(beta_1, step)), v / (1 - tf.pow(beta_2, step))
        update = m_hat / (tf.sqrt(v_hat) + self.epsilon)
        if self.lamb_weight_decay and len(variable.shape) > 1:
            update += self.lamb_weight_decay * variable
        w_norm, u_norm = tf.norm(variable), tf.norm(update)
        ratio = tf.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, tf.ones_like(w_norm))
        if self.bn_bias_lr != 1.0 and is_bn_shift(variable):     # its own step: BiasRate's is not called
            lr = lr * tf.cast(self.bn_bias_lr, dtype)
        variable.assign_sub(lr * ratio * update)

    def get_config(self) -> dict:
        return {**super().get_config(), "lamb_weight_decay": self.lamb_weight_decay}


def lr_schedule(t, batches: BatchPlan, steps_per_epoch: int) -> WarmupSchedule:
    """From the train section: train.lr scaled by the global batch over train.batch_size (the world
    size under weak scaling), linearly, by its square root, or not at all."""
    factor = batches.lr_factor
    scale = {"linear": factor, "sqrt": math.sqrt(factor), "none": 1.0}[t.lr_scaling]
    return WarmupSchedule(t.lr, t.lr * scale, round(warmup_epochs(t, batches) * steps_per_epoch),
                          t.epochs * steps_per_epoch, t.schedule == "cosine", t.schedule == "linear")


def warmup_epochs(t, batches: BatchPlan) -> float:
    return max(t.warmup_epochs, LARGE_BATCH_WARMUP_EPOCHS) if batches.large else t.warmup_epochs


def optimizer_name(t, batches: BatchPlan) -> str:
    """train.optimizer, but LAMB for Adam and AdamW under the large-batch recipe."""
    return "lamb" if batches.large and t.optimizer in ("adam", "adamw") else t.optimizer


def recipe(t, batches: BatchPlan) -> dict:
    """The report's record of what the global batch made of the train section."""
    return {"recipe": "large-batch" if batches.large else "standard", "optimizer": optimizer_name(t, batches),
            "warmup_epochs": warmup_epochs(t, batches)}


def make_optimizer(t, schedule: WarmupSchedule, batches: BatchPlan) -> tf.keras.optimizers.Optimizer:
    name, bias = optimizer_name(t, batches), {"bn_bias_lr": t.bn_bias_lr}
    if name == "lamb":
        return Lamb(schedule, lamb_weight_decay=t.weight_decay, **bias)
    if name == "adam":
        return Adam(schedule, **bias)
    if name == "adamw":
        return AdamW(schedule, weight_decay=t.weight_decay, **bias)
    return SGD(schedule, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay or None, **bias)
