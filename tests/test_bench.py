"""The benchmark: a real tiny run (`bench --quick`: the peak probe, a plain-Keras process and a
2-rank horovodrun launch) checked for structure, and the summary arithmetic on made-up figures.
Figures are never asserted: they depend on the machine and its load."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_dist import bench

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def test_variants_and_comparisons_are_consistent():
    names = [v.name for v in bench.VARIANTS]
    assert len(names) == len(set(names)) and bench.BASELINE in names
    assert set(bench.QUICK_VARIANTS) <= set(names)
    for _, _, a, b in bench.COMPARISONS:
        assert a in names and b in names
    groups = {v.group for v in bench.VARIANTS}
    assert {"precision", "itex", "onednn", "ranks", "controller", "horovod"} <= groups
    launchers = {v.launcher for v in bench.VARIANTS}
    assert launchers == {"keras", "single", "mpi", "mpi-bind", "gloo"}


def test_launch_commands():
    by_name = {v.name: v for v in bench.VARIANTS}
    keras = bench.launch_command(by_name["keras-1x2-fp32"], "s.json")
    assert keras[1:] == ["-m", "fmnist_dist.bench", "--worker", "s.json"]
    bound = bench.launch_command(by_name["mpi-2x1-fp32-bind"], "s.json")
    assert bound[1:5] == ["-np", "2", "--mpi", f"--binding-args={bench.BIND_ARGS}"]
    assert "--gloo" in bench.launch_command(by_name["gloo-2x1-fp32"], "s.json")
    assert bench.display_command(by_name["mpi-2x1-fp32"]).startswith("horovodrun -np 2 --mpi python -m")


def test_statistics_pair_launches_of_the_same_repetition():
    s = bench.stats([100.0, None, 300.0, 200.0])
    assert s == {"median": 200.0, "min": 100.0, "max": 300.0, "spread": 1.0}
    assert bench.stats([None])["median"] is None
    per = {"mpi-2x1-fp32": [90.0, 180.0, None], "hvd-1x2-fp32": [100.0, 200.0, 300.0]}
    (c,) = [c for c in bench.compare(per) if c["name"] == "2x1 / 1x2"]
    assert c["ratios"] == [0.9, 0.9, None] and c["median"] == pytest.approx(0.9)


def test_summary_peak_fraction_and_tables():
    variants = [v for v in bench.VARIANTS if v.name in ("hvd-1x2-fp32", "hvd-1x2-itex-bf16")]
    per = {"hvd-1x2-fp32": [1000.0, 1100.0], "hvd-1x2-itex-bf16": [2000.0, None]}
    model = {"description": "m", "parameters": 1, "flops_per_image": 10_000_000, "train_flops_per_image": 30_000_000}
    peak = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "n": 64, "samples": [{"rep": 1, "fp32": [100.0], "bf16": [200.0]}]}
    rows = bench.summarize_variants(variants, per, {}, model, peak)
    fp32, bf16 = rows
    assert fp32["median"] == 1050.0 and fp32["vs_baseline"] == 1.0
    assert fp32["gflops"] == pytest.approx(31.5) and fp32["peak_fraction"] == pytest.approx(0.315)
    assert bf16["vs_baseline"] == pytest.approx(2.0) and bf16["peak_fraction"] == pytest.approx(0.3)
    result = {"quick": True, "started": "t", "host": "h", "settings": {"batch_size": 8, "reps": 2, "warmup_steps": 1,
              "steps": 2}, "machine": {"cpu_model": "cpu", "cores": 2, "avx512f": True, "avx512_bf16": True,
              "amx": False}, "load": {"before": [0.5, 0.4, 0.3], "waited_s": 0, "launches_other_cpu_median": 0.1,
              "launches_other_cpu_max": 0.2}, "peak": peak, "model": model, "variants": rows,
              "comparisons": bench.compare(per)}
    md = bench.markdown(result)
    assert md.count("\n| ") >= 4 and "AMX no" in md and "of peak" in md and "32%" in md
    assert "hvd-1x2-fp32" in bench.text_table(result)


@pytest.mark.slow
def test_quick_bench_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == bench.SCHEMA and result["schema_version"] == bench.SCHEMA_VERSION
    assert result["quick"] is True and result["settings"]["reps"] == 1
    assert [v["name"] for v in result["variants"]] == list(bench.QUICK_VARIANTS)
    for v in result["variants"]:
        assert v["median"] is not None and v["median"] > 0, f"{v['name']} failed; see {out}/logs"
        assert v["gflops"] > 0 and v["peak_fraction"] > 0
        assert v["environment"]["intra_op_threads"] == v["threads_per_rank"]
    launches = result["launches"]
    assert [la["variant"] for la in launches] == ["peak", *bench.QUICK_VARIANTS]   # the order they ran
    assert all(la["ok"] and (out / la["log"]).exists() for la in launches)
    assert result["peak"]["fp32_gflops"] > 0 and result["peak"]["bf16_gflops"] > 0
    assert result["model"]["train_flops_per_image"] == 3 * result["model"]["flops_per_image"]
    assert len(result["load"]["before"]) == 3 and result["machine"]["cores"] == os.cpu_count()
    assert [c["name"] for c in result["comparisons"]] == ["Horovod 2x1 / plain Keras 1x2"]
    md = (out / "bench.md").read_text()
    assert "| variant |" in md and "of peak" in md and "matmul peak" in md
    assert "images/s" in proc.stdout and "| variant |" in proc.stdout and "vs base" in proc.stdout
