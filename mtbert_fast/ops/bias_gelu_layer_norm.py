"""bias_gelu_layer_norm: LayerNorm(GELU(x + bias)), the masked-LM head transform."""

from __future__ import annotations

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference
from mtbert_fast.ops._checks import autocast_layer_norm, check_gelu, check_rows, sum_rows


def bias_gelu_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float = 1e-12,
    approximate: str = "none",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(GELU(x + bias)) * weight + beta, in fp32.

    x [..., D]; bias [D] in x's dtype; weight, beta [D] in x's dtype or both float32 -> [..., D] in x's dtype. The
    gradients of weight and beta are summed in fp32 and returned in their dtype. Under torch.autocast, x and bias
    are cast to autocast's dtype, and fp32 weight and beta stay fp32.
    """
    op = "bias_gelu_layer_norm"
    check_gelu(op, approximate)
    (x, bias), (weight, beta) = autocast_layer_norm((x, bias), (weight, beta))
    check_rows(op, x, vectors={"bias": bias}, params={"weight": weight, "beta": beta})
    impl = dispatch.choose(op, x, backend)
    if impl == "reference":
        return reference.bias_gelu_layer_norm(x, bias, weight, beta, eps, approximate)
    if impl == "triton":
        return dispatch.triton_kernels[op](x, bias, weight, beta, eps, approximate)
    return torch.ops.mtbert_fast_C.bias_gelu_layer_norm(x, bias, weight, beta, eps, approximate)[0]


if _ext.loaded():

    # The fakes describe exactly what the kernels return: new contiguous tensors, whatever the inputs' strides.

    @torch.library.register_fake("mtbert_fast_C::bias_gelu_layer_norm")
    def _fake(x, bias, weight, beta, eps, approximate):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        stats = x.new_empty((rows,), dtype=torch.float32)
        return x.new_empty(x.shape), stats, stats.clone()

    @torch.library.register_fake("mtbert_fast_C::bias_gelu_layer_norm_backward")
    def _fake_backward(grad_out, x, bias, weight, mean, rstd, approximate):
        d = x.shape[-1]
        return x.new_empty(x.shape), weight.new_empty((d,)), weight.new_empty((d,))

    def _setup_context(ctx, inputs, output):
        x, bias, weight, beta, eps, approximate = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, bias, weight, mean, rstd)
        ctx.mark_non_differentiable(mean, rstd)
        ctx.approximate = approximate

    def _backward(ctx, grad, _grad_mean, _grad_rstd):
        x, bias, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_weight, grad_beta = torch.ops.mtbert_fast_C.bias_gelu_layer_norm_backward(
            grad.contiguous(), x, bias, weight, mean, rstd, ctx.approximate
        )
        return grad_x, sum_rows(grad_x, bias.dtype), grad_weight, grad_beta, None, None

    torch.library.register_autograd("mtbert_fast_C::bias_gelu_layer_norm", _backward, setup_context=_setup_context)
