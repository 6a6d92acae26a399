"""Argument checks shared by the op wrappers: every failure names the op, the tensor and what was expected."""

from __future__ import annotations

import torch

GELU_KINDS = ("none", "tanh")


def check_gelu(op: str, approximate: str) -> None:
    if approximate not in GELU_KINDS:
        raise ValueError(f"{op}: approximate must be 'none' (erf) or 'tanh', got {approximate!r}")


def check_rows(
    op: str, x: torch.Tensor, *, same_shape: dict[str, torch.Tensor] | None = None,
    vectors: dict[str, torch.Tensor] | None = None,
) -> None:
    """x [..., D]; `same_shape` tensors must match x's shape, `vectors` must be [D]; all share x's dtype and device."""
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    d = x.shape[-1]
    same_shape, vectors = same_shape or {}, vectors or {}
    for name, t in same_shape.items():
        if t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
    for name, t in vectors.items():
        if t.shape != (d,):
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({d},) (x's last dim)")
    for name, t in {**same_shape, **vectors}.items():
        check_like(op, name, t, x)


def check_like(op: str, name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")


def sum_rows(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Column sums of grad [..., D] in fp32, returned as `dtype` [D]: the gradient of a broadcast bias."""
    return grad.reshape(-1, grad.shape[-1]).sum(0, dtype=torch.float32).to(dtype)


def autocast_like(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, the floating-point tensors cast to autocast's dtype, as autocast casts a matmul's
    inputs: the layer's activations arrive in bf16 from the autocast GEMMs while its weights stay fp32.
    Outside autocast the tensors are returned unchanged, and mixed dtypes are refused by the checks."""
    first = tensors[0]
    device_type = first.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
