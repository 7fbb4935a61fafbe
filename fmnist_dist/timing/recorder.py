"""The per-run object the training loop talks to: every rank records its fit windows, step times and
CPU use; rank 0 splits them into compute and communication (see timing/__init__ for the methods)."""
from __future__ import annotations

import os
import sys
import time

import tensorflow as tf

from .breakdown import CATEGORIES, METHOD_TEXT, cpu_snapshot, rank_totals, split_record, step_statistics
from .probe import probe_allreduce
from .timeline import read_timeline, timeline_intervals, timeline_mode, union_seconds


def start(rt, model, run_dir: str, startup_s: float) -> Timing:
    """Every rank, after the model and optimizer exist and before the first step: gather the
    ranks' start-up times, run the allreduce probe."""
    startup_ranks = {str(r): s for r, s in enumerate(rt.hvd_tf.allgather_object(startup_s))}
    probe = probe_allreduce(rt, model.trainable_variables)
    return Timing(rt, run_dir, probe, timeline_mode(), startup_ranks)


class Timing:
    """Created on every rank after the model is built; collective calls (probe, timeline start and
    stop) happen on every rank, report work on rank 0 only."""

    def __init__(self, rt, run_dir: str, probe: dict, mode: str | None, startup_ranks: dict[str, float]):
        self.rt, self.run_dir, self.probe, self.mode = rt, run_dir, probe, mode
        self.startup_ranks = startup_ranks
        self.windows: dict[int, list[tuple[float, float, str | None]]] = {}  # epoch -> fit chunks
        self.steps: dict[int, list[float]] = {}       # epoch -> this rank's step times
        self.cpu: dict[int, list[float]] = {}         # epoch -> this rank's [cpu_s, cpu_wait_s] in fit
        self.step_stats: dict[int, list[dict]] = {}   # epoch -> per rank (index = rank)
        self.epoch = 0

    # -- collective, every rank
    def callbacks(self) -> list:
        """A Keras callback recording each fit call's wall-clock window (one fit = one epoch) and,
        with a per-epoch timeline, starting and stopping Horovod's timeline around it."""
        timing = self

        class EpochWindow(tf.keras.callbacks.Callback):
            """An epoch may take several fit calls (chunks between checkpoints or stop checks):
            windows and step times are kept per epoch, a timeline file per chunk."""

            def on_epoch_begin(self, epoch, logs=None):
                timing.epoch = epoch + 1                     # fit(initial_epoch=epoch - 1, ...)
                chunks = timing.windows.setdefault(timing.epoch, [])
                self._path = None
                if timing.mode == "per-epoch":
                    self._path = timing.timeline_path(timing.epoch, len(chunks) + 1)
                    if timing.rt.rank == 0:
                        os.makedirs(os.path.dirname(self._path), exist_ok=True)
                    timing.rt.hvd.start_timeline(self._path)
                elif timing.mode == "whole-run":
                    self._path = os.environ["HOROVOD_TIMELINE"]
                timing.steps.setdefault(timing.epoch, [])
                self._cpu0 = cpu_snapshot()
                self._t0 = time.time()

            def on_train_batch_begin(self, batch, logs=None):
                self._b = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                timing.steps[timing.epoch].append(time.perf_counter() - self._b)

            def on_epoch_end(self, epoch, logs=None):
                timing.windows[timing.epoch].append((self._t0, time.time(), self._path))
                if timing.mode == "per-epoch":
                    timing.rt.hvd.stop_timeline()

            def on_train_end(self, logs=None):
                run, wait = (b - a for a, b in zip(self._cpu0, cpu_snapshot()))
                cpu = timing.cpu.setdefault(timing.epoch, [0.0, 0.0])
                cpu[0] += run
                cpu[1] += wait
                # every rank is here (end of fit): gather each rank's step-time statistics so far
                stats = step_statistics(timing.steps.get(timing.epoch, []))
                stats.update(cpu_s=cpu[0], cpu_wait_s=cpu[1],
                             cpu_wait_share=cpu[1] / (cpu[0] + cpu[1]) if cpu[0] + cpu[1] > 0 else 0.0,
                             loadavg=os.getloadavg()[0])
                timing.step_stats[timing.epoch] = timing.rt.hvd_tf.allgather_object(stats)

        return [EpochWindow()]

    def timeline_path(self, epoch: int, chunk: int = 1) -> str:
        if self.mode == "whole-run":
            return os.environ["HOROVOD_TIMELINE"]
        suffix = "" if chunk == 1 else f"-{chunk}"
        return os.path.join(self.run_dir, "timeline", f"epoch-{epoch:03d}{suffix}.json")

    def close(self) -> None:
        """End of training (rank 0, Horovod's timeline writer): close a whole-run timeline so it
        can be read completely (the test evaluation after it is not recorded)."""
        if self.mode == "whole-run":
            try:
                self.rt.hvd.stop_timeline()
            except Exception as e:  # noqa: BLE001 - not fatal: the report is still written, see the warning
                print(f"fmnist-dist: warning: cannot close Horovod's timeline {os.environ.get('HOROVOD_TIMELINE')}: "
                      f"{e}; the report's communication split uses what the file holds so far (the allreduce "
                      f"probe where it holds nothing)", file=sys.stderr, flush=True)

    # -- rank 0
    def split(self, epoch: int, records: list[dict]) -> list[dict]:
        """Add compute_s / comm_s / other_s / checkpoint_s / comm_method to every rank's record."""
        measured = self.measured_comm(epoch)
        stats = self.step_stats.get(epoch) or []
        for r in records:
            r.setdefault("checkpoint_s", 0.0)
            if r["rank"] < len(stats):
                r.update(stats[r["rank"]])
            split_record(r, self.rt.size, self.probe.get("seconds_per_call", 0.0), measured)
        return records

    def measured_comm(self, epoch: int) -> dict | None:
        """Communication measured by the timeline during the epoch's fit chunks, or None."""
        if self.mode is None or self.rt.size == 1 or not self.windows.get(epoch):
            return None
        comm_s = nego_s = 0.0
        cache: dict[str, tuple] = {}
        for t0, t1, path in self.windows[epoch]:
            if path not in cache:
                cache[path] = timeline_intervals(read_timeline(path))
            start, comm, nego = cache[path]
            if start is None or not comm:
                return None
            comm_s += union_seconds(comm, (t0, t1))
            nego_s += union_seconds(nego, (t0, t1))
        if comm_s <= 0:
            return None
        return {"comm_s": comm_s, "negotiate_s": nego_s}

    def after_epoch(self, report: dict) -> None:
        """Rank 0, after the epoch's summary and timing: the breakdown section."""
        report["breakdown"] = self.section(report)

    def finish(self, report: dict) -> None:
        """Rank 0, at the very end: close a whole-run timeline, redo the split with complete files."""
        self.close()
        self.resplit(report)
        report["breakdown"] = self.section(report)

    def resplit(self, report: dict) -> None:
        """At the end (rank 0): re-read the timeline for every epoch (a whole-run file is complete
        only now) and redo the split."""
        for e in report["epochs"]:
            if e["epoch"] in self.windows:  # not epochs of an earlier segment (resumed run)
                self.split(e["epoch"], e["ranks"])

    def section(self, report: dict) -> dict:
        """report['breakdown']: the method and the per-rank totals over epochs."""
        methods = {r.get("comm_method") for e in report["epochs"] for r in e["ranks"]}
        method = "timeline" if methods == {"timeline"} else ("single" if self.rt.size == 1 else
                 ("probe" if methods <= {"probe"} else "mixed"))
        detail = METHOD_TEXT.get(method, "timeline where it could be read, probe otherwise (see comm_method per epoch)")
        return {"method": method, "method_detail": detail,
                "timeline": ({"mode": self.mode,
                              "files": sorted({w[2] for chunks in self.windows.values() for w in chunks if w[2]})}
                             if self.mode else None),
                "categories": list(CATEGORIES), "probe": self.probe,
                "ranks": rank_totals(report, self.startup_ranks)}

