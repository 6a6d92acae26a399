"""Guarded load of the compiled extension mtbert_fast._C.

Importing mtbert_fast never fails because the build is missing or broken: the ops then run on the other
backends, and `load_error` keeps the reason for `python -m mtbert_fast.info` and for forced-backend errors.
"""

from __future__ import annotations

import torch

load_error: str | None
try:
    from mtbert_fast import _C  # noqa: F401  (registers the torch.ops.mtbert_fast kernels)

    load_error = None
except ImportError as exc:
    load_error = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return load_error is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the built extension registered a kernel of `op` for `dispatch_key` ("CPU", "CUDA")."""
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"mtbert_fast::{op}", dispatch_key)


def built_with_cuda() -> bool:
    return has_kernel("bias_gelu", "CUDA")
