# Two commands on a fresh machine:  make setup  &&  make test
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# CPU machines get the CPU build of torch first, so no multi-GB CUDA wheels are pulled.
# On CUDA machines run `make setup TORCH_SPEC=torch` (or pre-install your CUDA torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup check lint format test te-tier te-check test-fast train-debug bench gpu-check

setup:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -c "import sys, torch, megatron.core, mm1_megatron; print('python', sys.version.split()[0], '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)"

# pytest exits 5 when it collects no tests; make treats any non-zero exit as failure.
# Tiers (pytest.ini): the fast tier first, so a broken unit test stops `make test` in
# about two minutes; then the slow tier (tests that start processes); then the Transformer
# Engine tier (tests/te), its own pytest process with the CPU stand-in of TE first on the
# path (docs/gpu.md); in the first two processes it skips at once.
TE_STANDIN = tests/te/standin
PYTEST = $(PY) -m pytest -q

test:
	$(PYTEST) -m "not slow" tests
	$(PYTEST) -m slow tests
	$(MAKE) te-tier

te-tier:
	PYTHONPATH=$(TE_STANDIN) $(PYTEST) tests/te

# The same tier against the real Transformer Engine (a CUDA machine or an NGC container).
te-check:
	$(GPU_PY) -m pytest -q tests/te

# The first tier (under 3 minutes on 2 cores): lint, format check, every test that starts
# no process (`-m "not slow"`, all folders).
check: lint
	$(PYTEST) -m "not slow" tests

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Rewrites files: run before committing.
format:
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-fast: check

train-debug:
	$(VENV)/bin/mm1 train --config configs/debug.yaml

bench:
	$(PY) tools/bench_step.py

# On a machine with one GPU (see docs/gpu.md): figures in gpu_check.json, table on stdout.
# Uses .venv's python where there is one, else $(PYTHON) (a bare machine's CUDA torch);
# WHEELS=DIR installs what the machine lacks from a folder made by `make gpu-wheels`.
GPU_PY = $(if $(wildcard $(PY)),$(PY),$(PYTHON))
WHEELS ?=

gpu-check:
	$(GPU_PY) tools/gpu_check.py --output gpu_check.json $(if $(WHEELS),--wheels $(WHEELS))

# On a machine with network: the wheel folder (under 60 MiB) for a GPU machine without one.
.PHONY: gpu-wheels
gpu-wheels:
	$(GPU_PY) tools/gpu_wheels.py --output $(or $(WHEELS),wheels)
