"""The package's structure keeps to the rules of docs/architecture.md: its layers (imports point
down, inside functions too), no import cycle, Horovod in one module, TensorFlow only after the
environment is prepared, each fact defined once, and short functions."""
from __future__ import annotations

import ast
import re
import subprocess
from collections import defaultdict
from pathlib import Path

from conftest import PYTHON, ROOT, run_env

PACKAGE = ROOT / "fmnist_dist"
ARCHITECTURE_DOC = ROOT / "docs" / "architecture.md"
# The layers, bottom first, as docs/architecture.md states them. A module may import its own package
# and the layers below its own; the base layer's modules import one another too (without a cycle).
LAYERS = (
    ("errors", "files", "tables", "config", "cpu", "data", "basis", "scaling", "lease", "environment",
     "mpi"),
    ("timing", "preflight"),
    ("reporting",),
    ("training", "launch"),
    ("bench",),
    ("cli",),
    ("__main__",),
)
# Modules that import TensorFlow when they load: imported only after environment.prepare.
TENSORFLOW_AT_LOAD = {
    "fmnist_dist.training.runtime", "fmnist_dist.training.model", "fmnist_dist.training.optim",
    "fmnist_dist.training.pipeline", "fmnist_dist.training.callbacks", "fmnist_dist.training.loop",
    "fmnist_dist.timing.probe", "fmnist_dist.timing.recorder", "fmnist_dist.reporting.tensorboard",
    "fmnist_dist.bench.measure",
    "fmnist_dist.bench.peer",       # the race's plain Keras script: TensorFlow's defaults, on purpose
}
MAX_FUNCTION_LINES = 85


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported_by(node: ast.AST, package: str) -> set[str]:
    """What one import statement names, as absolute module names (a name imported from a package
    may be a module: both are kept, and filtered against the package's modules later)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return {base} | {f"{base}.{alias.name}" for alias in node.names}


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imports(name: str, path: Path, top_level_only: bool) -> set[str]:
    """The package's modules (and tensorflow, horovod) that `name` imports."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set().union(*(imported_by(node, package_of(name, path)) for node in nodes))
    known = modules()
    return {m for m in found if m in known or m.split(".")[0] in ("tensorflow", "horovod")}


def unit(module: str) -> str | None:
    """fmnist_dist.training.loop -> training; fmnist_dist.config -> config; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layer_of(module: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit(module) in units)


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


def test_every_module_has_a_layer():
    placed = {u for units in LAYERS for u in units}
    unplaced = sorted({unit(name) for name in modules()} - placed - {None})
    assert not unplaced, f"place {unplaced} in LAYERS here and in the Layers table of docs/architecture.md"


def allowed(importer: str, imported: str) -> bool:
    if unit(imported) is None or unit(imported) == unit(importer):
        return True
    below = layer_of(imported) < layer_of(importer)
    return below or layer_of(imported) == layer_of(importer) == 0


def test_imports_point_down_the_layers():
    """Imports inside functions count too: a lazy import sideways is still a dependency sideways."""
    wrong = []
    for name, path in modules().items():
        for imported in sorted(m for m in imports(name, path, False) if m in modules()):
            if not allowed(name, imported):
                wrong.append(f"{name} (layer {layer_of(name)}) imports {imported} (layer {layer_of(imported)})")
    assert not wrong, "imports that do not point down (docs/architecture.md, Layers): " + "; ".join(wrong)


def documented_layers() -> tuple[tuple[str, ...], ...]:
    """The Layers table of docs/architecture.md: lines `N  a, b, c  why` in the block after its heading."""
    section = ARCHITECTURE_DOC.read_text().split("\n## Layers\n", 1)[1]
    block = section.split("```", 2)[1]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"(\d+)\s+(\w+(?:, \w+)*)", line)
        if match:
            rows[int(match.group(1))] = tuple(match.group(2).split(", "))
    return tuple(rows[i] for i in sorted(rows))


def test_the_architecture_page_states_the_layers_enforced_here():
    assert documented_layers() == LAYERS, "docs/architecture.md, Layers: the table must equal LAYERS here"


def test_the_rules_of_the_house():
    everything = {name: imports(name, path, False) for name, path in modules().items()}
    at_load = {name: imports(name, path, True) for name, path in modules().items()}
    horovod = sorted(n for n, found in everything.items() if any(m.startswith("horovod") for m in found))
    assert horovod == ["fmnist_dist.training.runtime"], "only the runtime imports Horovod"
    tensorflow = {n for n, found in at_load.items() if any(m.startswith("tensorflow") for m in found)}
    assert tensorflow == TENSORFLOW_AT_LOAD


def prepare_calls(function: ast.AST) -> list[int]:
    """Lines where `function` calls environment.prepare."""
    return [node.lineno for node in ast.walk(function)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "prepare"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "environment"]


def test_code_that_loads_tensorflow_later_prepares_the_environment_first():
    """A function of a module without TensorFlow that imports a module loading it (cli.cmd_train,
    bench/worker.main) calls environment.prepare before that import: TensorFlow reads its variables
    once, as it loads."""
    late = []
    for name, path in modules().items():
        if name in TENSORFLOW_AT_LOAD:
            continue
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            prepared = min(prepare_calls(function), default=None)
            for node in ast.walk(function):
                loads = imported_by(node, package_of(name, path)) & TENSORFLOW_AT_LOAD
                if loads and (prepared is None or node.lineno < prepared):
                    late.append(f"{name}.{function.name} imports {sorted(loads)} before environment.prepare")
    assert not late, "; ".join(late)


def test_commands_that_never_train_never_load_tensorflow():
    """`report`, `launch-plan`, `preflight` and the command line itself stay light: TensorFlow would
    take seconds to load, and must not load before environment.prepare anyway."""
    code = ("import sys, fmnist_dist.cli, fmnist_dist.launch, fmnist_dist.preflight, fmnist_dist.reporting.compare, "
            "fmnist_dist.reporting.render, fmnist_dist.training.rundir, fmnist_dist.bench.run\n"
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(n for n in modules() if n != "fmnist_dist.__main__")
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    proc = subprocess.run([PYTHON, "-c", code, *names], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def proc_file(node: ast.AST) -> str | None:
    """'/proc/PID/stat' for the literal '/proc/self/stat' or f'/proc/{pid}/stat'; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr):
        text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    else:
        return None
    return re.sub(r"^/proc/(self|\{\})/", "/proc/PID/", text) if text.startswith("/proc/") else None


def definitions() -> dict[str, set[str]]:
    """Fact -> the modules defining it: module-level constants (by value; numbers aside), URLs,
    the /proc files read, and formatting helpers (by name)."""
    facts: dict[str, set[str]] = defaultdict(set)
    for name, path in modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                try:
                    value = ast.literal_eval(node.value)
                except ValueError:
                    continue
                if isinstance(value, (str, tuple, list, dict, set)):
                    facts[f"the constant {value!r}"].add(name)
            if isinstance(node, ast.FunctionDef) and re.match(r"_?(fmt|format)", node.name):
                facts[f"the formatter {node.name.lstrip('_')}"].add(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.match(r"https?://", node.value):
                facts[f"the URL {node.value}"].add(name)
            if proc_file(node):
                facts[f"the parsing of {proc_file(node)}"].add(name)
    return facts


def test_each_fact_is_defined_once():
    """Two copies drift apart: a constant, URL, /proc file or formatter lives in the lowest module
    its users may import, and they import it from there."""
    twice = {fact: sorted(where) for fact, where in definitions().items() if len(where) > 1}
    assert not twice, "defined in several modules: " + "; ".join(f"{f}: {', '.join(w)}" for f, w in twice.items())


def test_functions_are_short():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into steps): " + "; ".join(long)
