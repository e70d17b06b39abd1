# From a fresh clone: `make dev` runs the whole platform on this machine, `make test` runs what CI runs.
# Each creates the virtualenv on first use with the README's install command, and installs again when
# pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# Written after a successful install: make compares its time with pyproject.toml's.
INSTALLED := $(VENV)/.installed
# Extra arguments: `make dev ARGS="--simulate-delay 2"`, `make test PYTEST_ARGS="tests/unit -x"`.
ARGS ?=
PYTEST_ARGS ?=

# The recipes run the virtualenv's tools (apphosting, nats-server, buf, pytest, ...) as an activated
# shell would.
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(BIN):$(PATH)

.PHONY: help install dev check test

help:
	@echo "make dev     set up on first use, then run apphosting dev (ARGS=... passes flags)"
	@echo "make test    set up on first use, then the checks and pytest (PYTEST_ARGS=... passes arguments)"
	@echo "make check   set up on first use, then only the checks (generated code, buf, ruff, mypy, imports)"

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV) && . $(VENV)/bin/activate && pip install -e '.[dev]'
	touch $@

dev: $(INSTALLED)
	$(BIN)/apphosting dev $(ARGS)

check: $(INSTALLED)
	$(BIN)/python scripts/gen_protos.py --check
	$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: check
	$(BIN)/pytest $(PYTEST_ARGS)
