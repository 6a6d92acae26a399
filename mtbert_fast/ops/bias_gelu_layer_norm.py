"""bias_gelu_layer_norm: LayerNorm(GELU(x + bias)), the masked-LM head transform."""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import (
    autocast_layer_norm, check_gelu, check_rows, layer_norm_backends, layer_norm_backward_fake, layer_norm_fake,
)
from mtbert_fast.ops.registry import Op


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
    return OP(x, bias, weight, beta, eps, approximate, backend=backend)


def _fake(x, bias, weight, beta, eps, approximate):
    return layer_norm_fake(x)


def _fake_backward(grad_out, x, bias, weight, mean, rstd, approximate):
    return layer_norm_backward_fake(x, bias, weight)


def _setup_context(ctx, inputs, output):
    x, bias, weight, beta, eps, approximate = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, bias, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.approximate = approximate


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    x, bias, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_beta, grad_bias = OP.backward_kernel(ctx.backend)(
        grad.contiguous(), x, bias, weight, mean, rstd, ctx.approximate
    )
    return grad_x, grad_bias, grad_weight, grad_beta, None, None


OP = Op(
    name="bias_gelu_layer_norm",
    # -> out [N, D], mean fp32 [N], rstd fp32 [N]
    schema="(Tensor x, Tensor bias, Tensor weight, Tensor beta, float eps, str approximate) -> (Tensor, Tensor, Tensor)",
    # -> grad_x [N, D], grad_weight [D], grad_beta [D], grad_bias [D]
    backward_schema="(Tensor grad_out, Tensor x, Tensor bias, Tensor weight, Tensor mean, Tensor rstd, "
                    "str approximate) -> (Tensor, Tensor, Tensor, Tensor)",
    cpp_backward_schema="(Tensor grad_out, Tensor x, Tensor bias, Tensor weight, Tensor mean, Tensor rstd, "
                        "str approximate) -> (Tensor, Tensor, Tensor)",
    reference=reference.bias_gelu_layer_norm,
    backends=layer_norm_backends("bias_gelu_layer_norm_backward"),
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
