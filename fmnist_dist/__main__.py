"""Command line: `python -m fmnist_dist {train,report} ...` (also the `fmnist-dist` console script)."""
from __future__ import annotations

import argparse
import os
import sys

from . import config as config_mod
from . import report as report_mod
from .errors import FmnistError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FmnistError as e:   # the user's to fix: one line, exit 2; anything else is a bug (traceback)
        return fail(str(e))


def rank_zero() -> bool:
    from .runtime import launcher_rank

    return launcher_rank() == 0


def fail(message: str) -> int:
    if rank_zero():  # every rank hits the same error; one line is enough
        print(f"fmnist-dist: error: {message}", file=sys.stderr, flush=True)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train (single process, or one process per rank under "
                       "horovodrun/mpirun/srun)", description="Train the CNN on Fashion-MNIST. Run it "
                       "directly for one process, or under `horovodrun -np N` / `mpirun -np N` for N ranks.")
    p.add_argument("--config", help="YAML config (keys not given take the defaults; see README)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=5 (repeatable; YAML scalar syntax)")
    p.add_argument("--run-dir", help="where rank 0 writes the report (default runs/<time>-<config>-<host>)")
    p.add_argument("--data-dir", help="directory holding the Fashion-MNIST IDX files (same as data.dir)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard a run already in --run-dir (report and checkpoints) and start afresh")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the unfinished run in RUN_DIR from its newest checkpoint, with its "
                   "config.yaml (plus --set overrides that do not change the model, data or seed). "
                   "A run directory holding a checkpoint is also resumed without this flag")
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
    from .compare import add_report_arguments  # report/compare/projection options live in compare.py
    add_report_arguments(p)
    p.set_defaults(func=cmd_report)

    from .launch import add_launch_parser  # `launch-plan`: used by jobs/train.pbs and jobs/train.slurm
    add_launch_parser(sub)

    from .bench import add_bench_parser  # `bench`: side-by-side throughput of the speed options
    add_bench_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    if args.resume and args.run_dir and os.path.abspath(args.run_dir) != os.path.abspath(args.resume):
        raise config_mod.ConfigError(f"--resume {args.resume} and --run-dir {args.run_dir} name different runs")
    config_path = args.config or (os.path.join(args.resume, "config.yaml") if args.resume else None)
    cfg = config_mod.load(config_path, overrides)          # validated before any work

    from .train import EXIT_PREEMPTED, Preempted, default_run_dir, train

    run_dir = args.resume or args.run_dir or default_run_dir(args.config)
    try:
        report = train(cfg, run_dir, overwrite=args.overwrite, resume=bool(args.resume))
    except Preempted as stop:
        if rank_zero():
            print(f"fmnist-dist: preempted: {stop.reason}; checkpoint and partial report in {stop.run_dir}; "
                  f"resume with: fmnist-dist train --resume {stop.run_dir} (exit {EXIT_PREEMPTED})",
                  file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if report is not None:  # rank 0
        print("\n".join(report_mod.summary_lines(report)))
        print(f"  report: {os.path.join(run_dir, 'report.md')} (also report.json, epochs.csv, config.yaml)")
    return 0


def cmd_preflight(args: argparse.Namespace) -> int:
    from .preflight import run

    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    cfg = config_mod.load(args.config, overrides)
    return run(cfg, args.run_dir or "runs", keep_record=bool(args.run_dir))


def cmd_report(args: argparse.Namespace) -> int:
    from .compare import cmd_report as report_command  # one run: summary; several: comparison

    return report_command(args)


if __name__ == "__main__":
    sys.exit(main())
