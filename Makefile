# Two commands on a fresh machine:  make setup  &&  make test
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch first, so no multi-GB CUDA wheels are pulled.
# On CUDA machines run `make setup TORCH_SPEC=torch` (or pre-install your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup check lint format test test-fast train-debug bench gpu-check

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "import sys, torch, megatron.core, mm1_megatron; print('python', sys.version.split()[0], '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)"

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
test:
	$(PY) -m pytest -q tests

# The first tier (under 3 minutes on 2 cores): lint, format check, the fast tests.
check: lint
	$(PY) -m pytest -q tests/unit tests/data

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrites files: run before committing.
format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: check

train-debug:
	$(VENV)/bin/mm1-train --config configs/debug.yaml

bench:
	$(PY) tools/bench_step.py

# On a machine with one GPU (see docs/gpu.md): figures in gpu_check.json, table on stdout.
gpu-check:
	$(PY) tools/gpu_check.py --output gpu_check.json
