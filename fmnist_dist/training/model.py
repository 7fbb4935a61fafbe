"""The CNN, built from the layer list in the config (see config.LAYER_PARAMS)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import tensorflow as tf

from .optim import WarmupSchedule, lr_schedule, make_optimizer

from ..config import IMAGE_SHAPE
from ..data import NUM_CLASSES
from ..scaling import BatchPlan


def build_and_compile(ns: Any, batches: BatchPlan, steps_per_epoch: int, distributed: Callable | None = None,
                      train_images: np.ndarray | None = None) -> tuple[tf.keras.Model, Any, WarmupSchedule]:
    """The model, its optimizer (wrapped by `distributed`, e.g. hvd.DistributedOptimizer) and the
    learning-rate schedule, compiled and built: what training trains and the benchmark times.
    model.first_conv_init: whiten takes its statistics from `train_images` (the benchmark, timing
    the same arithmetic, passes none and keeps the Glorot start)."""
    tf.keras.utils.set_random_seed(ns.train.seed)      # the same on every rank: the same initial weights
    if ns.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    model = build_model(ns.model.layers, ns.train.seed, batches.ranks_per_process, ns.model.first_conv_frozen)
    if ns.model.first_conv_init == "whiten" and train_images is not None:
        whiten_first_conv(model, train_images)
    schedule = lr_schedule(ns.train, batches, steps_per_epoch)
    optimizer = make_optimizer(ns.train, schedule, batches)
    if distributed is not None:
        optimizer = distributed(optimizer)
    loss = tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=ns.train.label_smoothing)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    optimizer.build(model.trainable_variables)
    # The metrics' variables are made here rather than by the first step: a tf.function that makes
    # variables is traced twice (the fast network's training step: 0.9 s of tracing against 0.35 s).
    model.compiled_metrics.build(tf.zeros([1, NUM_CLASSES]), tf.zeros([1, NUM_CLASSES]))
    return model, optimizer, schedule


def build_model(layers: list[dict], seed: int, ranks_per_process: int = 1,
                first_conv_frozen: bool = False) -> tf.keras.Model:
    """Stack the configured layers and append the Dense(10) classifier (logits, float32).
    With several (simulated) ranks per process, each trains as its own rank would (SimulatedRanks).
    A frozen first convolution keeps the weights it is given (model.first_conv_frozen)."""
    initializer_seed = iter(range(seed * 1000, seed * 1000 + 1000))
    if ranks_per_process > 1:
        model = SimulatedRanks(ranks_per_process, name="fmnist_cnn")
    else:
        model = tf.keras.Sequential(name="fmnist_cnn")
    model.add(tf.keras.Input(shape=IMAGE_SHAPE))
    for spec in layers:
        model.add(_make_layer(spec, next(initializer_seed), ranks_per_process))
    if not any(spec["type"] == "flatten" for spec in layers):
        model.add(tf.keras.layers.Flatten())
    # Logits stay float32 under a bf16 policy: the softmax/loss is where bf16 would lose accuracy.
    model.add(tf.keras.layers.Dense(NUM_CLASSES, dtype="float32", name="logits",
                                    kernel_initializer=tf.keras.initializers.GlorotUniform(seed)))
    if first_conv_frozen:
        model.layers[0].trainable = False
    return model


def _make_layer(spec: dict, seed: int, ranks_per_process: int) -> tf.keras.layers.Layer:
    kind = spec["type"]
    init = tf.keras.initializers.GlorotUniform(seed)
    if kind == "conv":
        return tf.keras.layers.Conv2D(spec["filters"], spec["kernel"], padding=spec["padding"],
                                      kernel_initializer=init)
    if kind == "dense":
        return tf.keras.layers.Dense(spec["units"], kernel_initializer=init)
    if kind == "relu":
        return tf.keras.layers.ReLU()
    if kind == "maxpool":
        return tf.keras.layers.MaxPooling2D(spec["size"])
    if kind == "dropout":
        return StepDropout(spec["rate"], seed=seed)
    if kind == "batchnorm":
        # 0.9, not Keras' 0.99: the moving statistics used at evaluation then settle within ~50
        # steps instead of ~500, so short runs evaluate what they trained. A process carrying n
        # simulated ranks updates them n times per step: momentum ** (1/n) keeps that horizon.
        return tf.keras.layers.BatchNormalization(momentum=spec["momentum"] ** (1 / ranks_per_process))
    if kind == "flatten":
        return tf.keras.layers.Flatten()
    raise ValueError(f"unknown layer type {kind!r}")  # config validation makes this unreachable


# The whitening filters' largest weight. 1/sqrt(eigenvalue) alone sets the scale by the pixels' units;
# scaled so, the layer starts near Glorot's range (+-0.47 for 3x3x1x16), where the layers after it
# and the learning rate were tuned. Measured with this scale (docs/results.md).
WHITEN_MAX_WEIGHT = 0.5
# Images the patch statistics come from (the first of the training split), and every how-many-th patch.
WHITEN_IMAGES, WHITEN_PATCH_STRIDE = 10_000, 7


def whitening_images(ns: Any, x_train: np.ndarray, train_idx: np.ndarray) -> np.ndarray | None:
    """The training images whitening reads (the first WHITEN_IMAGES of the training split), or None
    when model.first_conv_init does not whiten: no copy of the split for a run that does not."""
    if ns.model.first_conv_init != "whiten":
        return None
    return x_train[train_idx[:WHITEN_IMAGES]]


def whiten_first_conv(model: tf.keras.Model, train_images: np.ndarray) -> None:
    """Start the first convolution as patch whitening (airbench's first layer): its k x k patches'
    covariance C has eigenvectors v with eigenvalues e; filter v / sqrt(e) for the leading ones, and
    its negative (ReLU keeps both signs), so the layer's outputs start decorrelated and of equal
    variance. Filters beyond 2 k^2 keep their Glorot start; biases start at zero. Deterministic in
    the images, so every rank computes the same weights."""
    conv = model.layers[0]
    if not isinstance(conv, tf.keras.layers.Conv2D):
        raise ValueError(f"the first layer is {conv.name}, not a convolution")
    kernel, bias = conv.get_weights()
    kh, kw, channels, filters = kernel.shape
    patches = _patches(train_images[:WHITEN_IMAGES], kh, kw)[::WHITEN_PATCH_STRIDE]
    values, vectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    leading = np.argsort(values)[::-1][:min(filters // 2, kh * kw * channels)]
    whitening = vectors[:, leading] / np.sqrt(values[leading] + 1e-3)
    weights = np.concatenate([whitening, -whitening], axis=1)
    weights *= WHITEN_MAX_WEIGHT / np.abs(weights).max()
    n = weights.shape[1]
    kernel[..., :n] = weights.reshape(kh, kw, channels, n)
    bias[:n] = 0.0
    conv.set_weights([kernel, bias])


def _patches(images: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Every kh x kw patch inside the images (N, H, W, C) as rows of kh*kw*C values, in the order
    of a Conv2D kernel's first three axes, scaled to [0, 1] as the input pipeline scales pixels."""
    x = images.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[..., None]
    _, h, w, c = x.shape
    rows = [x[:, i:i + h - kh + 1, j:j + w - kw + 1, :] for i in range(kh) for j in range(kw)]
    return np.stack(rows, axis=-2).reshape(-1, kh * kw * c)


class SimulatedRanks(tf.keras.Sequential):
    """A Sequential model whose training step runs the forward pass once per simulated rank, on
    that rank's share of the process's batch, so batch norm takes each rank's statistics on its
    own; the loss and its gradient are over the whole batch, as the ranks' averaged gradients are.
    The rest (evaluation, weights, checkpoints) is the plain Sequential model's."""

    def __init__(self, ranks: int, **kwargs):
        super().__init__(**kwargs)
        self.ranks = ranks

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            shares = [(y_share, self(x_share, training=True))
                      for x_share, y_share in zip(tf.split(x, self.ranks), tf.split(y, self.ranks))]
            # The batch's mean loss as the mean of the ranks' (equal shares): one loss per rank, each the
            # seed of its own backward pass, so a rank's backward starts as its forward ends instead of
            # waiting for the other ranks' (towers run side by side, environment.thread_layout).
            losses = [self.compute_loss(x, y_share, y_pred) / self.ranks for y_share, y_pred in shares]
        self.optimizer.minimize(losses, self.trainable_variables, tape=tape)
        return self.compute_metrics(x, y, tf.concat([y_pred for _, y_pred in shares], axis=0), None)


@tf.keras.utils.register_keras_serializable("fmnist_dist")
class StepDropout(tf.keras.layers.Layer):
    """Dropout whose masks are a pure function of (seed, call count).

    Keras' seeded Dropout keeps its random state inside the kernel, where no checkpoint sees it, so
    a resumed run would draw other masks than an uninterrupted one. Here the count is a variable:
    checkpointed, broadcast, and so a resumed run continues the same sequence.
    """

    def __init__(self, rate: float, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.seed = rate, seed

    def build(self, input_shape):
        self.calls = self.add_weight(name="calls", shape=(), dtype=tf.int64, trainable=False,
                                     initializer="zeros")

    def call(self, inputs, training=None):
        if not training or self.rate == 0:
            return inputs
        self.calls.assign_add(1)
        return tf.nn.experimental.stateless_dropout(inputs, self.rate, seed=tf.stack(
            [tf.constant(self.seed, tf.int64), self.calls]))

    def get_config(self) -> dict:
        return {**super().get_config(), "rate": self.rate, "seed": self.seed}


def flops_per_image(model: tf.keras.Model) -> int:
    """Multiply-adds x2 of the conv and dense layers for one forward pass."""
    return sum(flops_per_image_of(layer) for layer in model.layers)


def gradients_computed(model: tf.keras.Model) -> list[tuple[bool, bool]]:
    """For each layer, whether a training step computes the gradient of its input and of its weights:
    an input gradient only where a layer before it trains, weight gradients only where it has
    trainable weights (a frozen first convolution has none, and neither has the pooling after it)."""
    computed, trained_before = [], False
    for layer in model.layers:
        trains = bool(layer.trainable_weights)
        computed.append((trained_before, trains))
        trained_before = trained_before or trains
    return computed


def train_flops_by_layer(model: tf.keras.Model) -> list[int]:
    """FLOPs of one image's training step in each layer (0 but for conv and dense): its forward pass
    and the gradients the step computes (gradients_computed), each costing as much as the forward."""
    return [flops_per_image_of(layer) * (1 + input_gradient + weight_gradient)
            for layer, (input_gradient, weight_gradient) in zip(model.layers, gradients_computed(model))]


def train_flops_per_image(model: tf.keras.Model) -> int:
    """FLOPs of one image's training step in the conv and dense layers (train_flops_by_layer)."""
    return sum(train_flops_by_layer(model))


def flops_per_image_of(layer: tf.keras.layers.Layer) -> int:
    """Forward FLOPs of one conv or dense layer for one image (0 for the others)."""
    if isinstance(layer, tf.keras.layers.Conv2D):
        kh, kw = layer.kernel_size
        _, h, w, c_out = layer.output.shape
        return int(2 * h * w * c_out * kh * kw * layer.input.shape[-1])
    if isinstance(layer, tf.keras.layers.Dense):
        return int(2 * layer.input.shape[-1] * layer.units)
    return 0
