"""geglu in Triton: y = GELU(a) * g for each row's halves [a | g], and its backward.

x [N, 2I] -> y [N, I] in x's dtype, computed in fp32. Backward: grad_a = grad_y * g * GELU'(a), grad_g = grad_y *
GELU(a) (the GELU forms and their derivatives are bias_gelu's). The kernels run over the flat [N * I] outputs, BLOCK
at a time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.triton._jit import device_guard, jit
from mtbert_fast.ops.triton.bias_gelu import gelu, gelu_grad

_BLOCK = 1024


@jit
def _geglu_fwd(
    X,  # [N, 2I]
    Y,  # [N, I] out
    n,  # N * I
    I,
    TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a_offs = (offs // I) * 2 * I + offs % I
    a = tl.load(X + a_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + a_offs + I, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (gelu(a, TANH) * g).to(Y.dtype.element_ty), mask=mask)


@jit
def _geglu_bwd(
    GradY,  # [N, I]
    X,  # [N, 2I]
    GradX,  # [N, 2I] out
    n,  # N * I
    I,
    TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a_offs = (offs // I) * 2 * I + offs % I
    dy = tl.load(GradY + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(X + a_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(X + a_offs + I, mask=mask, other=0.0).to(tl.float32)
    tl.store(GradX + a_offs, (dy * g * gelu_grad(a, TANH)).to(GradX.dtype.element_ty), mask=mask)
    tl.store(GradX + a_offs + I, (dy * gelu(a, TANH)).to(GradX.dtype.element_ty), mask=mask)


def _launch(kernel, out: torch.Tensor, tensors: tuple[torch.Tensor, ...], half: int, approximate: str) -> None:
    n = tensors[-1].numel() // 2
    if n:
        with device_guard(out):
            kernel[(triton.cdiv(n, _BLOCK),)](*tensors, out, n, half, TANH=approximate == "tanh", BLOCK=_BLOCK,
                                              num_warps=4)


def forward(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU(x[..., :I]) * x[..., I:].  x [..., 2I] -> [..., I] in x's dtype."""
    check_gelu("geglu", approximate)
    x = x.contiguous()
    half = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], half))
    _launch(_geglu_fwd, out, (x,), half, approximate)
    return out


def backward(grad_y: torch.Tensor, x: torch.Tensor, approximate: str) -> torch.Tensor:
    """-> grad_x [..., 2I]."""
    x = x.contiguous()
    grad_x = torch.empty_like(x)
    _launch(_geglu_bwd, grad_x, (grad_y.contiguous(), x), x.shape[-1] // 2, approximate)
    return grad_x
