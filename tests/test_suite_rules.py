"""The test suite's own rules (issue 25): no assertion that cannot fail, and one policy for a missing
piece, conftest's (skip on a developer machine, fail in CI), checked on the test files' syntax and
on real pytest processes."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, run_env

TESTS = Path(__file__).resolve().parent
LITERALS = (ast.Constant, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.JoinedStr)
# The files that own the policy: conftest, and this file, which tests it.
POLICY_OWNERS = {"conftest.py", Path(__file__).name}


def suite_files() -> list[Path]:
    return sorted(TESTS.glob("*.py"))


def asserts_that_cannot_fail(path: Path) -> list[str]:
    """`assert a == b if c else [x]` is `assert (a == b) if c else [x]`: on one branch it asserts a
    literal, which is always true (or always false). So is `assert (x, "message")`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Assert):
            continue
        test = node.test
        if isinstance(test, LITERALS):
            found.append((node.lineno, "asserts a literal"))
        elif isinstance(test, ast.IfExp) and (isinstance(test.body, LITERALS) or isinstance(test.orelse, LITERALS)):
            found.append((node.lineno, "one branch of `assert ... if ... else ...` is a literal "
                                       "(compute the expected value first, then compare)"))
    return [f"{path.name}:{line}: {problem}" for line, problem in sorted(found)]


def own_missing_piece_policies(path: Path) -> list[str]:
    """Reading $CI, pytest.skip and pytest.importorskip belong to conftest (IN_CI, unavailable,
    require_module); a skipif on the hardware (no native bf16) stays allowed."""
    found = []
    owner = path.name in POLICY_OWNERS
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "importorskip":
            found.append((node.lineno, "pytest.importorskip skips in CI too; use conftest.require_module"))
        elif not owner and isinstance(node, ast.Attribute) and node.attr == "skip" \
                and isinstance(node.value, ast.Name) and node.value.id == "pytest":
            found.append((node.lineno, "pytest.skip skips in CI too; use conftest.unavailable"))
        elif not owner and isinstance(node, ast.Constant) and node.value == "CI":
            found.append((node.lineno, "reads $CI itself; use conftest.IN_CI or conftest.unavailable"))
    return [f"{path.name}:{line}: {problem}" for line, problem in sorted(found)]


def test_no_assertion_has_a_branch_that_cannot_fail():
    found = [problem for path in suite_files() for problem in asserts_that_cannot_fail(path)]
    assert not found, "; ".join(found)


def test_only_conftest_decides_between_skip_and_fail():
    found = [problem for path in suite_files() for problem in own_missing_piece_policies(path)]
    assert not found, "; ".join(found)


def test_the_rules_see_what_issue_25_found(tmp_path):
    """The three patterns the issue found, each caught."""
    old = tmp_path / "test_old.py"
    old.write_text('import os\nimport pytest\n'
                   'tf = pytest.importorskip("tensorflow")\n'
                   'def test_x(native):\n'
                   '    assert [1] == [1, 2] if native else [1]\n'
                   '    if os.environ.get("CI") == "true":\n'
                   '        pytest.fail("in CI")\n'
                   '    pytest.skip("absent")\n')
    assert [p.split(": ")[0] for p in asserts_that_cannot_fail(old)] == ["test_old.py:5"]
    assert [p.split(": ")[0] for p in own_missing_piece_policies(old)] == \
        ["test_old.py:3", "test_old.py:6", "test_old.py:8"]


MISSING_AT_TOP = """import sys
sys.path.insert(0, {tests!r})
from conftest import require_module
require_module("fmnist_dist_no_such_module")

def test_never_collected():
    pass
"""
MISSING_IN_A_TEST = """import sys
sys.path.insert(0, {tests!r})
from conftest import unavailable

def test_needs_a_missing_piece():
    unavailable("no such piece")
"""


@pytest.mark.parametrize("ci, in_ci", [(None, False), ("0", False), ("1", True), ("true", True), ("True", True),
                                       ("yes", True)])
def test_a_missing_piece_skips_on_a_developer_machine_and_fails_in_ci(tmp_path, ci, in_ci):
    """A real pytest run of two test files, one missing a module at its top, one a piece in a test."""
    (tmp_path / "test_missing_at_top.py").write_text(MISSING_AT_TOP.format(tests=str(TESTS)))
    (tmp_path / "test_missing_in_a_test.py").write_text(MISSING_IN_A_TEST.format(tests=str(TESTS)))
    env = run_env()
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    proc = subprocess.run([PYTHON, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    summary = proc.stdout.strip().splitlines()[-1]
    if in_ci:
        assert proc.returncode == 1 and "1 failed, 1 error" in summary, proc.stdout[-3000:]
        assert f"CI={ci} but this test cannot run: cannot import fmnist_dist_no_such_module" in proc.stdout
        assert f"CI={ci} but this test cannot run: no such piece" in proc.stdout
    else:
        assert proc.returncode == 0 and "2 skipped" in summary, proc.stdout[-3000:]
        assert "cannot import fmnist_dist_no_such_module" in proc.stdout and "no such piece" in proc.stdout
