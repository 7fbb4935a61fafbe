"""One benchmark launch's process (`python -m fmnist_dist.bench.worker SPEC.json`): it sets up the
process as training does, before TensorFlow loads, then measures and writes its result."""
from __future__ import annotations

import json
import os
import sys


def main(spec_path: str) -> int:
    from .. import config as config_mod
    from .. import environment

    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    ns = config_mod.namespace(config_mod.load(spec["config"], spec["overrides"]))
    if spec["mode"] == "layers":
        # One core, as each rank of the 2-rank default is bound by intel.bind=auto.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    # Something that loaded TensorFlow already (a sitecustomize, an embedding script) makes prepare's
    # oneDNN switch too late: noted, so that a mismatch names its cause.
    tensorflow_loaded_before_prepare = "tensorflow" in sys.modules
    environment.prepare(ns)                  # threads, binding, oneDNN/ITEX switches: before TensorFlow
    from . import measure                    # imports TensorFlow

    if spec["mode"] == "peak":
        result = measure.peak(ns, spec["n"], spec["calls"])
    elif spec["mode"] == "layers":
        result = measure.layer_profile(ns, spec["batch"], spec["calls"])
    else:
        result = measure.throughput(ns, spec["horovod"], spec["warmup_steps"], spec["steps"],
                                    tensorflow_loaded_before_prepare)
    if result is not None:
        with open(spec["result"], "w", encoding="utf-8") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fmnist_dist.bench.worker SPEC.json (internal; use `python -m fmnist_dist bench`)")
    sys.exit(main(sys.argv[1]))
