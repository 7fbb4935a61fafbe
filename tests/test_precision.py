"""Every CPU a scheduler may hand out: the precision is chosen from the CPU and agreed by all ranks,
an impossible bf16 request is one clear error, and the no-bf16 paths run on any machine.

A CPU without native bf16 is made with oneDNN's own ISA cap (ONEDNN_MAX_CPU_ISA), which TensorFlow's
and ITEX's oneDNN both obey: on a bf16 CPU, capped to AVX2, a bf16 convolution fails exactly as on an
AVX2-only CPU ("could not create a primitive descriptor for a convolution forward propagation
primitive"; with ITEX loaded the process aborts in C++). These tests run the real stack under the cap.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fmnist_dist import cpu
from fmnist_dist.errors import SetupError
from conftest import PYTHON, ROOT, SHORT_CONFIG, load, run_env

HERE = cpu.node_facts()          # this CPU, under any cap the whole run was given
NATIVE_BF16 = HERE["native_bf16"]
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
MPI = ["mpirun", "--bind-to", "none"]


def node(host="n1", isa="AVX2", native_bf16=False, cap=None, model="cpu"):
    return {"host": host, "cpu_model": model, "flags": [], "isa_cap": cap, "isa": isa,
            "avx512": isa.startswith("AVX-512") or isa == "AMX", "native_bf16": native_bf16}


# ------------------------------------------------------------------ the decision (no processes)

def test_cpu_levels_follow_the_flags():
    assert cpu.cpu_level(["avx2", "fma"]) == cpu.ONEDNN_ISA_LEVELS["AVX2"]
    avx512 = ["avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"]
    assert cpu.cpu_level(avx512) == cpu.AVX512_LEVEL
    assert cpu.cpu_level(avx512 + ["avx512_bf16"]) == cpu.NATIVE_BF16_LEVEL
    assert cpu.cpu_level(avx512 + ["avx512_bf16", "amx_bf16", "amx_tile"]) == cpu.ONEDNN_ISA_LEVELS["AVX512_CORE_AMX"]


def test_an_isa_cap_lowers_what_this_node_offers():
    capped = cpu.node_facts(AVX2_ONLY)
    assert capped["isa"] == "AVX2" and not capped["native_bf16"] and not capped["avx512"]
    assert capped["isa_cap"] == "ONEDNN_MAX_CPU_ISA=AVX2"
    assert cpu.node_facts({"ONEDNN_MAX_CPU_ISA": "avx512_core"})["native_bf16"] is False
    with pytest.raises(SetupError, match="ONEDNN_MAX_CPU_ISA=AVX3: not a oneDNN ISA name"):
        cpu.node_facts({"ONEDNN_MAX_CPU_ISA": "AVX3"})


def test_auto_is_bf16_only_where_every_node_has_it():
    both = [node("a", "AMX", True), node("b", "AVX-512 BF16", True)]
    assert cpu.resolve_precision("auto", both)["chosen"] == "keras_bf16"
    mixed = [node("a", "AMX", True), node("b", "AVX-512", False)]
    decision = cpu.resolve_precision("auto", mixed)
    assert decision["chosen"] == "fp32"
    assert decision["reason"] == "not every node has native bf16: b has AVX-512"
    assert decision["hosts"] == {"a": "AMX", "b": "AVX-512"}
    assert cpu.resolve_precision("fp32", both)["chosen"] == "fp32"


def test_explicit_bf16_without_native_bf16_names_each_host_lacking_it():
    nodes = [node("a", "AMX", True), node("b", "AVX2", cap="ONEDNN_MAX_CPU_ISA=AVX2", model="EPYC"),
             node("b", "AVX2"), node("c", "AVX-512")]
    for request in ("keras_bf16", "itex_bf16"):
        with pytest.raises(SetupError) as err:
            cpu.resolve_precision(request, nodes)
        message = str(err.value)
        assert message.startswith(f"intel.mixed_precision={request} needs native bf16 (avx512_bf16 or amx_bf16)")
        assert "b (EPYC) has AVX2 under ONEDNN_MAX_CPU_ISA=AVX2" in message and "c (cpu) has AVX-512" in message
        assert "a (" not in message and message.count("b (") == 1


# ------------------------------------------------------------------ the real stack

def run(cmd: list[str], env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**run_env(), **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def train(run_dir: Path, *extra: str) -> list[str]:
    return [PYTHON, "-m", "fmnist_dist", "train", "--run-dir", str(run_dir), "--config", SHORT_CONFIG,
            "--set", "train.epochs=1", "--set", "train.steps_per_epoch=20", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("request_", ["keras_bf16", "itex_bf16"])
def test_explicit_bf16_on_a_cpu_without_it_is_one_line_and_exit_2(tmp_path, request_):
    run_dir = tmp_path / "run"
    proc = run(train(run_dir, "--set", f"intel.mixed_precision={request_}"), AVX2_ONLY, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fmnist-dist: error:")]
    assert len(errors) == 1 and errors[0] == proc.stderr.strip().splitlines()[-1]
    assert f"intel.mixed_precision={request_} needs native bf16" in errors[0]
    assert "has AVX2 under ONEDNN_MAX_CPU_ISA=AVX2" in errors[0] and os.uname().nodename in errors[0]
    assert "dnnl" not in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists(), "refused before the run directory was touched"


@pytest.mark.slow
def test_auto_trains_fp32_on_a_cpu_without_bf16(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train(run_dir), AVX2_ONLY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    env = load(run_dir)["environment"]
    assert env["mixed_precision_policy"] == "float32" and not env["itex_auto_mixed_precision"]
    assert env["precision"]["chosen"] == "fp32" and env["precision"]["requested"] == "auto"
    assert "has AVX2 under ONEDNN_MAX_CPU_ISA=AVX2" in env["precision"]["reason"]
    assert env["nodes"][0]["isa"] == "AVX2" and env["nodes"][0]["native_bf16"] is False
    assert "precision: not every node has native bf16" in proc.stdout
    assert "Precision and CPUs" in (run_dir / "report.md").read_text()


def mixed_job(run_dir: Path, *extra: str) -> list[str]:
    """Two ranks whose CPUs differ: rank 1 is capped to AVX2 (MPMD: one app context per rank)."""
    cmd = train(run_dir, *extra)
    return [*MPI, "-np", "1", *cmd, ":", "-np", "1", "-x", "ONEDNN_MAX_CPU_ISA=AVX2", *cmd]


@pytest.mark.slow
def test_ranks_on_different_cpus_agree_on_the_least_capable(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(mixed_job(run_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = load(run_dir)
    nodes = report["environment"]["nodes"]
    assert [n["isa_cap"] for n in nodes] == [HERE["isa_cap"], "ONEDNN_MAX_CPU_ISA=AVX2"]
    assert nodes[0]["native_bf16"] == NATIVE_BF16 and nodes[1]["native_bf16"] is False
    assert report["environment"]["precision"]["chosen"] == "fp32"
    assert report["environment"]["mixed_precision_policy"] == "float32"
    assert report["segments"][0]["precision"] == "fp32"


@pytest.mark.slow
def test_explicit_bf16_fails_on_every_rank_when_one_rank_lacks_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(mixed_job(run_dir, "--set", "intel.mixed_precision=keras_bf16"), timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stderr.count("fmnist-dist: error: intel.mixed_precision=keras_bf16 needs native bf16") == 1
    assert "dnnl" not in proc.stderr and "Traceback" not in proc.stderr
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE_BF16, reason=f"this CPU has no native bf16 ({HERE['isa']}): "
                    "the bf16 training path is tested on CPUs with avx512_bf16 or AMX")
def test_auto_trains_bf16_where_the_cpu_has_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = run(train(run_dir))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    env = load(run_dir)["environment"]
    assert env["precision"]["chosen"] == "keras_bf16" and env["mixed_precision_policy"] == "mixed_bfloat16"


@pytest.mark.slow
def test_itex_auto_keeps_to_cpus_with_native_bf16(tmp_path):
    """intel.itex=auto loads ITEX only where it pays (cpu.itex_pays); elsewhere the report says why."""
    run_dir = tmp_path / "run"
    proc = run(train(run_dir), AVX2_ONLY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    itex = load(run_dir)["environment"]["itex"]
    assert itex["loaded"] is cpu.itex_pays(cpu.node_facts(AVX2_ONLY))
    if not itex["loaded"]:
        assert itex["reason"].startswith("intel.itex=auto: not used on AVX2")


@pytest.mark.parametrize("opts, changed_after_import, expected", [
    ("1", None, True), ("0", None, False),
    ("1", "0", True),      # switched off after TensorFlow loaded: too late, oneDNN still runs
    ("0", "1", False)])
def test_the_reported_onednn_state_is_what_tensorflow_executes(opts, changed_after_import, expected):
    """report.json's environment.onednn_enabled comes from the ops TensorFlow executes, so a change of
    TF_ENABLE_ONEDNN_OPTS after TensorFlow loaded (which TensorFlow ignores) does not change it."""
    code = ("import os, tensorflow\n"
            + (f"os.environ['TF_ENABLE_ONEDNN_OPTS'] = '{changed_after_import}'\n" if changed_after_import else "")
            + "from fmnist_dist.training import runtime\nprint(runtime.onednn_enabled())\n")
    out = subprocess.run([PYTHON, "-c", code], env=run_env(TF_ENABLE_ONEDNN_OPTS=opts),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == str(expected)
