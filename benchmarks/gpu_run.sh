#!/usr/bin/env bash
# The whole GPU check in one run, for a machine with one CUDA GPU (PyTorch, Triton, transformers, pytest and nvcc
# installed; no network needed):
#   1. device   what the machine is (nvidia-smi, versions)
#   2. build    the CUDA kernels for the GPU found only, and the CPU kernels for this CPU only, in place; info.txt
#   3. errors   tests/cuda/errors_case.py --toolchains: a failed argument check must reach Python as an exception
#               from every kind of code (torch, the CPU kernels, the CUDA translation units) and from a one-function
#               extension built with each compiler, each in its own process; it names the compilers and runtimes.
#               Where the build's compiler is at fault and the system's is not, the package is rebuilt with the
#               system's (CC, CXX, LDSHARED) for the steps that follow, and probed again
#   4. tests    the GPU test suite (tests/cuda): every op forward and backward on both GPU backends (cuda, triton),
#               fp16/bf16/fp32, head dims 32-256, ragged lengths with 1 and 512, dropout on and off, strided inputs;
#               FastBertModel and swap parity against HF; a short MLM+NSP training run whose loss must fall. Each
#               failure is written to failures.log as it happens
#   5. bench    benchmarks/test_gpu.py: encoder inference, training step and peak memory against HF, GEMM rate
#   6. sanitize compute-sanitizer (memcheck, initcheck on both backends; racecheck, synccheck on the CUDA kernels)
#               over tests/cuda/sanitize_case.py; a sandbox whose sanitizer refuses the device is reported, not fatal
# Each step runs under its own timeout, cut to what is left of the whole run's budget (GPU_RUN_BUDGET_S, default
# 560 s), and the next one runs whatever happened; a step with under 20 s left is skipped and says so. The logs are
# copied to $OUT after every step, so a run stopped from outside still returns what it did. Everything lands in $OUT
# (default ./gpu-results), at most 8 files: summary.txt (one line per step, the error probe's lines, the failed
# tests), device.txt, info.txt, tests.log, failures.log, bench.log, gpu.csv (the benchmark rows) and logs.tar.gz
# (every log, the sanitizer's and the tests' junit.xml among them). Exit status: 0 when every step passed.
#
#   benchmarks/gpu_run.sh             on the GPU machine
#   benchmarks/gpu_run.sh --dry-run   anywhere: checks that every step's command exists, imports and collects
#                                     (CI runs it), without a GPU
# Environment: PYTHON (default python3), OUT, GPU_RUN_BUDGET_S, MAX_JOBS (default: all cores), TORCH_CUDA_ARCH_LIST
# (default: the GPU's own architecture), MTBERT_FAST_BUILD_ISAS (default: this CPU's), PYTEST_WORKERS (default 12:
# the GPU tests in that many processes when pytest-xdist is installed, so the Triton kernels compile in parallel).
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
budget=${GPU_RUN_BUDGET_S:-560}
failed=0

# save: the logs so far into $OUT (the same at most 8 files after every step)
save() {
    for f in tests failures bench; do cp "$logs/$f.log" "$out/$f.log" 2>/dev/null; done
    tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null
}

# step NAME TIMEOUT_S COMMAND...: runs COMMAND with its output in $logs/NAME.log, and records the outcome
step() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    local what="$*" left=$((budget - (SECONDS - start_all) - 15))
    if [[ $dry -eq 0 && $left -lt 20 ]]; then
        printf '%-10s %-24s %4d s   %s\n' "$name" "SKIPPED: budget spent" 0 "${what:0:110}" | tee -a "$summary"
        failed=1
        return 1
    fi
    if [[ $dry -eq 0 && $left -lt $limit ]]; then
        limit=$left
    fi
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
    printf '%-10s %-24s %4d s   %s\n' "$name" "$verdict" "$((SECONDS - t0))" "${what:0:110}" | tee -a "$summary"
    [[ $dry -eq 1 ]] || save
    return $rc
}

# a one-line digest of a pytest log: its closing line
digest() { grep -E "passed|failed|error|no tests ran|collected" "$1" | tail -1 | tee -a "$summary"; }

if [[ $dry -eq 1 ]]; then
    step imports 120 "$python" -c "import torch, transformers, pytest, pytest_benchmark, mtbert_fast, mtbert_fast.info
import mtbert_fast.ops.dispatch as d; print('torch', torch.__version__, 'triton:', d.reason('triton', 'bias_gelu', torch.device('cuda'), torch.bfloat16) or 'importable')"
    step collect 300 "$python" -m pytest --collect-only -q tests/cuda benchmarks/test_gpu.py
    digest "$logs/collect.log"
    step errors 60 "$python" tests/cuda/errors_case.py --help
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
isa=$("$python" -c "import torch; c = torch.backends.cpu.get_cpu_capability().lower(); \
print(c if c in ('avx512', 'avx2') else 'default')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} MTBERT_FAST_CUDA=1 \
    MTBERT_FAST_BUILD_ISAS=${MTBERT_FAST_BUILD_ISAS:-$isa}
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

# ---- 3. errors reach Python --------------------------------------------------------------------------------------
step errors 120 "$python" tests/cuda/errors_case.py --toolchains
grep -v "^$" "$logs/errors.log" | sed 's/^/  /' | cut -c1-200 | tee -a "$summary"
# where a failed check crashes an extension built by the build's compiler and not one built by the system's, the
# rest of the run uses a build by the system's compiler (nvcc's host compiler too), probed again
if grep -q "one-function ext, build *CRASHED" "$logs/errors.log" \
    && grep -q "one-function ext, system *raised" "$logs/errors.log"; then
    echo "rebuild    with /usr/bin/gcc and /usr/bin/g++: the build's compiler crashes on a failed check" | tee -a "$summary"
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
    rm -rf build
    step rebuild 360 "$python" setup.py build_ext --inplace && "$python" -m mtbert_fast.info >"$out/info.txt" 2>&1
    step errors-again 60 "$python" tests/cuda/errors_case.py
    grep -v "^$" "$logs/errors-again.log" | sed 's/^/  /' | cut -c1-200 | tee -a "$summary"
fi

# ---- 4. GPU tests -------------------------------------------------------------------------------------------------
extra=()
if "$python" -c "import xdist" 2>/dev/null && [[ ${PYTEST_WORKERS:-12} -gt 1 ]]; then
    extra+=(-n "${PYTEST_WORKERS:-12}")
fi
if "$python" -c "import pytest_timeout" 2>/dev/null; then
    extra+=(--timeout=120)
fi
: >"$logs/failures.log"
MTBERT_FAST_FAILURE_LOG=$logs/failures.log step tests 300 "$python" -m pytest tests/cuda -q -rfE --tb=short \
    -p no:cacheprovider --junitxml="$logs/junit.xml" "${extra[@]}"
digest "$logs/tests.log"
grep "^==== " "$logs/failures.log" | sed 's/^==== /  FAILED /' | tee -a "$summary"

# ---- 5. benchmarks ------------------------------------------------------------------------------------------------
rm -f benchmarks/results/gpu.csv
step bench 240 "$python" -m pytest benchmarks/test_gpu.py --benchmark-only -s -q -p no:cacheprovider
grep -E "^\[" "$logs/bench.log" | tee -a "$summary"
digest "$logs/bench.log"
cp benchmarks/results/gpu.csv "$out/gpu.csv" 2>/dev/null

# ---- 6. compute-sanitizer -----------------------------------------------------------------------------------------
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
: >"$logs/sanitize.log"
if [[ ! -x "$sanitizer" ]]; then
    echo "sanitize   compute-sanitizer not found: skipped" | tee -a "$summary"
else
    for run in "memcheck cuda" "memcheck triton" "initcheck cuda" "initcheck triton" "racecheck cuda" "synccheck cuda"; do
        set -- $run
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

save
rm -rf "$logs"
echo "total      $((SECONDS - start_all)) s" | tee -a "$summary"
exit $failed
