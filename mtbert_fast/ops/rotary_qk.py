"""rotary_qk: rotary position embeddings (RoPE) applied to the query and key heads of a packed qkv."""

from __future__ import annotations

import os

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops.attention_varlen import DEBUG_CHECKS_ENV
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op

_INDEX_DTYPES = (torch.int32, torch.int64)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """qkv [T, 3, heads, D] -> the same with the query and key heads rotated, the value heads copied.

    cos, sin [P, D/2] float32: cos and sin of position p times the frequencies theta^(-2i/D) (rotary_tables makes
    them); positions [T] int32/int64, each token's position, < P. Rotation on the half-split pairs (i, i + D/2), as
    GPT-NeoX and HF's rotate_half: out[i] = x[i] cos - x[i + D/2] sin, out[i + D/2] = x[i + D/2] cos + x[i] sin,
    computed in fp32 and stored in qkv's dtype. Differentiable in qkv (the gradient rotates back).
    """
    op = "rotary_qk"
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{op}: qkv must be [tokens, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    if not qkv.dtype.is_floating_point:
        raise TypeError(f"{op}: qkv must be a floating-point tensor, got {qkv.dtype}")
    head_dim = qkv.shape[-1]
    if head_dim % 2:
        raise ValueError(f"{op}: head_dim must be even to rotate pairs, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be float32, got {t.dtype}")
        if t.dim() != 2 or t.shape[1] != head_dim // 2:
            raise ValueError(f"{op}: {name} must be [positions, {head_dim // 2}] (head_dim / 2), got shape "
                             f"{tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"{op}: sin has shape {tuple(sin.shape)} but cos has {tuple(cos.shape)}")
    if positions.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: positions must be int32 or int64, got {positions.dtype}")
    if positions.shape != (qkv.shape[0],):
        raise ValueError(f"{op}: positions must be [{qkv.shape[0]}] (one per token of qkv), got shape "
                         f"{tuple(positions.shape)}")
    for name, t in (("cos", cos), ("sin", sin), ("positions", positions)):
        if t.device != qkv.device:
            raise ValueError(f"{op}: {name} is on {t.device} but qkv is on {qkv.device}")
    _check_positions(op, positions, cos.shape[0])
    return OP(qkv, cos, sin, positions, False, backend=backend)


def _check_positions(op: str, positions: torch.Tensor, tables: int) -> None:
    """Every position indexes the tables. Read where that costs nothing (CPU tensors), or on the GPU with
    MTBERT_FAST_DEBUG_CHECKS=1 (a read back to the host); unchecked, the GPU kernels give NaN for a token whose
    position is out of range, never another position's angles."""
    if torch.compiler.is_compiling() or not positions.numel():
        return
    if positions.device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1":
        lo, hi = torch.aminmax(positions)
        if lo < 0 or hi >= tables:
            raise ValueError(f"{op}: positions hold values in [{int(lo)}, {int(hi)}], outside the {tables} "
                             "positions of the cos/sin tables")


def rotary_tables(head_dim: int, positions: int | torch.Tensor, theta: float,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, head_dim / 2] float32 of p * theta^(-2i / head_dim), the angles rotary_qk reads: for p in
    0..positions-1, or for each p of a positions tensor [P] (a row per token, read at its own index)."""
    if head_dim % 2 or head_dim <= 0:
        raise ValueError(f"rotary_tables: head_dim must be even and positive, got {head_dim}")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    if isinstance(positions, torch.Tensor):
        angles = torch.outer(positions.to(device=inv_freq.device, dtype=torch.float32), inv_freq)
    else:
        angles = torch.outer(torch.arange(positions, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _fake(qkv, cos, sin, positions, inverse):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    _, cos, sin, positions, inverse = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.inverse = inverse


def _backward(ctx, grad):
    # a rotation's transpose is the rotation by the negative angles: the same kernel with `inverse` flipped
    cos, sin, positions = ctx.saved_tensors
    grad_qkv = OP.op(grad.contiguous(), cos, sin, positions, not ctx.inverse, ctx.backend)
    return grad_qkv, None, None, None, None


OP = Op(
    name="rotary_qk",
    # qkv [T, 3, heads, D], cos/sin fp32 [P, D/2], positions int [T] -> [T, 3, heads, D]
    schema="(Tensor qkv, Tensor cos, Tensor sin, Tensor positions, bool inverse) -> Tensor",
    reference=reference.rotary_qk,
    backends={
        "cuda": Backend(),
        "triton": Backend("forward"),
        "cpu": Backend(dtypes=CPU_DTYPES),
    },
    fake=_fake,
    setup_context=_setup_context,
    backward=_backward,
)
