#!/usr/bin/env bash
# Idempotent set-up: system packages, .venv, pinned Python packages, Horovod built from source.
# Usage: scripts/setup.sh [run|test]   ("test" also installs Slurm, munge and sshd for the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
venv=.venv
stamp=$venv/.setup-$mode

# System software. As root on Debian/Ubuntu it is installed with apt. Anyone else (a cluster user:
# not root, often no apt or dpkg, MPI and compilers from environment modules) gets nothing installed
# system-wide: what is on PATH is used, and each missing piece is named with how to get it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  apt_pkgs=(openmpi-bin libopenmpi-dev cmake g++ make dataset-fashion-mnist)
  [ "$mode" = test ] && apt_pkgs+=(slurm-wlm munge openssh-server openssh-client iproute2 procps shellcheck)
  missing=()
  for p in "${apt_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
else
  missing=()
  need() { command -v "$1" >/dev/null || missing+=("$2"); }
  need mpirun "mpirun (Open MPI, to launch the ranks): module load openmpi, or conda install -c conda-forge openmpi"
  need mpicxx "mpicxx (Open MPI's C++ compiler wrapper, to build Horovod): module load openmpi, or conda install -c conda-forge openmpi-mpicxx"
  need g++ "g++ (a C++17 compiler, to build Horovod): module load gcc, or conda install -c conda-forge gxx_linux-64"
  need make "make (to build Horovod): module load make, or conda install -c conda-forge make"
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: running as $(id -un) without apt: nothing is installed system-wide; missing from PATH:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
  fi
  echo "setup: running as $(id -un) without apt: using $(command -v mpirun), $(command -v g++) from PATH"
fi

reqs_hash=$(cat requirements.txt requirements-dev.txt requirements-itex.txt pyproject.toml | sha256sum | cut -c1-16)
for done_stamp in "$stamp" $venv/.setup-test; do  # a test set-up includes the run set-up
  if [ -f "$done_stamp" ] && [ "$(cat "$done_stamp")" = "$reqs_hash" ]; then
    exit 0
  fi
done

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3.10 python3.9 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(not (3, 9) <= sys.version_info[:2] <= (3, 11))'; then
      python=$candidate; break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "setup: TensorFlow 2.15 needs Python 3.9-3.11; none found on PATH (module load python/3.11, or conda create -n fmnist python=3.11; or set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x $venv/bin/python ]; then
  echo "setup: creating $venv with $python"
  "$python" -m venv $venv || { echo "setup: $python -m venv failed (Debian/Ubuntu: apt-get install python3-venv; elsewhere: module load python/3.11, or conda create -n fmnist python=3.11 and PYTHON=\$CONDA_PREFIX/bin/python)" >&2; exit 1; }
fi
pip() { $venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "setup: installing pinned Python packages"
pip install -r requirements.txt -r requirements-dev.txt
if $venv/bin/python -m pip show -q intel-extension-for-tensorflow 2>/dev/null; then
  pip uninstall -y intel-extension-for-tensorflow intel-extension-for-tensorflow-lib  # see requirements-itex.txt
fi
if [ ! -f $venv/itex/tensorflow-plugins/libitex_cpu.so ]; then
  echo "setup: installing Intel Extension for TensorFlow into $venv/itex"
  pip install --no-deps --target $venv/itex -r requirements-itex.txt
fi

if ! $venv/bin/python -c 'import horovod.tensorflow' 2>/dev/null; then
  echo "setup: building horovod 0.28.1 against TensorFlow (takes a few minutes)"
  pip install cmake==3.29.6 packaging wheel
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
    HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    $venv/bin/python -m pip install -q --no-build-isolation --no-cache-dir horovod==0.28.1
fi
pip install --no-deps -e .

check=$(TF_CPP_MIN_LOG_LEVEL=3 $venv/bin/horovodrun --check-build 2>&1)
for want in '\[X\] TensorFlow' '\[X\] MPI' '\[X\] Gloo'; do
  echo "$check" | grep -q "$want" || { echo "$check" >&2; echo "setup: horovod lacks ${want//\\/}" >&2; exit 1; }
done
echo "$reqs_hash" > "$stamp"
echo "setup: done ($mode)"
