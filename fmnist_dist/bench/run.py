"""Running the benchmark: the launches, interleaved over repetitions, each a real process."""
from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from .. import config as config_mod
from ..files import atomic_write, now_iso
from .render import machine_line, markdown
from .stats import compare, count_if_ran_as_named, summarize_variants
from .variants import CURVE_IMAGES, FP32, VARIANTS, Variant, batch_curve_variants, curve_of, launch_command

SCHEMA = "fmnist-dist/bench"
SCHEMA_VERSION = 1
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_bench(cfg: dict, config_path: str | None, overrides: list[str], settings: dict, out: str,
              quick: bool, quiet_load: float = 1.0, quiet_wait: float = 0.0, log=print) -> dict:
    out = os.path.abspath(out)          # the workers run from the project directory, not the caller's
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    started = now_iso()
    load_before, waited = wait_for_quiet(quiet_load, quiet_wait, log)
    machine = machine_info()
    chosen = [v for v in VARIANTS if v.name in settings["variants"]]
    chosen += batch_curve_variants(settings.get("batch_curve") or (), machine["native_bf16"])
    skipped = [{"name": v.name, "reason": v.skip_reason(machine)} for v in chosen if v.skip_reason(machine)]
    variants = [v for v in chosen if not v.skip_reason(machine)]
    base_yaml = os.path.join(out, "base-config.yaml")
    with open(base_yaml, "w", encoding="utf-8") as f:
        f.write(config_mod.dump(cfg))
    result = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": started, "finished": None,
        "command": command_line(), "quick": quick, "host": socket.gethostname(),
        "machine": machine, "config_file": config_path, "overrides": overrides, "config": cfg,
        "settings": settings, "model": None,
        "load": {"before": load_before, "waited_s": waited, "quiet_load": quiet_load},
        "peak": None, "variants": [], "skipped": skipped, "comparisons": [], "launches": [], "layers": [],
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
            launch, r = launch_variant(v, base_yaml, settings, rep, out)
            if r is not None:
                per_variant[v.name][rep] = launch["images_per_s"]
                environments.setdefault(v.name, r["environment"])
                if result["model"] is None:
                    result["model"] = r["model"]
            result["launches"].append(launch)
            log(f"[rep {rep + 1}/{settings['reps']}] {v.name:24s} "
                + (f"{launch['images_per_s']:8.0f} images/s" if launch["ok"] else f"FAILED ({launch['error']})")
                + f"   {launch['seconds']:.0f} s, load {launch['load1']:.2f}, other processes "
                f"{100 * launch['other_cpu']:.0f}% of the cores")
    if settings.get("layers"):
        result["layers"] = profile_layers(base_yaml, settings, machine, out, result["launches"], log)
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
    result["batch_curve"] = curve_of(variants, result["variants"])
    result["finished"] = now_iso()
    atomic_write(os.path.join(out, "bench.json"), json.dumps(result, indent=2) + "\n")
    atomic_write(os.path.join(out, "bench.md"), markdown(result) + "\n")
    return result


def launch_variant(v: Variant, base_yaml: str, settings: dict, rep: int, out: str) -> tuple[dict, dict | None]:
    """One timed launch of a variant: (the launch record, the worker's result or None)."""
    spec = {"mode": "train", "config": base_yaml,
            "overrides": [f"intel.{k}={_yaml(val)}" for k, val in v.intel.items()]
            + ([f"train.batch_size={v.batch}", "train.global_batch_size=null"] if v.batch else []),
            "horovod": v.launcher != "keras", "warmup_steps": settings["warmup_steps"],
            "steps": max(10, CURVE_IMAGES // v.batch) if v.batch else settings["steps"]}
    launch = run_launch(spec, v.name, v, rep, out, settings["timeout"])
    r = launch.pop("result", None)
    if not launch["ok"]:
        r = None
    r = count_if_ran_as_named(v, launch, r)   # a launch that did not run as named is an error, not its figure
    if r is not None:
        launch["images_per_s"] = r["images_per_s"]
        launch["ranks"] = [{k: x[k] for k in ("rank", "threads", "affinity", "fit_s", "steps")} for x in r["ranks"]]
    return launch, r


def profile_layers(base_yaml: str, settings: dict, machine: dict, out: str, launches: list, log=print) -> list[dict]:
    """One single-thread process per precision this CPU runs natively (a rank of the 2x1 default
    has one thread): each layer's forward and backward time, against that thread's matmul peak."""
    precisions = ["fp32"] + (["keras_bf16"] if machine["native_bf16"] else [])
    profiles = []
    for precision in precisions:
        intel = {**FP32, "mixed_precision": precision, "intra_op_threads": 1}
        v = Variant(f"layers-{precision}", f"layer profile, {precision}", "layers", "keras", 1, intel)
        spec = {"mode": "layers", "config": base_yaml, "overrides": [f"intel.{k}={_yaml(x)}" for k, x in intel.items()],
                "batch": settings["batch_size"], "calls": settings["layer_calls"]}
        launch = run_launch(spec, v.name, v, 0, out, settings["timeout"])
        if launch["ok"]:
            profiles.append(launch.pop("result")["layers"])
            log(f"layer profile {precision}: whole step {1e3 * profiles[-1]['whole_step_s']:.1f} ms, "
                f"sum of layers {1e3 * profiles[-1]['sum_of_layers_s']:.1f} ms")
        else:
            launch.pop("result", None)
            log(f"layer profile {precision} FAILED ({launch['error']})")
        launches.append(launch)
    return profiles


def child_env() -> dict:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3"),
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    for name in ("TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "ITEX_AUTO_MIXED_PRECISION",
                 "ITEX_AUTO_MIXED_PRECISION_DATA_TYPE", "HOROVOD_TIMELINE", "FMNIST_THREADS", "FMNIST_BOUND_BY"):
        env.pop(name, None)  # each worker sets these from its variant
    return env


def with_mpi(env: dict, extra: dict) -> dict:
    """The worker's environment with a variant's own variables; another MPI's Horovod goes before
    the project on PYTHONPATH."""
    merged = {**env, **extra}
    if "PYTHONPATH" in extra:
        merged["PYTHONPATH"] = os.pathsep.join(p for p in (extra["PYTHONPATH"], env.get("PYTHONPATH")) if p)
    return merged


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
    error = run_logged(cmd, log_path, timeout, v.launch_env())
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


def command_line() -> str:
    """This invocation as a user would type it (`python -m fmnist_dist` shows its __main__.py)."""
    return " ".join(["fmnist-dist", *(shlex.quote(a) for a in sys.argv[1:])])


def run_logged(cmd: list[str], log_path: str, timeout: float, extra_env: dict | None = None) -> str | None:
    """Run cmd from the project directory, its output (after the command line) in log_path; the
    error in a few words, or None."""
    with open(log_path, "w", encoding="utf-8") as logf:
        logf.write("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n")
        logf.flush()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=with_mpi(child_env(), extra_env or {}), stdout=logf,
                                  stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"killed after the {timeout:g} s timeout"
        except OSError as e:                 # the launcher is missing or not executable
            logf.write(f"cannot start {cmd[0]}: {e.strerror or e}\n")
            return f"cannot start {cmd[0]}: {e.strerror or e}"
    return f"exit {proc.returncode}: {_last_line(log_path)}" if proc.returncode else None


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


def machine_info() -> dict:
    from .. import cpu

    node = cpu.node_facts()
    return {"cpu_model": node["cpu_model"], "cores": os.cpu_count(), "flags": node["flags"], "isa": node["isa"],
            "isa_cap": node["isa_cap"], "native_bf16": node["native_bf16"], "avx512": node["avx512"],
            "avx512f": "avx512f" in node["flags"], "avx512_bf16": "avx512_bf16" in node["flags"],
            "amx": node["isa"] == "AMX"}   # the kernels' AMX: the CPU's flag, unless ONEDNN_MAX_CPU_ISA caps it


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
