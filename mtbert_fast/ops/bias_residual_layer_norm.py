"""bias_residual_layer_norm: LayerNorm(x + bias + residual), the epilogue of every encoder sub-layer."""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import (
    autocast_layer_norm, check_rows, layer_norm_backends, layer_norm_backward_fake, layer_norm_fake,
)
from mtbert_fast.ops.registry import Op


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
    return OP(x, bias, residual, weight, beta, eps, backend=backend)


def _fake(x, bias, residual, weight, beta, eps):
    return layer_norm_fake(x)


def _fake_backward(grad_out, x, bias, residual, weight, mean, rstd):
    return layer_norm_backward_fake(x, bias, weight)


def _setup_context(ctx, inputs, output):
    x, bias, residual, weight, beta, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, residual, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, bias, residual, weight, mean, rstd = ctx.saved_tensors
    grad_s, grad_weight, grad_beta, grad_bias = OP.backward_kernel(ctx.backend)(
        grad.contiguous(), x, bias, residual, weight, mean, rstd
    )
    return grad_s, grad_bias, grad_s, grad_weight, grad_beta, None


OP = Op(
    name="bias_residual_layer_norm",
    # -> out [N, D], mean fp32 [N], rstd fp32 [N]
    schema="(Tensor x, Tensor bias, Tensor residual, Tensor weight, Tensor beta, float eps) -> (Tensor, Tensor, Tensor)",
    # -> grad_s [N, D] (the gradient of x and of residual), grad_weight [D], grad_beta [D], grad_bias [D]
    backward_schema="(Tensor grad_out, Tensor x, Tensor bias, Tensor residual, Tensor weight, Tensor mean, "
                    "Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor)",
    cpp_backward_schema="(Tensor grad_out, Tensor x, Tensor bias, Tensor residual, Tensor weight, Tensor mean, "
                        "Tensor rstd) -> (Tensor, Tensor, Tensor)",
    reference=reference.bias_residual_layer_norm,
    backends=layer_norm_backends("bias_residual_layer_norm_backward"),
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
