"""Build of the compiled extension: mtbert_fast._C (the op schemas, and the CUDA kernels where CUDA is present or
forced) and the C++ CPU kernels once per instruction set, mtbert_fast._C_cpu_<isa>, of which mtbert_fast/_ext.py
loads the best one the running CPU supports. mtbert_fast/_build_info.json records what the build was made against.

Environment:
  MTBERT_FAST_SKIP_BUILD=1   install pure Python (every op then runs its PyTorch reference)
  MTBERT_FAST_CUDA=1         build the CUDA kernels even where torch has no CUDA, and fail when they do not build
                             (needs nvcc and a CUDA torch)
  MTBERT_FAST_CUDA=0         never build them
  (unset)                    build them when torch has CUDA and a CUDA toolkit is found; a toolkit that is not one,
                             or a CUDA compile or link that fails, leaves a CPU-only build with a warning
  CUDA_HOME                  the CUDA toolkit (torch otherwise takes it from the nvcc on PATH)
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0+PTX": machine code for sm_80 and sm_90, and PTX
                             for compute_90 that the driver compiles for any newer GPU)
  MTBERT_FAST_BUILD_ISAS     the CPU kernel builds to compile, e.g. "avx512" or "default,avx2" (default: all three
                             on x86-64); the CPU that runs them needs one of them
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import copy
import glob
import json
import os
import platform
import sys

from setuptools import setup
from setuptools.errors import CCompilerError

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = "_build_info.json"

# The instruction sets the CPU kernels are compiled for, with ATen's flags for them: CPU_CAPABILITY selects
# at::vec's implementation (and its inline namespace), CPU_CAPABILITY_<ISA> the kernels' own intrinsics paths.
CPU_ISA_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}
# setup.py commands that compile; the others (metadata, sdist) run without torch
_COMPILING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def cpu_isas():
    """The instruction sets built: those $MTBERT_FAST_BUILD_ISAS names, else all three on x86-64 and the baseline
    elsewhere."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    wanted = os.environ.get("MTBERT_FAST_BUILD_ISAS", "").strip()
    if not wanted:
        return list(CPU_ISA_FLAGS) if x86 else ["default"]
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in names if name not in CPU_ISA_FLAGS]
    if unknown or not names:
        sys.exit(f"MTBERT_FAST_BUILD_ISAS={wanted!r}: name one or more of {', '.join(CPU_ISA_FLAGS)}, comma-separated")
    if not x86 and names != ["default"]:
        sys.exit(f"MTBERT_FAST_BUILD_ISAS={wanted!r}: {platform.machine()} builds the default kernels only")
    return [isa for isa in CPU_ISA_FLAGS if isa in names]


DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_arch_names(arch_list):
    """TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX", "9.0a 10.0") -> ["sm_80", "sm_90", "compute_90"]: what the build holds,
    as the extension reports it at run time (the dispatch reads it to tell whether a GPU can run the kernels)."""
    names = []
    for entry in arch_list.replace(";", " ").split():
        arch, ptx = (entry[: -len("+PTX")], True) if entry.endswith("+PTX") else (entry, False)
        major, dot, minor = arch.partition(".")
        if not (dot and major.isdigit() and minor[:1].isdigit() and minor[1:] in ("", "a", "f")):
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {entry!r} is not an architecture like 8.0, 9.0a or 9.0+PTX")
        number = f"{major}{minor}"
        names.append(f"sm_{number}")
        if ptx:
            names.append(f"compute_{number}")
    return names


def _warn(message):
    """A warning that stands out in a build log (pip shows the log with -v, or when the build fails)."""
    bar = "!" * 100
    print(f"\n{bar}\nmtbert_fast build WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)


def cuda_toolkit_problem(cuda_home):
    """Why `cuda_home` is not a CUDA toolkit to build against, or None when it is one."""
    if cuda_home is None:
        return "no CUDA toolkit found (no CUDA_HOME, and no nvcc on PATH or in /usr/local/cuda)"
    missing = []
    if not os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        missing.append("include/cuda_runtime.h")
    if not any(glob.glob(os.path.join(cuda_home, lib, "libcudart.so*")) for lib in ("lib64", "lib")):
        missing.append("libcudart in lib64/ or lib/")
    if not missing:
        return None
    return (
        f"CUDA_HOME={cuda_home} is not a CUDA toolkit: it has no {' and no '.join(missing)}. torch takes CUDA_HOME "
        "from $CUDA_HOME, else from the nvcc on PATH, which gives a wrong directory when that nvcc is a wrapper "
        "script or a link outside the toolkit. Set CUDA_HOME to the toolkit, e.g. CUDA_HOME=/usr/local/cuda"
    )


def _cuda_plan():
    """(build the CUDA kernels?, why not when torch has CUDA but they are not built)."""
    flag = os.environ.get("MTBERT_FAST_CUDA")
    if flag == "0":
        return False, "MTBERT_FAST_CUDA=0"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    forced = flag == "1"
    if not forced and torch.version.cuda is None:
        return False, None
    problem = cuda_toolkit_problem(CUDA_HOME)
    if forced and problem is None and torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a build without CUDA; install a CUDA build of torch"
    if problem is None:
        return True, None
    if forced:
        sys.exit(f"MTBERT_FAST_CUDA=1, but the CUDA kernels cannot be built: {problem}")
    _warn(f"building the CPU kernels only: {problem}")
    return False, problem


def _build_ext_class(base, cuda_reason):
    class BuildExt(base):
        """torch's BuildExtension, plus: every extension compiles in its own temporary directory (the CPU ISA
        builds share their sources), a CUDA failure leaves a CPU-only _C unless MTBERT_FAST_CUDA=1, and
        _build_info.json is written next to the extensions."""

        cuda_not_built = cuda_reason

        def build_extension(self, ext):
            self._current = ext
            build_temp = self.build_temp
            self.build_temp = os.path.join(build_temp, ext.name.rpartition(".")[2])
            try:
                super().build_extension(ext)
            finally:
                self.build_temp = build_temp

        def build_extensions(self):
            pristine = copy.deepcopy(self.extensions)
            self._current = None
            try:
                super().build_extensions()
            except (CCompilerError, RuntimeError, OSError) as exc:
                failed = self._current
                # the CUDA version check runs before any extension; a failure of a CPU build is not CUDA's
                if os.environ.get("MTBERT_FAST_CUDA") == "1" or not (failed is None or _has_cuda(failed)):
                    raise
                self.cuda_not_built = f"the CUDA build failed ({type(exc).__name__}: {exc})"
                _warn(f"{self.cuda_not_built}; building the CPU kernels only (set MTBERT_FAST_CUDA=1 to make this "
                      "an error, or MTBERT_FAST_CUDA=0 to skip the CUDA kernels)")
                self.extensions = [_without_cuda(e) for e in pristine]
                super().build_extensions()

        def _info_path(self, root):
            return os.path.join(root, "mtbert_fast", BUILD_INFO)

        def run(self):
            super().run()
            import torch

            cuda = any(_has_cuda(e) for e in self.extensions)
            arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
            info = {
                "torch": torch.__version__,
                "torch_cuda": torch.version.cuda,
                "cuda_kernels": cuda,
                "cuda_archs": cuda_arch_names(arch_list) if cuda else [],
                "cuda_not_built": None if cuda else self.cuda_not_built,
                "cpu_isas": [e.name.rpartition("_cpu_")[2] for e in self.extensions if "_cpu_" in e.name],
            }
            path = self._info_path(self.build_lib)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f, indent=1)
                f.write("\n")
            if self.inplace:
                package_dir = self.get_finalized_command("build_py").get_package_dir("mtbert_fast")
                self.copy_file(path, os.path.join(package_dir, BUILD_INFO), level=self.verbose)

        def get_outputs(self):
            return super().get_outputs() + [self._info_path(self.build_lib)]

    return BuildExt


def _has_cuda(ext):
    return any(s.endswith(".cu") for s in ext.sources)


def _without_cuda(ext):
    """ext with its CUDA sources, macros and libraries taken out."""
    if not _has_cuda(ext):
        return ext
    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
    ext.define_macros = [m for m in ext.define_macros if not m[0].startswith("MTBERT_FAST_")]
    ext.libraries = [lib for lib in ext.libraries if "cuda" not in lib]
    return ext


def _extensions():
    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1" or not _COMPILING_COMMANDS & set(sys.argv[1:]):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -std: torch's BuildExtension adds the standard its own headers need (C++17 up to torch 2.13, C++20 from
    # 2.14, whose headers refuse C++17), and nvcc takes a single -std.
    cuda, why_not = _cuda_plan()
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        # one preprocessor token ("sm_80__sm_90__compute_90"): nvcc would split a list at commas, and quotes do not
        # survive the build's command lines
        archs = "__".join(cuda_arch_names(os.environ["TORCH_CUDA_ARCH_LIST"]))
        core = CUDAExtension(
            "mtbert_fast._C",
            _sources("csrc/*.cpp") + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("MTBERT_FAST_WITH_CUDA", "1"), ("MTBERT_FAST_CUDA_ARCHS", archs)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    else:
        core = CppExtension("mtbert_fast._C", _sources("csrc/*.cpp"), include_dirs=include_dirs,
                            extra_compile_args=["-O3"])
    cpu = [
        CppExtension(
            f"mtbert_fast._C_cpu_{isa}",
            _sources("csrc/cpu/*.cpp"),
            include_dirs=include_dirs,
            extra_compile_args=["-O3", "-fopenmp"] + CPU_ISA_FLAGS[isa],
            extra_link_args=["-fopenmp"],
        )
        for isa in cpu_isas()
    ]
    build_ext = _build_ext_class(BuildExtension.with_options(use_ninja=True), why_not)
    return [core] + cpu, {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
