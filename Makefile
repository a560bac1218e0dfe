# make test: set up .venv (on a fresh machine too) and run the suite.
# make demo: set up and run the FSDP2 quickstart on 2 CPU ranks.
# An existing torch is kept: one importable by $(PYTHON) is shared into the venv, and one
# already in $(VENV) is never replaced; otherwise the CPU build pinned in $(CONSTRAINTS).

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
NPROC ?= 2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pma-installed

.PHONY: setup test lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || { \
		if $(PYTHON) -c "import torch" 2>/dev/null; then \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) torch
	$(PY) -m pip install -q -e ".[dev]"
	@# DeepSpeed builds from source against the torch above: no build isolation.
	@$(PY) -c "import deepspeed" 2>/dev/null || \
		DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	@touch $@

lint: $(STAMP)
	$(PY) -m ruff check pma_dist tests benchmarks launch
	$(PY) -m ruff format --check pma_dist tests benchmarks launch

test: lint
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} $(PY) -m pytest -q -m "not gpu"

demo: $(STAMP)
	NPROC=$(NPROC) PYTHON=$(PY) bash launch/run_quickstart.sh

bench: $(STAMP)
	$(PY) benchmarks/snapshot_bandwidth.py --out bench_results/snapshot.json
	$(PY) benchmarks/export_throughput.py --out bench_results/export.json
	DS_ACCELERATOR=cpu $(PY) benchmarks/deepspeed_overhead.py --out bench_results/deepspeed.json

clean:
	rm -rf $(VENV) bench_results runs .pytest_cache .ruff_cache
