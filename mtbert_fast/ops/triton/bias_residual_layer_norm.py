"""bias_residual_layer_norm in Triton: y = LayerNorm(s) * weight + beta with s = x + bias + residual, and its backward.

x, residual [N, D] (any leading dims, flattened); bias, weight, beta [D] -> y [N, D] in x's dtype, with
mean, rstd fp32 [N] saved for the backward.  weight and beta are in x's dtype or both fp32 (mixed precision); their
gradients come back in their dtype.  Statistics in fp32, one program per row (the row lives in registers).
Forward:  mean = sum(s) / D,  var = sum((s - mean)^2) / D,  rstd = 1 / sqrt(var + eps),  s_hat = (s - mean) rstd,
          y = s_hat * weight + beta
Backward (g = dL/dy, wg = weight * g; Ba, Kiros & Hinton 2016; as in Liger-Kernel ops/layer_norm.py):
          ds = rstd (wg - s_hat mean(s_hat wg) - mean(wg)),   dweight = sum_rows(g s_hat),   dbeta = sum_rows(g)
          dx = dresidual = ds,   dbias = sum_rows(ds)
The backward runs on a fixed grid of P programs, each over a contiguous range of rows, accumulating dweight, dbeta
and dbias of its rows in fp32 registers; the [P, D] partial sums are added up by torch afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops.triton._jit import device_guard, jit, reduction_programs, row_block, row_warps


@jit
def _fwd(
    X,  # [N, D]
    Bias,  # [D]
    Res,  # [N, D]
    W,  # [D]
    Beta,  # [D]
    Y,  # [N, D] out
    Mean,  # fp32 [N] out
    Rstd,  # fp32 [N] out
    D,
    eps,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    offs = row * D + cols
    s = (
        tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        + tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
        + tl.load(Res + offs, mask=mask, other=0.0).to(tl.float32)
    )
    # the corrected two-pass mean: the deviations' own mean corrects the rounding of the first, so a constant row's
    # deviations are exactly 0 (with eps 1e-12, rstd would magnify that rounding to the weights' size)
    mean0 = tl.sum(s, axis=0) / D
    dev = tl.where(mask, s - mean0, 0.0)
    shift = tl.sum(dev, axis=0) / D
    mean = mean0 + shift
    diff = tl.where(mask, s - mean, 0.0)
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
    Res,  # [N, D]
    W,  # [D]
    Mean,  # fp32 [N]
    Rstd,  # fp32 [N]
    GradS,  # [N, D] out: the gradient of x and of residual
    PartW,  # fp32 [P, D] out: per-program partial sums of dweight
    PartBeta,  # fp32 [P, D] out: of dbeta
    PartBias,  # fp32 [P, D] out: of dbias
    N,
    D,
    rows_per_program,
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
    # pointers advance a row per step: a runtime loop index cannot be widened to int64 the same way compiled and
    # interpreted, and row * D can overflow int32
    first = row_start.to(tl.int64) * D
    GradY += first
    X += first
    Res += first
    GradS += first
    for row in range(row_start, row_end):
        s = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32) + bias
        s += tl.load(Res + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GradY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(Rstd + row)
        s_hat = tl.where(mask, (s - tl.load(Mean + row)) * rstd, 0.0)
        wg = w * g
        c1 = tl.sum(s_hat * wg, axis=0) / D
        c2 = tl.sum(wg, axis=0) / D
        ds = tl.where(mask, (wg - (s_hat * c1 + c2)) * rstd, 0.0)
        tl.store(GradS + cols, ds.to(GradS.dtype.element_ty), mask=mask)
        dw += g * s_hat
        dbeta += g
        dbias += ds
        GradY += D
        X += D
        Res += D
        GradS += D
    part = pid.to(tl.int64) * D + cols
    tl.store(PartW + part, dw, mask=mask)
    tl.store(PartBeta + part, dbeta, mask=mask)
    tl.store(PartBias + part, dbias, mask=mask)


def forward(
    x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, beta: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> y [N, D] in x's dtype, mean and rstd fp32 [N] (saved for the backward)."""
    d = x.shape[-1]
    block = row_block("bias_residual_layer_norm", d)
    x, residual = x.contiguous(), residual.contiguous()
    rows = x.numel() // d if d else 0
    y = torch.empty_like(x)
    mean = x.new_empty((rows,), dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if rows and d:
        with device_guard(x):
            _fwd[(rows,)](
                x, bias.contiguous(), residual, weight.contiguous(), beta.contiguous(), y, mean, rstd, d, eps,
                BLOCK_D=block, num_warps=row_warps(block),
            )
    return y, mean, rstd


def backward(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_s [N, D] (of x and residual), grad_weight, grad_beta [D] in weight's dtype (summed in fp32),
    grad_bias [D] in bias's."""
    d = x.shape[-1]
    block = row_block("bias_residual_layer_norm", d)
    x, residual, grad_y = x.contiguous(), residual.contiguous(), grad_y.contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    rows = mean.numel()
    grad_s = torch.empty_like(x)
    programs = reduction_programs(x, rows)
    partials = x.new_zeros((3, programs, d), dtype=torch.float32)
    if rows and d:
        with device_guard(x):
            _bwd[(programs,)](
                grad_y, x, bias.contiguous(), residual, weight.contiguous(), mean, rstd, grad_s,
                partials[0], partials[1], partials[2], rows, d, triton.cdiv(rows, programs),
                BLOCK_D=block, num_warps=row_warps(block),
            )
    grad_weight, grad_beta = (p.sum(0).to(weight.dtype) for p in partials[:2])
    grad_bias = partials[2].sum(0).to(bias.dtype)
    return grad_s, grad_weight, grad_beta, grad_bias

