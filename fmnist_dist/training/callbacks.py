"""Stopping cleanly and timing steps: the stop flag set by signals, the Keras callbacks that act at
step boundaries, and the small collectives through which the ranks agree."""
from __future__ import annotations

import math
import signal
import time
from typing import Any

import tensorflow as tf

from ..environment import seconds_since_process_start
from ..errors import DivergenceError
from . import watchdog

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
        # Under PBS the launcher runs with SIGTERM blocked (launch.SIGTERM_BLOCKED); Open MPI's and
        # Intel MPI's launchers unblock it in the ranks, MPICH's passes the mask on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return flag

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name


def agreed_flags(rt: Any, stop: StopFlag, time_limit: float | None, diverged: bool = False) -> tuple[str | None, bool]:
    """(Why to stop: a rank's stop signal or the time limit, else None; whether any rank saw a
    non-finite loss): the same answer on every rank."""
    over_time = time_limit is not None and seconds_since_process_start(time.perf_counter()) >= time_limit
    # Horovod: a max over ranks, so one rank's signal stops them all at the same step.
    flags = rt.hvd_tf.allreduce(tf.constant([float(stop.signal is not None), float(over_time), float(diverged)]),
                                op=rt.hvd_tf.Max, name="stop_flags").numpy()
    reason = None
    if flags[0]:
        reason = f"stop signal ({stop.signal or 'received by another rank'})"
    elif flags[1]:
        reason = f"time limit of {time_limit:g} s reached"
    return reason, bool(flags[2])


def barrier(rt: Any) -> float:
    """Seconds this rank waits for the slowest one (a tiny allreduce every rank must enter)."""
    t = time.perf_counter()
    rt.hvd.allreduce(tf.constant(0.0), op=rt.hvd.Sum, name="epoch_barrier")
    return time.perf_counter() - t


class StepControl(tf.keras.callbacks.Callback):
    """Ends fit at a step boundary when the ranks agree to stop, or when a mid-epoch checkpoint is
    due (every checkpoint_every steps; 0 = only at epoch ends).

    Watches the loss: once it is NaN or infinite on any rank, every rank raises DivergenceError at the
    next agreement (every check_every steps, before every checkpoint, at an epoch's end), so no
    checkpoint is written after it. `progress` (the run's state: position and samples_done at the
    start of a fit chunk) and `per_step` (examples per step, all ranks) name the step."""

    def __init__(self, rt: Any, stop: StopFlag, check_every: int, time_limit: float | None, checkpoint_every: int,
                 progress: Any = None, per_step: int = 1):
        super().__init__()
        self.rt, self.stop, self.check_every = rt, stop, check_every
        self.time_limit, self.checkpoint_every = time_limit, checkpoint_every
        self.progress, self.per_step = progress, per_step
        self.stop_reason: str | None = None
        self.checkpoint_due = False
        self.global_steps = 0
        self.epoch, self.chunk_start = 0, (0, 0)
        self.nonfinite: dict | None = None          # where this rank first saw a non-finite loss

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        if self.progress is not None:
            self.chunk_start = (self.progress.position // self.per_step, self.progress.samples_done // self.per_step)

    def on_train_batch_end(self, batch, logs=None):
        self.global_steps += 1
        self._watch_loss(batch, (logs or {}).get("loss"))
        self.checkpoint_due = bool(self.checkpoint_every) and self.global_steps % self.checkpoint_every == 0
        if self.global_steps % self.check_every == 0 or self.checkpoint_due:
            self.stop_reason = self.agree()
        if self.stop_reason or self.checkpoint_due:
            self.model.stop_training = True

    def agree(self) -> str | None:
        """The ranks' reason to stop (a signal, the time limit) or None. A collective: every rank calls
        it at the same step; when any rank saw a non-finite loss, every rank raises DivergenceError."""
        reason, diverged = agreed_flags(self.rt, self.stop, self.time_limit, self.nonfinite is not None)
        if diverged:
            raise self._divergence()
        return reason

    def check_finite(self) -> None:
        """Before a checkpoint (a collective): DivergenceError on every rank if any saw a non-finite loss."""
        seen = self.rt.hvd_tf.allreduce(tf.constant(float(self.nonfinite is not None)), op=self.rt.hvd_tf.Max,
                                        name="loss_not_finite").numpy()
        if seen:
            raise self._divergence()

    def _watch_loss(self, batch: int, loss: Any) -> None:
        # Keras logs the mean loss of the fit chunk so far: non-finite from the first bad step on.
        if self.nonfinite is None and loss is not None and not math.isfinite(float(loss)):
            in_epoch, in_run = self.chunk_start
            self.nonfinite = {"epoch": self.epoch, "step": in_epoch + batch + 1, "run_step": in_run + batch + 1,
                              "loss": str(float(loss)), "rank": self.rt.rank}

    def _divergence(self) -> DivergenceError:
        """The earliest non-finite loss any rank saw (an allgather), as the error every rank raises."""
        first = min((s for s in self.rt.hvd_tf.allgather_object(self.nonfinite) if s),
                    key=lambda s: (s["run_step"], s["rank"]))
        return DivergenceError(f"the training loss became {first['loss']} at epoch {first['epoch']}, step "
                               f"{first['step']} (first seen on rank {first['rank']}); all ranks stopped at "
                               f"the next check, and no checkpoint was written after it", where=first)


class StepTimer(tf.keras.callbacks.Callback):
    """Sums the time inside training steps (compute + allreduce) over one fit call."""

    def on_epoch_begin(self, epoch, logs=None):
        self.step_s, self.steps = 0.0, 0

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.step_s += time.perf_counter() - self._start
        self.steps += 1


class ProgressMarks(tf.keras.callbacks.Callback):
    """Tells the stall watchdog that this rank's main thread moves on, at every step."""

    steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
        watchdog.mark("training", f"epoch {self.epoch}")

    def on_train_batch_end(self, batch, logs=None):
        ProgressMarks.steps += 1
        watchdog.mark("training", f"epoch {self.epoch}, {ProgressMarks.steps} steps since this process started")
