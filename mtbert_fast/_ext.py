"""Guarded load of the compiled extension: mtbert_fast._C (the op schemas, and the CUDA kernels where built) and one
build of the C++ CPU kernels, mtbert_fast._C_cpu_<isa>.

The CPU kernels are compiled once per instruction set (default, avx2, avx512 on x86-64); the one loaded is the best
that both the build holds and the CPU runs, following ATen's own choice (torch.backends.cpu.get_cpu_capability(),
which honours $ATEN_CPU_CAPABILITY), unless $MTBERT_FAST_CPU_ISA names one. Only one is ever loaded into a process.

The extension is loaded only when the running torch is the one it was compiled against (recorded at build time in
_build_info.json): a C++ ABI mismatch can crash. Importing mtbert_fast never fails because the build is missing,
broken or mismatched: the ops then run on the other backends, and `load_error` keeps the reason for
`python -m mtbert_fast.info` and for forced-backend errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Callable

import torch

ISA_ENV = "MTBERT_FAST_CPU_ISA"
ISAS = ("default", "avx2", "avx512")  # ascending
# /proc/cpuinfo flags each instruction set's build is compiled for (setup.py's CPU_ISA_FLAGS)
_ISA_CPU_FLAGS = {
    "default": set(),
    "avx2": {"avx2", "fma", "f16c"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
}
REBUILD_COMMAND = "pip install --no-deps --force-reinstall --no-cache-dir --no-binary mtbert_fast mtbert_fast"
REBUILD_FROM_CHECKOUT = "pip install --no-deps --force-reinstall ."
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_BUILD_INFO_PATH = os.path.join(_PACKAGE_DIR, "_build_info.json")


class BuildMismatchWarning(UserWarning):
    """The compiled extension was built against another torch than the one running, so it is not loaded."""


def _origin(module: str) -> str | None:
    spec = importlib.util.find_spec(f"mtbert_fast.{module}")
    return None if spec is None else spec.origin


def _read_build_info() -> dict | None:
    try:
        with open(_BUILD_INFO_PATH) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cpuinfo_field(name: str) -> str | None:
    """The value of /proc/cpuinfo's first `name` line ("" where it has none), or None where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith(name)), "")
    except OSError:
        return None
    return line.split(":", 1)[-1].strip()


def _cpu_flags() -> set[str] | None:
    flags = _cpuinfo_field("flags")
    return None if flags is None else set(flags.split())


def _cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD"), or None where there is none to read."""
    return _cpuinfo_field("vendor_id") or None


def supported_isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs: from /proc/cpuinfo, or else up to ATen's capability."""
    flags = _cpu_flags()
    if flags:
        return tuple(isa for isa in ISAS if _ISA_CPU_FLAGS[isa] <= flags)
    return ISAS[: ISAS.index(_aten_isa()) + 1]


def _aten_isa() -> str:
    """ATen's CPU capability as one of ISAS ("AVX512" -> "avx512"; anything not x86 -> "default")."""
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return capability if capability in ISAS else "default"


def _choose_isa(built: list[str]) -> tuple[str | None, str | None]:
    """(the CPU build to load, None) or (None, why none can be)."""
    wanted = os.environ.get(ISA_ENV, "").strip().lower()
    supported = supported_isas()
    if wanted:
        if wanted not in ISAS:
            return None, f"${ISA_ENV}={wanted}: expected one of {', '.join(ISAS)}"
        if wanted not in built:
            return None, f"${ISA_ENV}={wanted}: this build holds the CPU kernels for {', '.join(built)} only"
        if wanted not in supported:
            return None, f"${ISA_ENV}={wanted}: this CPU lacks it (it runs {', '.join(supported)})"
        return wanted, None
    ceiling = ISAS.index(_aten_isa())
    usable = [isa for isa in built if isa in supported and ISAS.index(isa) <= ceiling]
    if not usable:
        return None, f"no CPU build this CPU runs: built for {', '.join(built)}, the CPU runs {', '.join(supported)}"
    return max(usable, key=ISAS.index), None


def mismatch_message(built: str, running: str) -> str:
    return (
        f"mtbert_fast: its compiled kernels were built against torch {built}, but torch {running} is running. They "
        "are not loaded (a C++ ABI mismatch can crash the process), so every op falls back to its PyTorch reference "
        f"or Triton. Rebuild them against this torch: `{REBUILD_COMMAND}` (or, from a source checkout, "
        f"`{REBUILD_FROM_CHECKOUT}`)."
    )


def _load() -> tuple[str | None, str | None]:
    """Loads the extension: (load error or None, the CPU build loaded or None)."""
    core = _origin("_C")
    if core is None:
        return "no compiled mtbert_fast._C next to the package (installed with MTBERT_FAST_SKIP_BUILD=1, or not built)", None
    if build_info is None:
        return (f"{_BUILD_INFO_PATH} is missing or unreadable, so the torch mtbert_fast._C was built against is "
                f"unknown; rebuild it: `{REBUILD_FROM_CHECKOUT}` from a source checkout, or `{REBUILD_COMMAND}`"), None
    if build_info.get("torch") != torch.__version__:
        message = mismatch_message(build_info.get("torch"), torch.__version__)
        warnings.warn(message, BuildMismatchWarning, stacklevel=2)
        return message, None
    built = [isa for isa in build_info.get("cpu_isas", []) if _origin(f"_C_cpu_{isa}") is not None]
    isa, why_not = _choose_isa(built)
    if why_not is not None:
        return why_not, None
    try:
        # plain shared libraries of TORCH_LIBRARY registrations, not Python modules: the schemas first
        torch.ops.load_library(core)
        torch.ops.load_library(_origin(f"_C_cpu_{isa}"))
    except OSError as exc:
        return f"mtbert_fast._C failed to load: {type(exc).__name__}: {exc}", None
    return None, isa


build_info: dict | None = _read_build_info()
load_error: str | None
_cpu_isa: str | None
load_error, _cpu_isa = _load()


def _registered(dispatch_key: str) -> frozenset[str]:
    prefix = "mtbert_fast_C::"
    names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key) if load_error is None else []
    return frozenset(n[len(prefix):] for n in names if n.startswith(prefix))


# Read once at load, so the backend choice is plain Python that torch.compile traces without a graph break.
_KERNELS = {key: _registered(key) for key in ("CPU", "CUDA")}


def loaded() -> bool:
    return load_error is None


def cpu_isa() -> str | None:
    """The instruction set of the CPU kernels loaded ("default", "avx2", "avx512"), or None when none is."""
    return _cpu_isa


def built_isas() -> list[str]:
    """The instruction sets this build compiled the CPU kernels for."""
    return list(build_info.get("cpu_isas", [])) if build_info else []


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a kernel of `op` for `dispatch_key` ("CPU", "CUDA")."""
    return op in _KERNELS[dispatch_key]


def built_with_cuda() -> bool:
    return has_kernel("bias_gelu", "CUDA")


def cuda_archs() -> tuple[list[str], list[str]]:
    """(machine-code archs, PTX archs) the CUDA kernels were compiled for, e.g. (["sm_80", "sm_90"], ["compute_90"]);
    empty lists for a build without CUDA."""
    if not built_with_cuda():
        return [], []
    names = torch.ops.mtbert_fast_C.cuda_archs().split()
    return [n for n in names if n.startswith("sm_")], [n for n in names if n.startswith("compute_")]


def cuda_attention_shared_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """The most dynamic shared memory per block that the CUDA attention kernels (forward and backward) ask for at
    this head_dim and dtype."""
    return int(torch.ops.mtbert_fast_C.cuda_attention_shared_bytes(head_dim, dtype))


# what is kept between calls and follows cpu_amx's answer (the encoder's row limits): run on every switch
_AMX_SWITCH_HOOKS: list[Callable[[], object]] = []


def on_cpu_amx_switch(hook: Callable[[], object]) -> None:
    """Runs hook() whenever cpu_amx(allow) is given an allow: how a cache of a decision that follows cpu_amx()
    forgets it."""
    _AMX_SWITCH_HOOKS.append(hook)


def cpu_amx(allow: bool | None = None) -> bool:
    """Whether the CPU kernels run on AMX tiles where they can: attention's bf16 forward without position terms or
    dropout, and panel_linear on bf16 pair panels whose reduction length is a multiple of 32, on a CPU with AMX-BF16
    (Intel Xeon from Sapphire Rapids on) under a Linux that grants a process the tiles (5.16 on). Their products then
    run on TDPBF16PS instead of the AVX512-BF16 dot products (attention's forward 1.6-2.6x as fast on sequences of
    128-512 tokens at head_dim 32-64, 1.1x on 32): the same exact products and fp32 sums in another order, which can
    flip a bf16 rounding. With AMX-INT8 too, the int8 panels' products of 16 rows and more run on TDPBUSD instead of
    VNNI, with the same exact int32 sums (ops.int8.panels_on_tiles). `allow` False keeps this process on the dot
    products, True lets it use the tiles again; None leaves it. False where the CPU kernels are not loaded. The encoder
    routes its bf16 products by the answer: off the tiles, panel_linear keeps only the few rows where the dot products
    beat oneDNN's linear (panel_linear.encoder_rows)."""
    if not has_kernel("attention_varlen", "CPU"):
        return False
    on = bool(torch.ops.mtbert_fast_C.cpu_amx(allow))
    if allow is not None:
        for hook in _AMX_SWITCH_HOOKS:
            hook()
    return on
