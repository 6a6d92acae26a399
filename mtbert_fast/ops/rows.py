"""Packing helpers: gather/scatter of rows, and unpad/pad between [B, L, ...] and packed [T, ...]."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtbert_fast.ops import reference
from mtbert_fast.ops.registry import Backend, Op


def _check_indices(op: str, x: torch.Tensor, indices: torch.Tensor) -> None:
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim, got a scalar")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"{op}: indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if indices.device != x.device:
        raise ValueError(f"{op}: indices are on {indices.device} but x is on {x.device}")


def gather_rows(x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """x [R, ...], indices int64 [N] -> x[indices] [N, ...].  The gradient adds up repeated indices."""
    _check_indices("gather_rows", x, indices)
    return GATHER(x, indices, backend=backend)


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int, *, backend: str | None = None):
    """x [N, ...], indices int64 [N], all distinct -> out [num_rows, ...]: out[indices] = x, zeros elsewhere."""
    _check_indices("scatter_rows", x, indices)
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"scatter_rows: {indices.shape[0]} indices for {x.shape[0]} rows of x")
    return SCATTER(x, indices, num_rows, backend=backend)


def unpad_indices(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """attention_mask [B, L] of 0/1 -> (indices int64 [T] into the flattened [B*L], cu_seqlens int32 [B+1],
    max_seqlen).  A row's real tokens keep their order; holes in a row are allowed."""
    seqlens = attention_mask.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    return indices, cu_seqlens, max_seqlen


def unpad(hidden: torch.Tensor, attention_mask: torch.Tensor):
    """hidden [B, L, ...], attention_mask [B, L] -> (packed [T, ...], indices [T], cu_seqlens [B+1], max_seqlen)."""
    if hidden.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"unpad: hidden is {tuple(hidden.shape)} but attention_mask is {tuple(attention_mask.shape)}"
        )
    indices, cu_seqlens, max_seqlen = unpad_indices(attention_mask)
    packed = gather_rows(hidden.reshape((-1,) + tuple(hidden.shape[2:])), indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """packed [T, ...], indices [T] from unpad -> [batch, seqlen, ...] with zeros at the padding."""
    out = scatter_rows(packed, indices, batch * seqlen)
    return out.reshape((batch, seqlen) + tuple(packed.shape[1:]))


def _fake_gather(x, indices):
    return x.new_empty((indices.shape[0],) + tuple(x.shape[1:]))


def _fake_scatter(x, indices, num_rows):
    return x.new_empty((num_rows,) + tuple(x.shape[1:]))


def _setup_gather(ctx, inputs, output):
    x, indices = inputs
    ctx.save_for_backward(indices)
    ctx.num_rows = x.shape[0]


def _backward_gather(ctx, grad):
    (indices,) = ctx.saved_tensors
    out = grad.new_zeros((ctx.num_rows,) + tuple(grad.shape[1:]))
    return out.index_add_(0, indices, grad), None


def _setup_scatter(ctx, inputs, output):
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _backward_scatter(ctx, grad):
    (indices,) = ctx.saved_tensors
    return GATHER.op(grad.contiguous(), indices, ctx.backend), None, None


# rows of any dtype (token ids too), not only floating-point activations
_ANY_DTYPE = {"cuda": Backend(dtypes=None), "cpu": Backend(dtypes=None)}

GATHER = Op(
    name="gather_rows",
    # x [R, ...], indices int64 [N] -> x[indices] [N, ...]
    schema="(Tensor x, Tensor indices) -> Tensor",
    reference=reference.gather_rows,
    backends=_ANY_DTYPE,
    fake=_fake_gather,
    setup_context=_setup_gather,
    backward=_backward_gather,
)
SCATTER = Op(
    name="scatter_rows",
    # x [N, ...], indices int64 [N] (distinct) -> out [num_rows, ...], zero where no index points
    schema="(Tensor x, Tensor indices, SymInt num_rows) -> Tensor",
    reference=reference.scatter_rows,
    backends=_ANY_DTYPE,
    fake=_fake_scatter,
    setup_context=_setup_scatter,
    backward=_backward_scatter,
)
