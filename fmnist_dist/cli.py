"""Command line: `python -m fmnist_dist {train,preflight,report,launch-plan,bench,race} ...` (also the
`fmnist-dist` console script). Every subcommand is defined here; the work is done by the package's
modules, imported when their command runs (`report` and `launch-plan` never load TensorFlow).

The one error path: any FmnistError becomes one line `fmnist-dist: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime

from . import basis, scaling
from . import config as config_mod
from . import lease
from .errors import FmnistError, LaunchError, ProjectionError, ReportError, UsageError
from . import environment


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FmnistError as e:   # the user's to fix: one line, exit 2; anything else is a bug (traceback)
        from .errors import NodeError

        # Every rank hits the same error (one line is enough), except what a rank finds on its own node.
        if isinstance(e, NodeError) or environment.launcher_rank() == 0:
            print(f"fmnist-dist: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        lease.release_held()                # the run directory's writer lease, if this process took it


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (single process, or one process per rank under "
                       "horovodrun/mpirun/srun)", description="Train the CNN on Fashion-MNIST. Run it "
                       "directly for one process, or under `horovodrun -np N` / `mpirun -np N` for N ranks.")
    p.add_argument("--config", help=f"YAML config; keys not given take the defaults, which are the default "
                   f"recipe ({config_mod.DEFAULT_CONFIG} states it in full)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable; YAML scalar syntax)")
    p.add_argument("--run-dir", help="where rank 0 writes the report (default runs/<time>-<config>-<host>)")
    p.add_argument("--data-dir", help="directory holding the Fashion-MNIST IDX files (same as data.dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a run already in --run-dir (report and checkpoints) and start afresh")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the unfinished run in RUN_DIR from its newest checkpoint, with its "
                   "config.yaml (plus --set overrides of keys that leave the experiment as it was; see --allow-change). "
                   "A run directory holding a checkpoint is also resumed without this flag")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="when resuming, let KEY (given with --set) differ from the run's config.yaml, e.g. "
                   "--set train.epochs=30 --allow-change train.epochs; the report records the change. "
                   "Without it, a key that changes the experiment is refused")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("preflight", help="check every rank's node before the training (run it through the "
                       "job's launcher, one process per rank)", description="Every rank reports its host, CPU and ISA, "
                       "cores and affinity, the software versions it imports, the data (checksums) and the run "
                       "directory; rank 0 prints one table, agrees the precision, and exits 2 with one line per "
                       "problem before anything expensive starts.")
    p.add_argument("--config", help="YAML config the training will use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, as for train")
    p.add_argument("--run-dir", help="the training's run directory: checked, and the record is kept there "
                   "as preflight.json (default: only ./runs is checked, nothing is kept)")
    p.add_argument("--data-dir", help="directory holding the Fashion-MNIST IDX files (same as data.dir)")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("report", help="print a run's report again, or compare several runs",
                       description="One run directory: its summary. Several (or a glob such as 'runs/*'): "
                       "a comparison table with speedup and parallel efficiency per recipe. Optionally "
                       "plots (--plots DIR) and projected scaling to more nodes (--project).")
    add_report_arguments(p)
    p.set_defaults(func=cmd_report)
    add_launch_parser(sub)      # `launch-plan`: used by jobs/train.pbs and jobs/train.slurm
    add_bench_parser(sub)       # `bench`: side-by-side throughput of the speed options
    add_race_parser(sub)        # `race`: time to 92%, the project's recipe against a plain Keras peer
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    cfg, run_dir, changes = train_config(args)             # validated before any work
    from . import data as data_mod
    from .errors import DataError, NodeDataError

    try:  # in milliseconds, before Horovod and TensorFlow take their 10-15 s to start
        source = cfg["data"]
        data_mod.check_quickly(source["dir"], source["download"], source["cache_dir"], source["url"])
    except DataError as e:  # perhaps this node's alone: the rank says so itself, naming the host when launched
        launched = any(name in os.environ for name in environment.RANK_VARS)
        raise NodeDataError(f"{os.uname().nodename}: {e}" if launched else str(e)) from None
    environment.prepare(config_mod.namespace(cfg))        # before TensorFlow loads with the training code
    from .training.loop import EXIT_PREEMPTED, Preempted, train

    try:
        report = train(cfg, run_dir, overwrite=args.overwrite, resume=bool(args.resume), changes=changes)
    except Preempted as stop:
        # The job's status is rank 0's, given last: a rank exiting non-zero while others still run
        # makes srun --kill-on-bad-exit and mpirun kill them (their 75 would become 143).
        if environment.launcher_rank() != 0:
            return 0
        from .training import watchdog

        watchdog.linger_until_others_exit()
        print(f"fmnist-dist: preempted: {stop.reason}; checkpoint and partial report in {stop.run_dir}; "
              f"resume with: fmnist-dist train --resume {stop.run_dir} (exit {EXIT_PREEMPTED})",
              file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if report is not None:  # rank 0
        from .reporting.render import summary_lines

        print("\n".join(summary_lines(report)))
        print(f"  report: {os.path.join(run_dir, 'report.md')} (also report.json, epochs.csv, config.yaml)")
    return 0


def train_config(args: argparse.Namespace) -> tuple[dict, str, dict]:
    """The config, run directory and deliberate config changes of `train`, refusing what it cannot
    honour before anything starts or is written. Resuming (--resume, or a run directory holding an
    unfinished run: a requeued job) continues with the run's own config.yaml."""
    from .training import rundir

    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    if args.resume and args.run_dir and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        raise UsageError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs")
    if args.resume and args.overwrite:
        raise UsageError(f"--resume {args.resume} and --overwrite contradict each other: --overwrite would delete "
                         f"the checkpoints --resume continues from")
    if args.resume and not rundir.will_resume(args.resume, overwrite=False):
        raise UsageError(f"--resume {args.resume}: {rundir.why_not_resumable(args.resume)}")
    run_dir = args.resume or args.run_dir or rundir.default_run_dir(args.config)
    if environment.launcher_rank() == 0:
        lease.check_free(run_dir)                          # another job writes there: refused at once
    if args.allow_change and not rundir.will_resume(run_dir, args.overwrite):
        raise UsageError(f"--allow-change is for resuming a run, and {run_dir} holds none to resume")
    if not rundir.will_resume(run_dir, args.overwrite):
        return config_mod.load(args.config, overrides), run_dir, {}
    cfg, changes, warnings = rundir.resume_config(run_dir, args.config, overrides, args.allow_change)
    if environment.launcher_rank() == 0:
        for line in warnings:
            print(f"fmnist-dist: warning: {line}", file=sys.stderr, flush=True)
    return cfg, run_dir, changes


def cmd_preflight(args: argparse.Namespace) -> int:
    from .preflight import run

    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    cfg = config_mod.load(args.config, overrides)
    return run(cfg, args.run_dir or "runs", keep_record=bool(args.run_dir))


def add_report_arguments(p) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories (or report.json files, or a quoted glob such as 'runs/*'); "
                        "one: its summary; several: a comparison table")
    p.add_argument("--format", choices=("text", "md", "csv", "json"), default="text",
                   help="text (terminal), md (Markdown), csv, json (default text); csv of one run is its epochs.csv")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (one run: accuracy/loss, "
                   "throughput, time per rank; several: scaling and time per run)")
    p.add_argument("--seeds", action="store_true", help="several runs: completed runs grouped by recipe with "
                   "the seed left out: test accuracy mean, spread and range, mean training time and images/s")
    p.add_argument("--project", action="store_true", help="projected time per epoch and efficiency on more "
                   "nodes, with the model's assumptions, and its validation on the measured sizes")
    p.add_argument("--nodes", default="1,2,4,8,16,32,64", help="node counts for --project (default 1,2,4,8,16,32,64)")
    p.add_argument("--ranks-per-node", type=int, help="ranks per node for --project (default: as in the base run)")
    p.add_argument("--latency-us", type=float, help="--project: per-hop allreduce latency of your network, µs "
                   "(default: from the allreduce probe, measured on the run's ranks)")
    p.add_argument("--bandwidth-gbs", type=float, help="--project: link bandwidth of your network, GB/s "
                   "(default: from the allreduce probe)")
    p.add_argument("--latency-model", choices=("ring", "tree"), default="ring",
                   help="--project: latency hops of the allreduce: ring 2(p-1) (default) or tree 2 log2(p)")
    p.add_argument("--network", default="25gbe", choices=[n for n in scaling.NETWORKS if n != "shm"],
                   help="--project: the network between nodes, nominal figures (default 25gbe; --latency-us and "
                   "--bandwidth-gbs give your own)")
    p.add_argument("--target", type=float, default=None, help="--project, --scan: the accuracy to reach (default: "
                   f"the run's train.target_accuracy, else its recipe's stated target, else {basis.DEFAULT_TARGET})")
    p.add_argument("--basis", default=None, help="--project: the accuracy-vs-global-batch basis (default: the one "
                   "the package ships for the run's own recipe, docs/scaling.md); none: leave accuracy out")
    p.add_argument("--throughput", metavar="BENCH_JSON", help="--scan --format json: the batch curve of this "
                   "bench.json (bench --batch-curve) goes into the basis, for train.global_batch_size=auto")
    p.add_argument("--scan", action="store_true", help="several runs of one recipe at several global batches: "
                   "test accuracy against global batch (mean, spread, epochs to --target); json: an accuracy basis")


def cmd_report(args: argparse.Namespace) -> int:
    """One run: its summary (or report.md, epochs.csv, json); several: the comparison, or --seeds."""
    from .reporting import projection
    from .reporting import report as report_mod
    from .reporting.compare import compare_rows, expand, load_all, projections, render, seed_summary
    from .reporting.render import render_markdown, summary_lines

    paths = expand(args.run_dirs)
    nodes = node_counts(args.nodes)
    latency = args.latency_us * 1e-6 if args.latency_us is not None else None
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs is not None else None
    check_report_options(args)
    accuracy = functools.partial(accuracy_basis, args) if args.project else None
    if len(paths) == 1 and not (args.scan or args.seeds):
        report = report_mod.load_report(paths[0])   # unreadable: ReportError, exit 2
        proj = None
        if args.project:
            try:
                proj = projection.project(report, nodes=nodes, ranks_per_node=args.ranks_per_node,
                                          latency_s=latency, bandwidth_Bps=bandwidth, latency_model=args.latency_model,
                                          accuracy=accuracy(report), network=args.network)
            except ProjectionError as e:
                raise ProjectionError(f"{paths[0]}: cannot project: {e}") from None
        if args.format == "json":
            print(json.dumps(report if proj is None else {"report": report, "projection": proj}, indent=2))
        elif args.format == "csv":
            print(report_mod.epochs_csv(report), end="")
        else:
            text = render_markdown(report) if args.format == "md" else "\n".join(summary_lines(report))
            print(text)
            if proj is not None:
                print("\n" + "\n".join(projection.render(proj, args.format)))
        if args.plots:
            from .reporting import plots
            written = plots.plot_run(report, args.plots)
            print("plots: " + (", ".join(written) if written else "none (no finished epoch)"), file=sys.stderr)
        return 0

    loaded = load_all(paths)
    if all(r is None for _, r, _ in loaded):
        raise report_mod.ReportError("no readable report among the runs given:\n  "
                                     + "\n  ".join(e for _, _, e in loaded))
    if args.seeds:
        print(seed_summary(loaded, "md" if args.format == "md" else "text"))
        return 0
    if args.scan:
        return print_scan(loaded, args)
    rows = compare_rows(loaded)
    projs, vals, problems = [], [], []
    if args.project:
        projs, vals, problems = projections(loaded, rows, nodes, args.ranks_per_node, latency, bandwidth,
                                            args.latency_model, accuracy, args.network)
    if args.format == "json":
        data = json.loads(render(rows, "json"))
        if args.project:
            data.update(projections=projs, validations=vals, projection_problems=problems)
        print(json.dumps(data, indent=2))
    else:
        print(render(rows, args.format))
        if args.project and args.format != "csv":
            for proj in projs:
                print("\n" + "\n".join(projection.render(proj, args.format)))
            if vals:
                print("")
            for v in vals:
                print("\n".join(projection.render_validation(v, args.format)))
            for p in problems:
                print(f"projection: {p}")
        elif args.project:
            print("fmnist-dist: --project is not part of the csv output; use text, md or json", file=sys.stderr)
    for _, r, e in loaded:
        if r is None:
            print(f"fmnist-dist: warning: {e}", file=sys.stderr)
    if args.plots:
        from .reporting import plots
        reports = {p: r for p, r, _ in loaded if r is not None}
        written = plots.plot_comparison(rows, reports, args.plots, projs)
        print("plots: " + ", ".join(written), file=sys.stderr)
    return 0


def batch_curve(path: str) -> dict:
    """The batch curve of a bench.json, with the machine and command that measured it."""
    try:
        with open(path, encoding="utf-8") as f:
            bench = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"--throughput {path}: cannot read it: {e}") from None
    curve = bench.get("batch_curve") if isinstance(bench, dict) else None
    if not curve:
        raise ReportError(f"--throughput {path}: no batch_curve in it (run bench --batch-curve 16,32,64,128,256,512)")
    m = bench.get("machine") or {}
    return {**curve, "cpu": f"{m.get('cpu_model')}, ISA {m.get('isa')}", "command": bench.get("command"),
            "measured": bench.get("started")}


def check_report_options(args: argparse.Namespace) -> None:
    """Refuse what `report` would otherwise ignore or misread."""
    if args.target is not None and not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target}: expected an accuracy in (0, 1], such as 0.92")
    if (args.latency_us is None) != (args.bandwidth_gbs is None):
        raise UsageError("--latency-us and --bandwidth-gbs go together (or name a --network preset)")
    for grouping in ("seeds", "scan"):
        for extra in ("project", "plots"):
            if getattr(args, grouping) and getattr(args, extra):
                raise UsageError(f"--{grouping} and --{extra} do not go together: --{grouping} prints one table "
                                 f"of several runs; run --{extra} on its own")
    if args.seeds and args.scan:
        raise UsageError("--seeds and --scan are two different tables: choose one")


def node_counts(text: str) -> tuple[int, ...]:
    try:
        nodes = tuple(int(n) for n in str(text).split(",") if n.strip())
        if not nodes or min(nodes) < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--nodes {text}: expected node counts such as 4,8,16,64") from None
    return nodes


def accuracy_basis(args: argparse.Namespace, report: dict) -> dict | None:
    """--project's accuracy basis for this run: --basis FILE, else the shipped basis of the run's own
    recipe (none: no accuracy part, and the projection says so); with the run's target."""
    if args.basis == "none":
        return None
    cfg = report.get("config") or {}
    found = basis.load(args.basis) if args.basis else basis.for_config(cfg) if cfg else None
    if found is None:
        print(f"projection: {report['run_id']}: {basis.missing_line(cfg) if cfg else 'the report has no config'}",
              file=sys.stderr)
        return None
    return {"basis": found, "target": args.target or basis.target_of(cfg, found)}


def print_scan(loaded: list, args: argparse.Namespace) -> int:
    """--scan: the accuracy-vs-global-batch table, or (json) an accuracy basis of one recipe."""
    from .reporting.scan import render, scan_points

    points = scan_points(loaded)
    if not points:
        raise ReportError("--scan: no completed run among the runs given")
    if args.format != "json":
        print(render(points, args.target or basis.DEFAULT_TARGET, "md" if args.format == "md" else "text"))
        return 0
    recipes = sorted({(p["recipe"], p["recipe_key"]) for p in points})
    if len(recipes) > 1:
        raise ReportError(f"--scan --format json: a basis is one recipe's; these runs are of {len(recipes)}: "
                          + ", ".join(f"{name} ({key})" for name, key in recipes))
    cfg = next(json.loads(json.dumps(r["config"])) for _, r, _ in loaded
               if r is not None and r.get("status") == "completed")
    for key in basis.SCAN_KEYS:
        cfg["train"].pop(key.split(".", 1)[1], None)
    head = {"schema": basis.SCHEMA, "recipe": recipes[0][0], "target": args.target or basis.DEFAULT_TARGET,
            "command": " ".join(["fmnist-dist report", *sys.argv[2:]]), "config": cfg}
    if args.throughput:
        head["throughput"] = batch_curve(args.throughput)
    print(json.dumps(head)[:-1] + ', "points": [\n' + ",\n".join(json.dumps(p) for p in points) + "\n]}")
    return 0


def add_launch_parser(sub) -> None:
    p = sub.add_parser(
        "launch-plan", help="turn a PBS/Slurm job's allocation into the launch command (used by jobs/*)",
        description="Read the scheduler's variables (PBS_NODEFILE, PBS_JOBID / SLURM_JOB_NODELIST, "
                    "SLURM_TASKS_PER_NODE, SLURM_JOB_ID), check the environment and print how to launch "
                    "the training. The job scripts eval the --format shell output. Extra mpirun "
                    "arguments come from $FMNIST_MPI_ARGS.")
    p.add_argument("--scheduler", required=True, choices=("pbs", "slurm"))
    p.add_argument("--config", default=config_mod.DEFAULT_CONFIG,
                   help=f"training config (default {config_mod.DEFAULT_CONFIG})")
    p.add_argument("--extra", default="", help="space-separated KEY=VALUE config overrides (the EXTRA variable)")
    p.add_argument("--np", default="", help="number of ranks (default: every slot of the job)")
    p.add_argument("--launcher", default="auto", help="mpirun, horovodrun, srun (Slurm) or auto (default: "
                   "srun --mpi=pmix under Slurm when available, else mpirun)")
    p.add_argument("--run-dir", default="", help="default runs/<job id> under --workdir")
    p.add_argument("--workdir", default=".", help="the project directory (default: current directory)")
    p.add_argument("--python", default=sys.executable, help="the Python every rank runs (default: this one)")
    p.add_argument("--cores-per-node", type=int, help="default: this node's usable cores, or "
                   "SLURM_CPUS_PER_TASK x ranks per node under Slurm")
    p.add_argument("--format", choices=("text", "shell", "json"), default="text",
                   help="shell: RUN_DIR=... and LAUNCH=(...) for eval (the summary goes to stderr)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the environment checks (python imports horovod, launcher on PATH)")
    p.set_defaults(func=cmd_launch_plan)


def cmd_launch_plan(args: argparse.Namespace) -> int:
    from .launch import describe, make_plan, shell_assignments

    np = None
    if str(args.np).strip():
        if not str(args.np).strip().isdigit():
            raise LaunchError(f"NP={args.np!r}: expected a whole number of ranks")
        np = int(args.np)
    plan = make_plan(args.scheduler, dict(os.environ), workdir=args.workdir, python=args.python,
                     config=args.config or config_mod.DEFAULT_CONFIG, extra=args.extra, np=np,
                     launcher=args.launcher or "auto", run_dir=args.run_dir or None,
                     cores_per_node=args.cores_per_node, check=args.check)
    if args.format == "shell":
        print("\n".join(describe(plan)), file=sys.stderr, flush=True)
        sys.stdout.write(shell_assignments(plan))
    elif args.format == "json":
        print(json.dumps(asdict(plan), indent=2))
    else:
        print("\n".join(describe(plan)))
    return 0


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side training throughput of the Intel and Horovod options",
                       description="Launch short training processes for every variant (fp32 vs bf16 Keras vs "
                       "bf16 ITEX AMP, ITEX on/off, oneDNN on/off, 1x2 vs 2x1 with and without binding, MPI "
                       "vs Gloo, plain Keras), interleaved over repetitions; probe the matmul peak; write "
                       "a table, OUT/bench.json and OUT/bench.md.")
    p.add_argument("--config", default=None,
                   help="config whose model, batch size and data settings are benchmarked (default: the "
                   "default recipe); each variant sets the intel.* keys itself")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.batch_size=256")
    p.add_argument("--reps", type=int, default=None, help="interleaved repetitions (default 3; quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per launch (default 20)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per launch and rank (default 100)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of variant names (see --list); default all")
    p.add_argument("--list", action="store_true", help="list the variants and comparisons, then exit")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: a plain-Keras process and 2 Horovod ranks; 1 repetition, a few steps, "
                   "small peak probe")
    p.add_argument("--no-peak", action="store_true", help="skip the matmul peak probe")
    p.add_argument("--batch-curve", default=None, metavar="B,B,...",
                   help="also one rank x 1 thread at each per-rank batch, per native precision: the throughput "
                   "curve an accuracy basis carries (e.g. 16,32,64,128,256,512; alone unless --variants is given)")
    p.add_argument("--layers", action="store_true",
                   help="also profile each layer (forward + backward, one thread, per native precision) "
                   "against one thread's matmul peak; with --variants none, only that")
    p.add_argument("--out", default=None, help="output directory (default runs/bench-<time>)")
    p.add_argument("--quiet-load", type=float, default=1.0,
                   help="before starting, wait until the 1-minute load average is at most this (default 1.0)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="give up waiting for a quiet machine after this many seconds (default 300; quick 0)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before a launch is killed (default 900)")
    p.set_defaults(func=cmd_bench)


def add_race_parser(sub) -> None:
    p = sub.add_parser("race", help="time to a test accuracy: the project's recipe against a plain Keras peer",
                       description="Per seed, train a plain Keras script of the original study's kind (one "
                       "process, TensorFlow's defaults) until its test accuracy reaches --target, and the "
                       "project's recipe on --np ranks; alternate their order; print the time to target of "
                       "each (training and wall seconds) and the ratio. Writes OUT/race.json and OUT/race.md.")
    p.add_argument("--config", default="configs/fast.yaml", help="the project's recipe (default configs/fast.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the project's recipe (repeatable)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    p.add_argument("--target", type=float, default=basis.DEFAULT_TARGET,
                   help=f"test accuracy to reach (default {basis.DEFAULT_TARGET})")
    p.add_argument("--np", type=int, default=1,
                   help="ranks of the project's run (default 1: one process on every core, running auto's simulated "
                   "ranks side by side, the soonest on one node; 2: make train's 2 ranks under Gloo)")
    p.add_argument("--peer-max-epochs", type=int, default=30, help="the peer gives up after this many epochs")
    p.add_argument("--peer-padding", choices=("same", "valid"), default="same",
                   help="the peer's convolutions: same (default; the plain script that reaches 92%%) or valid "
                   "(the original study's network, which plateaus just under it)")
    p.add_argument("--data-dir", default=None, help="directory holding the Fashion-MNIST IDX files")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: one seed, 20 steps of one epoch on each side (the target is not reached)")
    p.add_argument("--out", default=None, help="output directory (default runs/race-<time>)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a launch is killed (default 3600)")
    p.set_defaults(func=cmd_race)


def cmd_race(args: argparse.Namespace) -> int:
    from .bench.race import markdown, run_race

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 1,2,3") from None
    if not 0 < args.target <= 1:
        raise UsageError(f"--target {args.target}: expected a test accuracy in (0, 1], e.g. 0.92")
    if args.np < 1 or args.peer_max_epochs < 1:
        raise UsageError("--np and --peer-max-epochs must be at least 1")
    overrides = list(args.overrides)
    config_mod.load(args.config, overrides)                # a bad recipe fails here, before any launch
    # both sides train from the project directory: paths as the caller meant them
    args.config = os.path.abspath(args.config)
    args.data_dir = os.path.abspath(args.data_dir) if args.data_dir else None
    if args.quick:
        seeds = seeds[:1]
        overrides += ["train.epochs=1", "train.steps_per_epoch=20"]
    settings = {"config": args.config, "overrides": overrides, "seeds": seeds, "target": args.target,
                "np": args.np, "peer_max_epochs": 1 if args.quick else args.peer_max_epochs,
                "peer_padding": args.peer_padding, "peer_steps": 20 if args.quick else None, "data_dir": args.data_dir,
                "timeout": args.timeout}
    out = args.out or os.path.join("runs", f"race-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    result = run_race(settings, out)
    print()
    print(markdown(result))
    print(f"race: {os.path.join(out, 'race.json')}, {os.path.join(out, 'race.md')}, logs in {os.path.join(out, 'logs')}")
    failed = [r for r in result["results"] for side in ("peer", "project") if r[side]["error"]]
    return 1 if failed else 0


def batch_list(text: str) -> tuple[int, ...]:
    try:
        batches = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
        if not batches or batches[0] < 1:
            raise ValueError
    except ValueError:
        raise UsageError(f"--batch-curve {text}: expected per-rank batches such as 16,32,64,128,256,512") from None
    return batches


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.render import markdown, text_table
    from .bench.run import run_bench
    from .bench.variants import COMPARISONS, QUICK_VARIANTS, VARIANTS

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
    config_path = args.config
    overrides = list(args.overrides)
    if quick and not any(o.startswith("train.batch_size=") for o in overrides):
        overrides.append("train.batch_size=64")
    cfg = config_mod.load(config_path, overrides)
    curve = batch_list(args.batch_curve) if args.batch_curve else ()
    names = args.variants.split(",") if args.variants else [] if curve else \
        list(QUICK_VARIANTS if quick else [v.name for v in VARIANTS])
    if names == ["none"]:
        if not args.layers and not curve:
            raise UsageError("--variants none: nothing to run; add --layers, or name variants (see --list)")
        names = []
    unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
    if unknown:
        raise UsageError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(v.name for v in VARIANTS)}")
    settings = {
        "reps": args.reps or (1 if quick else 3),
        "warmup_steps": args.warmup_steps or (3 if quick else 20),
        "steps": args.steps or (5 if quick else 100),
        "batch_size": cfg["train"]["batch_size"],
        "variants": names,
        "batch_curve": curve,
        "peak": not args.no_peak,
        "peak_n": 512 if quick else 2048,
        "peak_calls": 3 if quick else 8,
        "layers": args.layers,
        "layer_calls": 3 if quick else 10,
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
    layers_failed = [la for la in result["launches"] if la["variant"].startswith("layers-") and not la["ok"]]
    return 1 if (failed and len(failed) == len(result["variants"])) or layers_failed else 0
