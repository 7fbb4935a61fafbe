"""The benchmark: a real tiny run (`bench --quick`: the peak probe, a plain-Keras process and a
2-rank horovodrun launch) checked for structure, and the summary arithmetic on made-up figures.
Figures are never asserted: they depend on the machine and its load."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT
from fmnist_dist import config as config_mod
from fmnist_dist.bench import render, run, stats, variants



def test_variants_and_comparisons_are_consistent():
    names = [v.name for v in variants.VARIANTS]
    assert len(names) == len(set(names)) and variants.BASELINE in names
    assert set(variants.QUICK_VARIANTS) <= set(names)
    for _, _, a, b in variants.COMPARISONS:
        assert a in names and b in names
    groups = {v.group for v in variants.VARIANTS}
    assert {"precision", "itex", "onednn", "ranks", "controller", "horovod"} <= groups
    launchers = {v.launcher for v in variants.VARIANTS}
    assert launchers == {"keras", "single", "mpi", "mpi-bind", "gloo", "hydra"}
    assert {v.mpi for v in variants.VARIANTS} == {None, "mpich", "intel", "ccl"}


def test_launch_commands():
    by_name = {v.name: v for v in variants.VARIANTS}
    keras = variants.launch_command(by_name["keras-1x2-fp32"], "s.json")
    assert keras[1:] == ["-m", "fmnist_dist.bench.worker", "s.json"]
    bound = variants.launch_command(by_name["mpi-2x1-fp32-bind"], "s.json")
    assert bound[1:5] == ["-np", "2", "--mpi", f"--binding-args={variants.BIND_ARGS}"]
    assert "--gloo" in variants.launch_command(by_name["gloo-2x1-fp32"], "s.json")
    assert variants.display_command(by_name["mpi-2x1-fp32"]).startswith("horovodrun -np 2 --mpi python -m")
    # MPICH's and Intel MPI's own mpirun (their env.sh puts it first on PATH), not horovodrun
    assert variants.display_command(by_name["mpich-2x1-fp32"]).startswith("mpirun -n 2 python -m")


def test_statistics_pair_launches_of_the_same_repetition():
    s = stats.stats([100.0, None, 300.0, 200.0])
    assert s == {"median": 200.0, "min": 100.0, "max": 300.0, "spread": 1.0}
    assert stats.stats([None])["median"] is None
    per = {"mpi-2x1-fp32": [90.0, 180.0, None], "hvd-1x2-fp32": [100.0, 200.0, 300.0]}
    (c,) = [c for c in stats.compare(per) if c["name"] == "2x1 / 1x2"]
    assert c["ratios"] == [0.9, 0.9, None] and c["median"] == pytest.approx(0.9)


def test_summary_peak_fraction_and_tables():
    chosen = [v for v in variants.VARIANTS if v.name in ("hvd-1x2-fp32", "hvd-1x2-itex-bf16")]
    per = {"hvd-1x2-fp32": [1000.0, 1100.0], "hvd-1x2-itex-bf16": [2000.0, None]}
    model = {"description": "m", "parameters": 1, "flops_per_image": 10_000_000, "train_flops_per_image": 30_000_000}
    # the machine ran faster in repetition 2: its probe and its launches are held against each other
    peak = {"fp32_gflops": 150.0, "bf16_gflops": 200.0, "n": 64,
            "samples": [{"rep": 1, "fp32": [90.0, 100.0], "bf16": [200.0]}, {"rep": 2, "fp32": [150.0], "bf16": [400.0]}]}
    rows = stats.summarize_variants(chosen, per, {}, model, peak)
    fp32, bf16 = rows
    assert fp32["median"] == 1050.0 and fp32["vs_baseline"] == 1.0 and fp32["gflops"] == pytest.approx(31.5)
    assert fp32["peak_fractions"] == pytest.approx([0.30, 0.22])        # 30 of 100, 33 of 150 GFLOP/s
    assert fp32["peak_fraction"] == pytest.approx(0.26)                 # not 31.5 of the best probe, 150
    assert bf16["vs_baseline"] == pytest.approx(2.0)
    assert bf16["peak_fractions"] == [pytest.approx(0.3), None] and bf16["peak_fraction"] == pytest.approx(0.3)
    result = {"quick": True, "started": "t", "host": "h", "settings": {"batch_size": 8, "reps": 2, "warmup_steps": 1,
              "steps": 2}, "machine": {"cpu_model": "cpu", "cores": 2, "avx512f": True, "avx512_bf16": True,
              "amx": False, "isa": "AVX-512 BF16", "isa_cap": None, "native_bf16": True, "avx512": True},
              "skipped": [{"name": "x", "reason": "needs native bf16; this CPU offers AVX2"}], "load": {"before": [0.5, 0.4, 0.3], "waited_s": 0, "launches_other_cpu_median": 0.1,
              "launches_other_cpu_max": 0.2}, "peak": peak, "model": model, "variants": rows,
              "comparisons": stats.compare(per)}
    md = render.markdown(result)
    assert md.count("\n| ") >= 4 and "AMX no" in md and "of peak" in md and "26%" in md
    assert "each repetition's best: fp32 100, 150; bf16 200, 400" in md
    assert "ISA AVX-512 BF16, native bf16 yes" in md and "Skipped on this CPU: `x` (needs native bf16" in md
    text = render.text_table(result)
    assert "hvd-1x2-fp32" in text and "x                        skipped: needs native bf16" in text


def test_the_machine_line_names_the_kernels_isa_not_the_cpu_flags(monkeypatch):
    """Under ONEDNN_MAX_CPU_ISA=AVX2 oneDNN runs no AMX kernel, whatever the CPU's flags say."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    capped = run.machine_info()
    assert capped["isa"] in ("AVX2", "AVX", "SSE4.1") and capped["amx"] is False and capped["native_bf16"] is False
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert run.machine_info()["amx"] == ("amx_bf16" in capped["flags"])


@pytest.mark.slow
def test_quick_bench_runs_and_writes_its_outputs(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == run.SCHEMA and result["schema_version"] == run.SCHEMA_VERSION
    assert result["quick"] is True and result["settings"]["reps"] == 1
    assert [v["name"] for v in result["variants"]] == list(variants.QUICK_VARIANTS)
    for v in result["variants"]:
        assert v["median"] is not None and v["median"] > 0, f"{v['name']} failed; see {out}/logs"
        assert v["gflops"] > 0 and v["peak_fraction"] > 0
        in_use = v["environment"]["intra_op_threads"] * v["environment"]["inter_op_threads"]
        assert in_use == v["threads_per_rank"]
    launches = result["launches"]
    assert [la["variant"] for la in launches] == ["peak", *variants.QUICK_VARIANTS]   # the order they ran
    assert all(la["ok"] and (out / la["log"]).exists() for la in launches)
    assert result["peak"]["fp32_gflops"] > 0
    assert (result["peak"]["bf16_gflops"] or 0) > 0 if result["machine"]["native_bf16"] else \
        result["peak"]["bf16_gflops"] is None, "bf16 is probed only where the CPU has it"
    from fmnist_dist.training.model import build_model, train_flops_per_image    # TensorFlow: only here
    configured = result["config"]["model"]
    timed = build_model(configured["layers"], 0, first_conv_frozen=configured["first_conv_frozen"])
    assert result["model"]["train_flops_per_image"] == train_flops_per_image(timed)
    assert result["model"]["train_flops_per_image"] < 3 * result["model"]["flops_per_image"]   # no input gradient first
    assert len(result["load"]["before"]) == 3 and result["machine"]["cores"] == os.cpu_count()
    assert [c["name"] for c in result["comparisons"]] == ["Horovod 2x1 / plain Keras 1x2"]
    md = (out / "bench.md").read_text()
    assert "| variant |" in md and "of peak" in md and "matmul peak" in md
    assert "images/s" in proc.stdout and "| variant |" in proc.stdout and "vs base" in proc.stdout


@pytest.mark.slow
def test_layer_profile_times_every_layer_of_the_model(tmp_path):
    """`bench --variants none --layers`: one single-thread launch per native precision, a row per
    layer of the configured model (the classifier included), FLOPs only for conv and dense."""
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--no-peak", "--variants", "none",
                           "--layers", "--config", "configs/fast.yaml", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert result["variants"] == [] and result["peak"] is None
    native_precisions = ["fp32", "bf16"] if result["machine"]["native_bf16"] else ["fp32"]
    assert [p["precision"] for p in result["layers"]] == native_precisions
    configured = [spec["type"] for spec in result["config"]["model"]["layers"]]
    for profile in result["layers"]:
        assert profile["threads"] == 1 and len(profile["cores"]) == 1
        assert profile["batch"] == result["settings"]["batch_size"]
        rows = profile["rows"]
        assert len(rows) == len(configured) + 1 and rows[-1]["name"] == "logits"
        for row, kind in zip(rows, configured + ["dense"]):
            assert row["step_s"] > 0
            has_flops = kind in ("conv", "dense")
            assert (row["flops_per_image"] > 0 and row["gflops"] > 0) if has_flops else \
                (row["flops_per_image"] == 0 and row["gflops"] is None), row
        assert sum(r["flops_per_image"] for r in rows) == profile["flops_per_image"]
        assert sum(r["train_flops_per_image"] for r in rows) == profile["train_flops_per_image"]
        # configs/fast.yaml's first convolution is frozen: its step is the forward pass alone
        assert rows[0]["kind"] == "Conv2D" and rows[0]["train_flops_per_image"] == rows[0]["flops_per_image"]
        assert profile["whole_step_s"] > 0 and profile["peak_gflops"] > 0
        assert profile["sum_of_layers_s"] == pytest.approx(sum(r["step_s"] for r in rows))
    assert proc.stdout.count("Layer profile, ") == len(result["layers"])


def test_nothing_to_run_is_refused(tmp_path):
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--variants", "none", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--variants none: nothing to run; add --layers" in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_skips_what_this_cpu_cannot_run(tmp_path):
    """On a CPU without native bf16 (made here with oneDNN's ISA cap) the bf16 variants are listed as
    skipped with the reason and the rest runs; the header states the ISA."""
    out = tmp_path / "bench"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT), ONEDNN_MAX_CPU_ISA="AVX2")
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--no-peak", "--out", str(out),
                           "--variants", "keras-1x2-fp32,hvd-1x2-keras-bf16,hvd-1x2-itex-bf16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    assert [v["name"] for v in result["variants"]] == ["keras-1x2-fp32"]
    reason = "needs native bf16; this CPU offers AVX2 (ONEDNN_MAX_CPU_ISA=AVX2)"
    assert result["skipped"] == [{"name": "hvd-1x2-keras-bf16", "reason": reason},
                                 {"name": "hvd-1x2-itex-bf16", "reason": reason}]
    assert f"bench: skipped hvd-1x2-keras-bf16: {reason}" in proc.stdout
    assert "ISA AVX2 (ONEDNN_MAX_CPU_ISA=AVX2), native bf16 no" in proc.stdout
    assert result["variants"][0]["median"] > 0


@pytest.mark.slow
def test_quick_race_runs_both_sides_and_writes_its_outputs(tmp_path):
    """`race --quick --np 2`: the plain Keras peer and the project's recipe on 2 ranks, 20 steps each;
    the target is out of reach, so neither side has a time to target and no ratio is claimed."""
    out = tmp_path / "race"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "race", "--quick", "--np", "2", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "race.json").read_text())
    assert result["schema"] == "fmnist-dist/race" and result["seeds"] == [1] and result["finished"]
    (entry,) = result["results"]
    assert entry["order"] == ["peer", "project"]                       # odd seeds: the peer first
    for side in ("peer", "project"):
        s = entry[side]
        assert s["error"] is None and s["epochs"] == 1 and 0 < s["test_accuracy"] < 0.92, s
        assert s["training_s"] > 0 and s["wall_s"] > s["training_s"] and s["reached"] is False
        assert (out / s["log"]).exists()
    assert entry["ratio_training"] is None and result["summary"]["ratio_training_median"] is None
    assert "--padding same" in entry["peer"]["command"] and result["peer_padding"] == "same"
    assert "--steps-per-epoch 20" in entry["peer"]["command"] and "horovodrun --gloo -np 2" in entry["project"]["command"]
    md = (out / "race.md").read_text()
    assert "| seed | peer epochs |" in md and "missed" in md
    assert "race: seed 1 peer: missed" in proc.stdout and "| seed | peer epochs |" in proc.stdout


def test_race_ratio_is_peer_over_project_and_needs_both_to_reach():
    from fmnist_dist.bench import race

    def side(reached, training_s, wall_s):
        return {"reached": reached, "training_s": training_s, "wall_s": wall_s, "error": None}
    entry = {"peer": side(True, 300.0, 330.0), "project": side(True, 100.0, 150.0)}
    assert race.ratio(entry, "training_s") == 3.0 and race.ratio(entry, "wall_s") == 2.2
    entry["project"]["reached"] = False
    assert race.ratio(entry, "training_s") is None
    results = [{"peer": side(True, 300.0, 330.0), "project": side(True, 100.0, 150.0), "ratio_training": 3.0,
                "ratio_wall": 2.2},
               {"peer": side(True, 200.0, 230.0), "project": side(False, 100.0, 150.0), "ratio_training": None,
                "ratio_wall": None}]
    s = race.summarize(results)
    assert s["every_seed_reached"] is False and s["project_reached"] == 1 and s["ratio_training_median"] == 3.0
    # a peer that gave up short of the target while the project reached it: a lower bound, not a ratio
    entry = {"peer": side(False, 290.0, 315.0), "project": side(True, 125.0, 150.0)}
    assert race.ratio(entry, "training_s") is None and race.ratio_bound(entry, "training_s") == pytest.approx(2.32)
    entry["peer"]["error"] = "killed"
    assert race.ratio_bound(entry, "training_s") is None                      # a crash bounds nothing
    entry["peer"]["error"], entry["project"]["reached"] = None, False
    assert race.ratio_bound(entry, "training_s") is None
    bounded = {"peer": side(False, 290.0, 315.0), "project": side(True, 125.0, 150.0), "ratio_training": None,
               "ratio_wall": None, "ratio_training_at_least": 2.32, "ratio_wall_at_least": 2.1}
    assert race.summarize([*results, bounded])["ratio_training_at_least"] == 2.32
    assert race._x(None, 2.32) == "> 2.32x" and race._x(3.0) == "3.00x" and race._x(None) == "—"


def test_race_shows_how_much_of_a_bound_rests_on_the_peer_plateau():
    """A peer that missed: its best epoch is in the table, and the ratio had it reached the target
    there is given per seed, beside (not instead of) the lower bound."""
    from fmnist_dist.bench import race

    peer = {"reached": False, "training_s": 290.0, "wall_s": 315.0, "error": None, "epochs": 30,
            "test_accuracy": 0.9183, "best_test_accuracy": 0.9197, "best_epoch": 15, "best_training_s": 142.4}
    project = {"reached": True, "training_s": 55.8, "wall_s": 74.7, "error": None, "epochs": 8,
               "test_accuracy": 0.9228, "precision": "keras_bf16"}
    missed = {"seed": 1, "peer": peer, "project": project, "ratio_training": None, "ratio_wall": None,
              "ratio_training_at_least": 290.0 / 55.8, "ratio_wall_at_least": 315.0 / 74.7}
    both = {"seed": 2, "peer": {**peer, "reached": True, "training_s": 200.0}, "project": project,
            "ratio_training": 200.0 / 55.8, "ratio_wall": 1.0}
    assert race.ratio_to_peer_best(missed) == pytest.approx(142.4 / 55.8)
    assert race.ratio_to_peer_best(both) is None                  # the peer reached: a real ratio exists
    assert race.ratio_to_peer_best({**missed, "project": {**project, "reached": False}}) is None
    summary = race.summarize([missed, both])
    assert summary["ratio_training_to_peer_best"] == [pytest.approx(2.552, abs=1e-3), None]
    md = race.markdown({"target": 0.92, "machine": {"cpu_model": "X", "cores": 2, "isa": "AVX2", "native_bf16": False,
                                                    "amx": False}, "started": "2026-12-01T00:00:00",
                        "command": "fmnist-dist race", "peer_max_epochs": 30, "results": [missed, both],
                        "summary": summary})
    assert "91.83% (best 91.97% at epoch 15, 142.4 s)" in md
    assert "at its best epoch, the training ratio would have been 2.55x (not a bound" in md
    seed1 = next(line for line in md.splitlines() if line.startswith("| 1 |"))
    assert ">" not in seed1 and seed1.endswith("| — \\* | — |")           # a bound is a footnote, not a ratio
    assert "only a lower bound on the training ratio (seed 1 > 5.20x)" in md


def test_the_batch_curve_is_one_rank_one_thread_per_batch_and_native_precision():
    from fmnist_dist.bench.variants import batch_curve_variants, curve_of

    assert [v.name for v in batch_curve_variants((32, 256), False)] == ["curve-fp32-b32", "curve-fp32-b256"]
    variants = batch_curve_variants((32, 256), True)
    assert {(v.batch, v.precision, v.intel["intra_op_threads"], v.launcher) for v in variants} == {
        (32, "fp32", 1, "single"), (256, "fp32", 1, "single"), (32, "bf16 (Keras)", 1, "single"),
        (256, "bf16 (Keras)", 1, "single")}
    rows = [{"name": v.name, "median": 100.0 * v.batch} for v in variants[:3]] + [{"name": variants[3].name, "median": None}]
    assert curve_of(variants, rows) == {"threads": 1, "precisions": {
        "fp32": {"batches": [32, 256], "images_per_s": [3200.0, 25600.0]},
        "bf16": {"batches": [32], "images_per_s": [3200.0]}}}


def test_a_rank_s_threads_count_the_ops_it_runs_side_by_side():
    """bench's "ranks x threads": one process running 2 simulated ranks' towers side by side, one
    thread each, uses 2 threads; a record from before inter-op threads were kept counts its intra-op pool."""
    assert stats.threads_in_use({"intra_op_threads": 1, "inter_op_threads": 2}, 1) == 2
    assert stats.threads_in_use({"intra_op_threads": 2, "inter_op_threads": 1}, 1) == 2
    assert stats.threads_in_use({"intra_op_threads": 1}, 2) == 1
    assert stats.threads_in_use({}, 2) == max(1, (os.cpu_count() or 1) // 2)
