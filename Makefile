# Every target sets itself up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HYPOTHESIS_PROFILE ?= ci
FUZZ_SECONDS ?= 60

.PHONY: test lint typecheck pytest demo fuzz bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict trio_taskgraph
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m trio_taskgraph demo

fuzz: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,fuzz]' || echo "atheris unavailable: harnesses fall back to hypothesis"
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python fuzz/run_all.py

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
