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


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class Lamb(tf.keras.optimizers.Adam):
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
    name = optimizer_name(t, batches)
    if name == "lamb":
        return Lamb(schedule, lamb_weight_decay=t.weight_decay)
    if name == "adam":
        return tf.keras.optimizers.Adam(schedule)
    if name == "adamw":
        return tf.keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay)
    return tf.keras.optimizers.SGD(schedule, momentum=t.momentum, nesterov=True,
                                   weight_decay=t.weight_decay or None)
