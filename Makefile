# dask-rag — the two commands: `make demo` and `make test`.
#
# torch is installed *first* and pinned: this machine has a local CPU wheel of torch 2.13.0;
# letting pip resolve torch through sentence-transformers would download multi-GB CUDA wheels.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.dask-rag-installed
# what the demo needs (the package and its runtime dependencies); the test and lint toolchain
# (moto, flask, schemathesis, scann, langchain-openai, ...) comes with `make test`
RUNTIME_STAMP := $(VENV)/.dask-rag-runtime-installed
TORCH  := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-runtime qemu test test-all test-fast demo lint typecheck bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

install-runtime: $(RUNTIME_STAMP)

## qemu-user: the cross-instruction-set test runs the encoder under an emulated CPU of another
## generation (tests/test_cross_isa.py); installed with apt where we are root, else skipped
qemu:
	@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null) || \
	  echo "qemu-user not installed: the cross-instruction-set test will be skipped"; }

## the test suite CI runs: slow tests included, the few that take minutes left out
## (gpu/vllm tests skip without a GPU)
test: install
	$(BIN)/python -m pytest -m "not minutes" $(PYTEST_ARGS)

## everything, the minutes-long tests too (the cross-instruction-set test among them)
test-all: install qemu
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## the fast suite only
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not minutes" $(PYTEST_ARGS)

## ingest the built-in demo corpus (Python stdlib docs), answer sample questions, serve HTTP
demo: install-runtime
	$(BIN)/dask-rag demo $(DEMO_ARGS)

lint: install
	$(BIN)/ruff check dask_rag tests benchmarks
	$(BIN)/mypy dask_rag
	$(BIN)/lint-imports

bench: install
	$(BIN)/dask-rag bench

bench-quick: install
	$(BIN)/dask-rag bench --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .demo-index
