"""Set-up as a cluster user: not root, no apt or dpkg, no dataset package; MPI, compilers and Python
from PATH. The real scripts/setup.sh and a short 2-rank training run as an unprivileged user, in a
mount namespace where apt, dpkg and /usr/share/datasets are gone (as on a RHEL-family node)."""
from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT, need
from fmnist_dist import data

USER = "fmnist-user"
HIDDEN = ("/usr/bin/apt-get", "/usr/bin/apt", "/usr/bin/dpkg", "/usr/bin/dpkg-query")
USER_PATH = "/usr/local/bin:/usr/bin:/bin"


@pytest.fixture(scope="module")
def user_project():
    """A fresh copy of the project owned by an unprivileged user, and the data in that user's Keras
    cache (where tf.keras.datasets.fashion_mnist.load_data() leaves it)."""
    need("useradd", "unshare", "su", "mount")
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/bash", USER], check=True)
    home = Path(pwd.getpwnam(USER).pw_dir)
    base = Path(tempfile.mkdtemp(prefix="fmnist-user-"))
    project = base / "project"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (project / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, project / name)
    keras = home / ".keras" / "datasets" / "fashion-mnist"
    keras.mkdir(parents=True, exist_ok=True)
    for name in data.FILES.values():
        shutil.copy2(Path(data.DEBIAN_DIR) / f"{name}.gz", keras / f"{name}.gz")
    subprocess.run(["chown", "-R", f"{USER}:", str(base), str(home)], check=True)
    os.chmod(base, 0o755)
    yield project
    shutil.rmtree(base, ignore_errors=True)


def as_user(project: Path, script: str, path: str = USER_PATH, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run script as the user, in a mount namespace without apt, dpkg and the dataset package."""
    hide = " && ".join([f"mount --bind /dev/null {p}" for p in HIDDEN if os.path.exists(p)]
                       + [f"mount -t tmpfs none {Path(data.DEBIAN_DIR).parent}"])
    inner = f"cd {project} && export PATH={path} && {script}"
    cmd = ["unshare", "--mount", "--propagation", "private", "bash", "-c",
           f"{hide} && exec su -s /bin/bash {USER} -c {shlex.quote(inner)}"]
    env = {"PATH": USER_PATH, "LANG": "C.UTF-8"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_setup_names_what_is_missing_without_installing_anything(user_project):
    """Without MPI's C++ wrapper, a compiler and make on PATH: each is named with how to get it."""
    shim = user_project.parent / "bin-without-compilers"    # where the user can reach it
    shim.mkdir(exist_ok=True)
    for entry in Path("/usr/bin").iterdir():
        hidden = "g++" in entry.name or entry.name.startswith(("mpicxx", "mpic++", "mpiCC", "c++", "make"))
        if not hidden and not (shim / entry.name).exists():
            (shim / entry.name).symlink_to(entry)
    proc = as_user(user_project, "bash scripts/setup.sh run", path=str(shim), timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"setup: running as {USER} without apt: nothing is installed system-wide; missing from PATH:" in proc.stderr
    for piece in ("mpicxx (Open MPI's C++ compiler wrapper, to build Horovod): module load openmpi",
                  "g++ (a C++17 compiler, to build Horovod): module load gcc",
                  "make (to build Horovod): module load make"):
        assert f"  - {piece}" in proc.stderr
    assert "mpirun" not in proc.stderr.split("missing from PATH:")[1], "mpirun is on PATH"
    assert not (user_project / ".venv").exists(), "nothing set up before the missing pieces are there"


@pytest.mark.slow
def test_setup_and_two_rank_training_as_a_cluster_user(user_project):
    """The whole set-up (venv, pip, ITEX, Horovod built from source) and a short 2-rank training."""
    train = (".venv/bin/horovodrun --gloo -np 2 .venv/bin/python -m fmnist_dist train --config configs/lean.yaml "
             "--set train.epochs=1 --set train.steps_per_epoch=30 --run-dir runs/user")
    proc = as_user(user_project, f"bash scripts/setup.sh run && {train}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert f"setup: running as {USER} without apt" in out and "installing system packages" not in out
    assert "setup: done (run)" in out
    report = user_project / "runs" / "user" / "report.json"
    r = json.loads(report.read_text())
    assert r["status"] == "completed" and r["world"]["size"] == 2
    home = pwd.getpwnam(USER).pw_dir
    assert r["data"]["source"] == f"{home}/.keras/datasets/fashion-mnist"
    assert report.stat().st_uid == pwd.getpwnam(USER).pw_uid
