"""geglu: GELU(a) * g over the two halves [a | g] of the last dim, the gated feed-forward of ModernBERT."""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import autocast_like, check_gelu
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op


def geglu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None) -> torch.Tensor:
    """GELU(x[..., :I]) * x[..., I:].  x [..., 2I] -> [..., I] in x's dtype, computed in fp32.

    approximate: "none" for the exact (erf) GELU, "tanh" for the tanh form.
    """
    op = "geglu"
    check_gelu(op, approximate)
    (x,) = autocast_like(x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"{op}: x's last dim must be even (the two halves [GELU input | gate]), got shape "
                         f"{tuple(x.shape)}")
    return OP(x, approximate, backend=backend)


def _fake(x, approximate):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


def _fake_backward(grad_out, x, approximate):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    x, approximate = inputs
    ctx.save_for_backward(x)
    ctx.approximate = approximate


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return OP.backward_kernel(ctx.backend)(grad.contiguous(), x, ctx.approximate), None


OP = Op(
    name="geglu",
    # x [N, 2I] -> [N, I]
    schema="(Tensor x, str approximate) -> Tensor",
    # -> grad_x [N, 2I]
    backward_schema="(Tensor grad_out, Tensor x, str approximate) -> Tensor",
    reference=reference.geglu,
    backends={
        "cuda": Backend(),
        "triton": Backend("forward", "backward"),
        "cpu": Backend(dtypes=CPU_DTYPES),
    },
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
