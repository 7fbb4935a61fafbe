"""The race's peer: the plain Keras script a practitioner writes first for Fashion-MNIST.

One process, TensorFlow's defaults (threads, oneDNN, fp32), two 3x3 conv/pool blocks with "same"
padding, dense 128, dropout, Adam at its default rate, batch 128, pixels scaled to [0, 1], the test
set evaluated after every epoch. Nothing of the project's recipe: no batch norm, schedule, flips or
label smoothing. With --padding valid it is the original study's network, which plateaus just under
92% (docs/benchmark.md): a peer that never reaches the target bounds a ratio but does not give one.
The only additions are the race's: the data comes from the project's verified loader (the same
files as the project's run), and each epoch's times and test accuracy are printed as one JSON line
so the race can read them; training stops at the target or after --max-epochs.

    python -m fmnist_dist.bench.peer --seed 1 --target 0.92 --max-epochs 30
"""
from __future__ import annotations

import argparse
import json
import time

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from fmnist_dist.basis import DEFAULT_TARGET  # noqa: E402
from fmnist_dist.data import load_fashion_mnist  # noqa: E402


def build_model(padding: str = "same") -> tf.keras.Model:
    return tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        tf.keras.layers.Conv2D(32, 3, padding=padding, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Conv2D(64, 3, padding=padding, activation="relu"),
        tf.keras.layers.MaxPooling2D(),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(128, activation="relu"),
        tf.keras.layers.Dropout(0.3),
        tf.keras.layers.Dense(10, activation="softmax"),
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--target", type=float, default=DEFAULT_TARGET)
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--padding", choices=("same", "valid"), default="same",
                   help="the convolutions' padding: same (default) or valid (the original study's network)")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="fewer steps (a smoke test)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    tf.keras.utils.set_random_seed(args.seed)
    data = load_fashion_mnist(args.data_dir, progress=False)
    x_train = (data.x_train / 255.0).astype("float32")[..., None]
    x_test = (data.x_test / 255.0).astype("float32")[..., None]
    model = build_model(args.padding)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    training_s = 0.0
    for epoch in range(1, args.max_epochs + 1):
        t0 = time.perf_counter()
        if args.steps_per_epoch:
            n = args.steps_per_epoch * args.batch_size
            model.fit(x_train[:n], data.y_train[:n], batch_size=args.batch_size, epochs=1, verbose=0)
        else:
            model.fit(x_train, data.y_train, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)
        training_s += time.perf_counter() - t0
        _, test_accuracy = model.evaluate(x_test, data.y_test, batch_size=1000, verbose=0)
        print(json.dumps({"epoch": epoch, "training_s": round(training_s, 3),
                          "wall_s": round(time.perf_counter() - STARTED, 3),
                          "test_accuracy": float(np.float64(test_accuracy))}), flush=True)
        if test_accuracy >= args.target:
            break


if __name__ == "__main__":
    main()
