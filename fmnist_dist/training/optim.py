"""Optimizer and learning-rate schedule: scaled with the global batch, with a linear warm-up."""
from __future__ import annotations

import math

import tensorflow as tf


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class WarmupSchedule(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from the one-rank rate to the scaled peak, then constant or cosine decay.

    A function of the optimizer's step counter, so it survives per-epoch fit calls and checkpoints.
    Serializable because hvd.DistributedOptimizer rebuilds the optimizer from its config.
    """

    def __init__(self, base_lr: float, peak_lr: float, warmup_steps: int, total_steps: int, cosine: bool):
        self.base_lr, self.peak_lr, self.cosine = base_lr, peak_lr, cosine
        self.warmup_steps, self.total_steps = int(warmup_steps), max(1, int(total_steps))

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warm = self.base_lr + (self.peak_lr - self.base_lr) * step / max(1, self.warmup_steps)
        progress = tf.clip_by_value(
            (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        decayed = self.peak_lr * 0.5 * (1.0 + tf.cos(math.pi * progress)) if self.cosine else self.peak_lr
        return tf.where(step < self.warmup_steps, warm, decayed)

    def get_config(self) -> dict:
        return {"base_lr": self.base_lr, "peak_lr": self.peak_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "cosine": self.cosine}


def lr_schedule(t, lr_factor: float, steps_per_epoch: int) -> WarmupSchedule:
    """From the train section: train.lr scaled by lr_factor, the global batch over train.batch_size
    (the world size under weak scaling), linearly, by its square root, or not at all."""
    scale = {"linear": lr_factor, "sqrt": math.sqrt(lr_factor), "none": 1.0}[t.lr_scaling]
    return WarmupSchedule(t.lr, t.lr * scale, round(t.warmup_epochs * steps_per_epoch),
                          t.epochs * steps_per_epoch, t.schedule == "cosine")


def make_optimizer(t, schedule: WarmupSchedule) -> tf.keras.optimizers.Optimizer:
    if t.optimizer == "adam":
        return tf.keras.optimizers.Adam(schedule)
    if t.optimizer == "adamw":
        return tf.keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay)
    return tf.keras.optimizers.SGD(schedule, momentum=t.momentum, nesterov=True,
                                   weight_decay=t.weight_decay or None)
