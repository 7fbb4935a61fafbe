"""The pins live in requirements.txt: the package's metadata is read from it, environment.yml repeats
it, and Intel Extension for TensorFlow is never a dependency (scripts/setup.sh installs it outside
site-packages, where TensorFlow would load it unasked)."""
from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import yaml

from conftest import PYTHON, ROOT, run_env

# What scripts/setup.sh installs from: its stamp must change when any of them does.
INSTALL_INPUTS = ("requirements.txt", "requirements-dev.txt", "requirements-itex.txt", "requirements-impi.txt",
                  "pyproject.toml")


def requirement_lines(name: str) -> list[str]:
    """A requirements file's requirements, comments and blank lines left out, spaces removed."""
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [re.sub(r"\s+", "", line) for line in lines if line]


def package_name(requirement: str) -> str:
    return re.split(r"[\[<>=!~;@\s]", requirement, 1)[0].lower().replace("_", "-")


def built_requires_dist(tmp_path: Path) -> list[str]:
    """Requires-Dist of the wheel setuptools would build from pyproject.toml (the metadata pip installs)."""
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "fmnist_dist").mkdir()
    (tmp_path / "fmnist_dist" / "__init__.py").write_text("")
    out = tmp_path / "metadata"
    out.mkdir()
    code = ("import sys\nfrom setuptools import build_meta\n"
            "print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))")
    proc = subprocess.run([PYTHON, "-c", code, str(out)], cwd=tmp_path, env=run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metadata = (out / proc.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    return [re.sub(r"\s+", "", line.split(":", 1)[1]) for line in metadata.splitlines()
            if line.startswith("Requires-Dist:")]


def test_the_package_requires_exactly_the_pins_of_requirements_txt(tmp_path):
    assert sorted(built_requires_dist(tmp_path)) == sorted(requirement_lines("requirements.txt")), \
        "pyproject.toml must take its dependencies from requirements.txt, and add none (no extras)"


def test_environment_yml_pins_what_the_requirements_files_pin():
    spec = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(item["pip"] for item in spec["dependencies"] if isinstance(item, dict) and "pip" in item)
    expected = requirement_lines("requirements.txt") + requirement_lines("requirements-dev.txt")
    assert sorted(re.sub(r"\s+", "", p) for p in pip) == sorted(expected), \
        "environment.yml: its pip list must equal requirements.txt + requirements-dev.txt"


def test_intel_extension_is_no_dependency_of_any_kind():
    itex = {package_name(r) for r in requirement_lines("requirements-itex.txt")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project.get("dependencies", []))
    declared += [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
    declared += requirement_lines("requirements.txt") + requirement_lines("requirements-dev.txt")
    found = sorted({package_name(r) for r in declared} & itex)
    assert not found, f"pyproject.toml or requirements*.txt name {found}: they belong in requirements-itex.txt only"


def test_setup_reinstalls_when_anything_it_installs_from_changes():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    hashed = re.search(r"^reqs_hash=\$\( ?\(?cat ([^|;]+)[|;]", setup, re.M)
    assert hashed, "scripts/setup.sh: no reqs_hash=$(cat FILES | sha256sum ...) line"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("tool", {}).get("setuptools", {})
    dynamic = setuptools.get("dynamic", {})
    read_by_build = {name for entry in dynamic.values() for name in entry.get("file", [])}
    missing = sorted((set(INSTALL_INPUTS) | read_by_build) - set(hashed.group(1).split()))
    assert not missing, f"scripts/setup.sh: reqs_hash leaves out {missing}; a change there would not reinstall"
