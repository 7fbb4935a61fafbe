"""`fmnist-dist bench`: every speed option side by side, in one run, on this machine.

Each variant is a real training process (or `horovodrun -np 2` of them) started from this module's
worker, which reuses the training code: `runtime` (environment before TensorFlow, ITEX, Horovod,
threads, precision), `data` (the real Fashion-MNIST and the rank's shard), `train.make_batches`
(the input pipeline), `model.build_model` and `optim` (schedule and optimizer), compiled as
`train.train` compiles it. A process trains `warmup` steps (graph tracing, oneDNN primitive
creation: excluded), waits at a barrier, then trains `steps` timed steps in one `fit` call.
images/s = images of all ranks / the slowest rank's wall-clock time of that `fit`, as the run
report counts it.

Noise on a shared machine: the variants run interleaved (rep 1: A B C ..., rep 2: A B C ..., ...),
so a slow minute hits one launch of every variant rather than all launches of one. Per variant the
median over repetitions and the spread ((max - min) / median); comparisons are medians of the
ratios of launches of the same repetition (neighbours in time). The load is recorded per launch:
the 1-minute load average at its start and the share of the cores other processes used during it
(/proc/stat busy time minus this benchmark's own CPU time).

Peak: a matmul probe (square float32 and bfloat16 matrices, all cores, one process) runs at the
start of every repetition; the best rate seen is the measured peak. Training FLOP/s = images/s x
3 x the model's forward FLOPs per image (`model.flops_per_image`; backward ~ 2x forward), compared
with the peak of the variant's precision.

Outputs: a table on stdout, OUT/bench.json (schema below), OUT/bench.md (Markdown tables, also
printed), OUT/logs/ (every launch's output).

bench.json (schema "fmnist-dist/bench", version 1): started, finished, command, quick, machine
{cpu_model, cores, flags, amx, avx512_bf16}, config (base, resolved), settings {reps, warmup_steps,
steps, batch_size, variants}, model {description, parameters, flops_per_image,
train_flops_per_image}, load {before, waited_s, after, launches_other_cpu_median, ..._max},
peak {fp32_gflops, bf16_gflops, samples [{rep, fp32 [..], bf16 [..]}], n} or null,
variants [{name, title, group, launcher, ranks, threads_per_rank, intel, command,
images_per_s [per rep, null if failed], median, min, max, spread, gflops, peak_fraction,
vs_baseline, environment (of the first good launch)}], comparisons [{name, what, a, b, ratios
[per rep], median, min, max}], launches [{rep, variant, seconds, ok, images_per_s, load1,
other_cpu, log, error, ranks [{rank, threads, affinity, fit_s, steps}]}] in the order they ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from datetime import datetime

from .files import now_iso

SCHEMA = "fmnist-dist/bench"
SCHEMA_VERSION = 1
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join("configs", "default.yaml")
BIND_ARGS = "-bind-to core -map-by core"


@dataclass(frozen=True)
class Variant:
    name: str
    title: str
    group: str
    launcher: str            # keras (no Horovod) | single (Horovod, 1 process) | mpi | mpi-bind | gloo
    ranks: int
    intel: dict = field(default_factory=dict)

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
        return None


FP32 = {"itex": "auto", "onednn": True, "mixed_precision": "fp32"}
VARIANTS = [
    Variant("hvd-1x2-fp32", "1 rank x 2 threads, fp32, ITEX + oneDNN", "baseline", "single", 1, FP32),
    Variant("hvd-1x2-keras-bf16", "1x2, bf16 Keras mixed precision", "precision", "single", 1,
            {**FP32, "mixed_precision": "keras_bf16"}),
    Variant("hvd-1x2-itex-bf16", "1x2, bf16 ITEX auto mixed precision", "precision", "single", 1,
            {**FP32, "itex": "on", "mixed_precision": "itex_bf16"}),
    Variant("hvd-1x2-fp32-noitex", "1x2, fp32, ITEX off (stock TF + oneDNN)", "itex", "single", 1,
            {**FP32, "itex": "off"}),
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
]
BASELINE = "hvd-1x2-fp32"
# (name, what it shows, A, B): ratio = images/s of A / images/s of B, launch by launch.
COMPARISONS = [
    ("keras bf16 / fp32", "bf16 via Keras mixed precision", "hvd-1x2-keras-bf16", "hvd-1x2-fp32"),
    ("ITEX AMP bf16 / fp32", "bf16 via ITEX auto mixed precision", "hvd-1x2-itex-bf16", "hvd-1x2-fp32"),
    ("ITEX AMP bf16 / keras bf16", "the two bf16 routes", "hvd-1x2-itex-bf16", "hvd-1x2-keras-bf16"),
    ("ITEX on / off (fp32)", "Intel Extension for TensorFlow", "hvd-1x2-fp32", "hvd-1x2-fp32-noitex"),
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
    ("2x1 Gloo bf16 / 1x2 bf16", "2 ranks under Gloo vs 1 rank at ITEX bf16", "gloo-2x1-itex-bf16",
     "hvd-1x2-itex-bf16"),
    ("2x1 Gloo keras bf16 / 1x2 keras bf16", "2 ranks under Gloo vs 1 rank at Keras bf16 (the default recipe)",
     "gloo-2x1-keras-bf16", "hvd-1x2-keras-bf16"),
    ("Horovod / plain Keras (1x2)", "Horovod's overhead at 1 rank", "hvd-1x2-fp32", "keras-1x2-fp32"),
    ("Horovod 2x1 / plain Keras 1x2", "2 Horovod ranks vs the same model without Horovod",
     "mpi-2x1-fp32", "keras-1x2-fp32"),
]
QUICK_VARIANTS = ("keras-1x2-fp32", "mpi-2x1-fp32")  # both launch paths, one comparison


# ------------------------------------------------------------------------------------- the CLI

def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side training throughput of the Intel and Horovod options",
                       description="Launch short training processes for every variant (fp32 vs bf16 Keras vs "
                       "bf16 ITEX AMP, ITEX on/off, oneDNN on/off, 1x2 vs 2x1 with and without binding, MPI "
                       "vs Gloo, plain Keras), interleaved over repetitions; probe the matmul peak; write "
                       "a table, OUT/bench.json and OUT/bench.md.")
    p.add_argument("--config", default=None,
                   help=f"config whose model, batch size and data settings are benchmarked (default "
                   f"{DEFAULT_CONFIG}); each variant sets the intel.* keys itself")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.batch_size=256")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per launch (default 20)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per launch and rank (default 100)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of variant names (see --list); default all")
    p.add_argument("--list", action="store_true", help="list the variants and comparisons, then exit")
    p.add_argument("--quick", action="store_true",
                   help=f"tiny smoke run: {', '.join(QUICK_VARIANTS)}; 1 repetition, a few steps, small peak probe")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak probe")
    p.add_argument("--out", default=None, help="output directory (default runs/bench-<time>)")
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="before starting, wait until the 1-minute load average is at most this (default 1.0)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="give up waiting for a quiet machine after this many seconds (default 300; quick 0)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a launch is killed (default 900)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import config as config_mod

    if args.list:
        width = max(len(v.name) for v in VARIANTS)
        for v in VARIANTS:
            print(f"{v.name:{width}s} {v.launcher:9s} {v.ranks} rank(s)  {v.title}")
        print()
        width = max(len(c[0]) for c in COMPARISONS)
        for name, what, a, b in COMPARISONS:
            print(f"{name:{width}s} {a} / {b}  ({what})")
        return 0
    quick = args.quick
    config_path = args.config or (DEFAULT_CONFIG if os.path.exists(os.path.join(ROOT, DEFAULT_CONFIG)) else None)
    overrides = list(args.overrides)
    if quick and not any(o.startswith("train.batch_size=") for o in overrides):
        overrides.append("train.batch_size=64")
    if config_path and not os.path.exists(config_path) and os.path.exists(os.path.join(ROOT, config_path)):
        config_path = os.path.join(ROOT, config_path)
    cfg = config_mod.load(config_path, overrides)
    names = args.variants.split(",") if args.variants else list(QUICK_VARIANTS if quick else [v.name for v in VARIANTS])
    unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
    if unknown:
        raise config_mod.ConfigError(f"--variants: unknown {', '.join(unknown)}; "
                                     f"choose from {', '.join(v.name for v in VARIANTS)}")
    settings = {
        "reps": args.reps or (1 if quick else 3),
        "warmup_steps": args.warmup_steps or (3 if quick else 20),
        "steps": args.steps or (5 if quick else 100),
        "batch_size": cfg["train"]["batch_size"],
        "variants": names,
        "peak": not args.no_peak,
        "peak_n": 512 if quick else 2048,
        "peak_calls": 3 if quick else 8,
        "timeout": args.timeout,
    }
    out = args.out or os.path.join("runs", f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    result = run_bench(cfg, config_path, overrides, settings, out, quick,
                       quiet_load=args.quiet_load, quiet_wait=0.0 if quick and args.quiet_wait is None
                       else (300.0 if args.quiet_wait is None else args.quiet_wait))
    print()
    print(text_table(result))
    md = markdown(result)
    print()
    print(md)
    print(f"bench: {os.path.join(out, 'bench.json')}, {os.path.join(out, 'bench.md')}, logs in {os.path.join(out, 'logs')}")
    failed = [v["name"] for v in result["variants"] if v["median"] is None]
    return 1 if failed and len(failed) == len(result["variants"]) else 0


# ------------------------------------------------------------------------- running the launches

def run_bench(cfg: dict, config_path: str | None, overrides: list[str], settings: dict, out: str,
              quick: bool, quiet_load: float = 1.0, quiet_wait: float = 0.0, log=print) -> dict:
    from . import config as config_mod

    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    started = now_iso()
    load_before, waited = wait_for_quiet(quiet_load, quiet_wait, log)
    machine = machine_info()
    chosen = [v for v in VARIANTS if v.name in settings["variants"]]
    skipped = [{"name": v.name, "reason": v.skip_reason(machine)} for v in chosen if v.skip_reason(machine)]
    variants = [v for v in chosen if not v.skip_reason(machine)]
    base_yaml = os.path.join(out, "base-config.yaml")
    with open(base_yaml, "w", encoding="utf-8") as f:
        f.write(config_mod.dump(cfg))
    result = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": started, "finished": None,
        "command": " ".join(shlex.quote(a) for a in sys.argv), "quick": quick, "host": socket.gethostname(),
        "machine": machine, "config_file": config_path, "overrides": overrides, "config": cfg,
        "settings": settings, "model": None,
        "load": {"before": load_before, "waited_s": waited, "quiet_load": quiet_load},
        "peak": None, "variants": [], "skipped": skipped, "comparisons": [], "launches": [],
    }
    log(f"bench on {machine_line(machine)}")
    for skip in skipped:
        log(f"bench: skipped {skip['name']}: {skip['reason']}")
    log(f"bench: {len(variants)} variants x {settings['reps']} repetitions, {settings['warmup_steps']} warm-up + "
        f"{settings['steps']} timed steps of batch {settings['batch_size']} per rank; load average "
        f"{' '.join(f'{x:.2f}' for x in load_before)}" + (f" (waited {waited:.0f} s)" if waited else ""))
    peak_samples = []
    per_variant: dict[str, list] = {v.name: [None] * settings["reps"] for v in variants}
    environments: dict[str, dict] = {}
    for rep in range(settings["reps"]):
        if settings["peak"]:
            spec = {"mode": "peak", "config": base_yaml, "overrides": [f"intel.{k}={_yaml(v)}" for k, v in FP32.items()],
                    "n": settings["peak_n"], "calls": settings["peak_calls"]}
            launch = run_launch(spec, "peak", Variant("peak", "matmul peak", "peak", "keras", 1, FP32), rep, out,
                                settings["timeout"])
            result["launches"].append(launch)
            if launch["ok"]:
                peak_samples.append({"rep": rep + 1, **launch["result"]["peak"]})
                log(f"[rep {rep + 1}] peak probe: " + ", ".join(
                    f"{key} {max(values):.0f} GFLOP/s" for key, values in launch["result"]["peak"].items()
                    if key in ("fp32", "bf16") and values))
            else:
                log(f"[rep {rep + 1}] peak probe failed: {launch['error']}")
            launch.pop("result", None)
        for v in variants:
            spec = {"mode": "train", "config": base_yaml,
                    "overrides": [f"intel.{k}={_yaml(val)}" for k, val in v.intel.items()],
                    "horovod": v.launcher != "keras", "warmup_steps": settings["warmup_steps"],
                    "steps": settings["steps"]}
            launch = run_launch(spec, v.name, v, rep, out, settings["timeout"])
            if launch["ok"]:
                r = launch.pop("result")
                per_variant[v.name][rep] = launch["images_per_s"] = r["images_per_s"]
                launch["ranks"] = [{k: x[k] for k in ("rank", "threads", "affinity", "fit_s", "steps")}
                                   for x in r["ranks"]]
                environments.setdefault(v.name, r["environment"])
                if result["model"] is None:
                    result["model"] = r["model"]
            else:
                launch.pop("result", None)
            result["launches"].append(launch)
            log(f"[rep {rep + 1}/{settings['reps']}] {v.name:24s} "
                + (f"{launch['images_per_s']:8.0f} images/s" if launch["ok"] else f"FAILED ({launch['error']})")
                + f"   {launch['seconds']:.0f} s, load {launch['load1']:.2f}, other processes "
                f"{100 * launch['other_cpu']:.0f}% of the cores")
    result["load"]["after"] = _loadavg()
    others = [la["other_cpu"] for la in result["launches"] if la.get("other_cpu") is not None]
    result["load"]["launches_other_cpu_median"] = statistics.median(others) if others else None
    result["load"]["launches_other_cpu_max"] = max(others) if others else None
    result["load"]["launches_load1_median"] = statistics.median([la["load1"] for la in result["launches"]])
    if peak_samples:
        result["peak"] = {"fp32_gflops": max(x for s in peak_samples for x in s["fp32"]),
                          "bf16_gflops": max((x for s in peak_samples for x in s["bf16"]), default=None),
                          "n": settings["peak_n"], "samples": peak_samples}
    result["variants"] = summarize_variants(variants, per_variant, environments, result["model"], result["peak"])
    result["comparisons"] = compare(per_variant)
    result["finished"] = now_iso()
    with open(os.path.join(out, "bench.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    with open(os.path.join(out, "bench.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    return result


def launch_command(v: Variant, spec_path: str) -> list[str]:
    worker = [sys.executable, "-m", "fmnist_dist.bench", "--worker", spec_path]
    if v.launcher in ("keras", "single"):
        return worker
    horovodrun = os.path.join(os.path.dirname(sys.executable), "horovodrun")
    cmd = [horovodrun if os.path.exists(horovodrun) else "horovodrun", "-np", str(v.ranks)]
    if v.launcher == "gloo":
        return cmd + ["--gloo"] + worker
    cmd.append("--mpi")
    if v.launcher == "mpi-bind":
        cmd.append(f"--binding-args={BIND_ARGS}")
    return cmd + worker


def display_command(v: Variant) -> str:
    """The launch as a user would type it (the worker stands for a training process)."""
    cmd = launch_command(v, "SPEC.json")
    cmd[cmd.index(sys.executable)] = "python"
    if cmd[0].endswith("horovodrun"):
        cmd[0] = "horovodrun"
    return " ".join(shlex.quote(c) for c in cmd)


def child_env() -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for name in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "ITEX_AUTO_MIXED_PRECISION",
                 "ITEX_AUTO_MIXED_PRECISION_DATA_TYPE", "HOROVOD_TIMELINE", "FMNIST_THREADS"):
        env.pop(name, None)  # each worker sets these from its variant
    return env


def run_launch(spec: dict, name: str, v: Variant, rep: int, out: str, timeout: float) -> dict:
    logs = os.path.join(out, "logs")
    fd, result_path = tempfile.mkstemp(prefix=f"{name}-", suffix=".json", dir=logs)
    os.close(fd)
    os.unlink(result_path)
    spec = {**spec, "result": os.path.abspath(result_path)}
    spec_path = os.path.join(logs, f"rep{rep + 1}-{name}.spec.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    log_path = os.path.join(logs, f"rep{rep + 1}-{name}.log")
    cmd = launch_command(v, os.path.abspath(spec_path))
    load1 = _loadavg()[0]
    cpu0, ours0, t0 = _cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    error = None
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        logf.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=logf, stderr=subprocess.STDOUT,
                                  timeout=timeout)
            if proc.returncode != 0:
                error = f"exit {proc.returncode}: {_last_line(log_path)}"
        except subprocess.TimeoutExpired:
            error = f"killed after the {timeout:g} s timeout"
    seconds = time.perf_counter() - t0
    cpu1, ours1 = _cpu_busy_s(), _children_cpu_s()
    other = max(0.0, (cpu1 - cpu0) - (ours1 - ours0)) / (seconds * (os.cpu_count() or 1)) if seconds > 0 else None
    launch = {"rep": rep + 1, "variant": name, "command": " ".join(shlex.quote(c) for c in cmd),
              "seconds": seconds, "ok": False, "images_per_s": None, "load1": load1,
              "other_cpu": min(1.0, other) if other is not None else None,
              "log": os.path.relpath(log_path, out), "error": error}
    if error is None:
        try:
            with open(result_path, encoding="utf-8") as f:
                launch["result"] = json.load(f)
            launch["ok"] = True
        except (OSError, ValueError) as e:
            launch["error"] = f"no result written ({e}); see {log_path}"
    if os.path.exists(result_path):
        os.unlink(result_path)
    return launch


def wait_for_quiet(threshold: float, max_wait: float, log=print) -> tuple[list[float], float]:
    """Wait (bounded) until the 1-minute load average is at most threshold; returns the load average
    when the benchmark starts and the seconds waited."""
    t0 = time.monotonic()
    load = _loadavg()
    if max_wait > 0 and load[0] > threshold:
        log(f"bench: load average {load[0]:.2f} > {threshold:g}: waiting up to {max_wait:.0f} s for a quieter machine")
        while load[0] > threshold and time.monotonic() - t0 < max_wait:
            time.sleep(min(10.0, max(0.0, max_wait - (time.monotonic() - t0))))
            load = _loadavg()
    return load, time.monotonic() - t0


# ---------------------------------------------------------------------------------- statistics

def stats(values: list) -> dict:
    good = [x for x in values if x is not None]
    if not good:
        return {"median": None, "min": None, "max": None, "spread": None}
    med = statistics.median(good)
    return {"median": med, "min": min(good), "max": max(good),
            "spread": (max(good) - min(good)) / med if med else None}


def summarize_variants(variants: list[Variant], per_variant: dict, environments: dict, model: dict | None,
                       peak: dict | None) -> list[dict]:
    base = per_variant.get(BASELINE)
    rows = []
    for v in variants:
        s = stats(per_variant[v.name])
        train_flops = model["train_flops_per_image"] if model else None
        gflops = s["median"] * train_flops / 1e9 if s["median"] is not None and train_flops else None
        peak_value = (peak or {}).get("bf16_gflops" if v.bf16 else "fp32_gflops")
        vs = None
        if base and v.name != BASELINE:
            ratios = [a / b for a, b in zip(per_variant[v.name], base) if a and b]
            vs = statistics.median(ratios) if ratios else None
        elif base and v.name == BASELINE and s["median"] is not None:
            vs = 1.0
        rows.append({"name": v.name, "title": v.title, "group": v.group, "launcher": v.launcher,
                     "ranks": v.ranks, "threads_per_rank": (environments.get(v.name) or {}).get(
                         "intra_op_threads") or max(1, (os.cpu_count() or 1) // v.ranks),
                     "precision": v.precision, "intel": v.intel, "command": display_command(v),
                     "images_per_s": per_variant[v.name], **s, "gflops": gflops,
                     "peak_fraction": gflops / peak_value if gflops and peak_value else None,
                     "peak_used": "bf16" if v.bf16 else "fp32",
                     "vs_baseline": vs, "environment": environments.get(v.name)})
    return rows


def compare(per_variant: dict) -> list[dict]:
    out = []
    for name, what, a, b in COMPARISONS:
        if a not in per_variant or b not in per_variant:
            continue
        ratios = [x / y if x and y else None for x, y in zip(per_variant[a], per_variant[b])]
        out.append({"name": name, "what": what, "a": a, "b": b, "ratios": ratios, **_ratio_stats(ratios)})
    return out


def _ratio_stats(ratios: list) -> dict:
    s = stats(ratios)
    return {"median": s["median"], "min": s["min"], "max": s["max"]}


# ------------------------------------------------------------------------------------- output

def _f(x, fmt: str = "{:.0f}", none: str = "—") -> str:
    return none if x is None else fmt.format(x)


def _load_line(result: dict) -> str:
    load = result["load"]
    before = " ".join(f"{x:.2f}" for x in load["before"])
    line = f"load average before the run {before} (1/5/15 min)"
    if (load.get("waited_s") or 0) >= 1:
        line += f" after waiting {load['waited_s']:.0f} s"
    if load.get("launches_other_cpu_median") is not None:
        line += (f"; other processes used {100 * load['launches_other_cpu_median']:.0f}% of the cores during "
                 f"the median launch (max {100 * load['launches_other_cpu_max']:.0f}%)")
    return line


def _peak_line(result: dict) -> str:
    peak, model = result["peak"], result["model"]
    parts = []
    if peak:
        parts.append(f"matmul peak (best of {sum(len(s['fp32']) for s in peak['samples'])} probes, "
                     f"{peak['n']}x{peak['n']}, 2 threads): fp32 {peak['fp32_gflops']:.0f} GFLOP/s, "
                     + (f"bf16 {peak['bf16_gflops']:.0f} GFLOP/s" if peak["bf16_gflops"] else "bf16 not measured "
                        "(no native bf16)"))
    if model:
        parts.append(f"model {model['description']}: {model['flops_per_image'] / 1e6:.2f} MFLOP/image forward, "
                     f"training ~3x = {model['train_flops_per_image'] / 1e6:.1f} MFLOP/image")
    return "; ".join(parts)


def text_table(result: dict) -> str:
    m = result["machine"]
    lines = [f"fmnist-dist bench on {result['host']}: {machine_line(m)}",
             f"batch {result['settings']['batch_size']}/rank, {result['settings']['reps']} interleaved repetitions, "
             f"{result['settings']['warmup_steps']} warm-up + {result['settings']['steps']} timed steps per launch",
             _load_line(result), _peak_line(result), ""]
    head = f"{'variant':24s} {'ranks':>5s} {'precision':>15s} {'images/s':>9s} {'spread':>7s} {'vs base':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"
    lines += [head, "-" * len(head)]
    for v in result["variants"]:
        lines.append(f"{v['name']:24s} {v['ranks']}x{v['threads_per_rank']:<3d} {v['precision']:>15s} "
                     f"{_f(v['median']):>9s} {_f(v['spread'], '{:.0%}'):>7s} {_f(v['vs_baseline'], '{:.2f}x'):>8s} "
                     f"{_f(v['gflops']):>8s} {_f(v['peak_fraction'], '{:.0%}'):>8s}")
    lines += [f"{v['name']:24s} skipped: {v['reason']}" for v in result.get("skipped", [])]
    if result["comparisons"]:
        lines += ["", f"{'comparison (same repetition, A/B)':40s} {'median':>7s} {'min':>6s} {'max':>6s}"]
        for c in result["comparisons"]:
            lines.append(f"{c['name']:40s} {_f(c['median'], '{:.2f}x'):>7s} {_f(c['min'], '{:.2f}'):>6s} "
                         f"{_f(c['max'], '{:.2f}'):>6s}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"Benchmark (`python -m fmnist_dist bench{' --quick' if result['quick'] else ''}`), {result['started']}: "
             f"{machine_line(m)}. "
             f"Batch {s['batch_size']} per rank; {s['reps']} interleaved repetitions of {s['warmup_steps']} "
             f"warm-up (excluded) + {s['steps']} timed steps per launch; median images/s, spread = "
             f"(max - min) / median. {_load_line(result)}.", "",
             "| variant | ranks x threads | precision | ITEX | oneDNN | images/s (median) | spread | vs baseline "
             "| GFLOP/s | of peak |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for v in result["variants"]:
        env = v.get("environment") or {}
        itex = "on" if (env.get("itex") or {}).get("loaded") else ("off" if env else v["intel"].get("itex", "?"))
        onednn = ("on" if env.get("onednn_enabled") else "off") if env else ("on" if v["intel"].get("onednn") else "off")
        lines.append(f"| {v['title']} (`{v['name']}`) | {v['ranks']} x {v['threads_per_rank']} | {v['precision']} | "
                     f"{itex} | {onednn} | {_f(v['median'])} | {_f(v['spread'], '{:.0%}')} | "
                     f"{_f(v['vs_baseline'], '{:.2f}x')} | {_f(v['gflops'])} | "
                     f"{_f(v['peak_fraction'], '{:.0%}')} {v['peak_used'] if v['peak_fraction'] is not None else ''} |")
    if result.get("skipped"):
        lines += ["", "Skipped on this CPU: " + "; ".join(f"`{v['name']}` ({v['reason']})" for v in result["skipped"]) + "."]
    if result["comparisons"]:
        lines += ["", "| comparison (launches of the same repetition) | A / B, median | min | max |",
                  "|---|---:|---:|---:|"]
        for c in result["comparisons"]:
            lines.append(f"| {c['name']}: {c['what']} | {_f(c['median'], '{:.2f}x')} | {_f(c['min'], '{:.2f}')} | "
                         f"{_f(c['max'], '{:.2f}')} |")
    peak = _peak_line(result)
    if peak:
        lines += ["", peak + ". GFLOP/s = images/s x training FLOPs per image; \"of peak\" compares it with the "
                  "measured matmul peak of the variant's precision."]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- the machine

def machine_info() -> dict:
    from . import cpu

    node = cpu.node_facts()
    return {"cpu_model": node["cpu_model"], "cores": os.cpu_count(), "flags": node["flags"], "isa": node["isa"],
            "isa_cap": node["isa_cap"], "native_bf16": node["native_bf16"], "avx512": node["avx512"],
            "avx512f": "avx512f" in node["flags"], "avx512_bf16": "avx512_bf16" in node["flags"],
            "amx": any(f.startswith("amx") for f in node["flags"])}


def machine_line(m: dict) -> str:
    """The CPU as the kernels see it: the ISA oneDNN may use (after any ONEDNN_MAX_CPU_ISA cap)."""
    cap = f" ({m['isa_cap']})" if m.get("isa_cap") else ""
    return (f"{m['cpu_model']}, {m['cores']} cores, ISA {m['isa']}{cap}, native bf16 "
            f"{'yes' if m['native_bf16'] else 'no'}, AMX {'yes' if m['amx'] else 'no'}")


def _loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return [0.0, 0.0, 0.0]


def _cpu_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all processes, incl. steal), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in parts[1:9])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return 0.0


def _children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "rror" in line]
    return (errors or lines or [""])[-1][:300]


def _yaml(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)




# ---------------------------------------------------------------------------- the worker side

def worker_main(spec_path: str) -> int:
    from . import config as config_mod

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    ns = config_mod.namespace(config_mod.load(spec["config"], spec["overrides"]))
    if spec["mode"] == "peak":
        result = peak_probe(ns, spec["n"], spec["calls"])
    else:
        result = throughput(ns, spec["horovod"], spec["warmup_steps"], spec["steps"])
    if result is not None:
        with open(spec["result"], "w", encoding="utf-8") as f:
            json.dump(result, f)
    return 0


def start_without_horovod(ns):
    """runtime.start minus Horovod: the same environment, ITEX, threads and precision decision."""
    from . import cpu, runtime

    node = cpu.node_facts()
    tf, itex = runtime.start_tensorflow(ns.intel, node)
    threads = int(os.environ["FMNIST_THREADS"])
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(ns.intel.inter_op_threads)
    runtime.set_precision(tf, ns.intel.mixed_precision, [node], itex)
    return tf, itex, threads


_WORKER_T0 = time.perf_counter()


def _stage(what: str) -> None:
    """A progress line into the launch's log: seconds since the worker module was imported."""
    print(f"bench worker pid {os.getpid()}: {time.perf_counter() - _WORKER_T0:7.1f} s  {what}", file=sys.stderr,
          flush=True)


def throughput(ns, horovod: bool, warmup_steps: int, steps: int) -> dict | None:
    _stage("start")
    from . import data as data_mod
    from . import runtime
    from .train import make_batches, make_step_timer

    if horovod:
        rt = runtime.start(ns)
        import tensorflow as tf
        hvd, rank, world, threads, environment = rt.hvd, rt.rank, rt.size, rt.threads, rt.environment
    else:
        tf, itex, threads = start_without_horovod(ns)
        hvd, rank, world = None, 0, 1
        environment = {"itex": itex, "onednn_enabled": runtime.onednn_enabled(), "horovod_controller": None,
                       "mixed_precision_policy": tf.keras.mixed_precision.global_policy().name,
                       "itex_auto_mixed_precision": os.environ.get("ITEX_AUTO_MIXED_PRECISION") == "1"
                       and itex["loaded"],
                       "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads()}
    from .config import describe_layers
    from .model import build_model, flops_per_image
    from .optim import lr_schedule, make_optimizer

    _stage(f"TensorFlow{' and Horovod' if horovod else ''} ready, {threads} threads")
    t = ns.train
    dataset = data_mod.load_fashion_mnist(ns.data.dir, ns.data.download, ns.data.cache_dir, ns.data.url,
                                          progress=False)
    train_idx, _ = data_mod.split_train_val(len(dataset.y_train), ns.data.val_size, t.seed)
    shard = data_mod.epoch_shard(train_idx, 1, t.seed, rank, world, t.batch_size)
    batches = make_batches(tf, dataset.x_train[shard], dataset.y_train[shard], t, 1, rank).repeat()

    # As train.train builds and compiles the model.
    tf.keras.utils.set_random_seed(t.seed)
    model = build_model(ns.model.layers, t.seed)
    optimizer = make_optimizer(t, lr_schedule(t, world, data_mod.steps_per_epoch(len(train_idx), world,
                                                                                  t.batch_size)))
    if hvd is not None:
        optimizer = hvd.DistributedOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=t.label_smoothing),
                  metrics=["accuracy"])
    optimizer.build(model.trainable_variables)
    callbacks = []
    if hvd is not None:
        rt.hvd_tf.broadcast_variables(model.variables + optimizer.variables(), root_rank=0)
        callbacks.append(hvd.callbacks.MetricAverageCallback())
    timer = make_step_timer(tf)
    _stage("data and model ready")
    # The dataset itself, as train.train passes it: given a Python iterator, Keras wraps it as a
    # generator, and steps then waited for it in multiples of ~85 ms (measured: 5.1, 10.3, 20.5 s
    # for 60 steps whatever the variant).
    model.fit(batches, epochs=1, steps_per_epoch=warmup_steps, callbacks=callbacks + [timer], verbose=0)
    warm_step_s = timer.step_s
    _stage(f"{warmup_steps} warm-up steps done")
    if hvd is not None:
        hvd.allreduce(tf.constant(0.0), name="bench_barrier")
    t0 = time.perf_counter()
    model.fit(batches, epochs=1, steps_per_epoch=steps, callbacks=callbacks + [timer], verbose=0)
    fit_s = time.perf_counter() - t0
    _stage(f"{steps} timed steps done in {fit_s:.2f} s")
    mine = {"rank": rank, "fit_s": fit_s, "step_s": timer.step_s, "steps": timer.steps, "warmup_step_s": warm_step_s,
            "threads": threads, "affinity": sorted(os.sched_getaffinity(0)), "pid": os.getpid()}
    ranks = rt.hvd_tf.allgather_object(mine) if hvd is not None else [mine]
    if rank != 0:
        return None
    slowest = max(r["fit_s"] for r in ranks)
    images = sum(r["steps"] for r in ranks) * t.batch_size
    fpi = flops_per_image(model)
    keep = ("itex", "onednn_enabled", "horovod_controller", "mixed_precision_policy", "itex_auto_mixed_precision",
            "intra_op_threads")
    return {"images_per_s": images / slowest, "fit_s": slowest, "images": images, "world": world,
            "batch_size": t.batch_size, "ranks": sorted(ranks, key=lambda r: r["rank"]),
            "environment": {k: environment.get(k) for k in keep},
            "model": {"description": describe_layers(ns.model.layers), "parameters": int(model.count_params()),
                      "flops_per_image": fpi, "train_flops_per_image": 3 * fpi}}


def peak_probe(ns, n: int, calls: int, rounds: int = 3) -> dict:
    """GFLOP/s of n x n matmuls in float32 and bfloat16 with all of this process's threads;
    rounds alternate the two types, each the best of `calls` timed calls after one warm-up."""
    from . import cpu

    tf, itex, threads = start_without_horovod(ns)
    out = {"fp32": [], "bf16": [], "threads": threads, "itex": itex["loaded"]}
    mats = {}
    dtypes = [("fp32", tf.float32)] + ([("bf16", tf.bfloat16)] if cpu.node_facts()["native_bf16"] else [])
    for key, dtype in dtypes:
        a = tf.cast(tf.random.stateless_uniform((n, n), seed=[1, 2], minval=-1, maxval=1), dtype)
        b = tf.cast(tf.random.stateless_uniform((n, n), seed=[3, 4], minval=-1, maxval=1), dtype)
        mats[key] = (a, b)

    @tf.function
    def mm(a, b):
        return tf.matmul(a, b)[0, 0]

    for key in mats:
        mm(*mats[key]).numpy()  # trace and warm up
    for _ in range(rounds):
        for key, (a, b) in mats.items():
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                mm(a, b).numpy()
                times.append(time.perf_counter() - t0)
            out[key].append(2 * n ** 3 / min(times) / 1e9)
    return {"peak": out}


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
    sys.exit("usage: python -m fmnist_dist.bench --worker SPEC.json (internal; use `python -m fmnist_dist bench`)")
