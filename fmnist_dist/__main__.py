"""Command line: `python -m fmnist_dist {train,report} ...` (also the `fmnist-dist` console script)."""
from __future__ import annotations

import argparse
import os
import sys

from . import config as config_mod
from . import report as report_mod


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (config_mod.ConfigError, report_mod.ReportError) as e:
        return fail(str(e))
    except Exception as e:
        from .data import DataError
        from .runtime import SetupError
        from .train import RunDirError

        if isinstance(e, (DataError, RunDirError, SetupError)):
            return fail(str(e))
        raise


def fail(message: str) -> int:
    from .runtime import launcher_rank

    if launcher_rank() == 0:  # every rank hits the same error; one line is enough
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
    p.add_argument("--overwrite", action="store_true", help="replace the report of a run already in --run-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="print a finished run's report again",
                       description="Print the summary of a run directory written by `train`.")
    p.add_argument("run_dir", help="a run directory (or its report.json)")
    p.add_argument("--format", choices=("text", "md", "json"), default="text")
    p.set_defaults(func=cmd_report)

    from .launch import add_launch_parser  # `launch-plan`: used by jobs/train.pbs and jobs/train.slurm
    add_launch_parser(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    overrides = list(args.overrides) + ([f"data.dir={args.data_dir}"] if args.data_dir else [])
    cfg = config_mod.load(args.config, overrides)          # validated before any work

    from .train import default_run_dir, train

    run_dir = args.run_dir or default_run_dir(args.config)
    report = train(cfg, run_dir, overwrite=args.overwrite)
    if report is not None:  # rank 0
        print("\n".join(report_mod.summary_lines(report)))
        print(f"  report: {os.path.join(run_dir, 'report.md')} (also report.json, epochs.csv, config.yaml)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = report_mod.load_report(args.run_dir)
    if args.format == "json":
        import json
        print(json.dumps(report, indent=2))
    elif args.format == "md":
        print(report_mod.render_markdown(report))
    else:
        print("\n".join(report_mod.summary_lines(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
