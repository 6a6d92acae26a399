"""Backend choice for every op, explainable.

Each backend states which devices, dtypes and input shapes it takes (`LIMITS`: head_dim, row length, ...), and the
cuda backend also which GPUs its build holds code for and how much shared memory its attention needs; `choose`
returns the first that can run an input, in the order cuda -> triton -> cpu -> reference, or the one the caller
forces with `backend=` or the `MTBERT_FAST_BACKEND` environment variable. So an automatic choice never takes a
backend that would then refuse the input. A forced backend that cannot run raises `BackendUnavailable`
with every backend's reason; an automatic choice never fails because a build is missing: it falls back,
and `last_choices()` remembers why (shown by `python -m mtbert_fast.info`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch

from mtbert_fast import _ext

BACKENDS = ("cuda", "triton", "cpu", "reference")
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MTBERT_FAST_BACKEND"

_DTYPES = {
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cpu": (torch.bfloat16, torch.float32),
}

# op name -> callable, filled by mtbert_fast.ops.triton when Triton imports
triton_kernels: dict[str, object] = {}
_triton_import_error: str | None = None
# ops that move rows of any dtype (token ids too), not only floating-point activations
_ANY_DTYPE_OPS = ("gather_rows", "scatter_rows")
_last: dict[tuple[str, str, torch.dtype], tuple[str, dict[str, str]]] = {}


_ROW_OPS = ("bias_gelu", "bias_residual_layer_norm", "bias_gelu_layer_norm")
_INT32_ROWS = 2**31 - 1
# the Triton kernels hold a row of a row op in one program (mtbert_fast/ops/triton/_jit.py reads this)
TRITON_MAX_ROW = 65536
MAX_HEAD_DIM = 256
CUDA_MAX_HEADS = 65535


@dataclass(frozen=True)
class Limit:
    """An input a backend refuses, declared once: `violated(t)` tells why an input like `t` (the op's main tensor)
    is outside the limit, or None."""

    ops: tuple[str, ...]
    backends: tuple[str, ...]
    text: str
    violated: Callable[[torch.Tensor], str | None]


def _head_dim(t: torch.Tensor) -> str | None:
    d = t.shape[-1]
    return None if d <= MAX_HEAD_DIM else f"head_dim {d} > {MAX_HEAD_DIM}"


def _heads(t: torch.Tensor) -> str | None:
    h = t.shape[2]
    return None if h <= CUDA_MAX_HEADS else f"{h} heads > {CUDA_MAX_HEADS} (the grid's y limit)"


def _tokens(t: torch.Tensor) -> str | None:
    n = t.shape[0]
    return None if n < _INT32_ROWS else f"{n} rows: cu_seqlens (int32) indexes at most {_INT32_ROWS - 1}"


def _row(t: torch.Tensor) -> str | None:
    d = t.shape[-1] if t.dim() else 1
    return None if d <= TRITON_MAX_ROW else f"rows of {d} elements > {TRITON_MAX_ROW} (one program holds a row)"


LIMITS = (
    Limit(("attention_varlen",), ("cuda", "triton"), f"head_dim <= {MAX_HEAD_DIM}", _head_dim),
    Limit(("attention_varlen",), ("cuda",), f"heads <= {CUDA_MAX_HEADS}", _heads),
    Limit(("attention_varlen",), ("cuda", "triton", "cpu"), f"T <= {_INT32_ROWS - 1} rows (int32 cu_seqlens)",
          _tokens),
    Limit(_ROW_OPS, ("triton",), f"rows of at most {TRITON_MAX_ROW} elements", _row),
)


def limits_of(op: str, backend: str) -> list[str]:
    """The declared input limits of `backend` for `op`, as text (for `python -m mtbert_fast.info`)."""
    return [lim.text for lim in LIMITS if op in lim.ops and backend in lim.backends]


def input_reason(backend: str, op: str, t: torch.Tensor) -> str | None:
    """Why `backend` cannot run `op` on an input like `t` although it takes its device and dtype, or None."""
    for lim in LIMITS:
        if op in lim.ops and backend in lim.backends:
            why = lim.violated(t)
            if why is not None:
                return why
    if backend == "cuda" and t.device.type == "cuda":
        return _cuda_device_reason(t.device) or _cuda_shared_memory_reason(op, t)
    return None


# ---- the GPUs the cuda build can run on ---------------------------------------------------------------------------

_device_reasons: dict[int, str | None] = {}
_shared_memory_reasons: dict[tuple[int, int, torch.dtype], str | None] = {}


def parse_arch(name: str) -> tuple[int, int, str]:
    """"sm_90a" / "compute_90" / "sm_120" -> (9, 0, "a") / (9, 0, "") / (12, 0, "")."""
    digits = name.split("_", 1)[1]
    suffix = digits.lstrip("0123456789")
    number = int(digits[: len(digits) - len(suffix)])
    return number // 10, number % 10, suffix


def runs_on(sass: list[str], ptx: list[str], capability: tuple[int, int]) -> bool:
    """Whether a build holding machine code for `sass` (["sm_80", "sm_90a"]) and PTX for `ptx` (["compute_90"])
    can run on a GPU of `capability`: machine code runs on the same major version at the same or a higher minor
    (an arch-specific "a" build only on its exact GPU); PTX is compiled by the driver for any newer GPU."""
    for name in sass:
        major, minor, suffix = parse_arch(name)
        if major == capability[0] and (minor == capability[1] if suffix else minor <= capability[1]):
            return True
    for name in ptx:
        major, minor, suffix = parse_arch(name)
        if ((major, minor) == capability) if suffix else ((major, minor) <= capability):
            return True
    return False


def arch_reason(sass: list[str], ptx: list[str], capability: tuple[int, int]) -> str | None:
    if runs_on(sass, ptx, capability):
        return None
    built = ", ".join(sass + [f"PTX {p}" for p in ptx]) or "no architecture"
    return f"mtbert_fast._C holds CUDA code for {built}; this GPU is sm_{capability[0]}{capability[1]}"


def _cuda_device_reason(device: torch.device) -> str | None:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_reasons:
        sass, ptx = _ext.cuda_archs()
        _device_reasons[index] = arch_reason(sass, ptx, torch.cuda.get_device_capability(index))
    return _device_reasons[index]


def _cuda_shared_memory_reason(op: str, t: torch.Tensor) -> str | None:
    if op != "attention_varlen":
        return None
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    key = (index, t.shape[-1], t.dtype)
    if key not in _shared_memory_reasons:  # asked on every call: the answer is a function of the key alone
        need = _ext.cuda_attention_shared_bytes(t.shape[-1], t.dtype)
        have = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
        _shared_memory_reasons[key] = None if need <= have else (
            f"head_dim {t.shape[-1]} needs {need} bytes of shared memory per block, this GPU allows {have}"
        )
    return _shared_memory_reasons[key]


class BackendUnavailable(RuntimeError):
    """A backend was forced that cannot run this input; the message gives every backend's reason."""


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the argument, else $MTBERT_FAST_BACKEND, else "auto"."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if name not in CHOICES:
        source = "backend=" if backend is not None else f"${ENV_VAR}="
        raise ValueError(f"{source}{name!r} is not a backend; choose one of {', '.join(CHOICES)}")
    return name


def _triton_reason(op: str, device: torch.device) -> str | None:
    _load_triton()
    if _triton_import_error is not None:
        return _triton_import_error
    if op not in triton_kernels:
        return f"no Triton kernel for {op}"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got a {device.type} tensor"


def _load_triton() -> None:
    global _triton_import_error
    if triton_kernels or _triton_import_error is not None:
        return
    if importlib.util.find_spec("triton") is None:
        _triton_import_error = "triton is not installed"
        return
    try:
        importlib.import_module("mtbert_fast.ops.triton")
    except Exception as exc:  # a broken Triton install must not break the other backends
        _triton_import_error = f"mtbert_fast.ops.triton failed to import: {type(exc).__name__}: {exc}"


def reason(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run `op` on this device and dtype, or None when it can."""
    any_dtype = op in _ANY_DTYPE_OPS
    if backend == "reference":
        return None if dtype.is_floating_point or any_dtype else f"dtype {dtype} is not a floating-point type"
    if backend == "triton":
        why = _triton_reason(op, device)
    elif backend in ("cpu", "cuda"):
        key = backend.upper()
        if not _ext.loaded():
            why = f"mtbert_fast._C unavailable: {_ext.load_error}"
        elif not _ext.has_kernel(op, key):
            why = f"mtbert_fast._C has no {key} kernel for {op}" + (
                " (built without CUDA)" if key == "CUDA" and not _ext.built_with_cuda() else ""
            )
        elif device.type != backend:
            why = f"input is on {device.type}, the {backend} kernels take {backend} tensors"
        else:
            why = None
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if why is None and not any_dtype and dtype not in _DTYPES[backend]:
        names = ", ".join(str(d).replace("torch.", "") for d in _DTYPES[backend])
        why = f"dtype {str(dtype).replace('torch.', '')} is not supported ({names})"
    return why


def choose(op: str, t: torch.Tensor, backend: str | None = None) -> str:
    """The backend that runs `op` on inputs like `t` (the op's main tensor: its device, dtype and shape decide)."""
    wanted = requested_backend(backend)
    if wanted != "auto":
        why = why_not(wanted, op, t)
        if why is None:
            return wanted
        detail = "; ".join(f"{b}: {why_not(b, op, t) or 'can run'}" for b in BACKENDS)
        raise BackendUnavailable(f"{op}: backend {wanted!r} cannot run this input ({why}). All backends: {detail}")
    reasons: dict[str, str] = {}
    for b in BACKENDS:
        why = why_not(b, op, t)
        if why is None:
            if not torch.compiler.is_compiling():
                _last[(op, t.device.type, t.dtype)] = (b, reasons)
            return b
        reasons[b] = why
    raise BackendUnavailable(f"{op}: no backend can run this input: {reasons}")


def backward_backend(op: str, t: torch.Tensor) -> str:
    """Where the backward of `op` runs after a forward on the cuda backend: on Triton's tensor-core kernels when
    they can take the input (the CUDA C++ backward runs on CUDA cores), unless $MTBERT_FAST_BACKEND forces cuda."""
    if requested_backend() == "cuda":
        return "cuda"
    # why_not loads the Triton kernels first, so the lookup that follows sees them
    if why_not("triton", op, t) is None and f"{op}_backward" in triton_kernels:
        return "triton"
    return "cuda"


def why_not(backend: str, op: str, t: torch.Tensor) -> str | None:
    """Why `backend` cannot run `op` on an input like `t` (device, dtype, build, shape), or None when it can."""
    return reason(backend, op, t.device, t.dtype) or input_reason(backend, op, t)


def last_choices() -> dict[tuple[str, str, torch.dtype], tuple[str, dict[str, str]]]:
    """(op, device type, dtype) -> (backend chosen automatically, why each earlier backend was passed over)."""
    return dict(_last)
