"""The input pipeline (a rank's shard of an epoch as batches) and the exact evaluation."""
from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from ..data import NUM_CLASSES


def make_batches(x: np.ndarray, y: np.ndarray, t: Any, batch_size: int, epoch: int, rank: int,
                 first_batch: int = 0, mirrored: np.ndarray | None = None) -> tf.data.Dataset:
    """This rank's epoch as batches: uint8 -> float in [0, 1], one-hot labels, optional
    flips/shifts drawn from a seed of (seed, epoch, rank, batch) so a run is reproducible.
    With `mirrored` (train.alternate_flips), those images are the flipped ones instead of a coin's."""
    if mirrored is not None:
        x = x.copy()
        x[mirrored] = x[mirrored][:, :, ::-1]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size, drop_remainder=True).enumerate()

    def prepare(i, batch):
        images, labels = batch
        images = tf.cast(images[..., None], tf.float32) / 255.0
        seed = tf.stack([tf.cast(t.seed * 1_000_003 + epoch * 1009 + rank, tf.int64), i + first_batch])
        if t.augment_flip and mirrored is None:
            images = tf.image.stateless_random_flip_left_right(images, seed)
        if t.augment_shift:
            images = random_shift(images, t.augment_shift, seed)
        return images, tf.one_hot(tf.cast(labels, tf.int32), NUM_CLASSES)

    # No tf.data autotuning: tearing down its model thread at the end of a fit call stalled the
    # next epoch by about an epoch's compute time in roughly half of the fit calls (measured).
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return ds.map(prepare).prefetch(2).with_options(options)


def random_shift(images: tf.Tensor, max_shift: int, seed: tf.Tensor) -> tf.Tensor:
    """Shift each image by up to max_shift pixels in x and y, filling with zeros."""
    n = tf.shape(images)[0]
    shifts = tf.random.stateless_uniform([n, 2], seed, -max_shift, max_shift + 1, dtype=tf.int32)
    shifts = tf.cast(shifts, tf.float32)
    ones, zeros = tf.ones([n, 1]), tf.zeros([n, 1])
    transforms = tf.concat([ones, zeros, -shifts[:, :1], zeros, ones, -shifts[:, 1:], zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="NEAREST", fill_mode="CONSTANT")


def evaluate(model: tf.keras.Model, x: np.ndarray, y: np.ndarray, rt: Any, batch_size: int,
             flip: bool = False, shift: int = 0) -> dict:
    """Exact accuracy over all of x: each rank predicts a disjoint part, counts are summed.
    With flip, the logits of each image and its mirror image are averaged; with shift, also of each
    of those moved by up to `shift` pixels in x and y (every offset). The accuracy of the image
    alone is returned too (one_view_accuracy)."""
    if rt.size > 1:
        # The model evaluated is rank 0's, the one checkpoints keep: batch norm's moving statistics
        # are updated by each rank from its own batches, and another rank's would be lost on resume.
        rt.hvd_tf.broadcast_variables(model.non_trainable_variables, root_rank=0)
    part = np.array_split(np.arange(len(x)), rt.size)[rt.rank]
    correct, one_view_correct, loss_sum = 0, 0, 0.0
    for start in range(0, len(part), batch_size):
        idx = part[start:start + batch_size]
        logits = predict_logits(model, tf.constant(x[idx]))
        labels = y[idx].astype(np.int64)
        one_view_correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        views = [x[idx]] + ([np.ascontiguousarray(x[idx][:, :, ::-1])] if flip else [])
        offsets = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1) if dy or dx]
        for view in views[1:]:
            logits = logits + predict_logits(model, tf.constant(view))
        for view in views:
            for dy, dx in offsets:
                logits = logits + predict_logits(model, tf.constant(shifted(view, dy, dx)))
        logits = logits / (len(views) * (1 + len(offsets)))
        correct += int(np.sum(np.argmax(logits, axis=1) == labels))
        loss_sum += float(np.sum(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)))
    # Horovod: every rank counted its own part; the sums are the exact totals over all of x.
    totals = rt.hvd.allreduce(tf.constant([correct, one_view_correct, loss_sum, len(part)], tf.float64),
                              op=rt.hvd.Sum)
    correct, one_view_correct, loss_sum, total = (float(v) for v in totals.numpy())
    return {"accuracy": correct / total, "one_view_accuracy": one_view_correct / total, "loss": loss_sum / total,
            "correct": int(correct), "total": int(total)}


def shifted(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The images moved dy pixels down and dx right, zeros shifted in (as train.augment_shift does)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def predict_logits(model: tf.keras.Model, images_uint8: tf.Tensor) -> np.ndarray:
    """The model's float32 logits. A model carrying simulated ranks predicts in as many parts, which
    its inter-op threads run side by side as in training (evaluation normalizes with the moving
    statistics: each image's logits do not depend on the others in its part)."""
    if not hasattr(model, "_fmnist_predict"):
        parts = getattr(model, "ranks", 1)

        @tf.function(reduce_retracing=True)
        def fn(images):
            x = tf.cast(images[..., None], tf.float32) / 255.0
            n = tf.shape(x)[0]

            def in_parts():
                sizes = tf.concat([tf.fill([parts - 1], n // parts), [n - (parts - 1) * (n // parts)]], axis=0)
                return tf.concat([model(part, training=False) for part in tf.split(x, sizes, num=parts)], axis=0)

            def whole():
                return model(x, training=False)

            logits = tf.cond(n >= parts, in_parts, whole) if parts > 1 else whole()   # no empty part
            return tf.cast(logits, tf.float32)
        model._fmnist_predict = fn
    return model._fmnist_predict(images_uint8).numpy()
