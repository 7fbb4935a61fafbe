# The two commands a user needs: `make train` and `make test`. Each sets itself up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
NP ?= 2
CONFIG ?= configs/default.yaml
RUN_DIR ?= runs/make-train-$(shell date +%Y%m%d-%H%M%S)
EXTRA ?=
PYTEST_ARGS ?=

export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: setup setup-test train test bench clean

setup:
	@bash scripts/setup.sh run

setup-test:
	@bash scripts/setup.sh test

train: setup
	$(VENV)/bin/horovodrun -np $(NP) $(PY) -m fmnist_dist train --config $(CONFIG) --run-dir $(RUN_DIR) $(foreach s,$(EXTRA),--set $(s))

test: setup-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
