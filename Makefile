# Quick start: `make run` (embedded Triton + Redis + gateway on :8080) and `make test`.
# Python 3.11 or 3.12 (the versions the lock covers): python3 where it is one of them, else python3.12/3.11.
PYTHON ?= $(shell for p in python3 python3.12 python3.11; do \
	  $$p -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null && { echo $$p; break; }; \
	done)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test unit integration lint typecheck bench chaos fuzz install lock lock-check upgrade clean

# Every install comes from the hash-pinned lock under requirements/ (scripts/lock.py; docs/development.md):
# pip bootstraps uv from requirements/uv.txt, uv installs the lock of this Python and the install profile.
$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "Python 3.11 or 3.12 is required (python3, python3.12 or python3.11 on PATH)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r requirements/uv.txt

# Reinstall whenever the lock changes. `make run` needs only the runtime and the embedded servers;
# `make test` adds the test tools.
RUN_STAMP := $(VENV)/.installed-run

$(RUN_STAMP): pyproject.toml requirements/py*/run.txt | $(BIN)/python
	$(BIN)/python scripts/lock.py install run
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml requirements/py*/test.txt | $(BIN)/python
	$(BIN)/python scripts/lock.py install test
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/tgw up

test: $(STAMP)
	$(BIN)/ruff check app tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo
	$(BIN)/python -m pytest -q tests/unit tests/integration

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# `make chaos`: the chaos suite with longer phases (two embedded Tritons, Redis, job workers and a second
# gateway killed and stopped under load; figures in chaos-results/report.json). `make test` runs it short.
chaos: $(STAMP)
	TGW_CHAOS_SCALE=$${TGW_CHAOS_SCALE:-4} $(BIN)/python -m pytest -q -p no:cacheprovider tests/integration/test_chaos.py

# `make fuzz`: the OpenAPI schema fuzz (schemathesis) against the real stack for TGW_FUZZ_SECONDS per mode
# (auth off, auth with keys; default 300 s each): 0 server errors and 0 contract failures, figures in
# fuzz-results/schema-fuzz.json. `make test` runs one bounded round per mode.
fuzz: $(STAMP)
	rm -f fuzz-results/schema-fuzz.json
	TGW_FUZZ_SECONDS=$${TGW_FUZZ_SECONDS:-300} $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/integration/test_fuzz_schema.py

# lint-imports: the import layers of app/ (import-linter; the contracts are [tool.importlinter] in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check app tests scripts
	$(BIN)/ruff format --check app tests scripts
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache --no-logo

# `make bench`: the whole benchmark (Triton direct vs the gateway; reports in bench-results/).
# BENCH_ARGS passes options, e.g. `make bench BENCH_ARGS=--quick`.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml requirements/py*/bench.txt | $(BIN)/python
	$(BIN)/python scripts/lock.py install bench
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/tgw bench $(BENCH_ARGS)

# `make lock`: rewrite the locks after a change to pyproject.toml's dependencies (same pins where allowed).
# `make upgrade`: the newest versions pyproject.toml allows, then the whole suite (a deliberate, tested change).
# `make lock-check`: exit 1 if a lock is not what `make lock` would write (also a test in `make test`).
lock: | $(BIN)/python
	$(BIN)/python scripts/lock.py compile

lock-check: | $(BIN)/python
	$(BIN)/python scripts/lock.py check

upgrade: | $(BIN)/python
	$(BIN)/python scripts/lock.py compile --upgrade
	$(MAKE) test

clean:
	rm -rf $(VENV) .tgw .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
