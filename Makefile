# The two commands of the README: `make demo` and `make test`. Each does its own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PIP := $(BIN)/pip -q --disable-pip-version-check
PYTEST_ARGS ?=

.PHONY: install demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel
	$(PIP) install -c constraints.txt torch==2.13.0 numpy
	# DeepSpeed builds its ops lazily; it needs torch in the build environment.
	DS_BUILD_OPS=0 $(PIP) install -c constraints.txt --no-build-isolation deepspeed
	$(PIP) install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m avts_dist.demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m tests.benchmarks.run_all --out bench-results

clean:
	rm -rf $(VENV) runs mlruns demo bench-results .pytest_cache .ruff_cache
