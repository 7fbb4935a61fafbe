"""Exact resume, with real runs (no mocks): a run interrupted mid-epoch and at an epoch boundary, then
resumed, ends with the weights of the uninterrupted run bit for bit (results.weights_sha256), on one
process and on 2 ranks under `horovodrun --gloo`; and a run resumes on another number of ranks at any
position of an epoch, with the data order, the learning-rate schedule and the epoch accounting right.

The setting is deterministic: fp32, one thread per rank, train.deterministic (TensorFlow's op
determinism), a fixed seed. So is where each run stops: the ranks agree to stop only every
train.stop_check_steps steps and at epoch ends, so a time limit already passed (train.time_limit=1), or
a SIGTERM sent once the run has resumed, stops it exactly at the next such point, however busy the
machine. Short: 2 epochs of 24 steps of 64 images per rank.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import PYTHON, ROOT, SHORT_CONFIG, VENV_BIN, load, record, run_env, stop_pid, unavailable, wait_for
from fmnist_dist import data
from fmnist_dist.training import checkpoint

EPOCHS, STEPS, BATCH = 2, 24, 64
MID_EPOCH_STOP = 10                # steps into epoch 1 at which the first segment stops
SETTINGS = {"train.epochs": EPOCHS, "train.steps_per_epoch": STEPS, "train.batch_size": BATCH,
            "intel.mixed_precision": "fp32", "intel.intra_op_threads": 1, "intel.inter_op_threads": 1,
            "train.deterministic": "true", "checkpoint.keep": 30, "report.plots": "false",
            "report.tensorboard": "false"}
RUN_TIMEOUT = 600
EXIT_PREEMPTED = 75


def sets(settings: dict) -> list[str]:
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def command(ranks: int, *args: str) -> list[str]:
    train = [PYTHON, "-m", "fmnist_dist", "train", *args]
    return [str(VENV_BIN / "horovodrun"), "--gloo", "-np", str(ranks), *train] if ranks > 1 else train


def start(ranks: int, run_dir: Path, *args: str) -> subprocess.Popen:
    """Train (or resume) in run_dir; stdout and stderr go to files beside it."""
    with open(f"{run_dir}.out", "a") as out:
        return subprocess.Popen(command(ranks, *args), cwd=ROOT, env=run_env(), stdout=out, stderr=subprocess.STDOUT)


def log(run_dir: Path) -> str:
    path = Path(f"{run_dir}.out")
    return path.read_text(errors="replace") if path.exists() else ""


def finish(proc: subprocess.Popen, run_dir: Path, expected: int) -> None:
    try:
        rc = proc.wait(RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop_pid(proc)
        pytest.fail(f"{run_dir}: still running after {RUN_TIMEOUT} s:\n{log(run_dir)[-4000:]}")
    if rc == 1 and proc.args[0].endswith("horovodrun"):   # Gloo's launcher says 1, and why
        rc = int(log(run_dir).rsplit("Exit code: ", 1)[-1].split()[0]) if "Exit code: " in log(run_dir) else rc
    assert rc == expected, f"{run_dir}: exit {rc}, expected {expected}:\n{log(run_dir)[-6000:]}"


def rank_pids(run_dir: Path) -> list[int]:
    """The training ranks of this run (not horovodrun, whose command line also holds the run directory)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv[:4] == [PYTHON, "-m", "fmnist_dist", "train"] and str(run_dir) in argv:
            found.append(int(entry))
    return found


def train_run(ranks: int, run_dir: Path, settings: dict) -> dict:
    finish(start(ranks, run_dir, "--config", SHORT_CONFIG, "--run-dir", str(run_dir), *sets(settings)), run_dir, 0)
    return load(run_dir)


def interrupted_run(ranks: int, run_dir: Path) -> dict:
    """Four segments: stopped by the time limit 10 steps into epoch 1, and again 13 steps later, one
    step before its end; stopped by SIGTERM at the end of epoch 1; resumed to the end."""
    first = {**SETTINGS, "train.time_limit": 1, "train.stop_check_steps": MID_EPOCH_STOP}
    finish(start(ranks, run_dir, "--config", SHORT_CONFIG, "--run-dir", str(run_dir), *sets(first)),
           run_dir, EXIT_PREEMPTED)
    again = {"train.stop_check_steps": STEPS - 1 - MID_EPOCH_STOP}           # one step before the end
    finish(start(ranks, run_dir, "--resume", str(run_dir), *sets(again)), run_dir, EXIT_PREEMPTED)
    resumes = log(run_dir).count("resuming from")
    resumed = start(ranks, run_dir, "--resume", str(run_dir), *sets({"train.time_limit": "null",
                                                                      "train.stop_check_steps": 1000}))
    try:
        # Every rank is past its signal handler once rank 0 says where it resumes (after collectives);
        # with no agreement inside the epoch's last step, the signal stops the run at the epoch's end.
        wait_for(lambda: resumed.poll() is not None or log(run_dir).count("resuming from") > resumes, RUN_TIMEOUT,
                 f"{run_dir} to resume")
        for pid in rank_pids(run_dir):
            os.kill(pid, signal.SIGTERM)
    except BaseException:
        stop_pid(resumed)
        raise
    finish(resumed, run_dir, EXIT_PREEMPTED)
    finish(start(ranks, run_dir, "--resume", str(run_dir)), run_dir, 0)
    return load(run_dir)


class Runs:
    """The module's runs, each made once when a test first needs it."""

    def __init__(self, base: Path):
        self.base, self.made = base, {}

    def get(self, name: str, ranks: int) -> dict:
        key = f"{name}-{ranks}"
        if key not in self.made:
            run_dir = self.base / key
            made = train_run(ranks, run_dir, SETTINGS) if name == "reference" else interrupted_run(ranks, run_dir)
            self.made[key] = {"run_dir": run_dir, "report": made}
        return self.made[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    if not (VENV_BIN / "horovodrun").exists():
        unavailable(f"no {VENV_BIN / 'horovodrun'} (run: bash scripts/setup.sh test)")
    if not Path(data.DEBIAN_DIR).is_dir():
        unavailable(f"no Fashion-MNIST in {data.DEBIAN_DIR} (apt-get install {data.DEBIAN_PACKAGE})")
    return Runs(tmp_path_factory.mktemp("resume"))


def global_batch(ranks: int) -> int:
    return ranks * BATCH


# ---------------------------------------------------------------------------------------------
# The data order: a resumed epoch continues where it stopped, whatever the number of ranks


@pytest.mark.parametrize("old_ranks, new_ranks", [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_resumed_shards_continue_the_epoch_order(old_ranks, new_ranks):
    train_idx, _ = data.split_train_val(1000, 100, seed=5)
    order = data.epoch_order(train_idx, 3, seed=5)
    for steps_before in range(0, 900 // (old_ranks * 10) + 1):
        position = steps_before * old_ranks * 10
        steps = (900 - position) // (new_ranks * 10)
        shards = [data.epoch_shard(train_idx, 3, 5, r, new_ranks, 10, start=position, max_steps=steps)
                  for r in range(new_ranks)]
        by_step = np.stack([s.reshape(steps, 10) for s in shards], axis=1).reshape(-1)
        assert np.array_equal(by_step, order[position:position + steps * new_ranks * 10]), position


# ---------------------------------------------------------------------------------------------
# Exact resume


# 2 ranks: Gloo's allreduce and the broadcast of rank 0's state on top of what 1 process does (1 process
# passed too; it is left out of make test to keep the suite's time).
@pytest.mark.parametrize("ranks", [2])
def test_interrupted_and_resumed_run_ends_with_the_same_weights(runs, ranks):
    reference, interrupted = runs.get("reference", ranks)["report"], runs.get("interrupted", ranks)["report"]
    segments = interrupted["segments"]
    assert [s["end"] for s in segments] == ["preempted"] * 3 + ["completed"]
    assert [(s["start_epoch"], s["start_position"] // global_batch(ranks)) for s in segments] == [
        (1, 0), (1, MID_EPOCH_STOP), (1, STEPS - 1), (2, 0)], "stopped elsewhere than planned"
    assert [s["start_step"] for s in segments] == [0, MID_EPOCH_STOP, STEPS - 1, STEPS]
    assert [s.get("reason") for s in segments[:3]] == ["time limit of 1 s reached"] * 2 + ["stop signal (SIGTERM)"]
    digest = reference["results"]["weights_sha256"]
    assert interrupted["results"]["weights_sha256"] == digest
    # Evaluation too: every rank evaluates rank 0's model (another rank's batch-norm statistics are
    # not in the checkpoint), so the validation and test results are the same, not merely close.
    for key in ("val_loss", "val_accuracy"):
        assert [e[key] for e in interrupted["epochs"]] == [e[key] for e in reference["epochs"]], key
    assert interrupted["epochs"][1]["lr"] == reference["epochs"][1]["lr"]
    for key in ("test_loss", "test_accuracy"):
        assert interrupted["results"][key] == reference["results"][key], key
    for e, ref in zip(interrupted["epochs"], reference["epochs"]):   # means over 2 or 3 fit calls
        assert e["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert e["train_accuracy"] == pytest.approx(ref["train_accuracy"], rel=1e-5)
    launcher = "1 process" if ranks == 1 else "2 ranks (horovodrun --gloo)"
    record(f"exact resume: {launcher}, stopped twice mid-epoch (time limit) and at an epoch boundary (SIGTERM)",
           digest_equal=True, weights_sha256=digest,
           stops=[(s["start_epoch"], s["start_position"]) for s in segments[1:]],
           test_accuracy=interrupted["results"]["test_accuracy"])


# ---------------------------------------------------------------------------------------------
# Resume on another number of ranks


def branch(source: Path, examples: int, run_dir: Path) -> None:
    """A run directory whose newest checkpoint is the source's at `examples`: the run as it was when
    stopped there (the checkpoint is what --resume reads)."""
    name = f"examples-{examples:010d}"
    shutil.copytree(source / "checkpoints" / name, Path(checkpoint.checkpoint_root(str(run_dir))) / name)
    shutil.copy(source / "config.yaml", run_dir / "config.yaml")


def expected_resume(old_ranks: int, new_ranks: int, steps_before: int) -> dict:
    """The rule: the epoch continues at the saved position with whole global batches of the new size,
    up to the epoch's size on the new number of ranks; what is left, fewer than one new global batch,
    is skipped (an epoch that already has that many examples ends); the schedule continues at the
    epoch's steps minus the steps left in it."""
    position = steps_before * global_batch(old_ranks)
    left = max(0, STEPS * global_batch(new_ranks) - position)
    new_steps = left // global_batch(new_ranks)
    return {"position": position, "new_steps": new_steps, "skipped": left % global_batch(new_ranks),
            "start_step": STEPS - new_steps}


@pytest.mark.parametrize("old_ranks, new_ranks", [(1, 2), (2, 1)])
def test_resume_on_another_rank_count(runs, tmp_path, old_ranks, new_ranks):
    """One step before the end of epoch 1, and mid-epoch (1 -> 2: positions of 23 and 10 steps of 64,
    the first not a whole number of global batches of 128; 2 -> 1: 23 steps of 128 are more than the
    1-rank epoch of 24 x 64, 10 leave 4 steps). A resume at an epoch's end, epoch 2 from its start,
    is the plain case: left out to keep the suite's time."""
    source = runs.get("interrupted", old_ranks)["run_dir"]
    reference = runs.get("reference", new_ranks)["report"]
    for steps_before in (STEPS - 1, MID_EPOCH_STOP):
        run_dir = tmp_path / f"from-{steps_before}"
        branch(source, steps_before * global_batch(old_ranks), run_dir)
        finish(start(new_ranks, run_dir, "--resume", str(run_dir)), run_dir, 0)
        report = load(run_dir)
        assert report["status"] == "completed" and report["results"]["test_total"] == 10000
        segment = report["segments"][-1]
        assert segment["world_size"] == new_ranks
        epoch2 = report["epochs"][1]
        assert [r["steps"] for r in epoch2["ranks"]] == [STEPS] * new_ranks
        assert epoch2["lr"] == reference["epochs"][1]["lr"], "the schedule is off"
        want = expected_resume(old_ranks, new_ranks, steps_before)
        assert (segment["start_epoch"], segment["start_position"]) == (1, want["position"])
        assert (segment["start_step"], segment["skipped_examples"]) == (want["start_step"], want["skipped"])
        steps1 = {r["rank"]: r["steps"] for r in report["epochs"][0]["ranks"]}
        assert steps1 == {r: steps_before * (r < old_ranks) + want["new_steps"] * (r < new_ranks)
                          for r in range(max(old_ranks, new_ranks))}
        samples1 = sum(r["samples"] for r in report["epochs"][0]["ranks"])
        assert samples1 == want["position"] + want["new_steps"] * global_batch(new_ranks)
        record(f"resume on another rank count: {old_ranks} -> {new_ranks} ranks", position=want["position"],
               skipped_examples=want["skipped"], start_step=want["start_step"], completed=True)
