#!/usr/bin/env bash
# Build check of the CUDA kernels on a machine without a GPU.
#
# Compiles mtbert_fast._C with csrc/cuda/*.cu against a CUDA build of torch (nvcc must be installed), imports
# mtbert_fast from that build, and checks that every op whose declaration (mtbert_fast/ops/registry.py, OPS) has a
# cuda backend has its C++ kernels (forward and backward) registered for the CUDA dispatch key, and that the build's
# tensor-less ops answer: cuda_archs() names the archs of TORCH_CUDA_ARCH_LIST (as setup.py's cuda_arch_names spells
# them) and cuda_attention_shared_bytes() gives a size for every head dim and dtype, and raises a RuntimeError past
# the largest. Exits non-zero when a .cu does not compile or link, when the import fails, or when an op is missing or
# answers wrong. Nothing CUDA runs: the GPU tests are tests/cuda/.
#
# Nothing is written inside the clone: the venv and the build live in a cache directory, so the clone's own
# in-place CPU build (used by `make test`) is left alone. The sources are mirrored into the cache by content,
# so that ninja recompiles only what changed since the last run.
#
# Environment:
#   MTBERT_FAST_CUDA_CACHE   cache directory (default ~/.cache/mtbert_fast)
#   MTBERT_FAST_CUDA_VENV    venv with the CUDA torch (default $MTBERT_FAST_CUDA_CACHE/cuda-venv), made when
#                            missing or broken
#   MTBERT_FAST_CUDA_TORCH   torch version to install there (default 2.14.1)
#   MTBERT_FAST_CUDA_CLEAN=1 rebuild every object from scratch
#   TORCH_CUDA_ARCH_LIST     default "8.0;9.0+PTX";  MAX_JOBS  default 2
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${MTBERT_FAST_CUDA_CACHE:-$HOME/.cache/mtbert_fast}
VENV=${MTBERT_FAST_CUDA_VENV:-$CACHE/cuda-venv}
BUILD=$CACHE/cuda-build
TORCH_VERSION=${MTBERT_FAST_CUDA_TORCH:-2.14.1}
PYTHON=${PYTHON:-python3}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}
export MAX_JOBS=${MAX_JOBS:-2}
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=$VENV/bin/python
mkdir -p "$CACHE"
exec 9>"$CACHE/cuda-build.lock"
flock 9  # one run at a time on this cache

PHASE_TAG=cuda_build_check
source "$ROOT/.ci/phase_timer.sh"

# --- 1. venv with a CUDA torch ----------------------------------------------------------------------------
# one interpreter start (importing a CUDA torch takes seconds): prints the torch version, fails if it is not usable
venv_torch() {
  "$PY" -c "import ninja, numpy, safetensors, setuptools, wheel, torch; assert torch.version.cuda; print(torch.__version__)" \
    2>/dev/null
}
if ! TORCH_FOUND=$(venv_torch); then
  if "$PY" -c "import torch; assert torch.version.cuda" >/dev/null 2>&1; then
    "$PY" -m pip install -qq "setuptools>=64" wheel ninja numpy safetensors
  else
    echo "==> cuda_build_check: creating $VENV with torch==$TORCH_VERSION (CUDA build)"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -qq --upgrade "setuptools>=64" wheel
    "$PY" -m pip install -qq "torch==$TORCH_VERSION" ninja numpy safetensors
  fi
  if ! TORCH_FOUND=$(venv_torch); then
    echo "cuda_build_check: $VENV has no usable CUDA build of torch" >&2
    exit 1
  fi
fi
phase_done "venv (torch $TORCH_FOUND)"

# --- 2. toolchain -------------------------------------------------------------------------------------------
if [[ -z "${CUDA_HOME:-}" ]]; then
  NVCC=$(command -v nvcc || true)
  [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]] && NVCC=/usr/local/cuda/bin/nvcc
  if [[ -z "$NVCC" ]]; then
    echo "cuda_build_check: nvcc not found (set CUDA_HOME or put nvcc on PATH)" >&2
    exit 1
  fi
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
  # /usr/local/bin/nvcc may be a wrapper script that execs the toolkit's nvcc elsewhere
  [[ -f "$CUDA_HOME/include/cuda_runtime.h" ]] || CUDA_HOME=/usr/local/cuda
  if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
    echo "cuda_build_check: no CUDA toolkit found next to $NVCC (set CUDA_HOME)" >&2
    exit 1
  fi
fi
export CUDA_HOME
export PATH=$CUDA_HOME/bin:$PATH
# the cuBLAS, cuSPARSE, ... headers that torch's CUDA headers include come with the nvidia wheels
NV_INCLUDE=$("$PY" - <<'PYEOF'
import glob, os, site
dirs = []
for sp in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
    dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
print(":".join(d for d in dirs if os.path.isdir(d)))
PYEOF
)
export CPATH=${NV_INCLUDE}${CPATH:+:$CPATH}
echo "==> cuda_build_check: CUDA_HOME=$CUDA_HOME, $("$CUDA_HOME/bin/nvcc" --version | tail -1), arch list $TORCH_CUDA_ARCH_LIST"

# --- 3. mirror the sources into the cache --------------------------------------------------------------------
[[ "${MTBERT_FAST_CUDA_CLEAN:-0}" == 1 ]] && rm -rf "$BUILD"
SRC=$BUILD/src
mkdir -p "$SRC"
"$PY" - "$ROOT" "$SRC" <<'PYEOF'
import filecmp, os, shutil, sys

root, dst = sys.argv[1:]
# a file is rewritten only when its content changed, so that its mtime (what ninja looks at) moves only then
wanted = {}
for top in ("setup.py", "pyproject.toml", "README.md", "csrc", "mtbert_fast"):
    path = os.path.join(root, top)
    if os.path.isfile(path):
        wanted[top] = path
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            if name.endswith((".so", ".pyc")) or name == "_build_info.json":
                continue  # a build of the clone's own (the CPU one) must not leak into this one
            full = os.path.join(dirpath, name)
            wanted[os.path.relpath(full, root)] = full
for rel, src in wanted.items():
    out = os.path.join(dst, rel)
    if not (os.path.isfile(out) and filecmp.cmp(src, out, shallow=False)):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(src, out)
for top in ("csrc", "mtbert_fast"):
    for dirpath, dirnames, filenames in os.walk(os.path.join(dst, top)):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, dst)
            built = name.startswith("_C") and name.endswith(".so") or name == "_build_info.json"
            if rel not in wanted and not (top == "mtbert_fast" and built):
                os.remove(full)
PYEOF
phase_done "mirror sources"

# --- 4. build --------------------------------------------------------------------------------------------------
LOG=$BUILD/build.log
# one ninja log per extension (_C, _C_cpu_<isa>): the lines each had before this build
ninja_logs() { compgen -G "$SRC/build/temp.*/*/.ninja_log" || true; }
declare -A SEEN
for f in $(ninja_logs); do SEEN[$f]=$(wc -l <"$f"); done
# the CPU kernels only in their baseline build: `make test` compiles and tests all of them
if ! (cd "$SRC" && MTBERT_FAST_CUDA=1 MTBERT_FAST_BUILD_ISAS=default "$PY" setup.py build_ext --inplace >"$LOG" 2>&1); then
  echo "cuda_build_check: the CUDA build failed; the end of $LOG:" >&2
  grep -n -E "error|Error" "$LOG" | head -40 >&2 || true
  tail -n 80 "$LOG" >&2
  exit 1
fi
phase_done "build (MAX_JOBS=$MAX_JOBS)"
# what this run compiled (ninja skips what is up to date), slowest first
for f in $(ninja_logs); do tail -n +"$((${SEEN[$f]:-1} + 1))" "$f"; done | grep -v '^#' |
  awk '{ path = $4; sub(/.*\/temp\.[^\/]*\//, "", path); sub(/\/csrc\//, "/", path)
         printf "    compiled %-48s %7.1f s\n", path, ($2 - $1) / 1000 }' |
  sort -k3 -rn || true

# --- 5. import and kernel registration ------------------------------------------------------------------------
(cd "$BUILD" && PYTHONPATH="$SRC" "$PY" - "$SRC" "$TORCH_CUDA_ARCH_LIST" <<'PYEOF'
import ast, glob, os, sys

import torch

src, arch_list = sys.argv[1:]
import mtbert_fast  # must work without a GPU
from mtbert_fast import _ext

built = glob.glob(os.path.join(src, "mtbert_fast", "_C.*.so"))
if len(built) != 1:
    sys.exit(f"cuda_build_check: expected one mtbert_fast/_C.*.so in {src}, found {built}")
torch.ops.load_library(built[0])  # registers the kernels (already done if mtbert_fast loaded it)
if not _ext.loaded():
    print(f"    WARNING: mtbert_fast._ext could not import the build, so the dispatcher will not use its kernels: "
          f"{_ext.load_error}")
print(f"    CPU kernels built for {_ext.built_isas()}, loaded: {_ext.cpu_isa()}")
from mtbert_fast.ops import registry

missing = []
for name, op in registry.OPS.items():
    kernels = [name] + ([f"{name}_backward"] if op.backward_schema is not None else [])
    for kernel in kernels:
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mtbert_fast_C::{kernel}", "CUDA")
        expected = "cuda" in op.backends
        note = "" if has or not expected else "   <-- MISSING"
        print(f"    {kernel:36s} CUDA kernel: {'yes' if has else 'no' if expected else 'no (none declared)'}{note}")
        if expected and not has:
            missing.append(kernel)
        if has and not expected:
            sys.exit(f"cuda_build_check: {kernel} has a CUDA kernel that its op's declaration does not list")
if missing:
    sys.exit(f"cuda_build_check: no CUDA kernel registered for {', '.join(missing)}")

# the tensor-less ops of the CUDA sources (mtbert_fast/_ext.py calls them); they answer without a GPU
for op in ("cuda_archs", "cuda_attention_shared_bytes"):
    if not torch._C._dispatch_has_kernel(f"mtbert_fast_C::{op}"):
        sys.exit(f"cuda_build_check: mtbert_fast._C defines no op {op}")
# setup.py's cuda_arch_names, taken from its source (importing setup.py would run setup())
with open(os.path.join(src, "setup.py")) as f:
    tree = ast.parse(f.read())
names = {}
exec(compile(ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "cuda_arch_names"],
                        type_ignores=[]), "setup.py", "exec"), names)
want = " ".join(names["cuda_arch_names"](arch_list))
got = torch.ops.mtbert_fast_C.cuda_archs()
print(f"    cuda_archs() = {got!r} (TORCH_CUDA_ARCH_LIST {arch_list!r})")
if got != want:
    sys.exit(f"cuda_build_check: cuda_archs() = {got!r}, but the build was for {want!r}")
sizes = {}
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for head_dim in (1, 32, 64, 80, 96, 128, 160, 256):
        n = torch.ops.mtbert_fast_C.cuda_attention_shared_bytes(head_dim, dtype)
        if not isinstance(n, int) or n <= 0:
            sys.exit(f"cuda_build_check: cuda_attention_shared_bytes({head_dim}, {dtype}) = {n!r}")
        sizes[(str(dtype).replace("torch.", ""), head_dim)] = n
print("    cuda_attention_shared_bytes: " + ", ".join(f"{d} hd{h} {n}" for (d, h), n in sizes.items()
                                                      if h in (64, 128, 256)))
# a failed check in a CUDA translation unit reaches Python as an exception
try:
    torch.ops.mtbert_fast_C.cuda_attention_shared_bytes(257, torch.float16)
except RuntimeError as e:
    if "head_dim" not in str(e):
        sys.exit(f"cuda_build_check: cuda_attention_shared_bytes(257) raised without naming head_dim: {e}")
else:
    sys.exit("cuda_build_check: cuda_attention_shared_bytes(257) returned instead of raising")
print("    a failed check in a .cu raises RuntimeError")
print(f"    torch {torch.__version__} (CUDA {torch.version.cuda}), GPU visible: {torch.cuda.is_available()}")
PYEOF
)
phase_done "import + registration check"
echo "==> cuda_build_check: OK in $(seconds_since "$START") s"
