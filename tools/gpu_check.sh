#!/usr/bin/env bash
# GPU acceptance check (issue 18), run from a fresh clone on a machine with an NVIDIA GPU:
#
#     git clone <repo> alignjax && cd alignjax && make gpu-check      # or: bash tools/gpu_check.sh
#
# 1. `make env ACCEL=cuda`: the venv with jax[cuda12] (pyproject's `cuda` extra).
# 2. alignjax.backend.describe() printed; fails unless JAX's backend is "gpu".
# 3. The device-independent tests (pure kernels, sampler vs HF, statistics, theory, history) on the GPU:
#    JAX_PLATFORMS=cuda set explicitly, which wins over the CPU default tests/conftest.py only setdefault()s.
# 4. tools/compare_backends.py: the default experiment's initial evaluation, the same SFT'd players on
#    the CPU and on the GPU in one process (float32), must agree within 1e-4 on every exact metric.
# 5. `make experiment ARGS="loop.total_steps=20"` (one chunk of the default run) and `make bench`
#    (bench_ppo prints the PPO update's model FLOP/s and MFU against the device's bf16 peak).
# Prints a PASS/FAIL line per step and exits non-zero if any failed (steps 1-2 failing stop the script).
#
# NOT RUN YET: written on a CPU-only machine; nothing here has been executed on a real GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

LOG_DIR="runs/gpu_check/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$LOG_DIR"
TESTS=(tests/test_rl_kernels.py tests/test_sampling.py tests/test_stats.py tests/test_theory.py tests/test_history.py)
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME COMMAND...: runs it, tees its output to $LOG_DIR/NAME.log, records PASS/FAIL and time
    local name=$1
    shift
    echo
    echo "=== ${name}: $* ==="
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOG_DIR/${name}.log"
    local rc=${PIPESTATUS[0]}
    local verdict=PASS
    if [ "$rc" -ne 0 ]; then verdict="FAIL (exit $rc)"; FAILED=1; fi
    SUMMARY+=("$(printf '%-12s %-16s %5ss  %s' "$name" "$verdict" "$((SECONDS - t0))" "$*")")
    return "$rc"
}

summary() {
    echo
    echo "=== gpu_check summary (logs in $LOG_DIR) ==="
    printf '%s\n' "${SUMMARY[@]}"
    if [ "$FAILED" -eq 0 ]; then echo "ALL PASSED"; else echo "SOME STEPS FAILED"; fi
}

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi is not on PATH; this check needs a machine with an NVIDIA GPU" >&2
    exit 2
fi
nvidia-smi -L | tee "$LOG_DIR/nvidia-smi.log"

step env make env ACCEL=cuda || { summary; exit 1; }

describe_gpu() {  # prints alignjax.backend.describe(); fails unless JAX's backend is the GPU
    .venv/bin/python -c '
import json, sys
from alignjax.backend import describe
info = describe()
print(json.dumps(info, indent=2))
if info["backend"] != "gpu":
    sys.exit("JAX backend is %r, not gpu: the venv lacks the CUDA build (make env ACCEL=cuda)" % info["backend"])
'
}
step backend describe_gpu || { summary; exit 1; }

# Only the test files that exist in this checkout (the list above may name some a later change removed).
EXISTING=()
for t in "${TESTS[@]}"; do
    if [ -f "$t" ]; then EXISTING+=("$t"); else echo "gpu_check: skipping missing $t"; fi
done
step tests env JAX_PLATFORMS=cuda .venv/bin/python -m pytest -q "${EXISTING[@]}"

step compare env JAX_PLATFORMS=cuda,cpu .venv/bin/python tools/compare_backends.py
step experiment make experiment ARGS="loop.total_steps=20"
step bench make bench

summary
exit "$FAILED"
