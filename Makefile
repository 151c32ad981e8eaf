# The whole set-up on a fresh machine:  make demo   (train, record, analyse, plot)
#                                       make test   (the test suite)
#                                       make docs   (the documentation site, into site/)
# Tests run with one torch thread: their models are tiny, and on a busy 2-core machine torch's
# spinning threads made them up to 10x slower.  `make test` then runs the tests whose numbers depend
# on reduction order (distributed, float32, BLAS-heavy) again with two threads, so no tolerance
# holds only for one thread count (PHASEWATCH_TEST_THREADS reaches the tests' worker processes).
# torch is installed first, pinned to a CPU wheel: resolved as a plain dependency it would pull
# several GB of CUDA packages.  Set TORCH_SPEC= to keep a torch you installed yourself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: install demo test test-threads test-repeat lint bench claims docs clean

# the tests whose results depend on thread count / reduction order: run under 1 and 2 threads
THREADED_TESTS ?= tests/record/test_fsdp.py tests/record/test_fsdp_curvature.py tests/record/test_curvature_fsdp.py tests/record/test_distributed.py tests/record/test_integrations_ddp.py \
	tests/record/test_integrations.py tests/record/test_curvature.py tests/record/test_recorder.py tests/analysis/test_grad_cov.py \
	tests/analysis/test_gram.py tests/analysis/test_streaming.py
# the tests that race processes, signals and the disk: `make test-repeat` runs them REPEAT times
REPEAT ?= 5
REPEAT_TESTS ?= tests/record/test_distributed.py tests/record/test_fsdp.py tests/record/test_fsdp_curvature.py tests/record/test_curvature_fsdp.py tests/record/test_integrations_ddp.py \
	tests/record/test_crash.py tests/record/test_signals.py tests/fault

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
	OMP_NUM_THREADS=1 PHASEWATCH_TEST_THREADS=1 $(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory test-threads

test-threads: install
	OMP_NUM_THREADS=2 PHASEWATCH_TEST_THREADS=2 $(BIN)/python -m pytest -q -p no:cacheprovider $(THREADED_TESTS)

# a flakiness check by hand: each round's outcome, then how many of REPEAT rounds failed
test-repeat: install
	@fails=0; for i in $$(seq 1 $(REPEAT)); do \
	  start=$$(date +%s); \
	  if OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider $(REPEAT_TESTS) > .test-repeat-$$i.log 2>&1; \
	  then echo "round $$i: passed ($$(( $$(date +%s) - start )) s) $$(tail -n 1 .test-repeat-$$i.log)"; rm -f .test-repeat-$$i.log; \
	  else fails=$$((fails + 1)); echo "round $$i: FAILED, log kept in .test-repeat-$$i.log: $$(tail -n 1 .test-repeat-$$i.log)"; fi; \
	done; echo "test-repeat: $$fails of $(REPEAT) rounds failed"; [ $$fails -eq 0 ]

lint: install
	$(BIN)/ruff check src tests benchmarks examples

claims: install
	$(BIN)/phasewatch claims --out claims-out

# the site from docs/ and the docstrings; --strict: a broken reference or an unlisted page fails
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: install
	$(BIN)/python benchmarks/recorder_overhead.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) claims-out site .pytest_cache
