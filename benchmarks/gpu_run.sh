#!/usr/bin/env bash
# On a machine with a CUDA GPU (an H100/H200 with PyTorch, Triton, transformers and nvcc installed): build the
# package with its CUDA kernels, run the GPU tests and the GPU benchmarks, and write everything under $OUT
# (default ./gpu-results): the device, the build log, the test and benchmark logs, the results CSVs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MTBERT_FAST_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-$(nproc)}
python=${PYTHON:-python3}

nvidia-smi >"$out/device.txt" 2>&1
"$python" -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), 'triton', triton.__version__, 'transformers', transformers.__version__)" \
    >>"$out/device.txt" 2>&1
start=$SECONDS
if ! "$python" -m pip install --no-build-isolation --no-deps -e . >"$out/build.log" 2>&1; then
    tail -40 "$out/build.log"
    exit 1
fi
echo "build: $((SECONDS - start)) s" | tee -a "$out/device.txt"
"$python" -m mtbert_fast.info >"$out/info.txt" 2>&1

status=0
"$python" -m pytest tests/cuda tests/ops -q -x 2>&1 | tee "$out/tests.log" | tail -5 || status=1
"$python" -m pytest benchmarks/test_gpu.py --benchmark-only -s -q 2>&1 | tee "$out/bench.log" | grep -E "^\[|passed|failed" || status=1
cp benchmarks/results/*.csv "$out"/ 2>/dev/null
exit $status
