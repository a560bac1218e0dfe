# make demo: set up .venv and run the main job (pre-training with PMA, the annealing forecast).
# make test: set up .venv with the test extras and DeepSpeed, then run ruff and the suite.
# An existing torch is kept: one importable by $(PYTHON) is shared into the venv, and one
# already in $(VENV) is never replaced; otherwise the CPU build pinned in $(CONSTRAINTS).

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
NPROC ?= 2
CONFIG ?= configs/demo_dense.yaml
PY := $(VENV)/bin/python
BASE := $(VENV)/.pma-base
DEMO := $(VENV)/.pma-demo
DEV := $(VENV)/.pma-dev

.PHONY: setup test lint demo demo-full quickstart bench gpu-check clean

setup: $(DEV)

$(BASE): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || { \
		if $(PYTHON) -c "import torch" 2>/dev/null; then \
			$(PYTHON) -m venv --system-site-packages $(VENV); \
		else $(PYTHON) -m venv $(VENV); fi; }
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c $(CONSTRAINTS) torch
	@touch $@

$(DEMO): $(BASE)
	$(PY) -m pip install -q -e ".[demo]"
	-$(VENV)/bin/pma-dist build-kernel
	@touch $@

$(DEV): $(BASE)
	$(PY) -m pip install -q -e ".[dev]"
	@# DeepSpeed builds from source against the torch above: no build isolation.
	@$(PY) -c "import deepspeed" 2>/dev/null || \
		DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.19,<0.20"
	-$(VENV)/bin/pma-dist build-kernel
	@touch $@ $(DEMO)

lint: $(DEV)
	$(PY) -m ruff check pma_dist tests benchmarks launch tools
	$(PY) -m ruff format --check pma_dist tests benchmarks launch tools

# Test ranks run with uninitialized memory filled with NaN (pma_dist/testing/_ranks.py).
test: lint
	PMA_TEST_FILL_UNINITIALIZED=1 DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} \
		$(PY) -m pytest -q -m "not gpu"

demo: $(DEMO)
	NPROC=$(NPROC) CONFIG=$(CONFIG) PYTHON=$(PY) bash launch/run_single_node.sh

demo-full: $(DEMO)
	NPROC=$(NPROC) CONFIG=$(CONFIG) PYTHON=$(PY) bash launch/run_single_node.sh --full

quickstart: $(DEMO)
	NPROC=$(NPROC) PYTHON=$(PY) bash launch/run_quickstart.sh

bench: $(DEV)
	$(PY) -m benchmarks.snapshot_bandwidth --out bench_results/snapshot.json
	$(PY) -m benchmarks.online_vs_offline --out bench_results/offline.json
	$(PY) -m benchmarks.memory_per_rank --out bench_results/memory.json
	$(PY) -m benchmarks.training_overhead --out bench_results/training.json
	$(PY) -m benchmarks.export_throughput --out bench_results/export.json
	$(PY) -m benchmarks.export_ranks --out bench_results/export_ranks.json
	$(PY) -m benchmarks.scale_plan --out bench_results/scale_plan.json
	$(PY) -m benchmarks.compressed_window --out bench_results/compressed.json
	DS_ACCELERATOR=cpu $(PY) -m benchmarks.deepspeed_overhead --out bench_results/deepspeed.json

# On a machine with one CUDA GPU: the accelerator path checked from this tree, nothing installed.
gpu-check:
	PYTHON=$(PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) bench_results runs .pytest_cache .ruff_cache
