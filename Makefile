# Every target sets itself up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HYPOTHESIS_PROFILE ?= ci
FUZZ_SECONDS ?= 60

.PHONY: test lint typecheck pytest demo fuzz bench clean postgres-server

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo,postgres]'
	touch $(STAMP)

test: $(STAMP) postgres-server
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict trio_taskgraph tests fuzz bench
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(BIN)/python -m pytest -q

# PostgreSQL server binaries for the throwaway test server (issue 11). Installed with apt
# when missing and we are root (CI); quiet when they are already there. Elsewhere the
# postgres tests fail with the same advice, never skip.
postgres-server:
	@if ! command -v pg_ctl >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing the Debian package postgresql (for the throwaway test server)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "PostgreSQL server binaries not found: install them with 'apt-get install postgresql'"; \
	  fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m trio_taskgraph demo

fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,fuzz]' || echo "atheris unavailable: harnesses fall back to hypothesis"
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python fuzz/run_all.py

# Line and branch coverage of the whole suite, child processes (cache server, workers) included.
.PHONY: coverage
coverage: $(STAMP) postgres-server
	$(BIN)/python -m pip install --quiet -e '.[test,demo,postgres,cov]'
	$(BIN)/python -m coverage erase
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(BIN)/python -m coverage run -m pytest -q
	$(BIN)/python -m coverage combine --quiet
	$(BIN)/python -m coverage report

bench: $(STAMP)
	$(BIN)/python -m trio_taskgraph bench

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .hypothesis

# Cancellation torture at every point (issue 10): suites size their campaigns with
# trio_taskgraph.testing.torture_max_points(), which reads TORTURE_MAX_POINTS (0 = all points).
.PHONY: torture
torture: $(STAMP)
	TORTURE_MAX_POINTS=0 HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(BIN)/python -m pytest -q -p tests.torture_tally

# Crash points (issue 10): a child SIGKILLed at every durable moment of small
# FsOutputRepository workloads (CRASH_MAX_POINTS=0: all of them; `make test` runs a sample).
.PHONY: crash
crash: $(STAMP)
	CRASH_MAX_POINTS=0 $(BIN)/python -m pytest -q -s tests/repository/test_crash_points.py
