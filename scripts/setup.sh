#!/usr/bin/env bash
# Idempotent set-up: system packages, .venv, pinned Python packages, Horovod built from source.
# Usage: [MPI=openmpi|mpich|intel] scripts/setup.sh [run|test]
#   MPI: the MPI Horovod is built against and the jobs launch with (default: Open MPI). mpich and
#   openmpi come from apt as root (else from PATH: module load); intel is Intel MPI from PyPI, in
#   .venv/mpi/intel. Other than Open MPI, the MPI's variables are in .venv/mpi.env, which the job
#   scripts and make targets source (as `module load` would).
#   "test" also installs Slurm, munge and sshd, and builds Horovod against the other two MPIs as well,
#   each in .venv/mpi/NAME (env.sh puts it first), for the tests that run every MPI.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
venv=.venv
stamp=$venv/.setup-$mode
mpi=${MPI:-openmpi}
case $mpi in openmpi|mpich|intel) ;; *) echo "setup: MPI=$mpi: expected openmpi, mpich or intel" >&2; exit 1 ;; esac

# System software. As root on Debian/Ubuntu it is installed with apt. Anyone else (a cluster user:
# not root, often no apt or dpkg, MPI and compilers from environment modules) gets nothing installed
# system-wide: what is on PATH is used, and each missing piece is named with how to get it.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && command -v dpkg-query >/dev/null; then
  apt_pkgs=(openmpi-bin libopenmpi-dev cmake g++ make dataset-fashion-mnist)
  { [ "$mpi" = mpich ] || [ "$mode" = test ]; } && apt_pkgs+=(mpich libmpich-dev)
  [ "$mode" = test ] && apt_pkgs+=(slurm-wlm libpmi2-0 munge openssh-server openssh-client iproute2 procps shellcheck)
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
  if [ "$mpi" != intel ]; then  # Intel MPI comes from PyPI, into the venv
    name=$([ "$mpi" = mpich ] && echo MPICH || echo "Open MPI") module=$([ "$mpi" = mpich ] && echo mpich || echo openmpi)
    need mpirun "mpirun ($name, to launch the ranks): module load $module, or MPI=intel for Intel MPI from PyPI"
    need mpicxx "mpicxx ($name's C++ compiler wrapper, to build Horovod): module load $module, or conda install -c conda-forge $module-mpicxx"
  fi
  need g++ "g++ (a C++17 compiler, to build Horovod): module load gcc, or conda install -c conda-forge gxx_linux-64"
  need make "make (to build Horovod): module load make, or conda install -c conda-forge make"
  if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: running as $(id -un) without apt: nothing is installed system-wide; missing from PATH:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 1
  fi
  echo "setup: running as $(id -un) without apt: using $(command -v mpirun), $(command -v g++) from PATH"
fi

reqs_hash=$( (cat requirements.txt requirements-dev.txt requirements-itex.txt requirements-impi.txt pyproject.toml; echo "MPI=$mpi") | sha256sum | cut -c1-16)
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

# prepare_mpi NAME: .venv/mpi/NAME/env.sh puts that MPI first on PATH (and its libraries on
# LD_LIBRARY_PATH), as `module load` would. Debian installs Open MPI and MPICH side by side as
# mpirun.openmpi and mpirun.mpich; the shims in bin/ pick one. Elsewhere the MPI on PATH is used.
prepare_mpi() {
  local name=$1 dir=$venv/mpi/$1 here
  here=$(pwd)
  mkdir -p "$dir"
  if [ "$name" = intel ]; then
    if [ ! -x "$dir/bin/mpiexec.hydra" ]; then
      echo "setup: installing Intel MPI into $dir"
      pip install --no-deps --prefix "$dir" -r requirements-impi.txt
    fi
    # shellcheck disable=SC2016  # $PATH and $LD_LIBRARY_PATH are for env.sh to expand
    printf 'export I_MPI_ROOT=%s\nexport PATH=%s/bin:$PATH\nexport LD_LIBRARY_PATH=%s/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' \
      "$here/$dir" "$here/$dir" "$here/$dir" > "$dir/env.sh"
  elif [ -x "/usr/bin/mpirun.$name" ]; then
    mkdir -p "$dir/bin" "$dir/lib"
    for tool in mpicc mpicxx; do ln -sf "/usr/bin/$tool.$name" "$dir/bin/$tool"; done
    for tool in mpirun mpiexec; do  # not links: Hydra finds its proxy beside the path it was started by
      rm -f "$dir/bin/$tool"     # an earlier link: writing through it would overwrite the MPI's own
      printf '#!/bin/sh\nexec /usr/bin/%s.%s "$@"\n' "$tool" "$name" > "$dir/bin/$tool"
      chmod +x "$dir/bin/$tool"
    done
    # mpi4py's wheel loads MPICH's ABI as libmpi.so.12; Debian names that library libmpich.so.12.
    [ "$name" = mpich ] && ln -sf "$(mpicc.mpich -print-file-name=libmpich.so.12)" "$dir/lib/libmpi.so.12"
    # shellcheck disable=SC2016
    printf 'export PATH=%s/bin:$PATH\nexport LD_LIBRARY_PATH=%s/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}\n' \
      "$here/$dir" "$here/$dir" > "$dir/env.sh"
  else
    echo "# $name: the one on PATH" > "$dir/env.sh"
  fi
}

# build_horovod NAME [TARGET]: Horovod against that MPI, into the venv, or alone into TARGET.
build_horovod() {
  local name=$1 target=${2:-} started=$SECONDS
  echo "setup: building horovod 0.28.1 against $name${target:+ into $target} (takes a few minutes)"
  pip install cmake==3.29.6 packaging wheel
  # shellcheck disable=SC1090
  ( source "$venv/mpi/$name/env.sh"
    HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
      HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
      $venv/bin/python -m pip install -q --no-build-isolation --no-cache-dir \
      ${target:+--no-deps --target "$target"} horovod==0.28.1 )
  echo "setup: horovod against $name built in $((SECONDS - started)) s"
}

prepare_mpi "$mpi"
built_with=$(cat $venv/mpi/built-with 2>/dev/null || echo openmpi)  # set-ups before MPI= built Open MPI's
if ! $venv/bin/python -c 'import horovod.tensorflow' 2>/dev/null || [ "$built_with" != "$mpi" ]; then
  $venv/bin/python -m pip uninstall -y -q horovod 2>/dev/null || true
  build_horovod "$mpi"
  echo "$mpi" > $venv/mpi/built-with
fi
if [ "$mpi" = openmpi ]; then rm -f $venv/mpi.env; else ln -sf "mpi/$mpi/env.sh" $venv/mpi.env; fi
if [ "$mode" = test ]; then   # the other MPIs, each with its own Horovod, for the tests that run them all
  for other in openmpi mpich intel; do
    [ "$other" = "$mpi" ] && continue
    prepare_mpi "$other"
    site=$venv/mpi/$other/site
    if [ ! -f "$site/.built" ]; then
      rm -rf "$site"
      build_horovod "$other" "$site"
      touch "$site/.built"
    fi
    echo "export PYTHONPATH=$(pwd)/$site\${PYTHONPATH:+:\$PYTHONPATH}" >> "$venv/mpi/$other/env.sh"
  done
fi
pip install --no-deps -e .

check=$(TF_CPP_MIN_LOG_LEVEL=3 $venv/bin/horovodrun --check-build 2>&1)
for want in '\[X\] TensorFlow' '\[X\] MPI' '\[X\] Gloo'; do
  echo "$check" | grep -q "$want" || { echo "$check" >&2; echo "setup: horovod lacks ${want//\\/}" >&2; exit 1; }
done
echo "$reqs_hash" > "$stamp"
echo "setup: done ($mode)"
