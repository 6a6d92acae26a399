"""bias_gelu: GELU(x + bias), exact (erf) or tanh form."""

from __future__ import annotations

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference
from mtbert_fast.ops._checks import autocast_like, check_gelu, check_rows, sum_rows


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none", *, backend: str | None = None):
    """GELU(x + bias).  x [..., D], bias [D] -> [..., D] in x's dtype, computed in fp32.

    approximate: "none" for 0.5 x (1 + erf(x / sqrt 2)), "tanh" for the tanh form (gelu_new).
    """
    check_gelu("bias_gelu", approximate)
    x, bias = autocast_like(x, bias)
    check_rows("bias_gelu", x, vectors={"bias": bias})
    impl = dispatch.choose("bias_gelu", x, backend)
    if impl == "reference":
        return reference.bias_gelu(x, bias, approximate)
    if impl == "triton":
        return dispatch.triton_kernels["bias_gelu"](x, bias, approximate)
    return torch.ops.mtbert_fast_C.bias_gelu(x, bias, approximate)


if _ext.loaded():

    # the kernels return contiguous tensors whatever the inputs' strides; so must the fakes (torch.compile
    # checks the strides of what runs against them)
    @torch.library.register_fake("mtbert_fast_C::bias_gelu")
    def _fake(x, bias, approximate):
        return x.new_empty(x.shape)

    @torch.library.register_fake("mtbert_fast_C::bias_gelu_backward")
    def _fake_backward(grad_out, x, bias, approximate):
        return x.new_empty(x.shape)

    def _setup_context(ctx, inputs, output):
        x, bias, approximate = inputs
        ctx.save_for_backward(x, bias)
        ctx.approximate = approximate

    def _backward(ctx, grad):
        x, bias = ctx.saved_tensors
        grad_x = torch.ops.mtbert_fast_C.bias_gelu_backward(grad.contiguous(), x, bias, ctx.approximate)
        return grad_x, sum_rows(grad_x, bias.dtype), None

    torch.library.register_autograd("mtbert_fast_C::bias_gelu", _backward, setup_context=_setup_context)
