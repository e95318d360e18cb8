# Two commands on a fresh machine with Python 3.11+:  make demo  and  make test.
# Both create .venv and install what they need. torch is pinned to a CPU build so the CUDA stack
# is never pulled by accident; for a GPU build pass e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS      ?= dev
DEMO_CONFIG ?= configs/run-quick-sst2.toml
DEMO_OUT    ?= runs/demo

BIN   := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-fast lint clean

# torch alone comes from TORCH_INDEX, without its dependencies: those come from the normal index
# with the project, so an unreachable TORCH_INDEX costs one short lookup, not one per dependency.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-deps --retries 1 --timeout 10 "torch==$(TORCH_VERSION)" --index-url $(TORCH_INDEX)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(STAMP)

# The main job on the embedded default: the whole pipeline on all-MiniLM-L6-v2 + SST-2 (fine-tune,
# step 1, step 2, export, optimize, verify, bench, report) into $(DEMO_OUT), about 20 minutes on
# 2 CPU cores. Re-running skips finished stages and resumes an interrupted training.
demo: $(STAMP)
	$(BIN)/mlpruning run $(DEMO_CONFIG) --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
