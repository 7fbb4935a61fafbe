"""The preflight: real MPI ranks (mpirun, mpi4py), the real data and run directory, in seconds.

Each failure a node could bring to the training is made real on one rank (MPMD: one app context per
rank) and must end in one line per problem naming the host and rank, exit 2, before any training.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT, run_env

HOST = os.uname().nodename
MPI = ["mpirun", "--bind-to", "none"]


def preflight(run_dir: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "fmnist_dist", "preflight", "--config", "configs/default.yaml",
            "--run-dir", str(run_dir), *extra]


def run(cmd: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=timeout)


def two_ranks(cmd: list[str], rank1_env: dict[str, str] | None = None) -> list[str]:
    """Two ranks; rank 1 may see another environment (as a node of another kind would)."""
    rank1 = [a for name, value in (rank1_env or {}).items() for a in ("-x", f"{name}={value}")]
    return [*MPI, "-np", "1", *cmd, ":", "-np", "1", *rank1, *cmd]


def errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("fmnist-dist: error:")]


def test_two_ranks_pass_and_the_record_is_kept(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([*MPI, "-np", "2", *preflight(run_dir)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("fmnist-dist preflight: 2 rank(s) on 1 host(s), ")
    assert lines[1].split()[:4] == ["rank", "host", "cpu", "isa"]
    assert [line.split()[:2] for line in lines[2:4]] == [["0", HOST[:16]], ["1", HOST[:16]]]
    assert any(line.startswith("precision: ") for line in lines) and lines[-1] == "preflight: ok"
    record = json.loads((run_dir / "preflight.json").read_text())
    assert record["problems"] == [] and len(record["ranks"]) == 2
    for rank in record["ranks"]:
        assert rank["data"]["ok"] is True and rank["run_dir"]["writable"] is True
        assert rank["versions"]["tensorflow"] == "2.15.1" and rank["versions"]["horovod"] == "0.28.1"
        assert rank["affinity"] and rank["cores"] == os.cpu_count()
    assert record["clock_offsets_s"][0] == 0.0 and abs(record["clock_offsets_s"][1]) < 0.5
    assert record["seconds"] < 30, "a preflight takes seconds"


def test_missing_data_on_one_node_names_it(tmp_path):
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    proc = run([*MPI, "-np", "1", *preflight(run_dir), ":", "-np", "1", *preflight(run_dir, "--data-dir", str(empty))])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert errors(proc) == [f"fmnist-dist: error: preflight: {HOST} (rank 1): Fashion-MNIST not found in {empty} "
                            f"(data.dir / --data-dir): directory holds none of the files. Expected "
                            + errors(proc)[0].split(". Expected ", 1)[1]]
    assert "preflight: ok" not in proc.stdout


def test_explicit_bf16_where_one_node_lacks_it(tmp_path):
    proc = run(two_ranks(preflight(tmp_path / "run", "--set", "intel.mixed_precision=keras_bf16"),
                         {"ONEDNN_MAX_CPU_ISA": "AVX2"}))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = errors(proc)
    assert line.startswith("fmnist-dist: error: preflight: intel.mixed_precision=keras_bf16 needs native bf16")
    assert f"{HOST} (" in line and "has AVX2 under ONEDNN_MAX_CPU_ISA=AVX2" in line


def test_auto_agrees_on_fp32_when_one_node_lacks_bf16(tmp_path):
    proc = run(two_ranks(preflight(tmp_path / "run"), {"ONEDNN_MAX_CPU_ISA": "AVX2"}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"precision: fp32 (not every node has native bf16: {HOST} has AVX2 under ONEDNN_MAX_CPU_ISA=AVX2)" \
        in proc.stdout


def test_another_tensorflow_on_one_node(tmp_path):
    """Rank 1's environment imports another TensorFlow (as a node with a stale environment would)."""
    other = tmp_path / "other-site"
    (other / "tensorflow-2.14.0.dist-info").mkdir(parents=True)
    (other / "tensorflow-2.14.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorflow\n"
                                                                     "Version: 2.14.0\n")
    proc = run(two_ranks(preflight(tmp_path / "run"), {"PYTHONPATH": f"{other}:{ROOT}"}))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert errors(proc) == [f"fmnist-dist: error: preflight: ranks import different tensorflow versions: "
                            f"{HOST} (rank 0) 2.15.1, {HOST} (rank 1) 2.14.0"]


def test_run_dir_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = run([*MPI, "-np", "2", *preflight(blocker / "run")])
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    [line] = errors(proc)
    assert line.startswith(f"fmnist-dist: error: preflight: {HOST} (rank 0): cannot write the run directory "
                           f"{blocker}/run ({blocker}: ")
    assert blocker.read_text() == "not a directory"


def test_bad_isa_cap_is_named(tmp_path):
    proc = run(two_ranks(preflight(tmp_path / "run"), {"ONEDNN_MAX_CPU_ISA": "AVX3"}))
    assert proc.returncode == 2
    assert errors(proc) == [f"fmnist-dist: error: preflight: {HOST} (rank 1): ONEDNN_MAX_CPU_ISA=AVX3: not a "
                            "oneDNN ISA name; expected one of " + errors(proc)[0].split("expected one of ", 1)[1]]
