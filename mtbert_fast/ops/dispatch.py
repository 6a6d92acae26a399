"""Backend choice for every op, explainable.

Each op's declaration (registry.py) states which backends have a kernel for it and which dtypes and input shapes
each takes (its limits: head_dim, row length, ...); the cuda backend also states which GPUs its build holds code
for and how much shared memory its attention needs. `choose` returns the first backend that can run an input, in
the order cuda -> triton -> cpu -> reference, or the one the caller forces with `backend=` or the
`MTBERT_FAST_BACKEND` environment variable, so an automatic choice never takes a backend that would then refuse
the input. A forced backend that cannot run raises `BackendUnavailable` with every backend's reason; an automatic
choice never fails because a build is missing: it falls back, and `last_choices()` remembers why (shown by
`python -m mtbert_fast.info`).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import registry

BACKENDS = registry.BACKENDS
CHOICES = ("auto",) + BACKENDS
ENV_VAR = "MTBERT_FAST_BACKEND"

_triton_import_error: str | None = None
_triton_imported = False
_last: dict[tuple[str, str, torch.dtype], tuple[str, dict[str, str]]] = {}
_reasons: dict[tuple, str | None] = {}
# (op, device, dtype, TRITON_INTERPRET on) -> the backend an automatic choice takes when every backend before it is
# refused for the device, dtype or build alone (not the input's shape): then only its own shape limits need checking
_auto: dict[tuple, str] = {}
_TRITON_DEVICES = "Triton runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)"


def limits_of(op: str, backend: str) -> list[str]:
    """The declared input limits of `backend` for `op`, as text (for `python -m mtbert_fast.info`)."""
    return [lim.text for lim in registry.OPS[op].limits(backend)]


def input_reason(backend: str, op: str, t: torch.Tensor, device: torch.device | None = None) -> str | None:
    """Why `backend` cannot run `op` on an input like `t` although it takes its device and dtype, or None."""
    for lim in registry.OPS[op].limits(backend):
        why = lim.violated(t)
        if why is not None:
            return why
    if backend == "cuda":
        device = t.device if device is None else device
        if device.type == "cuda":
            return _cuda_device_reason(device) or _cuda_shared_memory_reason(op, t)
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
    if "triton" not in registry.OPS[op].backends:
        return f"no Triton kernel for {op}"
    error = _triton_load_error()
    if error is not None:
        return error
    if device.type in ("cuda", "cpu"):
        return None
    return f"{_TRITON_DEVICES}, got a {device.type} tensor"


@torch.compiler.assume_constant_result
def _triton_load_error() -> str | None:
    """_load_triton's outcome: None, or why the Triton backend cannot load. torch.compile runs it while tracing (an
    import cannot be traced) and takes its result as a constant, as it is once the kernels have loaded or failed."""
    _load_triton()
    return _triton_import_error


def _load_triton() -> None:
    """Import the Triton kernels once; a failure is kept as the Triton backend's reason."""
    global _triton_import_error, _triton_imported
    if _triton_imported or _triton_import_error is not None:
        return
    if importlib.util.find_spec("triton") is None:
        _triton_import_error = "triton is not installed"
        return
    try:
        for name, spec in registry.OPS.items():
            if "triton" in spec.backends:
                importlib.import_module(f"{registry.TRITON_MODULES}.{name}")
    except Exception as exc:  # a broken Triton install must not break the other backends
        _triton_import_error = f"{registry.TRITON_MODULES} failed to import: {type(exc).__name__}: {exc}"
    else:
        _triton_imported = True


def reason(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run `op` on this device and dtype, or None when it can."""
    # TRITON_INTERPRET is read at every call (tests turn it on and off), and first: without it a CPU tensor never
    # needs the Triton kernels imported (an import, which torch.compile cannot trace, and a fifth of a second)
    if (backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"
            and "triton" in registry.OPS[op].backends):
        return f"{_TRITON_DEVICES}, got a cpu tensor"
    key = (backend, op, device.type, dtype)
    if key not in _reasons:  # a function of the key alone once the extension and Triton have loaded
        _reasons[key] = _reason(backend, op, device, dtype)
    return _reasons[key]


def _reason(backend: str, op: str, device: torch.device, dtype: torch.dtype) -> str | None:
    spec = registry.OPS[op]
    if backend == "reference":
        any_dtype = all(b.dtypes is None for b in spec.backends.values())
        return None if dtype.is_floating_point or any_dtype else f"dtype {dtype} is not a floating-point type"
    if backend == "triton":
        why = _triton_reason(op, device)
    elif backend in ("cpu", "cuda"):
        key = backend.upper()
        if backend not in spec.backends:
            why = f"no {backend} kernel for {op}"
        elif not _ext.loaded():
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
    dtypes = spec.dtypes(backend) if why is None else None
    if dtypes is not None and dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
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
    device, dtype = t.device, t.dtype  # read once: each read of t.device builds a new object
    key = (op, device, dtype, os.environ.get("TRITON_INTERPRET") == "1")
    cached = _auto.get(key)
    if cached is not None and input_reason(cached, op, t, device) is None:
        return cached
    reasons: dict[str, str] = {}
    shape_free = True  # every backend passed over so far was refused for the device, dtype or build alone
    for b in BACKENDS:
        why = reason(b, op, device, dtype)
        shape_free_here = why is None
        why = why or input_reason(b, op, t, device)
        if why is None:
            if not torch.compiler.is_compiling():
                _last[(op, device.type, dtype)] = (b, reasons)
                if shape_free:
                    _auto[key] = b
            return b
        reasons[b] = why
        shape_free = shape_free and not shape_free_here
    raise BackendUnavailable(f"{op}: no backend can run this input: {reasons}")


def backward_backend(op: str, forward: str, t: torch.Tensor) -> str:
    """Where the backward of `op` runs after its forward ran on `forward`: the same backend, except that after a
    forward on the cuda backend, Triton's tensor-core backward runs when it can take the input (the CUDA C++
    backward runs on CUDA cores), unless $MTBERT_FAST_BACKEND forces cuda."""
    if forward != "cuda" or requested_backend() == "cuda":
        return forward
    return "triton" if why_not("triton", op, t) is None else "cuda"


def why_not(backend: str, op: str, t: torch.Tensor) -> str | None:
    """Why `backend` cannot run `op` on an input like `t` (device, dtype, build, shape), or None when it can."""
    device = t.device
    return reason(backend, op, device, t.dtype) or input_reason(backend, op, t, device)


def last_choices() -> dict[tuple[str, str, torch.dtype], tuple[str, dict[str, str]]]:
    """(op, device type, dtype) -> (backend chosen automatically, why each earlier backend was passed over)."""
    return dict(_last)
