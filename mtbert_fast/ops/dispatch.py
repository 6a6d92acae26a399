"""Backend choice for every op, explainable.

Each backend states which devices and dtypes it takes; `choose` returns the first that can run an input, in
the order cuda -> triton -> cpu -> reference, or the one the caller forces with `backend=` or the
`MTBERT_FAST_BACKEND` environment variable. A forced backend that cannot run raises `BackendUnavailable`
with every backend's reason; an automatic choice never fails because a build is missing: it falls back,
and `last_choices()` remembers why (shown by `python -m mtbert_fast.info`).
"""

from __future__ import annotations

import importlib.util
import os

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


def choose(
    op: str, t: torch.Tensor, backend: str | None = None, limits: dict[str, str] | None = None
) -> str:
    """The backend that runs `op` on inputs like `t`.

    limits: extra per-backend reasons for this call (an argument a kernel does not support, say).
    """
    wanted = requested_backend(backend)
    limits = limits or {}

    def why_not(b: str) -> str | None:
        return limits.get(b) or reason(b, op, t.device, t.dtype)

    if wanted != "auto":
        why = why_not(wanted)
        if why is None:
            return wanted
        detail = "; ".join(f"{b}: {why_not(b) or 'can run'}" for b in BACKENDS)
        raise BackendUnavailable(f"{op}: backend {wanted!r} cannot run this input ({why}). All backends: {detail}")
    reasons: dict[str, str] = {}
    for b in BACKENDS:
        why = why_not(b)
        if why is None:
            if not torch.compiler.is_compiling():
                _last[(op, t.device.type, t.dtype)] = (b, reasons)
            return b
        reasons[b] = why
    raise BackendUnavailable(f"{op}: no backend can run this input: {reasons}")


def last_choices() -> dict[tuple[str, str, torch.dtype], tuple[str, dict[str, str]]]:
    """(op, device type, dtype) -> (backend chosen automatically, why each earlier backend was passed over)."""
    return dict(_last)
