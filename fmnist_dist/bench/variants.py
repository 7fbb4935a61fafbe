"""The variants the benchmark compares, what each pair of them shows, and how each is launched."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

from .. import mpi

BIND_ARGS = "-bind-to core -map-by core"


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    group: str
    launcher: str            # keras (no Horovod) | single (Horovod, 1 process) | mpi | mpi-bind | gloo | hydra
    ranks: int
    intel: dict = field(default_factory=dict)
    batch: int | None = None  # a per-rank batch of its own (the batch curve); None: the config's
    mpi: str | None = None    # another Horovod build, .venv/mpi/NAME (openmpi, mpich, intel; ccl: scripts/build-oneccl.sh)
    env: dict = field(default_factory=dict)   # variables of its own (e.g. Horovod's CPU operations)

    @property
    def precision(self) -> str:
        return {"fp32": "fp32", "keras_bf16": "bf16 (Keras)", "itex_bf16": "bf16 (ITEX AMP)"}[
            self.intel.get("mixed_precision", "fp32")]

    @property
    def bf16(self) -> bool:
        return self.intel.get("mixed_precision", "fp32") != "fp32"

    def skip_reason(self, node: dict) -> str | None:
        """Why this variant cannot run on this node's CPU (None: it can)."""
        if self.bf16 and not node["native_bf16"]:
            return f"needs native bf16; this CPU offers {node['isa']}" + (f" ({node['isa_cap']})" if node["isa_cap"] else "")
        if self.mpi and mpi_env(self.mpi) is None:
            how = "bash scripts/build-oneccl.sh" if self.mpi == "ccl" else "bash scripts/setup.sh test"
            return f"no Horovod built for {self.mpi} in {venv_dir()}/mpi/{self.mpi} ({how})"
        return None

    def launch_env(self) -> dict:
        """The variables this variant adds to the worker's environment: its MPI's, its own."""
        return {**(mpi_env(self.mpi) or {} if self.mpi else {}), **self.env}


def venv_dir() -> str:
    return os.path.dirname(os.path.dirname(sys.executable))


def mpi_env(name: str) -> dict | None:
    """What .venv/mpi/NAME/env.sh sets (that MPI first on PATH, its Horovod first on PYTHONPATH), or
    None where no Horovod was built against that MPI."""
    if not os.path.exists(os.path.join(venv_dir(), "mpi", name, "site", ".built")):
        return None
    return sourced_env(os.path.join(venv_dir(), "mpi", name, "env.sh"), os.environ.get("PATH", os.defpath))


def sourced_env(env_sh: str, path: str) -> dict:
    """The MPI variables an env.sh sets, sourced by bash on top of `path` (as `module load` would)."""
    out = subprocess.run(["bash", "-c", f'source "{env_sh}" && env -0'], capture_output=True, text=True,
                         env={"PATH": path}, check=True).stdout
    found = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    keep = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "I_MPI_ROOT", "CCL_ROOT", "HOROVOD_CPU_OPERATIONS")
    return {k: found[k] for k in keep if k in found}


FP32 = {"itex": "auto", "onednn": True, "mixed_precision": "fp32"}
VARIANTS = [
    Variant("hvd-1x2-fp32", "1 rank x 2 threads, fp32, ITEX + oneDNN", "baseline", "single", 1, FP32),
    Variant("hvd-1x2-keras-bf16", "1x2, bf16 Keras mixed precision", "precision", "single", 1,
            {**FP32, "mixed_precision": "keras_bf16"}),
    Variant("hvd-1x2-itex-bf16", "1x2, bf16 ITEX auto mixed precision", "precision", "single", 1,
            {**FP32, "itex": "on", "mixed_precision": "itex_bf16"}),
    Variant("hvd-1x2-fp32-noitex", "1x2, fp32, ITEX off (stock TF + oneDNN)", "itex", "single", 1,
            {**FP32, "itex": "off"}),
    Variant("hvd-1x2-keras-bf16-noitex", "1x2, bf16 Keras mixed precision, ITEX off (stock TF + oneDNN)", "itex",
            "single", 1, {**FP32, "itex": "off", "mixed_precision": "keras_bf16"}),
    Variant("hvd-1x2-fp32-noonednn", "1x2, fp32, ITEX off, oneDNN off (TF_ENABLE_ONEDNN_OPTS=0)", "onednn",
            "single", 1, {**FP32, "itex": "off", "onednn": False}),
    Variant("keras-1x2-fp32", "plain Keras, no Horovod, 1 process x 2 threads, fp32", "horovod", "keras", 1, FP32),
    Variant("mpi-2x1-fp32-nobind", "2 ranks x 1 thread, horovodrun --mpi, unbound (intel.bind=off)", "ranks",
            "mpi", 2, {**FP32, "bind": "off"}),
    Variant("mpi-2x1-fp32", "2 ranks x 1 thread, horovodrun --mpi, each rank binds itself (intel.bind=auto)",
            "ranks", "mpi", 2, FP32),
    Variant("mpi-2x1-fp32-bind", "2 ranks x 1 thread, horovodrun --mpi, -bind-to core", "ranks", "mpi-bind", 2,
            FP32),
    Variant("gloo-2x1-fp32", "2 ranks x 1 thread, horovodrun --gloo (intel.bind=auto)", "controller", "gloo", 2, FP32),
    Variant("mpi-2x1-itex-bf16", "2 ranks x 1 thread, bf16 ITEX AMP, horovodrun --mpi", "ranks", "mpi", 2,
            {**FP32, "itex": "on", "mixed_precision": "itex_bf16"}),
    Variant("gloo-2x1-itex-bf16", "2 ranks x 1 thread, bf16 ITEX AMP, horovodrun --gloo", "controller", "gloo", 2,
            {**FP32, "itex": "on", "mixed_precision": "itex_bf16"}),
    Variant("gloo-2x1-keras-bf16", "2 ranks x 1 thread, bf16 Keras, horovodrun --gloo (as make train runs)",
            "controller", "gloo", 2, {**FP32, "mixed_precision": "keras_bf16"}),
    # Hydra's mpirun, not horovodrun: Horovod 0.28.1's horovodrun does not recognise Debian MPICH 4's
    # `mpirun --version` ("HYDRA build details", no "MPICH") and refuses to start.
    Variant("mpich-2x1-fp32", "2 ranks x 1 thread, MPICH's mpirun, Horovod built against MPICH", "mpi",
            "hydra", 2, FP32, mpi="mpich"),
    Variant("impi-2x1-fp32", "2 ranks x 1 thread, Intel MPI's mpirun, Horovod built against Intel MPI", "mpi",
            "hydra", 2, FP32, mpi="intel"),
    Variant("ccl-2x1-fp32", "2 ranks x 1 thread, Intel MPI's mpirun, Horovod's CPU collectives by oneCCL",
            "mpi", "hydra", 2, FP32, mpi="ccl"),
]
BASELINE = "hvd-1x2-fp32"
# (name, what it shows, A, B): ratio = images/s of A / images/s of B, launch by launch.
COMPARISONS = [
    ("keras bf16 / fp32", "bf16 via Keras mixed precision", "hvd-1x2-keras-bf16", "hvd-1x2-fp32"),
    ("ITEX AMP bf16 / fp32", "bf16 via ITEX auto mixed precision", "hvd-1x2-itex-bf16", "hvd-1x2-fp32"),
    ("ITEX AMP bf16 / keras bf16", "the two bf16 routes", "hvd-1x2-itex-bf16", "hvd-1x2-keras-bf16"),
    ("ITEX on / off (fp32)", "Intel Extension for TensorFlow", "hvd-1x2-fp32", "hvd-1x2-fp32-noitex"),
    ("ITEX on / off (keras bf16)", "Intel Extension for TensorFlow under the Keras bf16 policy", "hvd-1x2-keras-bf16",
     "hvd-1x2-keras-bf16-noitex"),
    ("oneDNN on / off (fp32, no ITEX)", "TF_ENABLE_ONEDNN_OPTS=1 vs 0", "hvd-1x2-fp32-noitex",
     "hvd-1x2-fp32-noonednn"),
    ("2x1 / 1x2", "2 ranks x 1 thread (default: self-bound) vs 1 rank x 2 threads", "mpi-2x1-fp32",
     "hvd-1x2-fp32"),
    ("2x1 unbound / 1x2", "2 ranks, intel.bind=off, vs 1 rank x 2 threads", "mpi-2x1-fp32-nobind", "hvd-1x2-fp32"),
    ("2x1 self-bound / unbound", "intel.bind=auto vs off", "mpi-2x1-fp32", "mpi-2x1-fp32-nobind"),
    ("2x1 mpirun-bound / self-bound", "mpirun -bind-to core vs intel.bind=auto", "mpi-2x1-fp32-bind",
     "mpi-2x1-fp32"),
    ("2x1 bf16 / 1x2 bf16", "2 ranks vs 1 rank at ITEX bf16", "mpi-2x1-itex-bf16",
     "hvd-1x2-itex-bf16"),
    ("Gloo / MPI (2x1)", "Horovod controller and collectives", "gloo-2x1-fp32", "mpi-2x1-fp32"),
    ("Gloo / MPI (2x1 bf16)", "the same at ITEX bf16", "gloo-2x1-itex-bf16", "mpi-2x1-itex-bf16"),
    ("MPICH / Open MPI (2x1)", "Horovod over MPICH instead of Open MPI", "mpich-2x1-fp32", "mpi-2x1-fp32"),
    ("Intel MPI / Open MPI (2x1)", "Horovod over Intel MPI instead of Open MPI", "impi-2x1-fp32", "mpi-2x1-fp32"),
    ("oneCCL / Intel MPI (2x1)", "Horovod's collectives by oneCCL instead of Intel MPI", "ccl-2x1-fp32", "impi-2x1-fp32"),
    ("Gloo / Intel MPI (2x1)", "Horovod's Gloo controller instead of Intel MPI", "gloo-2x1-fp32", "impi-2x1-fp32"),
    ("2x1 Gloo bf16 / 1x2 bf16", "2 ranks under Gloo vs 1 rank at ITEX bf16", "gloo-2x1-itex-bf16",
     "hvd-1x2-itex-bf16"),
    ("2x1 Gloo keras bf16 / 1x2 keras bf16", "2 ranks under Gloo vs 1 rank at Keras bf16 (the default recipe)",
     "gloo-2x1-keras-bf16", "hvd-1x2-keras-bf16"),
    ("Horovod / plain Keras (1x2)", "Horovod at 1 rank (a 1-process job skips DistributedOptimizer)", "hvd-1x2-fp32", "keras-1x2-fp32"),
    ("Horovod 2x1 / plain Keras 1x2", "2 Horovod ranks vs the same model without Horovod",
     "mpi-2x1-fp32", "keras-1x2-fp32"),
]
QUICK_VARIANTS = ("keras-1x2-fp32", "mpi-2x1-fp32")  # both launch paths, one comparison
CURVE_IMAGES = 8192         # images per timed launch of the batch curve, whatever the batch


def batch_curve_variants(batches, native_bf16: bool) -> list[Variant]:
    """One rank with one thread, as a rank of the 2x1 default has, at each per-rank batch, in each
    precision this CPU runs natively: the throughput curve train.global_batch_size=auto weighs."""
    precisions = ["fp32"] + (["keras_bf16"] if native_bf16 else [])
    return [Variant(f"curve-{p.split('_')[-1]}-b{b}", f"1 rank x 1 thread, {p}, batch {b}", "batch-curve", "single", 1,
                    {**FP32, "mixed_precision": p, "intra_op_threads": 1}, batch=b)
            for p in precisions for b in batches]


def curve_of(variants: list[Variant], rows: list[dict]) -> dict | None:
    """The batch curve's medians: {"threads": 1, "precisions": {"fp32"|"bf16": {batches, images_per_s}}}."""
    median = {r["name"]: r["median"] for r in rows}
    out: dict = {}
    for v in variants:
        if v.batch is not None and median.get(v.name):
            curve = out.setdefault("fp32" if not v.bf16 else "bf16", {"batches": [], "images_per_s": []})
            curve["batches"].append(v.batch)
            curve["images_per_s"].append(round(median[v.name], 1))
    return {"threads": 1, "precisions": out} if out else None


def launch_command(v: Variant, spec_path: str) -> list[str]:
    worker = [sys.executable, "-m", "fmnist_dist.bench.worker", spec_path]
    if v.launcher in ("keras", "single"):
        return worker
    if v.launcher == "hydra":          # the variant's env.sh puts that MPI's mpirun first on PATH
        return ["mpirun", "-n", str(v.ranks)] + worker
    cmd = [horovodrun_path(), "-np", str(v.ranks)]
    if v.launcher == "gloo":
        return cmd + ["--gloo"] + worker
    cmd.append("--mpi")
    if v.launcher == "mpi-bind":
        cmd.append(f"--binding-args={BIND_ARGS}")
    return cmd + worker


def horovodrun_path() -> str:
    """The venv's horovodrun beside this Python, else the one on PATH (named in the error if none)."""
    beside = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    return beside if os.path.exists(beside) else shutil.which("horovodrun") or "horovodrun"


def display_command(v: Variant) -> str:
    """The launch as a user would type it (the worker stands for a training process)."""
    cmd = launch_command(v, "SPEC.json")
    cmd[cmd.index(sys.executable)] = "python"
    if cmd[0].endswith("horovodrun"):
        cmd[0] = "horovodrun"
    return " ".join(shlex.quote(c) for c in cmd)


def precision_in_effect(record: dict) -> str:
    """A worker's in-effect record (measure.in_effect) in intel.mixed_precision's words: fp32,
    keras_bf16, itex_bf16 (or both bf16 routes, or an unexpected Keras policy's name)."""
    keras = {"float32": None, "mixed_bfloat16": "keras_bf16"}.get(record["mixed_precision_policy"],
                                                                  record["mixed_precision_policy"])
    routes = [r for r in (keras, "itex_bf16" if record["itex_auto_mixed_precision"] else None) if r]
    return " + ".join(routes) or "fp32"


def mismatches(v: Variant, records: list[dict]) -> list[str]:
    """How what a launch's processes ran with (one measure.in_effect record per rank) differs from
    what the variant names: ranks, oneDNN, ITEX, precision and, where the variant gives them, intra-op
    threads. [] when it ran as named. Only what the variant names is judged: a key it leaves to the
    config is not its claim."""
    found: dict[str, list[int]] = {}
    if len(records) != v.ranks:
        found[f"{len(records)} rank(s) reported, named {v.ranks}"] = []
    for rank, record in enumerate(records):
        for what in _record_mismatches(v, record):
            found.setdefault(what, []).append(rank)
    return [what + (f" (rank {', '.join(map(str, ranks))})" if ranks and v.ranks > 1 else "")
            for what, ranks in found.items()]


def _record_mismatches(v: Variant, record: dict) -> list[str]:
    named, out = v.intel, []
    if record["world"] != v.ranks:
        out.append(f"a world of {record['world']} rank(s), named {v.ranks}")
    if "onednn" in named and record["onednn"] != named["onednn"]:
        out.append(f"oneDNN {_on_off(record['onednn'])}, named {_on_off(named['onednn'])}"
                   + (" (TensorFlow was loaded before environment.prepare set TF_ENABLE_ONEDNN_OPTS)"
                      if record.get("tensorflow_loaded_before_prepare") else ""))
    if "itex" in named:
        # auto names what intel.itex=auto decides on this node: the graph must agree with that decision.
        itex_named = {"on": True, "off": False}.get(named["itex"], record["itex_loaded"])
        if record["itex"] != itex_named:
            out.append(f"ITEX {_on_off(record['itex'])} in the executed graph, named intel.itex={named['itex']}"
                       + (f" (reported {'' if record['itex_loaded'] else 'not '}loaded)"
                          if named["itex"] == "auto" else ""))
    precision = precision_in_effect(record)
    if named.get("mixed_precision", "auto") != "auto" and precision != named["mixed_precision"]:
        out.append(f"precision {precision} in effect, named {named['mixed_precision']}")
    if named.get("intra_op_threads") and record["intra_op_threads"] != named["intra_op_threads"]:
        out.append(f"{record['intra_op_threads']} intra-op threads, named {named['intra_op_threads']}")
    family = "intel" if v.mpi == "ccl" else v.mpi     # oneCCL's Horovod runs over Intel MPI
    if family and record.get("mpi") != family:
        out.append(f"{mpi.NAMES.get(record.get('mpi') or '', 'no MPI')} in effect, named {mpi.NAMES[family]}")
    if v.mpi == "ccl" and not record.get("ccl"):
        out.append("no oneCCL in effect, named oneCCL")
    return out


def _on_off(flag: bool) -> str:
    return "on" if flag else "off"
