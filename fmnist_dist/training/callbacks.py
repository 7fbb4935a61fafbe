"""Stopping cleanly and timing steps: the stop flag set by signals, the Keras callbacks that act at
step boundaries, and the small collectives through which the ranks agree."""
from __future__ import annotations

import signal
import time
from typing import Any

import tensorflow as tf

from .environment import seconds_since_process_start

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (scheduler pre-emption, walltime warning); read at step boundaries."""

    def __init__(self):
        self.signal: str | None = None

    @classmethod
    def install(cls) -> "StopFlag":
        flag = cls()
        for sig in STOP_SIGNALS:
            signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def agreed_stop(rt: Any, stop: StopFlag, time_limit: float | None) -> str | None:
    """Whether any rank got a stop signal or passed the time limit; the same answer on every rank."""
    over_time = time_limit is not None and seconds_since_process_start(time.perf_counter()) >= time_limit
    # Horovod: a max over ranks, so one rank's signal stops them all at the same step.
    flags = rt.hvd_tf.allreduce(tf.constant([float(stop.signal is not None), float(over_time)]),
                                op=rt.hvd_tf.Max, name="stop_flags").numpy()
    if flags[0]:
        return f"stop signal ({stop.signal or 'received by another rank'})"
    if flags[1]:
        return f"time limit of {time_limit:g} s reached"
    return None


def barrier(rt: Any) -> float:
    """Seconds this rank waits for the slowest one (a tiny allreduce every rank must enter)."""
    t = time.perf_counter()
    rt.hvd.allreduce(tf.constant(0.0), op=rt.hvd.Sum, name="epoch_barrier")
    return time.perf_counter() - t


class StepControl(tf.keras.callbacks.Callback):
    """Ends fit at a step boundary when the ranks agree to stop, or when a mid-epoch checkpoint is
    due (every checkpoint_every steps; 0 = only at epoch ends)."""

    def __init__(self, rt: Any, stop: StopFlag, check_every: int, time_limit: float | None, checkpoint_every: int):
        super().__init__()
        self.rt, self.stop, self.check_every = rt, stop, check_every
        self.time_limit, self.checkpoint_every = time_limit, checkpoint_every
        self.stop_reason: str | None = None
        self.checkpoint_due = False
        self.global_steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.global_steps += 1
        self.checkpoint_due = bool(self.checkpoint_every) and self.global_steps % self.checkpoint_every == 0
        if self.global_steps % self.check_every == 0:
            self.stop_reason = agreed_stop(self.rt, self.stop, self.time_limit)
        if self.stop_reason or self.checkpoint_due:
            self.model.stop_training = True


class StepTimer(tf.keras.callbacks.Callback):
    """Sums the time inside training steps (compute + allreduce) over one fit call."""

    def on_epoch_begin(self, epoch, logs=None):
        self.step_s, self.steps = 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_s += time.perf_counter() - self._start
        self.steps += 1
