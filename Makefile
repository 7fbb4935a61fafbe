# The two commands a user needs: `make train` and `make test`. Each sets itself up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
NP ?= 2
CONFIG ?= configs/default.yaml
STAMP := $(shell date +%Y%m%d-%H%M%S)
RUN_DIR ?= runs/make-train-$(STAMP)
EXTRA ?=
PYTEST_ARGS ?=
BENCH_ARGS ?=
SEEDS ?= 1 2 3
RECIPES ?= default fast best seed
RECIPES_DIR ?= runs/recipes
SCAN_WORLDS ?= 2 4 8 16 32
RECIPE ?= fast
SCAN_DIR ?= runs/scan-$(RECIPE)

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup setup-test train test test-fast bench recipes scan basis docs clean

setup:
	@bash scripts/setup.sh run

setup-test:
	@bash scripts/setup.sh test

# Gloo, not MPI, as Horovod's controller on one node: 2 ranks on 2 cores trained 1.1x as fast as
# 1 rank under Gloo and 0.8x under MPI (docs/benchmark.md). Job scripts for clusters use mpirun/srun.
HOROVODRUN := $(VENV)/bin/horovodrun --gloo

SETS = $(foreach s,$(EXTRA),--set $(s))

# The preflight needs MPI (mpi4py gathers the ranks' answers); it takes seconds, so MPI's slower
# collectives do not matter there. MPICH and Intel MPI (.venv/mpi.env) start it with their own
# mpirun: horovodrun does not recognise Debian MPICH 4's and refuses to start.
train: setup
	if [ -f $(VENV)/mpi.env ]; then . $(VENV)/mpi.env; mpi=(mpirun -n $(NP)); else mpi=($(VENV)/bin/horovodrun --mpi -np $(NP)); fi; \
	TF_CPP_MIN_LOG_LEVEL=3 "$${mpi[@]}" $(PY) -m fmnist_dist preflight --config $(CONFIG) --run-dir $(RUN_DIR) $(SETS)
	$(HOROVODRUN) -np $(NP) $(PY) -m fmnist_dist train --config $(CONFIG) --run-dir $(RUN_DIR) $(SETS)

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tests alone (no training ranks, launchers or daemons): under 2 minutes, for quick edits.
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The configuration page's table, from the schema (a test fails when the page drifts from it).
docs: setup
	$(PY) -m fmnist_dist.config

# Side-by-side throughput of every speed option (docs/benchmark.md); figures, never assertions.
bench: setup
	$(PY) -m fmnist_dist bench $(BENCH_ARGS)

# Every recipe x seed on NP ranks, then the results table (docs/results.md).
recipes: setup
	@for r in $(RECIPES); do for s in $(SEEDS); do \
	  $(HOROVODRUN) -np $(NP) $(PY) -m fmnist_dist train --config configs/$$r.yaml --set train.seed=$$s \
	    --run-dir $(RECIPES_DIR)/$$r-seed$$s --overwrite $(SETS) || exit 1; \
	done; done
	$(PY) -m fmnist_dist report '$(RECIPES_DIR)/*' --seeds --format md

# Accuracy against global batch (docs/scaling.md): configs/RECIPE.yaml x SEEDS at the global batches
# of SCAN_WORLDS ranks of 256, simulated in one process; then the table. The global batch is set to
# weak scaling's: under auto the job would pick its own batch for the simulated ranks.
scan: setup
	@for w in $(SCAN_WORLDS); do for s in $(SEEDS); do \
	  $(PY) -m fmnist_dist train --config configs/$(RECIPE).yaml --set train.simulate_world_size=$$w \
	    --set train.global_batch_size=null --set train.seed=$$s --run-dir $(SCAN_DIR)/w$$w-seed$$s --overwrite $(SETS) || exit 1; \
	done; done
	$(PY) -m fmnist_dist report '$(SCAN_DIR)/w*' --scan --format md

# The accuracy basis the package ships for RECIPE (train.global_batch_size=auto): the scan, one
# rank's throughput against its batch on this CPU, both into fmnist_dist/bases/RECIPE.json.
basis: scan
	$(PY) -m fmnist_dist bench --config configs/$(RECIPE).yaml --batch-curve 16,32,64,128,256,512 --no-peak \
	  --out $(SCAN_DIR)/bench
	$(PY) -m fmnist_dist report '$(SCAN_DIR)/w*' --scan --format json --throughput $(SCAN_DIR)/bench/bench.json \
	  $(if $(TARGET),--target $(TARGET)) > fmnist_dist/bases/$(RECIPE).json.tmp
	mv fmnist_dist/bases/$(RECIPE).json.tmp fmnist_dist/bases/$(RECIPE).json

clean:
	rm -rf runs .pytest_cache
