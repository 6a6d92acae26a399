"""bias_gelu: GELU(x + bias), exact (erf) or tanh form."""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import autocast_like, check_gelu, check_rows, row_limits, sum_rows
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", *, backend: str | None = None):
    """GELU(x + bias).  x [..., D], bias [D] -> [..., D] in x's dtype, computed in fp32.

    approximate: "none" for 0.5 x (1 + erf(x / sqrt 2)), "tanh" for the tanh form (gelu_new).
    """
    check_gelu("bias_gelu", approximate)
    x, bias = autocast_like(x, bias)
    check_rows("bias_gelu", x, vectors={"bias": bias})
    return OP(x, bias, approximate, backend=backend)


# the kernels return contiguous tensors whatever the inputs' strides; so do the fakes (torch.compile checks the
# strides of what runs against them)
def _fake(x, bias, approximate):
    return x.new_empty(x.shape)


def _fake_backward(grad_out, x, bias, approximate):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, bias, approximate = inputs
    ctx.save_for_backward(x, bias)
    ctx.approximate = approximate


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    grad_x = OP.backward_kernel(ctx.backend)(grad.contiguous(), x, bias, ctx.approximate)
    return grad_x, sum_rows(grad_x, bias.dtype), None


OP = Op(
    name="bias_gelu",
    schema="(Tensor x, Tensor bias, str approximate) -> Tensor",
    backward_schema="(Tensor grad_out, Tensor x, Tensor bias, str approximate) -> Tensor",
    reference=reference.bias_gelu,
    backends={
        "cuda": Backend(),
        "triton": Backend("forward", "backward", limits=row_limits()),
        "cpu": Backend(dtypes=CPU_DTYPES),
    },
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
