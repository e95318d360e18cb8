# Two commands on a fresh machine with Python 3.11+:  make demo  and  make test.
# Both create .venv and install what they need. torch is pinned to a CPU build so the CUDA stack
# is never pulled by accident; for a GPU build pass e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128.

PYTHON      ?= python3
VENV        ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS      ?= dev
DEMO_OUT    ?= runs/demo/sst2-teacher

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

# The main job on the embedded default: fine-tune the all-MiniLM-L6-v2 teacher on SST-2
# (2 epochs, about 20 minutes on 2 CPU cores) and evaluate it on the SST-2 dev set.
# Re-running resumes an interrupted run, or re-evaluates a finished one.
demo: $(STAMP)
	@if [ -f $(DEMO_OUT)/eval.json ]; then \
		$(BIN)/mlpruning eval $(DEMO_OUT); \
	elif [ -f $(DEMO_OUT)/resume/state.pt ]; then \
		$(BIN)/mlpruning finetune --task sst2 --out $(DEMO_OUT) --resume; \
	else \
		$(BIN)/mlpruning finetune --task sst2 --out $(DEMO_OUT); \
	fi

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
