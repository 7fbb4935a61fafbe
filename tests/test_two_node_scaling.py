"""Two real nodes (network namespaces joined by a veth pair, real TCP between them), one rank each
with one thread, against one node with one rank: weak and strong scaling measured and projected
from the one-node run, and the job's own choice of global batch logged on two nodes. The errors are
printed (docs/scaling.md quotes them), never asserted: the machine is shared and its load moves."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import need
from fmnist_dist import basis, config
from fmnist_dist.reporting import projection
from nodes import NODES, in_node, two_nodes
from test_jobs import read_report, run_pbs_job

pytestmark = pytest.mark.slow
FAST = "configs/fast.yaml"
SHORT = "train.epochs=2 train.steps_per_epoch=40 intel.intra_op_threads=1 report.plots=false report.tensorboard=false"


def test_weak_and_strong_scaling_on_two_nodes_against_the_projection(tmp_path):
    need("ip", "unshare", "sshd", "ssh", "ssh-keygen", "mpirun")
    runs = {}
    with two_nodes(tmp_path / "nodes") as nodes:
        job = dict(wrap=lambda cmd: in_node(NODES[0], cmd), CONFIG=FAST, FMNIST_MPI_ARGS=nodes.mpi_args)
        for name, hosts, batch in (("one node", ["fmnode1"], "null"), ("weak", ["fmnode1", "fmnode2"], "null"),
                                   ("strong", ["fmnode1", "fmnode2"], "256")):
            rc, log, run_dir, _ = run_pbs_job(tmp_path, hosts, EXTRA=f"{SHORT} train.global_batch_size={batch}", **job)
            assert rc == 0, log[-4000:]
            runs[name] = read_report(run_dir, log)
            shutil.rmtree(run_dir)
        # the recipe as shipped, stopped by a time limit (which leaves the experiment as it is): its choice
        rc, log, run_dir, _ = run_pbs_job(tmp_path, ["fmnode1", "fmnode2"],
                                          EXTRA="intel.intra_op_threads=1 train.time_limit=25 report.plots=false", **job)
        shutil.rmtree(run_dir, ignore_errors=True)
    assert rc == 75, log[-4000:]                                          # stopped cleanly at the time limit
    assert "fmnist-dist: global batch (auto, 2 ranks on 2 node(s)): " in log, log[-4000:]
    assert [h for r in runs.values() for h in sorted(r["world"]["hosts"])] == ["fmnode1"] + ["fmnode1", "fmnode2"] * 2
    assert (runs["weak"]["data"]["global_batch_size"], runs["strong"]["data"]["global_batch_size"]) == (512, 256)
    curve = basis.for_config(config.load(FAST))["throughput"]["precisions"]
    figures = {}
    for name in ("weak", "strong"):
        precision = "fp32" if runs[name]["segments"][0]["precision"] == "fp32" else "bf16"
        v = projection.validate(runs["one node"], runs[name], throughput=curve.get(precision))
        assert v["target_hosts"] == 2 and v["steps"] == 40 and v["target_batch"] == (256 if name == "weak" else 128)
        assert v["error"] == pytest.approx((v["projected_epoch_s"] - v["measured_epoch_s"]) / v["measured_epoch_s"])
        figures[name] = {k: v[k] for k in ("projected_epoch_s", "measured_epoch_s", "error", "stated_error",
                                           "within", "comparable", "cpu_wait_share")}
    print("two nodes against the projection:", json.dumps(figures, indent=2))
