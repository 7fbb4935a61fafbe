"""Checkpoint and report files, real ones, without training: checkpoints of a tiny Keras model
written and read by fmnist_dist.training.checkpoint, report files by fmnist_dist.reporting. A crash
at a chosen instant is a real SIGKILL of a child process, sent from an audit hook (which only
watches: every call it sees runs for real)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, require_module, run_env
from fmnist_dist import files
from fmnist_dist.errors import CheckpointError, CheckpointFormatError, ReportWriteError
from fmnist_dist.reporting import report as report_mod

tf = require_module("tensorflow")
from fmnist_dist.training import checkpoint  # noqa: E402  (after TensorFlow, as the training imports it)


def tiny_model(seed: int = 0):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
    optimizer = tf.keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def state(samples: int, **extra) -> dict:
    return {"samples_done": samples, "epoch": 1, "position": samples, **extra}


def save(run_dir: Path, samples: int, keep: int = 3, seed: int = 0, **extra) -> str:
    model, optimizer = tiny_model(seed)
    return checkpoint.save(str(run_dir), model, optimizer, state(samples, **extra), keep)


def names(run_dir: Path) -> list[str]:
    return [os.path.basename(p) for p in checkpoint.list_checkpoints(str(run_dir))]


def everything(run_dir: Path) -> list[str]:
    return sorted(os.listdir(run_dir / "checkpoints"))


def load(run_dir: Path, seed: int = 99) -> tuple[dict, str, list]:
    model, optimizer = tiny_model(seed)
    saved, path = checkpoint.load_latest(str(run_dir), model, optimizer)
    return saved, path, model.get_weights()


def ckpt(n: int) -> str:
    return f"examples-{n:010d}"


# ---------------------------------------------------------------------------------------------
# 1. Retention: the newest keep, counted from the checkpoint just written


def test_a_stale_higher_numbered_checkpoint_never_outlives_the_new_one(tmp_path):
    """A run that went back to checkpoint 100 while 300 was on disk: the new 200 is the run's
    present, 300 is its abandoned future. keep=1 keeps 200 (sorting by name would keep 300)."""
    for n in (100, 300):
        save(tmp_path, n, keep=3)
    save(tmp_path, 200, keep=1)
    assert names(tmp_path) == [ckpt(200)]
    assert everything(tmp_path) == [ckpt(200)], "nothing else left behind"


def test_keep_counts_the_new_checkpoint_and_those_below_it(tmp_path):
    for n in (100, 200, 300, 400):
        save(tmp_path, n, keep=2)
    assert names(tmp_path) == [ckpt(300), ckpt(400)]


def test_a_damaged_newest_checkpoint_is_set_aside_and_never_chosen_again(tmp_path, capfd):
    for n in (100, 200):
        save(tmp_path, n, keep=2, seed=n)
    newest = tmp_path / "checkpoints" / ckpt(200)
    weights = newest / "weights.data-00000-of-00001"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))

    saved, path, restored = load(tmp_path)
    assert path == str(tmp_path / "checkpoints" / ckpt(100)) and saved["samples_done"] == 100
    aside = tmp_path / "checkpoints" / f"damaged-{ckpt(200)}"
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("fmnist-dist:")]
    assert err[0].startswith(f"fmnist-dist: warning: checkpoint {newest} is unusable (weights.data-00000-of-00001 "
                             f"is corrupt (SHA-256 ")
    assert err[1] == (f"fmnist-dist: warning: the unusable checkpoint {newest} is set aside as {aside}; it will not "
                      f"be tried again")
    assert aside.is_dir() and names(tmp_path) == [ckpt(100)]
    # Training goes on from 100; with keep=1 the new 150 is the one kept, the damaged one stays aside.
    save(tmp_path, 150, keep=1)
    assert names(tmp_path) == [ckpt(150)]
    assert load(tmp_path)[1].endswith(ckpt(150))
    assert aside.is_dir()


def test_nothing_is_set_aside_when_no_checkpoint_is_usable(tmp_path):
    path = save(tmp_path, 100)
    Path(path, "weights.index").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load(tmp_path)
    assert names(tmp_path) == [ckpt(100)], "the evidence stays where it was"


# ---------------------------------------------------------------------------------------------
# 2, 3, 5. Crash safety: a complete copy under a listed name at every instant; leftovers cleared

CHILD = r"""
import json, os, signal, sys
import tensorflow as tf
from fmnist_dist import files
from fmnist_dist.training import checkpoint

run_dir, kill_at = sys.argv[1], sys.argv[2]
ckpt_root = checkpoint.checkpoint_root(run_dir)


def tiny(seed):
    tf.keras.utils.set_random_seed(seed)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3)])
    optimizer = tf.keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def complete_copy():
    for path in checkpoint.list_checkpoints(run_dir):
        try:
            if checkpoint.verify(path)["samples_done"] == 100:
                return path
        except checkpoint.CheckpointError:
            pass
    return None


def kill_here(event, args):
    path = str(args[0]) if args else ""
    if kill_at == "state-json":          # weights written into the temporary directory, state.json not yet
        return event == "open" and path.endswith("state.json") and "/.tmp-" in path
    if kill_at == "before-swap":         # the temporary directory complete, fsyncing it
        return event == "open" and os.path.basename(path).startswith(".tmp-") and os.path.isdir(path)
    if kill_at == "after-swap":          # swapped in; the old copy under a temporary name
        return event == "open" and path == ckpt_root
    if kill_at == "removing-old":        # halfway through removing the old copy
        return event == "os.remove"
    if kill_at == "report-replace":      # atomic_write: the temporary report written, about to replace
        return event == "os.rename" and str(args[1]).endswith("report.json")
    return False


model, optimizer = tiny(1)
checkpoint.save(run_dir, model, optimizer, {"samples_done": 100, "copy": "first"}, 3)
files.atomic_write(os.path.join(run_dir, "report.json"), json.dumps({"copy": "first"}))
seen = {"checks": 0, "gaps": []}
busy = False


def hook(event, args):
    global busy
    if busy or event not in ("open", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
        return
    if event == "open" and not str(args[0]).startswith(run_dir):
        return
    busy = True
    try:
        seen["checks"] += 1
        if complete_copy() is None:
            seen["gaps"].append(f"{event} {args[:2]}")
        if kill_here(event, args):
            print(json.dumps(seen), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    finally:
        busy = False


sys.addaudithook(hook)
model, optimizer = tiny(2)
checkpoint.save(run_dir, model, optimizer, {"samples_done": 100, "copy": "second"}, 3)   # the same step again
files.atomic_write(os.path.join(run_dir, "report.json"), json.dumps({"copy": "second"}))
busy = True
seen["after"] = checkpoint.verify(complete_copy())["copy"]
print(json.dumps(seen), flush=True)
"""


def child(run_dir: Path, kill_at: str) -> tuple[int, dict]:
    proc = subprocess.run([PYTHON, "-c", CHILD, str(run_dir), kill_at], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


def test_saving_the_same_step_again_keeps_a_complete_copy_at_every_instant(tmp_path):
    """Checked before every file operation of the re-save (and after it): some listed checkpoint of
    step 100 verifies. Removing the old copy before the new one is in place fails this."""
    rc, seen = child(tmp_path, "nowhere")
    assert rc == 0
    assert seen["gaps"] == [] and seen["checks"] >= 5, seen
    assert seen["after"] == "second"
    assert everything(tmp_path) == [ckpt(100)]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


@pytest.mark.parametrize("kill_at", ["state-json", "before-swap", "after-swap", "removing-old", "report-replace"])
def test_kill9_during_a_save_leaves_a_complete_copy_and_the_next_save_clears_the_leftovers(tmp_path, kill_at):
    rc, seen = child(tmp_path, kill_at)
    assert rc == -signal.SIGKILL and seen["gaps"] == [], seen
    listed = checkpoint.list_checkpoints(str(tmp_path))
    assert [checkpoint.verify(p)["copy"] for p in listed] in (["first"], ["second"]), listed
    assert json.loads((tmp_path / "report.json").read_text())["copy"] in ("first", "second")
    leftovers = [p for d in (tmp_path, tmp_path / "checkpoints") for p in os.listdir(d) if p.startswith(".tmp-")]
    assert leftovers, f"a kill at {kill_at} leaves temporary files"

    save(tmp_path, 200, keep=3)                      # the next save
    assert not [p for d in (tmp_path, tmp_path / "checkpoints") for p in os.listdir(d) if p.startswith(".tmp-")]
    assert names(tmp_path) == [ckpt(100), ckpt(200)]
    assert checkpoint.verify(str(tmp_path / "checkpoints" / ckpt(100)))["samples_done"] == 100


def test_load_clears_leftovers_too(tmp_path):
    save(tmp_path, 100)
    (tmp_path / "checkpoints" / ".tmp-abc123").mkdir()
    (tmp_path / ".tmp-xyzreport.json").write_text("{")
    load(tmp_path)
    assert everything(tmp_path) == [ckpt(100)] and not list(tmp_path.glob(".tmp-*"))


def test_a_listed_extra_copy_of_a_step_sorts_after_it_and_goes_at_the_next_save(tmp_path):
    """What a re-save leaves on a file system that cannot swap directories (examples-N.K)."""
    save(tmp_path, 100, copy="first")
    shutil.copytree(tmp_path / "checkpoints" / ckpt(100), tmp_path / "checkpoints" / f"{ckpt(100)}.1")
    assert names(tmp_path) == [ckpt(100), f"{ckpt(100)}.1"]
    assert load(tmp_path)[1].endswith(f"{ckpt(100)}.1")
    save(tmp_path, 200, keep=1)
    assert everything(tmp_path) == [ckpt(200)]


# ---------------------------------------------------------------------------------------------
# 4. state.json's own checksum, the format version, the code version


def test_a_changed_state_json_is_damage_and_the_previous_checkpoint_is_used(tmp_path, capfd):
    save(tmp_path, 100)
    newest = Path(save(tmp_path, 200))
    saved = json.loads((newest / "state.json").read_text())
    assert re.fullmatch(r"[0-9a-f]{64}", saved["state_sha256"])
    saved["epoch"] = 7                                   # valid JSON, every file's checksum still right
    (newest / "state.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"state\.json is corrupt \(SHA-256 of its content [0-9a-f]{12}…, "
                                              r"recorded [0-9a-f]{12}…\)"):
        checkpoint.verify(str(newest))
    assert load(tmp_path)[1].endswith(ckpt(100))
    assert f"fmnist-dist: warning: checkpoint {newest} is unusable (state.json is corrupt" in capfd.readouterr().err


def test_a_checkpoint_of_another_format_version_is_refused_in_one_line(tmp_path):
    path = Path(save(tmp_path, 100))
    old = json.loads((path / "state.json").read_text())
    for key in ("state_sha256", "code_version"):          # what format 1 wrote
        del old[key]
    old["format_version"] = 1
    (path / "state.json").write_text(json.dumps(old))
    with pytest.raises(CheckpointFormatError) as refused:
        load(tmp_path)
    message = str(refused.value)
    assert message == (f"{path}: checkpoint format version 1 (written by an earlier fmnist-dist); this fmnist-dist "
                       f"{checkpoint.code_version()} reads format version {checkpoint.FORMAT_VERSION}: resume with "
                       f"the version that wrote it, or start a new --run-dir")
    assert "\n" not in message and names(tmp_path) == [ckpt(100)]


def test_resuming_from_a_checkpoint_of_other_code_says_so(tmp_path, capfd):
    path = Path(save(tmp_path, 100))
    saved = json.loads((path / "state.json").read_text())
    saved["code_version"] = "0.0.9+gdeadbeef0000"
    saved["state_sha256"] = checkpoint.state_digest(saved)           # as that code would have written it
    (path / "state.json").write_text(json.dumps(saved))
    assert load(tmp_path)[1] == str(path)
    assert (f"fmnist-dist: warning: checkpoint {path} was written by fmnist-dist 0.0.9+gdeadbeef0000; this is "
            f"fmnist-dist {checkpoint.code_version()}") in capfd.readouterr().err.splitlines()
    assert checkpoint.written_by(str(path)) == "0.0.9+gdeadbeef0000"


def test_the_code_version_is_recorded_and_read_without_git(tmp_path):
    path = save(tmp_path, 100)
    assert checkpoint.written_by(path) == checkpoint.code_version()
    from importlib.metadata import version
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    expected = version("fmnist-dist") + (f"+g{head.stdout.strip()[:12]}" if head.returncode == 0 else "")
    assert checkpoint.code_version() == expected
    # A tree that is no git checkout, and a worktree-style .git file with a packed ref: read without git.
    assert checkpoint.git_commit(str(tmp_path)) is None
    gitdir = tmp_path / "repo.git"
    gitdir.mkdir()
    (gitdir / "HEAD").write_text("ref: refs/heads/main\n")
    (gitdir / "packed-refs").write_text("# pack-refs with: peeled\n" + "ab" * 20 + " refs/heads/main\n")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / ".git").write_text(f"gitdir: {gitdir}\n")
    assert checkpoint.git_commit(str(tmp_path / "tree")) == "ab" * 20
    proc = subprocess.run([PYTHON, "-c", "from fmnist_dist.training import checkpoint; print(checkpoint.code_version())"],
                          cwd=ROOT, env=run_env(PATH="/nonexistent"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == expected, proc.stderr


# ---------------------------------------------------------------------------------------------
# 7. Report files: whole or not at all, and a failure names the file


REPORT = {"schema": report_mod.SCHEMA, "schema_version": report_mod.SCHEMA_VERSION, "run_id": "r", "status": "running",
          "error": None, "timing": {}, "world": {"size": 1, "hosts": {"h": [0]}, "ranks": []},
          "environment": {}, "model": {"description": "m", "parameters": 1, "batch_norm": False},
          "data": {"batch_size_per_rank": 1}, "epochs": [], "results": {}}


def test_a_report_file_that_cannot_be_written_is_named_and_the_earlier_report_stays(tmp_path):
    report_mod.write_report(str(tmp_path), REPORT)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.json", "epochs.csv")}
    (tmp_path / "report.md").unlink()
    (tmp_path / "report.md").mkdir()                      # something in the way, whatever the permissions
    with pytest.raises(ReportWriteError) as failed:
        report_mod.write_report(str(tmp_path), {**REPORT, "status": "completed"})
    assert str(failed.value) == f"{tmp_path}/report.md: could not write the report: Is a directory"
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_plot_that_cannot_be_written_is_named(tmp_path):
    from fmnist_dist.reporting import plots

    (tmp_path / "x.png").mkdir()
    fig, _ = plots._figure()
    with pytest.raises(ReportWriteError, match=re.escape(f"{tmp_path}/x.png: could not write the plot: Is a directory")):
        plots._save(fig, str(tmp_path / "x.png"))
    assert sorted(os.listdir(tmp_path)) == ["x.png"]


def test_a_tensorboard_failure_waits_for_the_agreed_check(tmp_path):
    from fmnist_dist.reporting.tensorboard import TensorBoardWriter

    (tmp_path / "tensorboard").write_text("a file where the log directory goes")
    writer = TensorBoardWriter(str(tmp_path))
    epoch = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "train_accuracy": 0.5, "val_accuracy": 0.5, "lr": 0.1,
             "images_per_s": 1.0, "training_s": 1.0, "evaluation_s": 1.0, "ranks": []}
    writer.epoch({"epochs": [epoch]})                     # rank 0 alone: must not raise here
    with pytest.raises(ReportWriteError, match=re.escape(f"{tmp_path}/tensorboard: could not write the TensorBoard "
                                                         f"log: Not a directory")):
        writer.check()


def test_remove_leftovers_removes_only_temporary_names(tmp_path):
    (tmp_path / ".tmp-a").mkdir()
    (tmp_path / ".tmp-breport.json").write_text("x")
    (tmp_path / "report.json").write_text("y")
    assert files.remove_leftovers(str(tmp_path)) == [".tmp-a", ".tmp-breport.json"]
    assert os.listdir(tmp_path) == ["report.json"]
