"""bias_gelu_layer_norm in Triton: y = LayerNorm(h) * weight + beta with h = GELU(x + bias), the masked-LM head
transform, and its backward.

x [N, D] (any leading dims, flattened); bias, weight, beta [D] -> y [N, D] in x's dtype, with mean, rstd fp32 [N]
(the statistics of h) saved for the backward.  fp32 throughout, one program per row.  weight and beta are in x's
dtype or both fp32 (mixed precision); their gradients come back in their dtype.
Forward:  s = x + bias,  h = GELU(s) (erf or tanh form, see bias_gelu.py),  h_hat = (h - mean(h)) rstd,
          rstd = 1 / sqrt(var(h) + eps),  y = h_hat * weight + beta
Backward (g = dL/dy, wg = weight * g):
          dh = rstd (wg - h_hat mean(h_hat wg) - mean(wg)),   dx = dh GELU'(s),
          dweight = sum_rows(g h_hat),  dbeta = sum_rows(g),  dbias = sum_rows(dx)
h is recomputed from x in the backward rather than stored.  The backward's grid and partial sums are those of
bias_residual_layer_norm.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.triton._jit import device_guard, jit, reduction_programs, row_block, row_warps
from mtbert_fast.ops.triton.bias_gelu import gelu, gelu_grad


@jit
def _fwd(
    X,  # [N, D]
    Bias,  # [D]
    W,  # [D]
    Beta,  # [D]
    Y,  # [N, D] out
    Mean,  # fp32 [N] out
    Rstd,  # fp32 [N] out
    D,
    eps,
    TANH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(Bias + cols, mask=mask, other=0.0).to(
        tl.float32
    )
    h = tl.where(mask, gelu(s, TANH), 0.0)
    # the corrected two-pass mean: the deviations' own mean corrects the rounding of the first, so a constant row's
    # deviations are exactly 0 (with eps 1e-12, rstd would magnify that rounding to the weights' size)
    mean0 = tl.sum(h, axis=0) / D
    dev = tl.where(mask, h - mean0, 0.0)
    shift = tl.sum(dev, axis=0) / D
    mean = mean0 + shift
    diff = tl.where(mask, h - mean, 0.0)
    rstd = tl.math.rsqrt(tl.maximum(tl.sum(dev * dev, axis=0) / D - shift * shift, 0.0) + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(Beta + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (diff * rstd * w + beta).to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@jit
def _bwd(
    GradY,  # [N, D]
    X,  # [N, D]
    Bias,  # [D]
    W,  # [D]
    Mean,  # fp32 [N]
    Rstd,  # fp32 [N]
    GradX,  # [N, D] out
    PartW,  # fp32 [P, D] out: per-program partial sums of dweight
    PartBeta,  # fp32 [P, D] out: of dbeta
    PartBias,  # fp32 [P, D] out: of dbias
    N,
    D,
    rows_per_program,
    TANH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, N)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # pointers advance a row per step (see bias_residual_layer_norm.py)
    first = row_start.to(tl.int64) * D
    GradY += first
    X += first
    GradX += first
    for row in range(row_start, row_end):
        s = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32) + bias
        g = tl.load(GradY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        h_hat = tl.where(mask, (gelu(s, TANH) - tl.load(Mean + row)) * rstd, 0.0)
        wg = w * g
        c1 = tl.sum(h_hat * wg, axis=0) / D
        c2 = tl.sum(wg, axis=0) / D
        dx = tl.where(mask, (wg - (h_hat * c1 + c2)) * rstd * gelu_grad(s, TANH), 0.0)
        tl.store(GradX + cols, dx.to(GradX.dtype.element_ty), mask=mask)
        dw += g * h_hat
        dbeta += g
        dbias += dx
        GradY += D
        X += D
        GradX += D
    part = pid.to(tl.int64) * D + cols
    tl.store(PartW + part, dw, mask=mask)
    tl.store(PartBeta + part, dbeta, mask=mask)
    tl.store(PartBias + part, dbias, mask=mask)


def forward(
    x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, eps: float, approximate: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_gelu("bias_gelu_layer_norm", approximate)
    d = x.shape[-1]
    block = row_block("bias_gelu_layer_norm", d)
    x = x.contiguous()
    rows = x.numel() // d if d else 0
    y = torch.empty_like(x)
    mean = x.new_empty((rows,), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if rows and d:
        with device_guard(x):
            _fwd[(rows,)](
                x, bias.contiguous(), weight.contiguous(), beta.contiguous(), y, mean, rstd, d, eps,
                TANH=approximate == "tanh", BLOCK_D=block, num_warps=row_warps(block),
            )
    return y, mean, rstd


def backward(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor, approximate: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_x [N, D], grad_weight, grad_beta [D] in weight's dtype (summed in fp32), grad_bias [D] in bias's."""
    d = x.shape[-1]
    block = row_block("bias_gelu_layer_norm", d)
    x, grad_y = x.contiguous(), grad_y.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    rows = mean.numel()
    grad_x = torch.empty_like(x)
    programs = reduction_programs(x, rows)
    partials = x.new_zeros((3, programs, d), dtype=torch.float32)
    if rows and d:
        with device_guard(x):
            _bwd[(programs,)](
                grad_y, x, bias.contiguous(), weight.contiguous(), mean, rstd, grad_x,
                partials[0], partials[1], partials[2], rows, d, triton.cdiv(rows, programs),
                TANH=approximate == "tanh", BLOCK_D=block, num_warps=row_warps(block),
            )
    grad_weight, grad_beta = (p.sum(0).to(weight.dtype) for p in partials[:2])
    grad_bias = partials[2].sum(0).to(bias.dtype)
    return grad_x, grad_weight, grad_beta, grad_bias

