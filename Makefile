# Two commands do all the set-up on a machine with only Python 3.11+:
#   make demo   run the deferrable example DAG against the local emulator
#   make test   the whole test suite: lint, the built distributions, unit, integration, and the
#               end-to-end deployment suite
#   (make test-compat runs the other Airflow lines and Pythons alone; make test includes it)
#   make bench  the benchmarks (not part of make test), written to BENCHMARKS.md
# Everything is created on first use and redone only when its inputs change.

PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
AIRFLOW := apache-airflow[postgres]==3.3.2
PIP_FLAGS := --quiet --disable-pip-version-check

VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

# The end-to-end suite runs Airflow from its own virtualenv, where the provider is installed from
# a built wheel, as a user would install it.
E2E_VENV := .venv-e2e
E2E_DEPS := $(E2E_VENV)/.deps
E2E_INSTALLED := $(E2E_VENV)/.installed
PROVIDER_SOURCES := $(shell find airflow_provider_altabots -name '*.py' -o -name py.typed 2>/dev/null)
EMULATOR_SOURCES := $(shell find emulator/altabots_emulator -name '*.py' 2>/dev/null)
COMPAT_WHEELS := dist/airflow_provider_altabots-*.whl dist/altabots_emulator-*.whl

# make bench compares this provider with others in its own virtualenv, so the test environment
# never carries them. Versions pinned for repeatable figures.
BENCH_VENV := .venv-bench
BENCH_DEPS := $(BENCH_VENV)/.deps
BENCH_INSTALLED := $(BENCH_VENV)/.installed
BENCH_PACKAGES := apache-airflow-providers-dbt-cloud==4.11.1 apache-airflow-providers-airbyte==6.2.0 \
	apache-airflow-providers-http==6.3.0 matplotlib==3.11.2

.PHONY: demo test test-compat lint dist unit e2e e2e-env postgres deployment bench bench-rate-limits install constraints clean

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is needed (python3.11, python3.12 or python3.13)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The provider and the emulator (two distributions of this repository, both editable), with the
# test and developers' tools of the dev dependency group, which pip installs from 25.1 on.
$(INSTALLED): pyproject.toml emulator/pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install $(PIP_FLAGS) "pip>=25.1"
	$(BIN)/python -m pip install $(PIP_FLAGS) -c constraints.txt "$(AIRFLOW)" -e . -e ./emulator --group dev
	@touch $@

install: $(INSTALLED)

$(E2E_VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is needed"; exit 1; }
	$(PYTHON) -m venv $(E2E_VENV)

$(E2E_DEPS): pyproject.toml constraints.txt | $(E2E_VENV)/bin/python
	$(E2E_VENV)/bin/python -m pip install $(PIP_FLAGS) -c constraints.txt "$(AIRFLOW)" requests httpx
	@touch $@

$(E2E_INSTALLED): $(E2E_DEPS) $(PROVIDER_SOURCES) | $(INSTALLED)
	rm -rf .e2e-dist
	$(BIN)/python -m pip wheel $(PIP_FLAGS) --no-deps -w .e2e-dist .
	$(E2E_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps --force-reinstall .e2e-dist/*.whl
	@touch $@

e2e-env: $(E2E_INSTALLED)

# Installs Debian's PostgreSQL where it is missing and this user may; otherwise says why the
# end-to-end suite will fall back to SQLite. Never fails the build by itself.
postgres:
	@scripts/ensure-postgres

demo: $(INSTALLED)
	$(BIN)/python scripts/demo.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The sdist and the wheel a release would upload, into a clean dist/, checked as the package index
# checks them. Built with the setuptools pinned in .venv rather than in a fresh isolated
# environment: no download, the same setuptools on every machine, about a second.
dist: $(INSTALLED)
	rm -rf dist
	$(BIN)/python -m build --quiet --no-isolation --outdir dist .
	$(BIN)/python -m build --quiet --no-isolation --outdir dist emulator
	$(BIN)/twine check --strict dist/*

unit: $(INSTALLED)
	$(BIN)/python -m pytest --ignore=tests/e2e

e2e: $(INSTALLED) e2e-env postgres
	$(BIN)/python -m pytest tests/e2e

test: lint dist e2e-env postgres
	$(BIN)/python -m pytest
	$(BIN)/python scripts/compat.py $(COMPAT_WHEELS)

# The other Airflow lines and Pythons, each in a virtualenv of its own under .venv-compat/, with
# the wheels make dist built (the provider's, and the emulator's for its pytest plugin): Airflow 2.11, 3.0, 3.1 and 3.2 on Python 3.11 from their pins in
# constraints/ (registration tests, connection form, every example DAG), and Airflow 3.3 on
# Python 3.12, 3.13 and 3.14 (every example DAG; a Python that is not found is skipped,
# loudly). make test runs it after the suite above.
test-compat: dist
	$(BIN)/python scripts/compat.py $(COMPAT_WHEELS)

# A running deployment to look at by hand: PostgreSQL, emulator, API server, scheduler,
# DAG processor and triggerer, on loopback; Ctrl-C stops it. The end-to-end suite's own harness
# (tests/e2e/harness), run as a module; `$(BIN)/python -m tests.e2e.harness --help` lists options.
deployment: $(INSTALLED) e2e-env postgres
	$(BIN)/python -m tests.e2e.harness

$(BENCH_VENV)/bin/python:
	@test -n "$(PYTHON)" || { echo "make: Python 3.11 or newer is needed"; exit 1; }
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_DEPS): pyproject.toml constraints.txt | $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python -m pip install $(PIP_FLAGS) -c constraints.txt "$(AIRFLOW)" requests httpx aiohttp $(BENCH_PACKAGES)
	@touch $@

$(BENCH_INSTALLED): $(BENCH_DEPS) $(PROVIDER_SOURCES) $(EMULATOR_SOURCES)
	rm -rf .bench-dist
	$(BENCH_VENV)/bin/python -m pip wheel $(PIP_FLAGS) --no-deps -w .bench-dist . ./emulator
	$(BENCH_VENV)/bin/python -m pip install $(PIP_FLAGS) --no-deps --force-reinstall .bench-dist/*.whl
	@touch $@

# Parse cost, triggerer fan-out and completion delay, beside the dbt Cloud, Airbyte and HTTP
# providers; writes BENCHMARKS.md and bench/results/. About 15 minutes on 2 cores.
bench: $(BENCH_INSTALLED)
	$(BENCH_VENV)/bin/python bench/run.py

# Many deferrable runs on one rate-limited API key (end-to-end tests 11 and 12) at full size:
# RATE_TASKS runs per scenario (make test runs them with 20). Prints each scenario's figures, also
# written to figures.json in the deployment's AIRFLOW_HOME. Not part of make test.
RATE_TASKS ?= 100
bench-rate-limits: $(INSTALLED) e2e-env postgres
	ALTABOTS_E2E_RATE_TASKS=$(RATE_TASKS) $(BIN)/python -m pytest tests/e2e/test_scenarios.py -k shared_key -s

# Re-resolve every dependency from scratch and pin the result: constraints.txt for Airflow 3.3, and
# constraints/airflow-<line>.txt for each older line from packages uploaded before a day after its
# release (scripts/constraints.py; needs an index that publishes upload times).
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install $(PIP_FLAGS) "pip>=25.1"
	.venv-constraints/bin/pip install $(PIP_FLAGS) "$(AIRFLOW)" -e . -e ./emulator --group dev
	{ echo "# Versions make test and make demo install (pip install -c constraints.txt)."; \
	  echo "# Resolved for $(AIRFLOW) on Python 3.11; regenerate with: make constraints"; \
	  .venv-constraints/bin/pip freeze --all --exclude pip --exclude-editable | grep -v '^-e'; } > constraints.txt
	rm -rf .venv-constraints
	$(PYTHON) scripts/constraints.py

clean:
	rm -rf $(VENV) $(E2E_VENV) $(BENCH_VENV) .venv-compat dist .e2e-dist .bench-dist .demo .pytest_cache .ruff_cache .mypy_cache
