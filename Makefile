# The whole set-up on a fresh machine:  make demo   (train, record, analyse, plot)
#                                       make test   (the test suite)
# Tests run with one torch thread: their models are tiny, and on a busy 2-core machine torch's
# spinning threads made them up to 10x slower.
# torch is installed first, pinned to a CPU wheel: resolved as a plain dependency it would pull
# several GB of CUDA packages.  Set TORCH_SPEC= to keep a torch you installed yourself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install demo test lint bench claims clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[all]"
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/phasewatch demo --out $(DEMO_OUT) --control --overwrite

test: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks examples

claims: install
	$(BIN)/phasewatch claims --out claims-out

bench: install
	$(BIN)/python benchmarks/recorder_overhead.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) claims-out .pytest_cache
