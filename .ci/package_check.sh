#!/usr/bin/env bash
# Packaging check: the sdist and a wheel install the way a user installs them, and work.
#
# `python -m build --sdist` (in a tool venv without torch) makes the sdist. In a fresh venv that has
# torch==$TORCH_VERSION installed first, pip builds a wheel from that sdist exactly as `pip install <sdist>` does
# (an isolated build environment, whose torch the build backend matches to the venv's), and installs it there; the
# same wheel is then installed with a plain `pip install <file>` into a second fresh venv. In each venv a smoke test
# runs from outside the source tree: the extension and one CPU build of its kernels loaded, an op ran on the C++ CPU
# kernel and matches its reference, and `python -m mtbert_fast.info` runs. The extension is compiled once, with the
# CPU kernels in their baseline build only (every build of them is compiled and tested by `make test`); set
# MTBERT_FAST_BUILD_ISAS=default,avx2,avx512 to check the wheel a user's pip builds on x86-64. Nothing is written
# inside the clone but the egg-info of the sdist build.
#
# Environment:  TORCH_VERSION (default 2.13.0), MAX_JOBS (default 2), PYTHON (default python3),
#               MTBERT_FAST_BUILD_ISAS (default "default")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}
export MTBERT_FAST_BUILD_ISAS=${MTBERT_FAST_BUILD_ISAS:-default}
export PIP_DISABLE_PIP_VERSION_CHECK=1
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

PHASE_TAG=package_check
source "$ROOT/.ci/phase_timer.sh"

# --- 1. sdist ----------------------------------------------------------------------------------------------------
"$PYTHON" -m venv "$WORK/tool"
"$WORK/tool/bin/pip" install -qq build
"$WORK/tool/bin/python" -m build --sdist --outdir "$WORK/dist" "$ROOT" >"$WORK/build.log" 2>&1 ||
  { tail -n 80 "$WORK/build.log" >&2; exit 1; }
SDIST=$(echo "$WORK"/dist/mtbert_fast-*.tar.gz)
# (listed first: grep -q stops reading early, which fails a pipeline under pipefail)
LISTING=$(tar -tzf "$SDIST")
for member in build_backend/mtbert_fast_backend.py csrc/cpu/bias_gelu.cpp csrc/include/cpu_utils.h csrc/cuda/layer_norm.cuh; do
  grep -q "/$member\$" <<<"$LISTING" || { echo "package_check: $member missing from $SDIST" >&2; exit 1; }
done
phase_done "python -m build --sdist: $(basename "$SDIST")"

# --- 2. a user's venv: torch first, then mtbert_fast -------------------------------------------------------------
user_venv() {
  "$PYTHON" -m venv "$1"
  "$1/bin/pip" install -qq "torch==$TORCH_VERSION"
}
install_logged() {  # venv, log name, pip arguments...
  local venv=$1 log=$WORK/$2.log
  shift 2
  "$venv/bin/pip" "$@" >"$log" 2>&1 || { tail -n 80 "$log" >&2; exit 1; }
}

smoke() {
  (cd "$WORK" && "$1/bin/python" - <<'PYEOF'
import os

import torch

import mtbert_fast
from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference

assert not mtbert_fast.__file__.startswith(os.environ.get("ROOT", "/nonexistent")), mtbert_fast.__file__
assert _ext.loaded(), _ext.load_error
assert _ext.cpu_isa() in _ext.built_isas(), (_ext.cpu_isa(), _ext.built_isas())
assert _ext.build_info["torch"] == torch.__version__, _ext.build_info
x, bias = torch.randn(16, 100), torch.randn(100)
torch.testing.assert_close(mtbert_fast.ops.bias_gelu(x, bias, backend="cpu"), reference.bias_gelu(x, bias))
mtbert_fast.ops.bias_gelu(x, bias)
choice = dispatch.last_choices()[("bias_gelu", "cpu", torch.float32)][0]
assert choice == "cpu", dispatch.last_choices()
print(f"    {mtbert_fast.__file__}: torch {torch.__version__}, CPU kernels {_ext.cpu_isa()} of {_ext.built_isas()}")
PYEOF
  ) && (cd "$WORK" && "$1/bin/python" -m mtbert_fast.info >"$WORK/info.log") ||
    { echo "package_check: smoke test failed in $1" >&2; exit 1; }
}
export ROOT

user_venv "$WORK/sdist-venv"
phase_done "sdist venv with torch==$TORCH_VERSION"
# what `pip install <sdist>` does, in two steps so that the wheel it builds can be checked and installed elsewhere
install_logged "$WORK/sdist-venv" sdist-build wheel --no-deps --wheel-dir "$WORK/wheel" "$SDIST"
WHEEL=$(echo "$WORK"/wheel/mtbert_fast-*.whl)
LISTING=$("$PYTHON" -m zipfile -l "$WHEEL")
for member in _C. $(for isa in ${MTBERT_FAST_BUILD_ISAS//,/ }; do echo "_C_cpu_$isa."; done) _build_info.json; do
  grep -q "mtbert_fast/$member" <<<"$LISTING" ||
    { echo "package_check: mtbert_fast/$member missing from $WHEEL" >&2; exit 1; }
done
phase_done "pip wheel <sdist> (builds the extension): $(basename "$WHEEL")"
install_logged "$WORK/sdist-venv" sdist-install install "$WHEEL"
smoke "$WORK/sdist-venv"
phase_done "pip install <wheel> + smoke test (sdist venv)"

user_venv "$WORK/wheel-venv"
phase_done "wheel venv with torch==$TORCH_VERSION"
install_logged "$WORK/wheel-venv" wheel-install install "$WHEEL"
smoke "$WORK/wheel-venv"
phase_done "pip install <wheel> + smoke test (fresh venv)"
echo "==> package_check: OK in $(seconds_since "$START") s"
