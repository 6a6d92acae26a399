"""Whether a failed argument check reaches Python as a RuntimeError or takes the process down, for each kind of code
an error can come from: torch itself (CPU and CUDA), the CPU kernels (compiled by the C++ compiler), and the CUDA
translation units (host code compiled through nvcc): a tensor-less query and a kernel. Each case runs in a fresh
process, so a crash is reported as such, naming its signal.

With --toolchains, the same question is asked of a one-function extension built three ways (the C++ compiler of the
build, the system's /usr/bin/g++, and nvcc), which tells a toolchain fault from a fault of this package's code.

`python tests/cuda/errors_case.py [--toolchains]`: one line per case, then the compilers and runtime libraries in
use; exits 1 when any case crashes or returns instead of raising."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

CASES = {
    "torch, CPU": "torch.ones(2).view(3)",
    "torch, CUDA": "torch.ones(2, device='cuda').view(3)",
    "mtbert_fast CPU kernel": "K.bias_gelu(torch.ones(2, 4), torch.ones(3), 'none')",
    "mtbert_fast CUDA query": "K.cuda_attention_shared_bytes(257, torch.float16)",
    "mtbert_fast CUDA kernel": "K.bias_gelu(torch.ones(2, 4, device='cuda'), torch.ones(3, device='cuda'), 'none')",
}

PRELUDE = ("import torch\nfrom mtbert_fast import _ext\nassert _ext.loaded(), _ext.load_error\n"
           "K = torch.ops.mtbert_fast_C\n")

TINY_SOURCE = """
#include <c10/util/Exception.h>
#include <torch/library.h>
int64_t refuse(int64_t n) {
  TORCH_CHECK(n < 0, "refuse: n must be negative, got ", n);
  return n;
}
TORCH_LIBRARY(NAME, m) { m.def("refuse(int n) -> int", &refuse); }
"""


def outcome(setup: str, call: str) -> str:
    """How `call` ends in a fresh process after `setup`: 'raised RuntimeError' (or another exception), 'returned',
    or 'CRASHED (SIGSEGV)'."""
    script = f"{setup}\ntry:\n    {call}\nexcept Exception as e:\n    print('raised', type(e).__name__)\n" \
             "else:\n    print('returned')\n"
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if run.returncode < 0:
        return f"CRASHED ({signal.Signals(-run.returncode).name})"
    if run.returncode != 0:
        return f"exit {run.returncode}: {run.stderr.strip().splitlines()[-1:]}"
    return run.stdout.strip().splitlines()[-1]


def environment() -> list[str]:
    """The compilers a build would use and the C++ runtime libraries a process loads."""
    lines = [f"CC={os.environ.get('CC', '')!r} CXX={os.environ.get('CXX', '')!r}"]
    for compiler in dict.fromkeys([os.environ.get("CXX", "c++"), "/usr/bin/g++", "/opt/gcc/bin/g++"]):
        path = shutil.which(compiler)
        if path:
            version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
            lines.append(f"{compiler}: {version}")
    probe = ("import torch, mtbert_fast, re\n"
             "print(re.findall(r'GCC \\S+|clang \\S+', torch.__config__.show())[:1])\n"
             "maps = {l.split()[-1] for l in open('/proc/self/maps') if re.search(r'libstdc|libgcc_s', l)}\n"
             "print(sorted(maps))\n"
             "print([l.strip() for l in open('/proc/self/status') if 'x86_Thread' in l])")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    lines += [f"torch built with: {run.stdout.splitlines()[0] if run.stdout else run.stderr[-300:]}"]
    lines += [f"loaded: {line}" for line in run.stdout.splitlines()[1:]]
    lines.append(f"kernel: {os.uname().release}")
    return lines


def tiny_extension(flavour: str, workdir: str) -> str:
    """Builds the one-function extension as `flavour` (build, system, nvcc) and reports how its failing check
    reaches Python."""
    name = f"refuse_{flavour}"
    env = dict(os.environ)
    if flavour == "system":
        if not os.path.exists("/usr/bin/g++"):
            return "no /usr/bin/g++"
        env.update(CC="/usr/bin/gcc", CXX="/usr/bin/g++")
    source = os.path.join(workdir, f"{name}.{'cu' if flavour == 'nvcc' else 'cpp'}")
    with open(source, "w") as f:
        f.write(TINY_SOURCE.replace("NAME", name))
    build = os.path.join(workdir, name)
    os.makedirs(build, exist_ok=True)
    loader = (f"from torch.utils import cpp_extension\n"
              f"cpp_extension.load({name!r}, [{source!r}], build_directory={build!r}, is_python_module=False)\n")
    made = subprocess.run([sys.executable, "-c", "import torch\n" + loader], capture_output=True, text=True,
                          env=env, timeout=600)
    if made.returncode != 0:
        errors = [line for line in made.stderr.splitlines() if "error:" in line or "Error:" in line]
        return f"did not build: {(errors or made.stderr.strip().splitlines())[:2]}"
    return outcome("import torch\n" + loader, f"torch.ops.{name}.refuse(3)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--toolchains", action="store_true", help="also build a one-function extension three ways")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(8) as pool:
        # every case in its own process, all at once: each one's time is mostly importing torch
        jobs = {name: pool.submit(outcome, PRELUDE, call) for name, call in CASES.items()}
        if args.toolchains:
            for flavour in ("build", "system", "nvcc"):
                jobs[f"one-function ext, {flavour}"] = pool.submit(tiny_extension, flavour, workdir)
        results = {name: job.result() for name, job in jobs.items()}
    for name, result in results.items():
        print(f"{name:26s} {result}", flush=True)
    failed = any(result.startswith(("CRASHED", "returned")) for result in results.values())
    for line in environment():
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
