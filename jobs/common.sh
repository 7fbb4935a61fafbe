# The part of jobs/train.pbs and jobs/train.slurm that does not depend on the scheduler. The job
# scripts source it after they cd to the directory the job was submitted from: PBS and Slurm run a
# spooled copy of the script, so this file is found there, not next to the copy.
# shellcheck shell=bash

die() { echo "fmnist-dist: error: $2" >&2; exit "$1"; }

# The Python environment: the conda environment CONDA_ENV, else the virtualenv VENV (default .venv).
# $1: how to name a conda environment with this scheduler (for the error message).
activate_environment() {
  if [ -n "${CONDA_ENV:-}" ]; then
    command -v conda >/dev/null || die 1 "CONDA_ENV=$CONDA_ENV but conda is not on PATH (module load conda?)"
    eval "$(conda shell.bash hook)" || die 1 "conda shell.bash hook failed"
    conda activate "$CONDA_ENV" || die 1 "cannot activate the conda environment $CONDA_ENV"
  else
    local venv=${VENV:-.venv}
    [ -f "$venv/bin/activate" ] || die 1 "no Python environment: $venv/bin/activate not found in $PWD (run: bash scripts/setup.sh, or $1)"
    # shellcheck source=/dev/null
    . "$venv/bin/activate"
    # The MPI Horovod was built against, when not Open MPI (MPI=mpich|intel bash scripts/setup.sh)
    # shellcheck source=/dev/null
    if [ -f "$venv/mpi.env" ]; then . "$venv/mpi.env"; fi
  fi
  if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
}

# RUN_DIR, PREFLIGHT, LAUNCH, SHIELD (what runs LAUNCH with SIGTERM blocked, under PBS) and
# RESUBMIT (PBS: the qsub command that continues the run) from `launch-plan`, which decides everything.
# $1: pbs or slurm; $2: the launcher when LAUNCHER is not set.
plan_launch() {
  RUN_DIR=${RUN_DIR:-}
  PREFLIGHT=() LAUNCH=() SHIELD=() RESUBMIT=
  local plan
  plan=$(python -m fmnist_dist launch-plan --scheduler "$1" --format shell --config "${CONFIG:-configs/default.yaml}" \
         --extra "${EXTRA:-}" --np "${NP:-}" --launcher "${LAUNCHER:-$2}" --run-dir "$RUN_DIR") || exit $?
  eval "$plan"
}

# Every rank checks its node first, through the same launcher (seconds, no TensorFlow): a node that
# would make the training fail (CPU, software, data, run directory) stops the job here.
run_preflight() {
  local status=0
  "${PREFLIGHT[@]}" || status=$?
  [ "$status" -eq 0 ] || [ "$stop_signal" != TERM ] || die 143 "SIGTERM during the preflight: the training was not launched; run dir $RUN_DIR"
  [ "$status" -eq 0 ] || die "$status" "preflight failed (see the lines above): the training was not launched; run dir $RUN_DIR"
}

# The launcher runs in the background so that signals are handled while it runs (bash runs traps
# only between commands). A stop request (stop_signal, set by the script's traps) is passed on as
# SIGUSR1 once the ranks have had 10 s to install their handlers, and again every 60 s while the
# launcher runs (in case it was lost). Under PBS, SHIELD starts mpirun with SIGTERM blocked: PBS
# signals the whole session at once, the ranks stop on their own SIGTERM, and mpirun must not kill
# them first. Sets rc to the launcher's exit status.
launch_and_wait() {
  [ "$stop_signal" != TERM ] || die 143 "SIGTERM before the launch; nothing started in $RUN_DIR"
  ${SHIELD[@]+"${SHIELD[@]}"} "${LAUNCH[@]}" &
  local pid=$! launched=$SECONDS forwarded=-60
  while kill -0 "$pid" 2>/dev/null; do
    if [ -n "$stop_signal" ] && [ $((SECONDS - launched)) -ge 10 ] && [ $((SECONDS - forwarded)) -ge 60 ]; then
      # horovodrun runs mpirun under `sh -c`: the signal goes to sh's children, not to sh
      if [ "$(ps -o comm= -p "$pid")" = sh ]; then pkill -USR1 -P "$pid"; else kill -USR1 "$pid"; fi 2>/dev/null
      forwarded=$SECONDS
    fi
    sleep 0.2   # not 1: under PBS the job's SIGKILL follows its SIGTERM after 10 s
  done
  rc=0
  wait "$pid" || rc=$?
}

# The job's last line when the training did not stop for a requeue (exit 75 is the caller's).
finish() {
  [ "$rc" -eq 0 ] || die "$rc" "launch failed: ${LAUNCH[0]} exited with status $rc (see the lines above); run dir $RUN_DIR"
  echo "fmnist-dist: done: report in $RUN_DIR/report.md"
}
