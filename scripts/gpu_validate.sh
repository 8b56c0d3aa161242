#!/usr/bin/env bash
# One prepared GPU run for a fresh H100/H200 with the GPU image's stack (torch 2.11, triton 3.6,
# transformers 5.17, peft preinstalled; no network). Steps run in order of importance, each under
# its own time limit (total 9 minutes), so a run cut off early still leaves the most important
# results; every step writes its output into one folder with the device, versions, date, command
# and commit:
#   1 build the CUDA extension (no network: --no-build-isolation --no-deps)   180 s
#   2 ptune_fast info                                                           20 s
#   3 the gpu-marked tests (kernels vs the reference on the GPU)                120 s
#   4 kernel benchmarks (prefix attention, decode) at the issue shapes         100 s
#   5 the end-to-end preset (PEFT vs ptune_fast, bf16)                          120 s
# Usage: bash scripts/gpu_validate.sh [OUT_DIR]   (default benchmarks/results/gpu-<date>)
# On a machine without a GPU the script runs as far as it can (a dry run: build refused, GPU tests
# skipped) and says so in run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date -u +%Y-%m-%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/run.log"; }
step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    log "step $name (limit ${limit} s): $*"
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    log "step $name: rc=$rc after $(( $(date +%s) - t0 )) s$([ $rc = 124 ] && echo ' (time limit)')"
}

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "command: bash scripts/gpu_validate.sh $*"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not available"
    python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" | tee -a "$OUT/run.log"
GPU=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
[ "$GPU" = 1 ] || log "no CUDA device: dry run (the build is refused, GPU tests and CUDA benchmarks skip or fail fast)"

step build 180 env TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS=16 PTUNE_FAST_BUILD_CUDA="$GPU" \
    python -m pip install --no-build-isolation --no-deps -e .
step info 20 python -m ptune_fast info --json
step gpu_tests 120 env PTUNE_FAST_REQUIRE_EXT="$GPU" python -m pytest tests -m gpu -q -p no:cacheprovider
step bench_kernels 100 python -m pytest benchmarks/bench_prefix_attention.py benchmarks/bench_decode_attention.py \
    --benchmark-only -q -p no:cacheprovider --benchmark-json "$OUT/bench_kernels.json"
if [ "$GPU" = 1 ]; then
    step e2e 120 python -m benchmarks.run e2e --device cuda --preset 1b --out-dir "$OUT"
else
    step e2e 120 python -m benchmarks.run e2e --device cpu --preset smoke --out-dir "$OUT"
fi
log "done; results in $OUT"
