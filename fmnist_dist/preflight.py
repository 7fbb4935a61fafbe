"""`python -m fmnist_dist preflight`: every rank checks its node in seconds, before the training.

The job scripts and `make train` start it through the same launcher as the training, one process
per rank, so it runs on exactly the nodes and with exactly the environment the ranks will have.
Each rank looks at its CPU, the software its environment imports, the data and the run directory,
without importing TensorFlow. Rank 0 gathers the answers over MPI (mpi4py), prints one table into
the job log, keeps it in RUN_DIR/preflight.json (the training copies it into its report), and
applies the same precision decision the training will make. Anything that would make the expensive
launch fail later fails here: one line per problem naming the node, exit 2 on every rank.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time

from . import cpu, lease, mpi, tables
from .environment import itex_dir
from .errors import LaunchError, RunDirError, SetupError
from .files import atomic_write, now_iso

PREFLIGHT_FILE = "preflight.json"
MIN_FREE_BYTES = 200 * 2**20     # a few checkpoints, the report and plots, with room to spare
CLOCK_SKEW_WARN_S = 1.0          # timings merged across hosts assume the clocks agree this well
EXIT_FAILED = 2


def check_node(cfg: dict, run_dir: str, environ: dict[str, str] = os.environ) -> dict:
    """What this rank finds on its node; problems are worded for the job log."""
    problems: list[str] = []
    try:
        node = cpu.node_facts(environ)
    except SetupError as e:
        node = {"host": socket.gethostname(), "cpu_model": cpu.cpu_model(), "flags": cpu.cpu_flags(),
                "isa_cap": None, "isa": "unknown", "avx512": False, "native_bf16": False}
        problems.append(str(e))
    versions, problem = software_versions(cfg["intel"]["itex"])
    problems += problem
    data, problem = check_data(cfg["data"])
    problems += problem
    return {**node, "pid": os.getpid(), "cores": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
            "versions": versions, "data": data, "run_dir": check_run_dir(run_dir), "problems": problems}


def software_versions(itex_request: str) -> tuple[dict, list[str]]:
    """The versions this interpreter would import, read from package metadata (no import of TF)."""
    versions = {"python": platform.python_version(), "executable": sys.executable}
    problems = []
    for name, dist, why in (("tensorflow", "tensorflow", "pip install -r requirements.txt"),
                            ("horovod", "horovod", "scripts/setup.sh builds it from source"),
                            ("mpi4py", "mpi4py", "pip install -r requirements.txt")):
        versions[name] = _dist_version(dist)
        if versions[name] is None:
            problems.append(f"{name} is not installed for {sys.executable} ({why})")
    if versions["horovod"] and not _horovod_has_tensorflow():
        problems.append("horovod is installed without its TensorFlow library (rebuild it: scripts/setup.sh)")
    versions["itex"] = _dist_version("intel-extension-for-tensorflow", [itex_dir()]) or _dist_version(
        "intel-extension-for-tensorflow")
    if itex_request == "on" and versions["itex"] is None:
        problems.append(f"intel.itex=on, but ITEX is not installed in {itex_dir()} (scripts/setup.sh)")
    return versions, problems


def _dist_version(name: str, path: list[str] | None = None) -> str | None:
    try:
        if path:
            found = next(iter(importlib.metadata.distributions(name=name, path=path)), None)
            return found.version if found else None
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _horovod_has_tensorflow() -> bool:
    spec = importlib.util.find_spec("horovod")
    if spec is None or not spec.submodule_search_locations:
        return False
    directory = os.path.join(list(spec.submodule_search_locations)[0], "tensorflow")
    return os.path.isdir(directory) and any(f.startswith("mpi_lib") for f in os.listdir(directory))


def check_data(data_cfg: dict) -> tuple[dict, list[str]]:
    """Find and verify the four files (checksums of the decompressed bytes), as the training will."""
    from . import data as data_mod

    t0 = time.perf_counter()
    try:
        dataset = data_mod.load_fashion_mnist(data_cfg["dir"], False, data_cfg["cache_dir"], data_cfg["url"],
                                              progress=False)
    except data_mod.DataError as e:
        if data_cfg["download"]:
            return {"ok": None, "source": "not found locally: the training downloads it (data.download)"}, []
        return {"ok": False, "source": None}, [" ".join(line.strip() for line in str(e).splitlines())]
    return {"ok": True, "source": dataset.source, "verified_s": round(time.perf_counter() - t0, 2)}, []


def check_run_dir(run_dir: str) -> dict:
    """Whether this node can write the run directory (or the nearest existing parent), and its free space."""
    target = os.path.abspath(run_dir)
    while not os.path.exists(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    try:
        if not os.path.isdir(target):
            raise NotADirectoryError(20, "not a directory")
        fd, probe = tempfile.mkstemp(dir=target, prefix=".preflight-")
        os.close(fd)
        os.unlink(probe)
        writable, error = True, None
    except OSError as e:
        writable, error = False, e.strerror or str(e)
    free = shutil.disk_usage(target).free if os.path.isdir(target) else 0
    try:
        lease.check_free(run_dir)
        busy = None
    except RunDirError as e:
        busy = str(e)
    return {"path": os.path.abspath(run_dir), "checked": target, "writable": writable, "error": error,
            "free_bytes": free, "busy": busy}


def run_dir_problems(result: dict) -> list[str]:
    """Rank 0 writes the run directory: only its view of it can stop the job."""
    rd = result["run_dir"]
    if rd.get("busy"):
        return [rd["busy"]]
    if not rd["writable"]:
        return [f"cannot write the run directory {rd['path']} ({rd['checked']}: {rd['error']})"]
    if rd["free_bytes"] < MIN_FREE_BYTES:
        return [f"the run directory {rd['path']} has {rd['free_bytes'] / 2**20:.0f} MiB free; "
                f"checkpoints and reports need at least {MIN_FREE_BYTES // 2**20} MiB"]
    return []


def clock_offsets(comm) -> list[float | None]:
    """Each rank's clock minus rank 0's, by a ping-pong with rank 0 (error: half the round trip)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    offsets: list[float | None] = [0.0] + [None] * (size - 1)
    for peer in range(1, size):
        if rank == 0:
            sent = time.time()
            comm.send(sent, dest=peer, tag=7)
            theirs = comm.recv(source=peer, tag=8)
            offsets[peer] = theirs - (sent + time.time()) / 2
        elif rank == peer:
            comm.recv(source=0, tag=7)
            comm.send(time.time(), dest=0, tag=8)
    return offsets


def agree(results: list[dict], requested_precision: str) -> tuple[dict | None, list[str]]:
    """The job-wide checks: the precision decision, and one software stack on every rank."""
    problems = [f"{r['host']} (rank {i}): {p}" for i, r in enumerate(results) for p in r["problems"]]
    problems += [f"{results[0]['host']} (rank 0): {p}" for p in run_dir_problems(results[0])]
    for name in ("python", "tensorflow", "horovod", "itex"):
        seen = {r["versions"].get(name) for r in results}
        if len(seen) > 1:
            problems.append(f"ranks import different {name} versions: " + ", ".join(
                f"{r['host']} (rank {i}) {r['versions'].get(name)}" for i, r in enumerate(results)))
    precision = None
    if not any("ONEDNN_MAX_CPU_ISA" in p or "DNNL_MAX_CPU_ISA" in p for p in problems):
        try:
            precision = cpu.resolve_precision(requested_precision, results)
        except SetupError as e:
            problems.append(str(e))
    return precision, problems


def table(results: list[dict], offsets: list[float | None]) -> list[str]:
    rows = []
    for i, r in enumerate(results):
        v, rd = r["versions"], r["run_dir"]
        data = {True: "ok", False: "FAIL", None: "dl"}[r["data"]["ok"]]
        run_dir = f"{rd['free_bytes'] / 2**30:.1f}G free" if rd["writable"] else "not writable"
        clock = "" if offsets[i] is None else f"{offsets[i] * 1000:+.1f}ms"
        rows.append([str(i), r["host"][:16], r["cpu_model"][:28], r["isa"][:14], str(r["cores"]), _ranges(r["affinity"]),
                     v["python"], str(v["tensorflow"]), str(v["horovod"]), v.get("mpi", "-"), str(v["itex"]), data,
                     run_dir, clock])
    head = ["rank", "host", "cpu", "isa", "cores", "affinity", "python", "tensorflow", "horovod", "mpi", "itex",
            "data", "run dir", "clock"]
    return tables.table(head, rows, left={1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12})


def _ranges(cores: list[int]) -> str:
    spans, start = [], None
    for i, c in enumerate(cores):
        if start is None:
            start = c
        if i + 1 == len(cores) or cores[i + 1] != c + 1:
            spans.append(f"{start}-{c}" if c != start else f"{c}")
            start = None
    return ",".join(spans)


def run(cfg: dict, run_dir: str, keep_record: bool = True) -> int:
    """The preflight of this rank; rank 0 prints (and keeps the record). Returns the exit status."""
    MPI = start_mpi(horovod_mpi(), os.environ)
    comm = MPI.COMM_WORLD
    t0 = time.perf_counter()
    mine = check_node(cfg, run_dir)
    mine["versions"]["mpi"] = mpi.short_name(MPI.Get_library_version())
    results = comm.gather(mine, root=0)
    offsets = clock_offsets(comm)
    status = EXIT_FAILED
    if comm.Get_rank() == 0:
        precision, problems = agree(results, cfg["intel"]["mixed_precision"])
        skew = max((abs(o) for o in offsets if o is not None), default=0.0)
        record = {"checked": now_iso(), "ranks": results,
                  "clock_offsets_s": offsets, "clock_skew_s": skew, "precision": precision,
                  "problems": problems, "seconds": round(time.perf_counter() - t0, 2)}
        print(f"fmnist-dist preflight: {len(results)} rank(s) on {len({r['host'] for r in results})} host(s), "
              f"{record['seconds']:.1f} s", flush=True)
        print("\n".join(table(results, offsets)), flush=True)
        if precision:
            print(f"precision: {precision['chosen']} ({precision['reason']})", flush=True)
        if skew > CLOCK_SKEW_WARN_S:
            print(f"fmnist-dist: warning: clocks differ by up to {skew:.1f} s between hosts: times merged "
                  f"across hosts (report start and end) are off by as much", file=sys.stderr, flush=True)
        for problem in problems:
            print(f"fmnist-dist: error: preflight: {problem}", file=sys.stderr, flush=True)
        if keep_record and results[0]["run_dir"]["writable"] and not results[0]["run_dir"]["busy"]:
            keep(run_dir, record)
        status = EXIT_FAILED if problems else 0
        if not problems:
            print("preflight: ok", flush=True)
    return comm.bcast(status, root=0)


def horovod_mpi() -> mpi.Mpi | None:
    """The MPI the importable Horovod was built against (found without importing it, or TensorFlow)."""
    spec = importlib.util.find_spec("horovod")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return mpi.horovod_build(locations[0]) if locations else None


def start_mpi(build: mpi.Mpi | None, environ: dict[str, str]):
    """mpi4py on the MPI library Horovod links, after checking that this rank's launcher belongs to
    that MPI (otherwise the ranks would each come up alone, as rank 0 of 1). Before MPI starts the
    rank is not known: the launcher's rank variable decides who says it, so it is said once."""
    try:
        mpi.check_rank(build, environ)
    except LaunchError:
        if (environ.get("OMPI_COMM_WORLD_RANK") or environ.get("PMI_RANK") or "0") != "0":
            raise SystemExit(EXIT_FAILED) from None
        raise
    if build and build.family:
        environ.setdefault("MPI4PY_LIBMPI", build.where)   # which ABI mpi4py's wheel loads
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise SetupError(f"the preflight needs mpi4py on {build.describe() if build else 'the MPI library'} "
                         f"({str(e).splitlines()[-1]}); put that MPI's libraries on LD_LIBRARY_PATH (its env.sh, or "
                         f"module load), or pip install -r requirements.txt") from None
    loaded = mpi.family_of(MPI.Get_library_version())
    if build and build.family and loaded and loaded != build.family:
        raise SetupError(f"mpi4py loaded {mpi.NAMES[loaded]} but Horovod was built against {build.describe()}: "
                         f"put that MPI's libraries first on LD_LIBRARY_PATH")
    return MPI


def keep(run_dir: str, record: dict) -> None:
    os.makedirs(run_dir, exist_ok=True)
    atomic_write(os.path.join(run_dir, PREFLIGHT_FILE), json.dumps(record, indent=2) + "\n")


def read(run_dir: str) -> dict | None:
    """The preflight record of this run directory, if the job ran one."""
    try:
        with open(os.path.join(run_dir, PREFLIGHT_FILE), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

