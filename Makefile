# Set-up and everyday commands. `make demo` and `make test` install into .venv first when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
# The exact, known-good versions (pyproject.toml holds the ranges).
CONSTRAINTS := constraints.txt
# The default run leaves out tests marked slow (minutes) and gpu (need CUDA); `make test-all` runs the slow ones.
PYTEST := $(PY) -m pytest -q --durations=15

.PHONY: install demo test test-all gpu-smoke bench lint clean

install: $(STAMP)

# Rebuilt only when pyproject.toml or the constraints change (or the venv is missing).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) torch torchvision
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

demo: install
	$(PY) -m lightning_cli.demo

test: install
	$(PYTEST) tests

test-all: install
	$(PYTEST) -m "not gpu" tests

gpu-smoke: install
	bash bench/gpu_smoke.sh

bench: install
	$(PY) bench/run_all.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf runs wandb lightning_logs .pytest_cache
