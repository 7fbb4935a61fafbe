"""A whole PBS job on two nodes of one machine (network namespaces joined by a veth pair, sshd in
each, real TCP between them), one rank with one thread per node: the job script run as PBS runs
it, with the recipe as shipped (train.global_batch_size: auto). Prints the job's choice and its
result; the run directory stays in runs/. Needs root (namespaces) and the test set-up (sshd).

    .venv/bin/python scripts/two_node_job.py [--config configs/fast.yaml] [--seed 1]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from nodes import NODES, in_node, two_nodes      # noqa: E402  (the test suite's two-node cluster)
from test_jobs import run_pbs_job               # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fast.yaml")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="two-node-") as tmp, two_nodes(Path(tmp) / "nodes") as nodes:
        rc, log, run_dir, wall = run_pbs_job(Path(tmp), ["fmnode1", "fmnode2"], wrap=lambda cmd: in_node(NODES[0], cmd),
                                             timeout=3600, CONFIG=args.config, FMNIST_MPI_ARGS=nodes.mpi_args,
                                             EXTRA=f"intel.intra_op_threads=1 train.seed={args.seed}")
    print("\n".join(line for line in log.splitlines() if "global batch" in line or "training time" in line))
    print(f"exit {rc} after {wall:.0f} s; run directory {run_dir}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
