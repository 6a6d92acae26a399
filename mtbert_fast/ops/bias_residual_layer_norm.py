"""bias_residual_layer_norm: LayerNorm(x + bias + residual), the epilogue of every encoder sub-layer."""

from __future__ import annotations

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference
from mtbert_fast.ops._checks import autocast_layer_norm, check_rows, sum_rows


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

    x, residual [..., D]; bias [D] in x's dtype; weight, beta [D] in x's dtype or both float32 -> [..., D] in x's
    dtype. The gradients of weight and beta are summed in fp32 and returned in their dtype. Under torch.autocast,
    x, bias and residual are cast to autocast's dtype, and fp32 weight and beta stay fp32.
    """
    op = "bias_residual_layer_norm"
    (x, bias, residual), (weight, beta) = autocast_layer_norm((x, bias, residual), (weight, beta))
    check_rows(
        op, x, same_shape={"residual": residual}, vectors={"bias": bias}, params={"weight": weight, "beta": beta}
    )
    impl = dispatch.choose(op, x, backend)
    if impl == "reference":
        return reference.bias_residual_layer_norm(x, bias, residual, weight, beta, eps)
    if impl == "triton":
        return dispatch.triton_kernels[op](x, bias, residual, weight, beta, eps)
    return torch.ops.mtbert_fast_C.bias_residual_layer_norm(x, bias, residual, weight, beta, eps)[0]


if _ext.loaded():

    # The fakes describe exactly what the kernels return: new contiguous tensors, whatever the inputs' strides.

    @torch.library.register_fake("mtbert_fast_C::bias_residual_layer_norm")
    def _fake(x, bias, residual, weight, beta, eps):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        stats = x.new_empty((rows,), dtype=torch.float32)
        return x.new_empty(x.shape), stats, stats.clone()

    @torch.library.register_fake("mtbert_fast_C::bias_residual_layer_norm_backward")
    def _fake_backward(grad_out, x, bias, residual, weight, mean, rstd):
        d = x.shape[-1]
        return x.new_empty(x.shape), weight.new_empty((d,)), weight.new_empty((d,))

    def _setup_context(ctx, inputs, output):
        x, bias, residual, weight, beta, eps = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, bias, residual, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)

    def _backward(ctx, grad, _grad_mean, _grad_rstd):
        x, bias, residual, weight, mean, rstd = ctx.saved_tensors
        grad_s, grad_weight, grad_beta = torch.ops.mtbert_fast_C.bias_residual_layer_norm_backward(
            grad.contiguous(), x, bias, residual, weight, mean, rstd
        )
        return grad_s, sum_rows(grad_s, bias.dtype), grad_s, grad_weight, grad_beta, None

    torch.library.register_autograd(
        "mtbert_fast_C::bias_residual_layer_norm", _backward, setup_context=_setup_context
    )
