"""mlm_gather_loss: masked-LM cross-entropy over the masked rows only, never holding [rows, vocab] logits."""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import autocast_like
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op


def mlm_gather_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 0,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight.T + bias against labels, over rows whose label != ignore_index.

    hidden [N, H] (the head-transformed rows), weight [V, H] (the tied decoder), bias [V] or None,
    labels int64 [N].  The vocabulary projection runs chunk_size rows at a time (0: a default) and the
    gradient is recomputed chunk by chunk, so memory never holds [N, V] logits. The kernels take the logits from a
    GEMM in the inputs' dtype (in bf16 rounded to bf16, as a bf16 linear's are; the CPU kernel adds the bias after
    that rounding, in fp32) and the log-sum-exp and the loss in fp32; the reference multiplies in fp32.
    -> fp32 scalar: the mean over counted rows ("mean", NaN when none is counted, as F.cross_entropy) or "sum".
    """
    op = "mlm_gather_loss"
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != (hidden.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"{op}: labels must be int64 [{hidden.shape[0]}], got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{op}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    hidden, weight, bias = autocast_like(hidden, weight, bias)
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    for name, t in (("weight", weight), ("bias", bias), ("labels", labels)):
        if t.device != hidden.device:
            raise ValueError(f"{op}: {name} is on {t.device} but hidden is on {hidden.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but hidden has {hidden.dtype}")
    loss_sum = OP(hidden, weight, bias, labels, ignore_index, chunk_size, backend=backend)
    if reduction == "sum":
        return loss_sum
    return loss_sum / (labels != ignore_index).sum()


def _reference_sum(hidden, weight, bias, labels, ignore_index, chunk_size):
    return reference.mlm_gather_loss(hidden, weight, bias, labels, ignore_index, "sum")


def _fake(hidden, weight, bias, labels, ignore_index, chunk_size):
    return hidden.new_empty((), dtype=torch.float32), hidden.new_empty((hidden.shape[0],), dtype=torch.float32)


def _fake_backward(grad_loss_sum, hidden, weight, bias, labels, lse, ignore_index, chunk_size):
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, chunk_size = inputs
    _, lse = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse)
    ctx.mark_non_differentiable(lse)
    ctx.ignore_index, ctx.chunk_size = ignore_index, chunk_size


def _backward(ctx, grad, _grad_lse):
    hidden, weight, bias, labels, lse = ctx.saved_tensors
    grad_hidden, grad_weight, grad_bias = OP.backward_kernel(ctx.backend)(
        grad, hidden, weight, bias, labels, lse, ctx.ignore_index, ctx.chunk_size
    )
    return grad_hidden, grad_weight, grad_bias, None, None, None


OP = Op(
    name="mlm_gather_loss",
    # hidden [N, H], weight [V, H], bias [V], labels int64 [N]: cross-entropy of hidden @ weight.T + bias, computed
    # chunk_size rows at a time over the rows whose label != ignore_index
    # -> loss_sum fp32 [] (summed over the counted rows), lse fp32 [N] (0 at ignored rows)
    schema="(Tensor hidden, Tensor weight, Tensor bias, Tensor labels, int ignore_index, int chunk_size) "
           "-> (Tensor, Tensor)",
    # grad_loss_sum [] -> grad_hidden [N, H], grad_weight [V, H], grad_bias [V] (the logits recomputed chunk by chunk)
    backward_schema="(Tensor grad_loss_sum, Tensor hidden, Tensor weight, Tensor bias, Tensor labels, Tensor lse, "
                    "int ignore_index, int chunk_size) -> (Tensor, Tensor, Tensor)",
    reference=_reference_sum,
    backends={
        "triton": Backend("forward", "backward"),
        "cpu": Backend(dtypes=CPU_DTYPES),
    },
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
