"""bias_residual_layer_norm: LayerNorm(x + bias + residual), the epilogue of every encoder sub-layer."""

from __future__ import annotations

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference
from mtbert_fast.ops._checks import autocast_like, check_rows, sum_rows


def bias_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-12,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(s) * weight + beta with s = x + bias + residual, statistics in fp32.

    x, residual [..., D]; bias, weight, beta [D] -> [..., D] in x's dtype.
    """
    op = "bias_residual_layer_norm"
    x, bias, residual, weight, beta = autocast_like(x, bias, residual, weight, beta)
    check_rows(op, x, same_shape={"residual": residual}, vectors={"bias": bias, "weight": weight, "beta": beta})
    impl = dispatch.choose(op, x, backend)
    if impl == "reference":
        return reference.bias_residual_layer_norm(x, bias, residual, weight, beta, eps)
    if impl == "triton":
        return dispatch.triton_kernels[op](x, bias, residual, weight, beta, eps)
    return torch.ops.mtbert_fast.bias_residual_layer_norm(x, bias, residual, weight, beta, eps)[0]


if _ext.loaded():

    @torch.library.register_fake("mtbert_fast::bias_residual_layer_norm")
    def _fake(x, bias, residual, weight, beta, eps):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        stats = x.new_empty((rows,), dtype=torch.float32)
        return torch.empty_like(x), stats, stats.clone()

    @torch.library.register_fake("mtbert_fast::bias_residual_layer_norm_backward")
    def _fake_backward(grad_out, x, bias, residual, weight, mean, rstd):
        return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        x, bias, residual, weight, beta, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, bias, residual, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad, _grad_mean, _grad_rstd):
        x, bias, residual, weight, mean, rstd = ctx.saved_tensors
        grad_s, grad_weight, grad_beta = torch.ops.mtbert_fast.bias_residual_layer_norm_backward(
            grad.contiguous(), x, bias, residual, weight, mean, rstd
        )
        return grad_s, sum_rows(grad_s, bias.dtype), grad_s, grad_weight, grad_beta, None

    torch.library.register_autograd(
        "mtbert_fast::bias_residual_layer_norm", _backward, setup_context=_setup_context
    )
