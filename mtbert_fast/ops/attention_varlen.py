"""attention_varlen: bidirectional softmax attention over packed (unpadded) sequences."""

from __future__ import annotations

import math

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import dispatch, reference


def attention_varlen(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(scale * Q K^T) V per sequence, with the softmax in fp32 and no padding anywhere.

    qkv [T, 3, heads, head_dim]: the packed output of the fused QKV projection, viewed per head.
    cu_seqlens int32 [B+1]: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]; cu_seqlens[-1] == T.
    max_seqlen: the longest sequence.  scale: default 1/sqrt(head_dim).
    dropout_p: dropout on the attention probabilities (training); only the reference computes it.
    -> [T, heads, head_dim] in qkv's dtype.
    """
    op = "attention_varlen"
    if qkv.dim() != 4 or qkv.shape[1] != 3:
        raise ValueError(f"{op}: qkv must be [T, 3, heads, head_dim], got shape {tuple(qkv.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but qkv is on {qkv.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    limits = {}
    if dropout_p > 0.0:
        limits = {b: "attention dropout is computed by the reference only" for b in ("cuda", "triton", "cpu")}
    impl = dispatch.choose(op, qkv, backend, limits)
    if impl == "reference":
        return reference.attention_varlen(qkv, cu_seqlens, max_seqlen, scale, dropout_p)
    if impl == "triton":
        return dispatch.triton_kernels[op](qkv, cu_seqlens, max_seqlen, scale)
    return torch.ops.mtbert_fast.attention_varlen(qkv, cu_seqlens, max_seqlen, scale)[0]


if _ext.loaded():

    @torch.library.register_fake("mtbert_fast::attention_varlen")
    def _fake(qkv, cu_seqlens, max_seqlen, scale):
        t, _, heads, head_dim = qkv.shape
        return qkv.new_empty((t, heads, head_dim)), qkv.new_empty((heads, t), dtype=torch.float32)

    @torch.library.register_fake("mtbert_fast::attention_varlen_backward")
    def _fake_backward(grad_out, qkv, out, lse, cu_seqlens, max_seqlen, scale):
        return torch.empty_like(qkv)

    def _setup_context(ctx, inputs, output):
        qkv, cu_seqlens, max_seqlen, scale = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse, cu_seqlens)
        ctx.mark_non_differentiable(lse)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale

    def _backward(ctx, grad, _grad_lse):
        qkv, out, lse, cu_seqlens = ctx.saved_tensors
        grad_qkv = torch.ops.mtbert_fast.attention_varlen_backward(
            grad.contiguous(), qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale
        )
        return grad_qkv, None, None, None

    torch.library.register_autograd("mtbert_fast::attention_varlen", _backward, setup_context=_setup_context)
