# structlearn: `make run` trains the default experiment, `make test` runs the tests.
# Both set up the environment first (uv, from the committed uv.lock).
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
ARGS ?=

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-extras --compile-bytecode
	@touch $@

setup: $(STAMP)  ## create .venv with the locked dependencies

run: setup  ## train the default experiment (dense MLP on moons, CPU, seconds); ARGS="method=static ..."
	$(BIN)/structlearn $(ARGS)

test: setup  ## the fast test suite (excludes tests marked slow or slurm), one worker per core
	$(BIN)/pytest -m "not slow and not slurm" -q -n auto

test-slurm: setup  ## the tests through a SLURM cluster (as root: scripts/slurm_local.sh start first)
	$(BIN)/pytest -m slurm -q -rs

test-full: setup  ## every test, slow ones included, one worker per core
	$(BIN)/pytest -q -n auto

bench: setup  ## benchmarks: runner vs a hand-written loop, in-memory batches vs DataLoader
	$(BIN)/python scripts/bench_runner.py

lint: setup  ## ruff lint and format check
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

format: setup  ## ruff fix and format
	$(BIN)/ruff check --fix src tests scripts
	$(BIN)/ruff format src tests scripts

clean:  ## remove caches (not outputs/)
	rm -rf .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +

.PHONY: help setup run test test-slurm test-full bench lint format clean
