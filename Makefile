# Two commands do all the set-up on a machine with only Python 3.11+:
#   make demo   run the deferrable example DAG against the local emulator
#   make test   the whole test suite (lint included)
# Both create .venv on first use and reinstall only when pyproject.toml or constraints.txt change.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
AIRFLOW_VERSION := 3.3.2

.PHONY: demo test lint install constraints clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is needed (python3.11, python3.12 or python3.13)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt \
		"apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	@touch $@

install: $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python scripts/demo.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# Re-resolve every dependency from scratch and pin the result.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet "apache-airflow==$(AIRFLOW_VERSION)" -e ".[test]"
	{ echo "# Versions make test and make demo install (pip install -c constraints.txt)."; \
	  echo "# Resolved for Apache Airflow $(AIRFLOW_VERSION) on Python 3.11; regenerate with: make constraints"; \
	  .venv-constraints/bin/pip freeze --exclude-editable | grep -v '^-e'; } > constraints.txt
	rm -rf .venv-constraints

clean:
	rm -rf $(VENV) .demo .pytest_cache .ruff_cache
