"""The package's structure keeps to the rules of docs/architecture.md: no import cycle, Horovod in
one module, TensorFlow only where the environment was prepared before it loads, reporting and
timing independent of training, and short functions."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from conftest import PYTHON, ROOT, run_env

PACKAGE = ROOT / "fmnist_dist"
# Modules that import TensorFlow when they load: imported only after environment.prepare.
TENSORFLOW_AT_LOAD = {
    "fmnist_dist.training.runtime", "fmnist_dist.training.model", "fmnist_dist.training.optim",
    "fmnist_dist.training.pipeline", "fmnist_dist.training.callbacks", "fmnist_dist.training.loop",
    "fmnist_dist.timing.probe", "fmnist_dist.timing.recorder", "fmnist_dist.reporting.tensorboard",
    "fmnist_dist.bench.measure",
    "fmnist_dist.bench.peer",       # the race's plain Keras script: TensorFlow's defaults, on purpose
}
# Functions allowed past MAX_FUNCTION_LINES, and why.
LONG_FUNCTIONS = {
    "fmnist_dist.launch.make_plan": "the launch plan, one decision after another, as the job log prints them",
}
MAX_FUNCTION_LINES = 85


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The package's modules (and tensorflow, horovod) that `name` imports."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    known = modules()
    return {m for m in found if m in known or m.split(".")[0] in ("tensorflow", "horovod")}


def test_no_import_cycle():
    """Imports inside functions count too: a lazy import only hides a cycle until that function runs."""
    graph = {name: {m for m in imports(name, path, False) if m in modules() and m != name}
             for name, path in modules().items()}
    # A package's __init__ is imported by its modules implicitly; only real edges count.
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in modules() if n != "fmnist_dist.__main__")
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    proc = subprocess.run([PYTHON, "-c", code, *names], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_the_rules_of_the_house():
    everything = {name: imports(name, path, False) for name, path in modules().items()}
    at_load = {name: imports(name, path, True) for name, path in modules().items()}
    horovod = sorted(n for n, found in everything.items() if any(m.startswith("horovod") for m in found))
    assert horovod == ["fmnist_dist.training.runtime"], "only the runtime imports Horovod"
    for name, found in everything.items():
        if name.startswith("fmnist_dist.reporting"):
            assert not any(m.startswith("fmnist_dist.training") for m in found), f"{name} imports training"
        if name.startswith("fmnist_dist.timing"):
            assert not any(m.startswith(("fmnist_dist.training", "fmnist_dist.reporting")) for m in found), name
    tensorflow = {n for n, found in at_load.items() if any(m.startswith("tensorflow") for m in found)}
    assert tensorflow == TENSORFLOW_AT_LOAD


def test_commands_that_never_train_never_load_tensorflow():
    """`report`, `launch-plan`, `preflight` and the command line itself stay light: TensorFlow would
    take seconds to load, and must not load before environment.prepare anyway."""
    code = ("import sys, fmnist_dist.cli, fmnist_dist.launch, fmnist_dist.preflight, fmnist_dist.reporting.compare, "
            "fmnist_dist.reporting.render, fmnist_dist.training.rundir, fmnist_dist.bench.run\n"
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_FUNCTIONS:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "functions over the limit (shorten them, or add them to LONG_FUNCTIONS with the reason): " \
        + "; ".join(long)
