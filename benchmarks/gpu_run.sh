#!/usr/bin/env bash
# The whole GPU check in one run, for a machine with one CUDA GPU (PyTorch, Triton, transformers, pytest and nvcc
# installed; no network needed):
#   1. device   what the machine is (nvidia-smi, versions)
#   2. build    the CUDA kernels, for the GPU found only (seconds to a few minutes), in place; info.txt
#   3. tests    the GPU test suite (tests/cuda): every op forward and backward on both GPU backends (cuda, triton),
#               fp16/bf16/fp32, head dims 32-256, ragged lengths with 1 and 512, dropout on and off, strided inputs;
#               FastBertModel and swap parity against HF; a short MLM+NSP training run whose loss must fall
#   4. bench    benchmarks/test_gpu.py: encoder inference, training step and peak memory against HF, GEMM rate
#   5. sanitize compute-sanitizer (memcheck, initcheck on both backends; racecheck, synccheck on the CUDA kernels)
#               over tests/cuda/sanitize_case.py; a sandbox whose sanitizer refuses the device is reported, not fatal
# Each step runs under its own timeout and the next one runs whatever happened; the whole run fits in about
# 8 minutes on an H200. Everything lands in $OUT (default ./gpu-results), at most 8 files: summary.txt (one line
# per step), device.txt, info.txt, tests.log, bench.log, sanitize.log, gpu.csv (the benchmark rows) and
# logs.tar.gz (every log). Exit status: 0 when every step passed.
#
#   benchmarks/gpu_run.sh             on the GPU machine
#   benchmarks/gpu_run.sh --dry-run   anywhere: checks that every step's command exists, imports and collects
#                                     (CI runs it), without a GPU
# Environment: PYTHON (default python3), OUT, MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST (default: the
# GPU's own architecture).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dry=0
if [[ "${1:-}" == "--dry-run" ]]; then
    dry=1
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--dry-run]" >&2
    exit 2
fi
python=${PYTHON:-python3}
out=${OUT:-gpu-results}
mkdir -p "$out"
logs=$(mktemp -d)
summary=$out/summary.txt
: >"$summary"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start_all=$SECONDS
failed=0

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $logs/NAME.log, and records the outcome
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
    rc=$?
    local verdict=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        verdict="TIMEOUT after ${limit} s"
        failed=1
    elif [[ $rc -ne 0 ]]; then
        verdict="FAILED (exit $rc)"
        failed=1
    fi
    local what="$*"
    printf '%-10s %-24s %4d s   %s\n' "$name" "$verdict" "$((SECONDS - t0))" "${what:0:110}" | tee -a "$summary"
    return $rc
}

# a one-line digest of a pytest log: its closing line
digest() { grep -E "passed|failed|error|no tests ran|collected" "$1" | tail -1 | tee -a "$summary"; }

if [[ $dry -eq 1 ]]; then
    step imports 120 "$python" -c "import torch, transformers, pytest, pytest_benchmark, mtbert_fast, mtbert_fast.info
import mtbert_fast.ops.dispatch as d; print('torch', torch.__version__, 'triton:', d.reason('triton', 'bias_gelu', torch.device('cuda'), torch.bfloat16) or 'importable')"
    step collect 300 "$python" -m pytest --collect-only -q tests/cuda benchmarks/test_gpu.py
    digest "$logs/collect.log"
    step sanitize 60 "$python" tests/cuda/sanitize_case.py --backend cuda --check
    step build 60 "$python" -c "import setuptools, ninja, torch.utils.cpp_extension"
    for tool in nvidia-smi nvcc compute-sanitizer; do
        where=$(command -v "$tool" || ls /usr/local/cuda/bin/"$tool" 2>/dev/null || echo "absent here (present on the GPU machine)")
        echo "tool       $tool: $where" | tee -a "$summary"
    done
    cp "$logs"/*.log "$out"/ 2>/dev/null
    rm -rf "$logs"
    [[ $failed -eq 0 ]] && echo "dry run: every step's command is present and imports" || echo "dry run: FAILED"
    exit $failed
fi

# ---- 1. device ---------------------------------------------------------------------------------------------------
{
    nvidia-smi
    "$python" -c "import torch, triton, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
torch.cuda.get_device_name(), 'sm_%d%d' % torch.cuda.get_device_capability(), 'triton', triton.__version__, \
'transformers', transformers.__version__)"
    nproc
} >"$out/device.txt" 2>&1
tail -2 "$out/device.txt" | tee -a "$summary"

# ---- 2. build for this GPU ----------------------------------------------------------------------------------------
arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} MTBERT_FAST_CUDA=1
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
fi
if step build 360 "$python" setup.py build_ext --inplace; then
    "$python" -m mtbert_fast.info >"$out/info.txt" 2>&1
    step loaded 60 "$python" -c "from mtbert_fast import _ext; assert _ext.loaded(), _ext.load_error; \
assert _ext.built_with_cuda(), 'no CUDA kernels in the build'; print(_ext.cuda_archs())"
else
    tail -40 "$logs/build.log"
fi

# ---- 3. GPU tests -------------------------------------------------------------------------------------------------
step tests 240 "$python" -m pytest tests/cuda -q -ra -p no:cacheprovider
digest "$logs/tests.log"

# ---- 4. benchmarks ------------------------------------------------------------------------------------------------
rm -f benchmarks/results/gpu.csv
step bench 240 "$python" -m pytest benchmarks/test_gpu.py --benchmark-only -s -q -p no:cacheprovider
grep -E "^\[" "$logs/bench.log" | tee -a "$summary"
digest "$logs/bench.log"
cp benchmarks/results/gpu.csv "$out/gpu.csv" 2>/dev/null

# ---- 5. compute-sanitizer -----------------------------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
: >"$logs/sanitize.log"
if [[ ! -x "$sanitizer" ]]; then
    echo "sanitize   compute-sanitizer not found: skipped" | tee -a "$summary"
else
    for run in "memcheck cuda" "memcheck triton" "initcheck cuda" "initcheck triton" "racecheck cuda" "synccheck cuda"; do
        set -- $run
        if (( SECONDS - start_all > 450 )); then
            echo "sanitize   $1 $2: skipped, the run is past its 7.5-minute mark" | tee -a "$summary"
            continue
        fi
        step "sanitize-$1-$2" 60 "$sanitizer" --tool "$1" --error-exitcode 9 \
            "$python" tests/cuda/sanitize_case.py --backend "$2"
        cat "$logs/sanitize-$1-$2.log" >>"$logs/sanitize.log"
        if grep -q "Device not supported" "$logs/sanitize-$1-$2.log"; then
            echo "sanitize   compute-sanitizer refuses this device (a sandbox without sanitizer support): skipped" \
                | tee -a "$summary"
            break
        fi
    done
fi

for f in tests bench sanitize; do cp "$logs/$f.log" "$out/$f.log" 2>/dev/null; done
tar -czf "$out/logs.tar.gz" -C "$logs" .
rm -rf "$logs"
echo "total      $((SECONDS - start_all)) s" | tee -a "$summary"
exit $failed
