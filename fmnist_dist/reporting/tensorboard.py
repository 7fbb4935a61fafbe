"""TensorBoard scalars of a run, written by rank 0 into RUN_DIR/tensorboard as the epochs end."""
from __future__ import annotations

import os

import tensorflow as tf

from ..errors import ReportWriteError, cause
from .report import rank_throughput
from .schema import Epoch, Report


class TensorBoardWriter:
    """Rank 0 writes while the other ranks go on, so a failure is not raised where it happens (the
    others would wait in a collective for it): the writer stops writing, keeps the error, and
    `check` raises it where every rank learns of it (the next checkpoint's agreement)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "tensorboard")
        self._writer = None
        self.failure: ReportWriteError | None = None

    def check(self) -> None:
        """Raise the ReportWriteError of a write that failed (naming the log directory), if any."""
        if self.failure is not None:
            raise self.failure

    def _open(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.path)
        return self._writer

    def epoch(self, report: Report) -> None:
        """The last epoch's curves, throughput and times (per rank too)."""
        self._write(report["epochs"][-1]["epoch"], epoch_scalars(report["epochs"][-1]))

    def final(self, report: Report) -> None:
        """The test results and the run's totals, at the last epoch's step; then closes the file."""
        res, timing = report.get("results", {}), report["timing"]
        scalars = {name: res[key] for name, key in (("loss/test", "test_loss"), ("accuracy/test", "test_accuracy"))
                   if res.get(key) is not None}
        scalars.update({name: timing[key] for name, key in (
            ("time/training_total_s", "training_s"), ("time/startup_s", "startup_s"),
            ("throughput/images_per_s_run", "images_per_s")) if timing.get(key) is not None})
        self._write(report["epochs"][-1]["epoch"], scalars)
        if self._writer is not None and self.failure is None:
            try:
                self._writer.close()
            except (OSError, tf.errors.OpError) as e:
                self.failure = ReportWriteError(f"{self.path}: could not write the TensorBoard log: {cause(e)}")

    def _write(self, step: int, scalars: dict[str, float]) -> None:
        if self.failure is not None:
            return
        try:
            with self._open().as_default(step=step):
                for name, value in scalars.items():
                    tf.summary.scalar(name, value)
            self._writer.flush()
        except (OSError, tf.errors.OpError) as e:
            self.failure = ReportWriteError(f"{self.path}: could not write the TensorBoard log: {cause(e)}")


def epoch_scalars(e: Epoch) -> dict[str, float]:
    """An epoch's scalars by tag: its curves, throughput and times, and each rank's images/s
    (report.rank_throughput)."""
    scalars = {"loss/train": e["train_loss"], "loss/validation": e["val_loss"],
               "accuracy/train": e["train_accuracy"], "accuracy/validation": e["val_accuracy"],
               "learning_rate": e["lr"], "throughput/images_per_s": e["images_per_s"],
               "time/epoch_training_s": e["training_s"], "time/epoch_evaluation_s": e["evaluation_s"]}
    for r in e["ranks"]:
        scalars[f"throughput/rank{r['rank']}_images_per_s"] = rank_throughput([r])
    return scalars
