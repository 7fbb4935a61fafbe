"""report.json against its one definition (fmnist_dist.reporting.report.Report), both ways: a key
written but not declared fails, and so does a key declared but never written. Values are checked
against the declared types too. Fast: the summaries report.py builds and the global batch choice;
slow: real reports of real runs (completed on 1 and 2 ranks, preempted and resumed with a preflight
record and train.global_batch_size=auto)."""
from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import pytest

from conftest import PYTHON, ROOT, cli, load, run
from fmnist_dist import basis, config as config_mod, scaling
from fmnist_dist.reporting import report as report_mod, schema
from fmnist_dist.timing.breakdown import split_record, step_statistics

# Declared keys the runs below do not write, each with the test that sees it written. The check
# fails when one of them is written after all: then it belongs out of this list.
NOT_IN_THESE_RUNS = {
    "Report.failure": "a run whose loss became NaN (tests/test_checkpoints.py)",
    "Segment.note": "a resume on another number of ranks (tests/test_resume.py)",
    "Choice.short_of_target": "more ranks than split a batch that keeps the target (the choice above, 128 ranks)",
}


class Conformance:
    """A walk of a value along a type of the definition: the problems found, and the keys seen as
    'TypedDictName.key'."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.seen: set[str] = set()

    def check(self, value: Any, hint: Any, path: str) -> None:
        origin = get_origin(hint)
        if hint is Any:
            return
        if is_typeddict(hint):
            self._typed_dict(value, hint, path)
        elif origin in (Union, types.UnionType):
            self._union(value, get_args(hint), path)
        elif origin is Literal:
            if value not in get_args(hint):
                self.problems.append(f"{path}: {value!r}, expected one of {get_args(hint)}")
        elif origin is list:
            if self._is(value, list, path):
                for i, item in enumerate(value):
                    self.check(item, get_args(hint)[0], f"{path}[{i}]")
        elif origin is dict:
            if self._is(value, dict, path):
                for key, item in value.items():
                    self.check(item, get_args(hint)[1], f"{path}.{key}")
        else:
            self._scalar(value, hint, path)

    def _typed_dict(self, value: Any, hint: Any, path: str) -> None:
        if not self._is(value, dict, path):
            return
        fields = get_type_hints(hint)
        for key in value:
            if key not in fields:
                self.problems.append(f"{path}.{key}: written but not declared in {hint.__name__}")
        for key in sorted(hint.__required_keys__ - set(value)):
            self.problems.append(f"{path}.{key}: declared (required) in {hint.__name__} but not written")
        for key, item in value.items():
            if key in fields:
                self.seen.add(f"{hint.__name__}.{key}")
                self.check(item, fields[key], f"{path}.{key}")

    def _union(self, value: Any, options: tuple, path: str) -> None:
        """The option the value fits (a section's full form or its empty one, a value or None); when
        none fits, the problems with the option that shares the most keys with it."""
        attempts = []
        for option in options:
            attempt = Conformance()
            attempt.check(value, option, path)
            if not attempt.problems:
                self.seen |= attempt.seen
                return
            fits_a_dict = is_typeddict(option) and isinstance(value, dict)
            shared = len(set(value) & set(get_type_hints(option))) if fits_a_dict else 0
            attempts.append((-shared, len(attempt.problems), attempt.problems))
        self.problems += min(attempts)[2]

    def _scalar(self, value: Any, hint: Any, path: str) -> None:
        if hint is type(None):
            ok = value is None
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif hint is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, hint)
        if not ok:
            self.problems.append(f"{path}: {value!r} is not {getattr(hint, '__name__', hint)}")

    def _is(self, value: Any, kind: type, path: str) -> bool:
        if not isinstance(value, kind):
            self.problems.append(f"{path}: {type(value).__name__}, expected {kind.__name__}")
            return False
        return True


def conformance(value: Any, hint: Any, path: str = "$") -> Conformance:
    found = Conformance()
    found.check(value, hint, path)
    return found


def declared_keys(hint: Any, leave_out: typing.Collection[str] = (), found: set[str] | None = None) -> set[str]:
    """Every 'TypedDictName.key' reachable from hint, not through the keys left out."""
    found = set() if found is None else found
    if is_typeddict(hint):
        for key, sub in get_type_hints(hint).items():
            name = f"{hint.__name__}.{key}"
            if name not in found and name not in leave_out:
                found.add(name)
                declared_keys(sub, leave_out, found)
    else:
        for arg in get_args(hint):
            declared_keys(arg, leave_out, found)
    return found


# -- fast: what report.py builds itself, and the global batch choice ---------------------------

METRICS = {"lr": 1e-3, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.4, "val_accuracy": 0.85}


def loop_record(rank: int, host: str, fit_s: float, samples: int, size: int = 2) -> dict:
    """A rank's epoch record as the training loop hands it over: training.loop.rank_record's fields
    and the CPU use timing.recorder gathers (by hand: both need TensorFlow and Horovod), then the
    real step statistics and compute/communication split of timing.breakdown."""
    record = {"rank": rank, "host": host, "data_s": 0.2, "step_s": fit_s - 0.5, "fit_s": fit_s, "wait_s": 0.1,
              "eval_s": 0.4, "steps": samples // 100, "samples": samples, "checkpoint_s": 0.0,
              **step_statistics([0.05] * (samples // 100)),
              "cpu_s": fit_s * 0.9, "cpu_wait_s": fit_s * 0.1, "cpu_wait_share": 0.1, "loadavg": 1.5}
    split_record(record, size, 0.001, None)
    return record


def summaries() -> tuple[list[dict], dict]:
    epochs = [report_mod.epoch_summary(n, [loop_record(1, "b", 12.0, 1000), loop_record(0, "a", 9.0, 1000)],
                                       dict(METRICS, val_accuracy=0.8 + n / 100)) for n in (1, 2)]
    return epochs, report_mod.timing_summary(epochs, target=0.9)


def test_report_summaries_write_what_the_definition_declares():
    epochs, timing = summaries()
    checked = [conformance(e, schema.Epoch, f"$.epochs[{i}]") for i, e in enumerate(epochs)]
    checked.append(conformance(timing, schema.TimingSummary, "$.timing"))
    assert [p for c in checked for p in c.problems] == []
    seen = set().union(*(c.seen for c in checked))
    for built in (schema.Epoch, schema.TimingSummary, schema.HostTiming):
        never = {f"{built.__name__}.{key}" for key in get_type_hints(built)} - seen
        assert not never, f"declared but not written by report.py's summaries: {sorted(never)}"


def test_the_check_finds_a_key_undeclared_missing_or_of_the_wrong_type():
    epochs, timing = summaries()
    written = {**timing, "command": "fmnist-dist train"}
    assert conformance(written, schema.TimingSummary).problems == \
        ["$.command: written but not declared in TimingSummary"]
    epoch = {k: v for k, v in epochs[0].items() if k != "images_per_s"}
    epoch["ranks"][0]["comm_method"] = "guess"
    assert conformance(epoch, schema.Epoch).problems == [
        "$.images_per_s: declared (required) in Epoch but not written",
        "$.ranks[0].comm_method: 'guess', expected one of ('probe', 'timeline', 'single')"]
    partial = conformance({"results": {}, "timing": {"training_s": 1.0}}, schema.Report).problems
    assert "$.timing.evaluation_s: declared (required) in Timing but not written" in partial, partial
    assert "$.run_id: declared (required) in Report but not written" in partial, partial


def fast_recipe() -> dict:
    return config_mod.load(str(ROOT / "configs/fast.yaml"))


@pytest.mark.parametrize("ranks", [1, 2, 8])
def test_the_global_batch_choice_and_accuracy_basis_match_the_definition(ranks):
    """scaling.choose and basis.launch_check, real, on the shipped basis of the fast recipe, and
    without a basis (the lean recipe at another batch)."""
    cfg = fast_recipe()
    recipe_basis = basis.for_config(cfg)
    train = config_mod.namespace(cfg).train
    gradient_bytes = config_mod.trainable_parameters(cfg["model"]["layers"]) * scaling.GRADIENT_BYTES_PER_WEIGHT
    choice = scaling.choose(ranks, 1, vars(train), recipe_basis, "fp32", gradient_bytes, 55_000,
                            basis.target_of(cfg, recipe_basis))
    unbased = config_mod.load(str(ROOT / "configs/lean.yaml"), ["train.batch_size=64"])
    checked = [conformance(choice, schema.Choice, "$.choice"),
               conformance(basis.launch_check(cfg, choice["global_batch"]), schema.AccuracyBasis, "$.basis"),
               conformance(basis.launch_check(unbased, 512), schema.AccuracyBasis, "$.none"),
               conformance(scaling.choose(ranks, 1, {"batch_size": 64}, None, "fp32", 1, 55_000, 0.9),
                           schema.Choice, "$.no_basis"),
               conformance(scaling.choose(128, 64, vars(train), recipe_basis, "fp32", gradient_bytes, 55_000, 0.92),
                           schema.Choice, "$.short")]    # 128 ranks split no batch that reaches 92%
    assert [p for c in checked for p in c.problems] == []
    assert "Choice.network" in checked[0].seen and "Candidate.projected_s" in checked[0].seen
    assert "Choice.short_of_target" in checked[-1].seen


# -- slow: real reports --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preempted_auto_run(tmp_path_factory) -> Path:
    """The fast recipe (it has an accuracy basis, so train.global_batch_size=auto weighs candidates)
    on 1 rank after a preflight, stopped by train.time_limit at its first check (10 steps), then
    resumed and stopped the same way: a preempted report with two segments."""
    run_dir = tmp_path_factory.mktemp("schema") / "auto"
    proc = cli("preflight", "--config", "configs/fast.yaml", "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    train = [PYTHON, "-m", "fmnist_dist", "train", "--config", "configs/fast.yaml", "--set", "train.time_limit=1",
             "--set", "intel.intra_op_threads=1", "--run-dir", str(run_dir)]
    for command in (train, [PYTHON, "-m", "fmnist_dist", "train", "--resume", str(run_dir)]):
        proc = run(command, timeout=600)
        assert proc.returncode == 75, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_real_reports_write_exactly_what_the_definition_declares(reporting_runs, preempted_auto_run):
    reports = {"one rank": load(reporting_runs["one"]), "two ranks, timeline": load(reporting_runs["two"]),
               "auto, preempted, resumed": load(preempted_auto_run)}
    auto = reports["auto, preempted, resumed"]["data"]["scaling"]
    assert auto["choice"]["candidates"], "no candidate weighed"
    # one process takes the basis's 512 as the basis measured it: 2 simulated ranks of 256, resumed alike
    assert (auto["choice"]["simulated_world"], auto["world_size"], auto["batch_size_per_rank"]) == (2, 2, 256)
    seen: set[str] = set()
    for name, written in reports.items():
        checked = conformance(written, schema.Report, f"{name}: $")
        assert checked.problems == [], "\n".join(checked.problems)
        seen |= checked.seen
    never = declared_keys(schema.Report, leave_out=NOT_IN_THESE_RUNS) - seen
    assert not never, f"declared in fmnist_dist/reporting/schema.py but written by none of the runs: {sorted(never)}"
    stale = set(NOT_IN_THESE_RUNS) & seen
    assert not stale, f"written after all, take them out of NOT_IN_THESE_RUNS: {sorted(stale)}"
