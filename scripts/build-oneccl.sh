#!/usr/bin/env bash
# Horovod with oneCCL for its CPU collectives (HOROVOD_CPU_OPERATIONS=CCL), over Intel MPI, alone in
# .venv/mpi/ccl: for the bench's ccl-2x1-fp32 variant (docs/benchmark.md). Not part of the default
# set-up: it measured no gain on 2 cores (docs/benchmark.md), and CI's time is better spent elsewhere.
# Needs Intel MPI's build first: bash scripts/setup.sh test (or MPI=intel bash scripts/setup.sh).
#
# oneCCL from PyPI: the CPU wheels (oneccl-cpu, oneccl-cpu-devel) ship libccl.so.1, which needs
# libccl.so.2, found only in the full oneccl wheel (whose other libraries want the SYCL runtime);
# that one library is taken from it.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
intel=$venv/mpi/intel
dir=$venv/mpi/ccl
version=2022.2.0
[ -f "$intel/env.sh" ] || { echo "build-oneccl: no Intel MPI in $intel (run: bash scripts/setup.sh test)" >&2; exit 1; }
if [ -f "$dir/site/.built" ]; then echo "build-oneccl: already built in $dir"; exit 0; fi
pip() { $venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
rm -rf "$dir" && mkdir -p "$dir/wheels"
pip download --no-deps -d "$dir/wheels" "oneccl-cpu==$version" "oneccl-cpu-devel==$version" "oneccl==$version"
pip install --no-deps --prefix "$dir" "$dir"/wheels/oneccl_cpu-*.whl "$dir"/wheels/oneccl_cpu_devel-*.whl
$venv/bin/python - "$dir" <<'EOF'
import glob, shutil, sys, zipfile
wheel = glob.glob(f"{sys.argv[1]}/wheels/oneccl-*.whl")[0]
with zipfile.ZipFile(wheel) as z, z.open(next(n for n in z.namelist() if n.endswith("/lib/libccl.so.2.0"))) as src, \
        open(f"{sys.argv[1]}/lib/libccl.so.2", "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
rm -rf "$dir/wheels"
here=$(pwd)
{ grep -v PYTHONPATH "$intel/env.sh"
  echo "export LD_LIBRARY_PATH=$here/$dir/lib:\$LD_LIBRARY_PATH"
  echo "export CCL_ROOT=$here/$dir"
  echo "export HOROVOD_CPU_OPERATIONS=CCL"
  echo "export PYTHONPATH=$here/$dir/site\${PYTHONPATH:+:\$PYTHONPATH}"; } > "$dir/env.sh"
started=$SECONDS
# shellcheck disable=SC1091
( source "$dir/env.sh"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_PYTORCH=1 \
    HOROVOD_WITHOUT_MXNET=1 $venv/bin/python -m pip install -q --no-build-isolation --no-cache-dir --no-deps \
    --target "$dir/site" horovod==0.28.1 )
touch "$dir/site/.built"
echo "build-oneccl: Horovod with oneCCL $version over Intel MPI built in $((SECONDS - started)) s, in $dir"
