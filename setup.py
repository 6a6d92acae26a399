"""Build of mtbert_fast._C: the C++ CPU kernels always, the CUDA kernels where CUDA is present or forced.

Environment:
  MTBERT_FAST_SKIP_BUILD=1   install pure Python (every op then runs its PyTorch reference)
  MTBERT_FAST_CUDA=1         build the CUDA kernels even where no GPU is visible (needs nvcc and a CUDA torch)
  MTBERT_FAST_CUDA=0         never build them
  TORCH_CUDA_ARCH_LIST       CUDA architectures (default "8.0;9.0+PTX": machine code for sm_80 and sm_90, and PTX
                             for compute_90 that the driver compiles for any newer GPU)
  MAX_JOBS                   parallel compile jobs (ninja)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _vector_flags():
    """Flags that make ATen's at::vec use the widest vectors this build machine has.

    The extension is compiled where it runs (pip install builds it), so it targets this CPU: AVX-512 where
    present, else AVX2. MTBERT_FAST_CPU_ISA=avx512|avx2|default overrides the detection.
    """
    isa = os.environ.get("MTBERT_FAST_CPU_ISA")
    if isa is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((line for line in f if line.startswith("flags")), "").split())
        except OSError:
            flags = set()
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            isa = "avx512"
        elif {"avx2", "fma"} <= flags:
            isa = "avx2"
        else:
            isa = "default"
    if isa == "avx512":
        return ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    if isa == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if isa == "default":
        return ["-DCPU_CAPABILITY=DEFAULT"]
    raise ValueError(f"MTBERT_FAST_CPU_ISA={isa!r}: expected avx512, avx2 or default")


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


def _want_cuda():
    flag = os.environ.get("MTBERT_FAST_CUDA")
    if flag is not None:
        return flag == "1"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _extensions():
    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -std: torch's BuildExtension adds the standard its own headers need (C++17 up to torch 2.13, C++20 from
    # 2.14, whose headers refuse C++17), and nvcc takes a single -std.
    cxx = ["-O3", "-fopenmp"] + _vector_flags()
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if _want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        # one preprocessor token ("sm_80__sm_90__compute_90"): nvcc would split a list at commas, and quotes do not
        # survive the build's command lines
        archs = "__".join(cuda_arch_names(os.environ["TORCH_CUDA_ARCH_LIST"]))
        ext = CUDAExtension(
            "mtbert_fast._C",
            sources + _sources("csrc/cuda/*.cu"),
            include_dirs=include_dirs,
            define_macros=[("MTBERT_FAST_WITH_CUDA", "1"), ("MTBERT_FAST_CUDA_ARCHS", archs)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mtbert_fast._C", sources, include_dirs=include_dirs, extra_compile_args=cxx, extra_link_args=["-fopenmp"]
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
