"""The benchmark measures what it names: each launch's worker records what TensorFlow really ran with
(measure.in_effect), variants.mismatches compares that with the variant, and a launch that did not
run as named is an error naming the mismatch, not the variant's figure. The slow tests run the real
bench worker: once as named (oneDNN on in the default fp32 variant, off in the oneDNN-off one), and
once with TensorFlow loaded before the worker could switch oneDNN off (the bug of issue 24)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import PYTHON, ROOT, unavailable
from fmnist_dist.bench import render, stats, variants

BY_NAME = {v.name: v for v in variants.VARIANTS}


def record(**changes) -> dict:
    """An in-effect record as measure.in_effect writes it (its keys are checked against a real
    worker's in test_the_fp32_and_onednn_off_variants_run_as_named): the default fp32 variant's."""
    return {"onednn": True, "itex": True, "itex_loaded": True, "itex_auto_mixed_precision": False,
            "mixed_precision_policy": "float32", "intra_op_threads": 2, "world": 1, "mpi": "openmpi", "ccl": False,
            "tensorflow_loaded_before_prepare": False, **changes}


def test_a_launch_that_ran_as_named_has_no_mismatch():
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32"], [record()]) == []
    # intel.itex=auto names what auto decided on this node: not loaded and not in the graph is as named
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32"], [record(itex=False, itex_loaded=False)]) == []
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [record(onednn=False, itex=False,
                                                                        itex_loaded=False)]) == []
    assert variants.mismatches(BY_NAME["hvd-1x2-keras-bf16"], [record(mixed_precision_policy="mixed_bfloat16")]) == []
    assert variants.mismatches(BY_NAME["hvd-1x2-itex-bf16"], [record(itex_auto_mixed_precision=True)]) == []
    assert variants.mismatches(BY_NAME["hvd-1x2-keras-bf16-noitex"], [
        record(mixed_precision_policy="mixed_bfloat16", itex=False, itex_loaded=False)]) == []
    both_ranks = [record(world=2, intra_op_threads=1), record(world=2, intra_op_threads=1)]
    assert variants.mismatches(BY_NAME["mpi-2x1-fp32"], both_ranks) == []


def test_onednn_and_itex_in_effect_contrary_to_the_name_are_mismatches():
    onednn_on = record(tensorflow_loaded_before_prepare=True, itex=False, itex_loaded=False)
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [onednn_on]) == [
        "oneDNN on, named off (TensorFlow was loaded before environment.prepare set TF_ENABLE_ONEDNN_OPTS)"]
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [record()]) == [
        "oneDNN on, named off", "ITEX on in the executed graph, named intel.itex=off"]
    assert variants.mismatches(BY_NAME["hvd-1x2-itex-bf16"], [record(itex=False)]) == [
        "ITEX off in the executed graph, named intel.itex=on", "precision fp32 in effect, named itex_bf16"]
    # auto: the loader said loaded, but TensorFlow executed no ITEX op
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32"], [record(itex=False)]) == [
        "ITEX off in the executed graph, named intel.itex=auto (reported loaded)"]


def test_precision_threads_and_ranks_contrary_to_the_name_are_mismatches():
    assert variants.mismatches(BY_NAME["hvd-1x2-keras-bf16"], [record()]) == [
        "precision fp32 in effect, named keras_bf16"]
    assert variants.mismatches(BY_NAME["hvd-1x2-keras-bf16-noitex"], [record(mixed_precision_policy="mixed_bfloat16")]) == [
        "ITEX on in the executed graph, named intel.itex=off"]
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32"], [record(mixed_precision_policy="mixed_bfloat16",
                                                               itex_auto_mixed_precision=True)]) == [
        "precision keras_bf16 + itex_bf16 in effect, named fp32"]
    (curve,) = variants.batch_curve_variants((64,), False)
    assert variants.mismatches(curve, [record()]) == ["2 intra-op threads, named 1"]
    # two single-rank worlds instead of one of two ranks (a launcher and Horovod that do not agree)
    assert variants.mismatches(BY_NAME["mpi-2x1-fp32"], [record(intra_op_threads=1)]) == [
        "1 rank(s) reported, named 2", "a world of 1 rank(s), named 2 (rank 0)"]
    one_rank_off = [record(world=2, intra_op_threads=1), record(world=2, intra_op_threads=1, onednn=False)]
    assert variants.mismatches(BY_NAME["mpi-2x1-fp32"], one_rank_off) == ["oneDNN off, named on (rank 1)"]
    # another MPI's Horovod named, the venv's own (Open MPI) in effect
    both = [record(world=2, intra_op_threads=1), record(world=2, intra_op_threads=1)]
    assert variants.mismatches(BY_NAME["mpich-2x1-fp32"], both) == ["Open MPI in effect, named MPICH (rank 0, 1)"]
    assert variants.mismatches(BY_NAME["impi-2x1-fp32"], [dict(r, mpi="intel") for r in both]) == []
    assert variants.mismatches(BY_NAME["ccl-2x1-fp32"], [dict(r, mpi="intel") for r in both]) == [
        "no oneCCL in effect, named oneCCL (rank 0, 1)"]
    assert variants.mismatches(BY_NAME["ccl-2x1-fp32"], [dict(r, mpi="intel", ccl=True) for r in both]) == []


def worker_result(*records: dict, images_per_s: float = 1234.0) -> dict:
    return {"images_per_s": images_per_s, "ranks": [{"rank": i, "in_effect": r} for i, r in enumerate(records)]}


def test_a_launch_that_did_not_run_as_named_is_an_error_not_a_figure():
    as_named = {"rep": 1, "variant": "hvd-1x2-fp32", "ok": True, "error": None}
    result = worker_result(record())
    assert stats.count_if_ran_as_named(BY_NAME["hvd-1x2-fp32"], as_named, result) is result
    assert as_named["ran_as_named"] is True and as_named["ok"] and as_named["in_effect"] == [record()]
    wrong = {"rep": 2, "variant": "hvd-1x2-fp32-noonednn", "ok": True, "error": None}
    assert stats.count_if_ran_as_named(BY_NAME["hvd-1x2-fp32-noonednn"], wrong,
                                       worker_result(record(itex=False, itex_loaded=False))) is None
    assert wrong["ran_as_named"] is False and wrong["ok"] is False
    assert wrong["error"] == "did not run as named: oneDNN on, named off" and wrong["uncounted_images_per_s"] == 1234.0
    unrecorded = {"rep": 1, "variant": "hvd-1x2-fp32", "ok": True, "error": None}
    assert stats.count_if_ran_as_named(BY_NAME["hvd-1x2-fp32"], unrecorded, {"images_per_s": 1.0,
                                                                             "ranks": [{"rank": 0}]}) is None
    assert unrecorded["error"] == "did not run as named: no record of what was in effect"
    assert stats.count_if_ran_as_named(BY_NAME["hvd-1x2-fp32"], {"ok": False}, None) is None


def test_the_tables_show_what_was_in_effect_and_the_launches_not_counted():
    chosen = [BY_NAME["hvd-1x2-fp32-noonednn"]]
    environments = {"hvd-1x2-fp32-noonednn": {"itex": {"loaded": False}, "onednn_enabled": True,
                                              "in_effect": record(onednn=False, itex=False, itex_loaded=False)}}
    rows = stats.summarize_variants(chosen, {"hvd-1x2-fp32-noonednn": [500.0, None]}, environments, None, None)
    wrong = {"rep": 2, "variant": "hvd-1x2-fp32-noonednn", "ok": False, "ran_as_named": False,
             "error": "did not run as named: oneDNN on, named off"}
    result = {"quick": True, "started": "t", "host": "h", "settings": {"batch_size": 8, "reps": 2, "warmup_steps": 1,
              "steps": 2}, "machine": {"cpu_model": "cpu", "cores": 2, "isa": "AVX2", "isa_cap": None,
              "native_bf16": False, "amx": False}, "load": {"before": [0.1, 0.1, 0.1]}, "peak": None, "model": None,
              "variants": rows, "comparisons": [], "launches": [{"rep": 1, "ok": True, "ran_as_named": True}, wrong]}
    md = render.markdown(result)
    (row,) = [line for line in md.splitlines() if "`hvd-1x2-fp32-noonednn`) |" in line]
    # oneDNN from what TensorFlow executed (off), not the variable-reading flag (which said on)
    assert [c.strip() for c in row.split("|")][4:6] == ["off", "off"]
    assert "Not counted, as they did not run as named: rep 2 `hvd-1x2-fp32-noonednn` (oneDNN on, named off)." in md
    text = render.text_table(result)
    assert "hvd-1x2-fp32-noonednn    rep 2 not counted: did not run as named: oneDNN on, named off" in text


def run_bench(out, *args: str, **env: str) -> dict:
    """`bench --quick --no-peak` of the variants named, as a user runs it; its bench.json."""
    environ = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env)
    environ["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    proc = subprocess.run([PYTHON, "-m", "fmnist_dist", "bench", "--quick", "--no-peak", "--warmup-steps", "1",
                           "--steps", "2", "--out", str(out), *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=600)
    assert (out / "bench.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench.json").read_text())


def in_effect_of(result: dict, name: str) -> dict:
    """What the variant's (first) launch had in effect, rank 0's: from the launch where run.py judges
    launches (stats.count_if_ran_as_named), else from the variant's environment in bench.json."""
    launch = next(la for la in result["launches"] if la["variant"] == name)
    if launch.get("in_effect"):
        return launch["in_effect"][0]
    (row,) = [v for v in result["variants"] if v["name"] == name]
    assert row["environment"], f"{name} wrote no result: {launch['error']}; see {launch['log']}"
    return row["environment"]["in_effect"]


@pytest.mark.slow
def test_the_fp32_and_onednn_off_variants_run_as_named(tmp_path):
    result = run_bench(tmp_path / "bench", "--variants", "hvd-1x2-fp32,hvd-1x2-fp32-noonednn")
    fp32 = in_effect_of(result, "hvd-1x2-fp32")
    off = in_effect_of(result, "hvd-1x2-fp32-noonednn")
    assert set(fp32) == set(record()) == set(off), "the fast tests' records have the real record's keys"
    assert fp32["onednn"] is True and off["onednn"] is False
    assert off["itex"] is False and fp32["itex"] is fp32["itex_loaded"]
    assert fp32["itex"] is result["machine"]["native_bf16"]           # intel.itex=auto: ITEX where bf16 is native
    assert fp32["intra_op_threads"] == off["intra_op_threads"] == os.cpu_count()
    assert not fp32["tensorflow_loaded_before_prepare"] and not off["tensorflow_loaded_before_prepare"]
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32"], [fp32]) == []
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [off]) == []
    # each real record judged against the other variant: the difference is named
    assert "oneDNN on, named off" in variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [fp32])
    assert "oneDNN off, named on" in variants.mismatches(BY_NAME["hvd-1x2-fp32"], [off])
    md = (tmp_path / "bench" / "bench.md").read_text()
    (row,) = [line for line in md.splitlines() if "`hvd-1x2-fp32-noonednn`) |" in line]
    assert [c.strip() for c in row.split("|")][4:6] == ["off", "off"]
    assert [la["ran_as_named"] for la in result["launches"]] == [True, True]
    assert [la["ran_as_named"] for la in result["launches"]] == [True, True]


@pytest.mark.slow
def test_a_worker_that_cannot_switch_onednn_off_is_reported(tmp_path):
    """TensorFlow loaded, oneDNN on, before the worker runs (a sitecustomize on PYTHONPATH, as a site
    might have): TensorFlow reads TF_ENABLE_ONEDNN_OPTS as it loads, before environment.prepare sets
    it to 0. TensorFlow's own IsMklEnabled would then say off; the executed graph says on."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['TF_ENABLE_ONEDNN_OPTS'] = '1'\nimport tensorflow\n")
    result = run_bench(tmp_path / "bench", "--variants", "hvd-1x2-fp32-noonednn", PYTHONPATH=str(site))
    off = in_effect_of(result, "hvd-1x2-fp32-noonednn")
    assert off["tensorflow_loaded_before_prepare"] is True and off["onednn"] is True
    assert variants.mismatches(BY_NAME["hvd-1x2-fp32-noonednn"], [off]) == [
        "oneDNN on, named off (TensorFlow was loaded before environment.prepare set TF_ENABLE_ONEDNN_OPTS)"]
    (launch,) = result["launches"]
    assert launch["ran_as_named"] is False and "oneDNN on, named off" in launch["error"]
    assert result["variants"][0]["median"] is None


@pytest.mark.slow
def test_each_mpi_variant_runs_on_its_own_mpi(tmp_path):
    """The MPICH and Intel MPI variants launch Horovod built against that MPI (scripts/setup.sh test),
    and their ranks say so from inside: the library in their memory map is that MPI's. Where a build
    is missing the bench skips the variant and says why (in CI that fails here)."""
    result = run_bench(tmp_path / "bench", "--variants", "mpich-2x1-fp32,impi-2x1-fp32")
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    if skipped:
        unavailable("; ".join(f"{k}: {v}" for k, v in skipped.items()))
    for name, family in (("mpich-2x1-fp32", "mpich"), ("impi-2x1-fp32", "intel")):
        launch = next(la for la in result["launches"] if la["variant"] == name)
        assert launch["ran_as_named"] is True, launch
        assert [r["mpi"] for r in launch["in_effect"]] == [family, family]
