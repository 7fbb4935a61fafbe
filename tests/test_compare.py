"""`report RUN_DIR RUN_DIR ...` on real runs (1 rank and 2 ranks): the comparison table, its
speedup/efficiency arithmetic, json round-trip, and runs that failed, were preempted or cannot be
read; plus the compute/communication split recorded per epoch and rank."""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest

from fmnist_dist.reporting import compare
from fmnist_dist.reporting.render import precision_label
from fmnist_dist.timing import breakdown, timeline
from fmnist_dist.timing.probe import PROBE_SIZES
from conftest import cli, load


@pytest.fixture(scope="module")
def runs(reporting_runs):
    return reporting_runs


def test_comparison_speedup_and_efficiency_arithmetic(runs):
    one, two = load(runs["one"]), load(runs["two"])
    proc = cli("report", str(runs["one"]), str(runs["two"]), "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in json.loads(proc.stdout)["rows"]}
    r1, r2 = rows[one["run_id"]], rows[two["run_id"]]
    assert r1["recipe_key"] == r2["recipe_key"], "threads per rank are world-dependent: same recipe"
    assert (r1["ranks"], r2["ranks"]) == (1, 2) and r1["status"] == r2["status"] == "completed"
    assert r1["images_per_s"] == pytest.approx(one["timing"]["images_per_s"])
    assert r1["speedup"] == pytest.approx(1.0) and r1["efficiency"] == pytest.approx(1.0)
    speedup = two["timing"]["images_per_s"] / one["timing"]["images_per_s"]
    assert r2["speedup"] == pytest.approx(speedup)
    assert r2["efficiency"] == pytest.approx(speedup / 2)
    assert r2["baseline_runs"] == [one["run_id"]] and r2["baseline_ranks"] == 1
    assert r2["test_accuracy"] == pytest.approx(two["results"]["test_accuracy"])
    assert r2["split_method"] == "timeline" and r1["split_method"] == "single"
    assert 0 < r2["comm_share"] < 1 and r1["comm_share"] == 0


def test_text_table_has_speedup_and_efficiency_columns(runs):
    proc = cli("report", str(runs["one"]), str(runs["two"]))
    assert proc.returncode == 0, proc.stderr
    header, first, second = proc.stdout.splitlines()[:3]
    for column in ("ranks", "hosts", "train s", "to target s", "test acc", "images/s", "speedup",
                   "efficiency", "precision", "ITEX", "oneDNN"):
        assert column in header
    assert "1.00x" in first and "100%" in first
    r2 = compare.compare_rows(compare.load_all([str(runs["one"]), str(runs["two"])]))[1]
    assert f"{r2['speedup']:.2f}x" in second and f"{r2['efficiency']:.0%}" in second


def test_json_round_trips_and_md_csv_agree(runs):
    paths = [str(runs["one"]), str(runs["two"])]
    proc = cli("report", *paths, "--format", "json")
    rows = compare.rows_from_json(proc.stdout)
    assert rows == compare.compare_rows(compare.load_all(paths))
    assert compare.render(rows, "text") == cli("report", *paths).stdout.rstrip("\n")
    md = cli("report", *paths, "--format", "md").stdout
    assert md.startswith("| run | status |") and "|---|---|---|---:|" in md
    table = list(csv.DictReader(io.StringIO(cli("report", *paths, "--format", "csv").stdout)))
    assert [float(r["speedup"]) for r in table] == pytest.approx([r["speedup"] for r in rows])


def test_failed_preempted_and_unreadable_runs_are_shown(runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(runs["one"], root / "a-one")
    shutil.copytree(runs["two"], root / "b-two")
    for name, status, error in (("c-failed", "failed", "RuntimeError: out of memory"),
                                ("d-preempted", "preempted", None)):
        shutil.copytree(runs["two"], root / name)
        report = load(root / name)
        report.update(run_id=name, status=status, error=error, results={})
        report["epochs"] = report["epochs"][:1]
        (root / name / "report.json").write_text(json.dumps(report))
    (root / "e-empty").mkdir()
    old = load(runs["one"])
    old["schema_version"] = 0
    (root / "f-old").mkdir()
    (root / "f-old" / "report.json").write_text(json.dumps(old))

    proc = cli("report", str(root / "*"), "--format", "json")   # a glob the shell did not expand
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in json.loads(proc.stdout)["rows"]}
    assert set(rows) == {load(runs["one"])["run_id"], load(runs["two"])["run_id"], "c-failed",
                         "d-preempted", "e-empty", "f-old"}
    assert rows["c-failed"]["status"] == "failed" and rows["c-failed"]["epochs"] == 1
    assert rows["c-failed"]["speedup"] is not None, "a failed run's finished epochs still count"
    assert rows["d-preempted"]["status"] == "preempted"
    assert rows["e-empty"]["status"] == "unreadable" and "no report here" in rows["e-empty"]["error"]
    assert rows["f-old"]["status"] == "unreadable" and "schema version 0" in rows["f-old"]["error"]
    assert "schema version 0" in proc.stderr

    text = cli("report", str(root / "*")).stdout
    assert "c-failed: failed (RuntimeError: out of memory); numbers cover its 1 finished epoch" in text
    assert "f-old: not read:" in text and "this fmnist-dist reads version 1" in text
    # baseline: completed runs only
    assert rows["c-failed"]["baseline_runs"] == [load(runs["one"])["run_id"]]

    # one unreadable run alone is refused clearly
    proc = cli("report", str(root / "f-old"))
    assert proc.returncode == 2 and "schema version 0" in proc.stderr


def test_time_split_per_epoch_and_rank(runs):
    two = load(runs["two"])
    b = two["breakdown"]
    assert b["method"] == "timeline" and "timeline" in b["method_detail"].lower()
    assert [f.rsplit("/", 1)[-1] for f in b["timeline"]["files"]] == ["epoch-001.json", "epoch-002.json"]
    for e in two["epochs"]:
        for r in e["ranks"]:
            assert r["comm_method"] == "timeline"
            assert r["comm_s"] > 0 and r["compute_s"] > 0
            # rank 0 writes the end-of-epoch checkpoint; the others only wait for it
            assert (r["checkpoint_s"] > 0) if r["rank"] == 0 else (r["checkpoint_s"] == 0.0)
            assert r["compute_s"] + r["comm_s"] + r["tracing_s"] == pytest.approx(r["step_s"])
            assert r["other_s"] == pytest.approx(r["fit_s"] - r["step_s"] + r["tracing_s"])
    assert two["epochs"][0]["ranks"][0]["tracing_s"] > 0, "epoch 1's first step traces the graph"
    assert [r["rank"] for r in b["ranks"]] == [0, 1]
    for r in b["ranks"]:
        assert r["startup_s"] > 0 and r["total_s"] == pytest.approx(sum(r[c] for c in breakdown.CATEGORIES))
    probe = b["probe"]
    assert probe["ranks"] == 2 and probe["seconds_per_call"] > 0 and len(probe["sizes"]) == len(PROBE_SIZES)
    assert probe["fit"]["bandwidth_Bps"] > 0
    # float32 gradients of the trainable parameters (not of batch norm's moving statistics)
    assert probe["gradient_bytes"] == 4 * two["model"]["trainable_parameters"] < 4 * two["model"]["parameters"]
    one = load(runs["one"])
    assert one["breakdown"]["method"] == "single" and "skipped" in one["breakdown"]["probe"]
    assert all(r["comm_s"] == 0 and r["comm_method"] == "single" for e in one["epochs"] for r in e["ranks"])
    md = (runs["two"] / "report.md").read_text()
    assert "## Where the time went" in md and "Method: **timeline**" in md
    assert "compute_s" in (runs["two"] / "epochs.csv").read_text().splitlines()[0]


def test_probe_estimate_split_arithmetic():
    r = {"rank": 0, "steps": 10, "step_s": 2.0, "fit_s": 2.5, "tracing_s": 0.5}
    breakdown.split_record(r, size=2, probe_s=0.03, measured=None)
    assert r["comm_method"] == "probe" and r["comm_s"] == pytest.approx(0.3)
    assert r["compute_s"] == pytest.approx(1.2) and r["other_s"] == pytest.approx(1.0)
    breakdown.split_record(r, size=2, probe_s=1.0, measured=None)   # an estimate above the step time
    assert r["comm_s"] == pytest.approx(1.5) and r["compute_s"] == 0


def test_timeline_union_and_partial_file(tmp_path):
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"start_time_since_epoch_in_micros": 10_000_000}},
              {"ph": "B", "name": "NEGOTIATE_ALLREDUCE", "ts": 0, "pid": 1}, {"ph": "E", "ts": 100, "pid": 1},
              {"ph": "B", "name": "ALLREDUCE", "ts": 100, "pid": 1},
              {"ph": "B", "name": "MPI_ALLREDUCE", "ts": 110, "pid": 1}, {"ph": "E", "ts": 290, "pid": 1},
              {"ph": "E", "ts": 300, "pid": 1},
              {"ph": "B", "name": "ALLREDUCE", "ts": 200, "pid": 2}, {"ph": "E", "ts": 400, "pid": 2}]
    path = tmp_path / "t.json"
    path.write_text("[\n" + ",\n".join(json.dumps(e) for e in events) + ', {"ph": "B", "na')  # still being written
    start, comm, nego = timeline.timeline_intervals(timeline.read_timeline(str(path)))
    assert start == 10.0 and timeline.union_seconds(comm) == pytest.approx(300e-6)
    assert timeline.union_seconds(nego) == pytest.approx(100e-6)
    assert timeline.union_seconds(comm, (10.0 + 150e-6, 10.0 + 250e-6)) == pytest.approx(100e-6)


def test_seed_summary_groups_seeds_of_one_recipe(runs, tmp_path):
    """`report --seeds`: runs that differ only in train.seed are one row with the accuracy's mean,
    sample standard deviation and range; other recipes, world sizes and unfinished runs stay apart."""
    two = load(runs["two"])
    for seed, acc in ((1, 0.90), (2, 0.92), (3, 0.94)):
        rep = json.loads(json.dumps(two))
        rep["config"]["train"]["seed"], rep["results"]["test_accuracy"] = seed, acc
        rep["results"].update(eval_flip=True, test_accuracy_one_view=acc - 0.01)
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "report.json").write_text(json.dumps(rep))
    rep["status"] = "preempted"
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "report.json").write_text(json.dumps(rep))
    proc = cli("report", str(runs["one"]), *(str(tmp_path / d) for d in ("s1", "s2", "s3", "p")), "--seeds",
               "--format", "md")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("| recipe | CPU (ISA) | precision | ranks | epochs | seeds | test acc mean | ± sd |")
    rows = {tuple(c.strip() for c in line.strip("|").split("|"))[3]: line for line in lines[2:]}
    env = two["environment"]
    assert f"| {env['nodes'][0]['cpu_model']} ({env['nodes'][0]['isa']}) | {precision_label(env)} |" in rows["2"]
    assert set(rows) == {"1", "2"}, "one row per world size"
    assert "| 1,2,3 | 92.00% | 2.00% | 90.00%–94.00% | 91.00% |" in rows["2"]
