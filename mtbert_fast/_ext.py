"""Guarded load of the compiled extension mtbert_fast._C.

Importing mtbert_fast never fails because the build is missing or broken: the ops then run on the other
backends, and `load_error` keeps the reason for `python -m mtbert_fast.info` and for forced-backend errors.
"""

from __future__ import annotations

import importlib.util

import torch

load_error: str | None
_spec = importlib.util.find_spec("mtbert_fast._C")
if _spec is None or _spec.origin is None:
    load_error = "no compiled mtbert_fast._C next to the package (installed with MTBERT_FAST_SKIP_BUILD=1, or not built)"
else:
    try:
        # _C is a plain shared library of TORCH_LIBRARY registrations, not a Python module
        torch.ops.load_library(_spec.origin)
        load_error = None
    except OSError as exc:
        load_error = f"mtbert_fast._C failed to load: {type(exc).__name__}: {exc}"



def _registered(dispatch_key: str) -> frozenset[str]:
    prefix = "mtbert_fast_C::"
    names = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key) if load_error is None else []
    return frozenset(n[len(prefix):] for n in names if n.startswith(prefix))


# Read once at load, so the backend choice is plain Python that torch.compile traces without a graph break.
_KERNELS = {key: _registered(key) for key in ("CPU", "CUDA")}


def loaded() -> bool:
    return load_error is None


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
