# voxaffect — `make run` sets up and serves; `make test` sets up and runs every test tier CI runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, so nothing pulls a different build. On this CI machine pip takes the CPU build
# from local disk; elsewhere PyPI's 2.13.0 (CUDA on Linux). CPU-only elsewhere:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
MODEL ?= iic/emotion2vec_plus_large
PYTEST_ARGS ?=

K8S_VALIDATE := deploy/kubernetes/validate
JS_CLIENT := clients/js

.PHONY: setup system node run demo test test-image lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node: $(K8S_VALIDATE)/node_modules/.package-lock.json $(JS_CLIENT)/node_modules/.package-lock.json  ## Node packages the tests use, from the lockfiles

%/node_modules/.package-lock.json: %/package-lock.json
	cd $* && npm ci --no-audit --no-fund --loglevel=error

system:  ## OS packages the tests use (espeak-ng, sox, chromium, prometheus, redis); needs root
	scripts/setup-system.sh

run: setup  ## serve the real model (downloaded on first use) on 127.0.0.1:5000
	$(BIN)/voxaffect serve --model $(MODEL) $(ARGS)

demo: setup  ## serve a RANDOM-WEIGHT model (no download); the page says so
	test -d models/tiny || $(BIN)/voxaffect random-model models/tiny --size tiny
	$(BIN)/voxaffect serve --model models/tiny $(ARGS)

lint: setup
	$(BIN)/ruff check engine server client tests bench
	$(BIN)/ruff format --check engine server client tests bench
	$(BIN)/mypy

# four workers on two cores: most tests wait on real-time streams and server processes. One run
# each on a 2-core AMD EPYC: pytest 393-425 s with three workers, 364 s with four; beside
# `stress-ng --cpu 1` (a slower machine) 493 s with three, 469 s with four; every test passing.
# Most of a run's CPU is server starts (29 of them): FunASR imported in part, one tuning per
# worker and torch-free prosody workers took a run from 939 to 635 CPU seconds
test: system setup node lint  ## every tier but the image install check, four workers (a file stays on one)
	$(BIN)/python -m pytest -m "not image" -n 4 --dist loadfile --durations=10 $(PYTEST_ARGS)

test-image: setup  ## the Dockerfile's install steps in a fresh venv (2 min; CI: when they change)
	$(BIN)/python -m pytest -m image $(PYTEST_ARGS)

bench: setup  ## not part of CI: full-size random checkpoint, then the engine benchmark
	test -d models/large || $(BIN)/voxaffect random-model models/large --size large
	$(BIN)/python -m bench.engine --model models/large

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache $(K8S_VALIDATE)/node_modules $(JS_CLIENT)/node_modules
