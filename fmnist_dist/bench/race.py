"""`fmnist-dist race`: time to a test accuracy, the project's recipe against a plain Keras peer.

Per seed, two real processes on this machine, one after the other, the order alternating with
the seed (peer first on odd seeds) so that a slow minute does not always hit the same side:
- the peer (bench/peer.py): one process of plain Keras, TensorFlow's defaults, evaluating the test
  set after each epoch until it reaches the target (or gives up after --peer-max-epochs); "same"
  padding by default, the script that reaches 92%; --peer-padding valid races the original study's
  network, which does not;
- the project: `python -m fmnist_dist train` with the given config (the fast recipe by default) and
  the seed, one process on every core by default (auto's 2 simulated ranks of 256 side by side, the
  soonest on one node), or `horovodrun --gloo -np N` of it with --np N (2: as `make train` runs it);
  its test accuracy is the report's.
Both use every core of the machine. Time to target: training seconds (the peer: its fit calls up to
the epoch that reached the target; the project: the report's training time, whose recipe ends at
its last epoch) and wall seconds (process start to exit, start-up and evaluation included).
The ratio is peer / project, per seed, and its median, only where both sides reached the target. A
peer giving up after --peer-max-epochs while the project reached the target bounds the ratio from
below (its time to target is longer than all it trained): kept in race.json and given as a footnote
("> R"), never in the ratio column.

Outputs: a table on stdout, OUT/race.json (schema below), OUT/race.md, OUT/logs/.
race.json (schema "fmnist-dist/race", version 1): started, finished, command, host, machine, target,
config_file, overrides, seeds, peer_max_epochs, peer_padding, results [{seed, order, peer {reached, epochs,
test_accuracy, best_test_accuracy, best_epoch, best_training_s, training_s, wall_s, log, error},
project {... plus precision, images_per_s, run_dir}, ratio_training, ratio_wall,
ratio_training_at_least, ratio_wall_at_least}], summary {every_seed_reached, ratio_training_median,
ratio_wall_median, ratio_training_at_least, ratio_training_to_peer_best [per seed, null where the
peer reached the target or the project did not], ...}.
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import statistics
import sys
import time

from ..files import atomic_write, now_iso
from ..tables import table
from .render import machine_line
from .run import command_line, machine_info, run_logged
from .variants import horovodrun_path

SCHEMA = "fmnist-dist/race"
SCHEMA_VERSION = 1


def run_race(settings: dict, out: str, log=print) -> dict:
    out = os.path.abspath(out)          # both sides run from the project directory, not the caller's
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    machine = machine_info()
    result = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "started": now_iso(), "finished": None,
              "command": command_line(), "host": socket.gethostname(),
              "machine": machine, "target": settings["target"], "config_file": settings["config"],
              "overrides": settings["overrides"], "seeds": settings["seeds"],
              "peer_max_epochs": settings["peer_max_epochs"], "peer_padding": settings["peer_padding"],
              "results": [], "summary": None}
    log(f"race on {machine_line(machine)}: to {settings['target']:.0%} test accuracy, seeds "
        f"{', '.join(map(str, settings['seeds']))}")
    for seed in settings["seeds"]:
        order = ("peer", "project") if seed % 2 else ("project", "peer")
        entry = {"seed": seed, "order": list(order)}
        for side in order:
            entry[side] = (run_peer if side == "peer" else run_project)(settings, seed, out)
            log(f"race: seed {seed} {side}: {describe_side(entry[side])}")
        for key in ("training", "wall"):
            entry[f"ratio_{key}"] = ratio(entry, f"{key}_s")
            entry[f"ratio_{key}_at_least"] = ratio_bound(entry, f"{key}_s")
        result["results"].append(entry)
        write_json(out, result)
    result["summary"] = summarize(result["results"])
    result["finished"] = now_iso()
    write_json(out, result)
    with open(os.path.join(out, "race.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    return result


def run_peer(settings: dict, seed: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "fmnist_dist.bench.peer", "--seed", str(seed), "--target", str(settings["target"]),
           "--max-epochs", str(settings["peer_max_epochs"]), "--padding", settings["peer_padding"]]
    if settings.get("peer_steps"):
        cmd += ["--steps-per-epoch", str(settings["peer_steps"])]
    if settings.get("data_dir"):
        cmd += ["--data-dir", settings["data_dir"]]
    side, log_path = launch(cmd, out, f"seed{seed}-peer", settings["timeout"])
    epochs = [json.loads(line) for line in read_lines(log_path) if line.startswith('{"epoch"')]
    reached = next((e for e in epochs if e["test_accuracy"] >= settings["target"]), None)
    last = reached or (epochs[-1] if epochs else None)
    best = max(epochs, key=lambda e: (e["test_accuracy"], -e["epoch"]), default=None)   # its first best epoch
    side.update(reached=reached is not None, epochs=last and last["epoch"],
                test_accuracy=last and last["test_accuracy"], training_s=last and last["training_s"],
                best_test_accuracy=best and best["test_accuracy"], best_epoch=best and best["epoch"],
                best_training_s=best and best["training_s"])
    if side["error"] is None and not epochs:
        side["error"] = f"no epoch reported; see {log_path}"
    return side


def run_project(settings: dict, seed: int, out: str) -> dict:
    run_dir = os.path.abspath(os.path.join(out, f"seed{seed}-project"))
    train = [sys.executable, "-m", "fmnist_dist", "train", "--config", settings["config"],
             "--set", f"train.seed={seed}", *(a for o in settings["overrides"] for a in ("--set", o)),
             "--run-dir", run_dir, "--overwrite"]
    cmd = [horovodrun_path(), "--gloo", "-np", str(settings["np"]), *train] if settings["np"] > 1 else train
    side, log_path = launch(cmd, out, f"seed{seed}-project", settings["timeout"])
    side["run_dir"] = run_dir
    try:
        with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        side.update(reached=False, error=side["error"] or f"no report ({e}); see {log_path}")
        return side
    accuracy = report["results"].get("test_accuracy")
    side.update(reached=accuracy is not None and accuracy >= settings["target"], epochs=len(report["epochs"]),
                test_accuracy=accuracy, training_s=report["timing"].get("training_s"),
                images_per_s=report["timing"].get("images_per_s"),
                precision=report["segments"][0].get("precision"))
    return side


def launch(cmd: list[str], out: str, name: str, timeout: float) -> tuple[dict, str]:
    log_path = os.path.join(out, "logs", f"{name}.log")
    t0 = time.perf_counter()
    error = run_logged(cmd, log_path, timeout)
    side = {"command": " ".join(shlex.quote(c) for c in cmd), "wall_s": time.perf_counter() - t0,
            "log": os.path.relpath(log_path, out), "error": error, "reached": False, "epochs": None,
            "test_accuracy": None, "training_s": None}
    return side, log_path


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f]


def ratio(entry: dict, key: str) -> float | None:
    """Peer over project: how many times faster the project reached the target."""
    peer, project = entry["peer"], entry["project"]
    if not (peer["reached"] and project["reached"]) or not project[key]:
        return None
    return peer[key] / project[key]


def ratio_bound(entry: dict, key: str) -> float | None:
    """Where the peer gave up without reaching the target and the project reached it: the peer's
    time to target is longer than all it trained, so the ratio is at least that over the project's."""
    peer, project = entry["peer"], entry["project"]
    if peer["reached"] or peer["error"] or not project["reached"] or not (peer[key] and project[key]):
        return None
    return peer[key] / project[key]


def summarize(results: list[dict]) -> dict:
    both = [r for r in results if r["ratio_training"] is not None]

    def median(values):
        return statistics.median(values) if values else None
    return {"every_seed_reached": all(r["peer"]["reached"] and r["project"]["reached"] for r in results),
            "project_reached": sum(r["project"]["reached"] for r in results),
            "peer_reached": sum(r["peer"]["reached"] for r in results), "seeds": len(results),
            "ratio_training_median": median([r["ratio_training"] for r in both]),
            "ratio_wall_median": median([r["ratio_wall"] for r in both]),
            "ratio_training_min": min((r["ratio_training"] for r in both), default=None),
            "ratio_training_at_least": min((r["ratio_training_at_least"] for r in results
                                            if r.get("ratio_training_at_least") is not None), default=None),
            "ratio_training_to_peer_best": [ratio_to_peer_best(r) for r in results]}


def ratio_to_peer_best(entry: dict) -> float | None:
    """Where the peer missed and the project reached the target: the ratio had the peer reached it at
    its best epoch. Not a bound; it shows how much of a "> R" rests on the peer's plateau lying just
    under the target rather than on the project's speed."""
    peer, project = entry["peer"], entry["project"]
    if peer["reached"] or not project["reached"] or not (peer.get("best_training_s") and project["training_s"]):
        return None
    return peer["best_training_s"] / project["training_s"]


def describe_side(side: dict) -> str:
    acc = "—" if side["test_accuracy"] is None else f"{side['test_accuracy']:.2%}"
    train = "—" if side["training_s"] is None else f"{side['training_s']:.1f} s"
    state = "reached" if side["reached"] else "missed"
    return (f"{state} ({acc} after {side['epochs']} epochs), training {train}, wall {side['wall_s']:.1f} s"
            + (f"; error: {side['error']}" if side["error"] else ""))


def markdown(result: dict) -> str:
    target = f"{result['target']:.0%}"
    peer = f"the peer with {result.get('peer_padding', 'valid')} padding"
    lines = [f"Race to {target} test accuracy on {machine_line(result['machine'])}, {peer} "
             f"({result['started'][:10]}; `{result['command']}`)", "",
             ]
    rows = []
    for r in result["results"]:
        p, q = r["peer"], r["project"]
        rows.append([
            str(r["seed"]), _n(p["epochs"]), _pct(p) + _best(p), _s(p["training_s"], p["reached"]), _s(p["wall_s"], p["reached"]),
            str(q.get("precision") or "—"), _n(q["epochs"]), _pct(q), _s(q["training_s"], q["reached"]),
            _s(q["wall_s"], q["reached"]), _x(r["ratio_training"]) + _mark(r), _x(r["ratio_wall"])])
    lines += table(["seed", "peer epochs", "peer test acc", "peer training s", "peer wall s", "project precision",
                    "project epochs", "project test acc", "project training s", "project wall s", "ratio training",
                    "ratio wall"], rows, "md", left={5})
    s = result["summary"] or {}
    if s:
        lines += ["", f"Median ratio (peer / project): training {_x(s['ratio_training_median'])}, wall "
                  f"{_x(s['ratio_wall_median'])}; reached {target}: project {s['project_reached']}/{s['seeds']}, "
                  f"peer {s['peer_reached']}/{s['seeds']} seeds."]
        if s.get("ratio_training_at_least") is not None:
            bounds = [f"seed {r['seed']} {_x(None, r['ratio_training_at_least'])}" for r in result["results"]
                      if r.get("ratio_training_at_least") is not None]
            lines.append(f"\\* The peer gave up short of {target} (after {result.get('peer_max_epochs', 'its')} "
                         f"epochs): no ratio, only a lower bound on the training ratio ({', '.join(bounds)}).")
        at_best = [x for x in s.get("ratio_training_to_peer_best") or [] if x is not None]
        if at_best:
            lines.append(f"Had the peer reached {target} at its best epoch, the training ratio would have been "
                         + ", ".join(f"{x:.2f}x" for x in at_best) + " (not a bound: how much of each > rests on "
                         f"the peer's plateau lying just under {target}).")
    return "\n".join(lines)


def _n(value) -> str:
    return "—" if value is None else str(value)


def _pct(side: dict) -> str:
    return "—" if side["test_accuracy"] is None else f"{side['test_accuracy']:.2%}"


def _best(side: dict) -> str:
    best = side.get("best_test_accuracy")
    if side["reached"] or best is None:
        return ""
    when = f" at epoch {side['best_epoch']}, {side['best_training_s']:.1f} s" if side.get("best_epoch") else ""
    return f" (best {best:.2%}{when})"


def _s(seconds, reached: bool) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f}" if reached else f"({seconds:.1f}, missed)"


def _mark(entry: dict) -> str:
    return " \\*" if entry.get("ratio_training_at_least") is not None else ""


def _x(value, at_least=None) -> str:
    if value is None and at_least is not None:
        return f"> {at_least:.2f}x"
    return "—" if value is None else f"{value:.2f}x"


def write_json(out: str, result: dict) -> None:
    atomic_write(os.path.join(out, "race.json"), json.dumps(result, indent=2) + "\n")
