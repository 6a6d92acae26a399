"""mlm_gather_loss in Triton: the masked-LM cross-entropy with its gradient computed in the forward, chunk by chunk.

hidden [N, H], weight [V, H] (the tied decoder), bias [V], labels int64 [N] -> loss_sum fp32 [] = sum over the rows
with label != ignore_index of CE(hidden_i @ weight^T + bias, label_i).  The rows counted are gathered first, then
projected to the vocabulary chunk_size rows at a time (0: as many as fit 64 MiB of fp32 logits, at most 4096, the
default of csrc/cpu/mlm_gather_loss.cpp), so memory never holds more than one chunk's [chunk, V] logits.
Per chunk (Liger-Kernel's FusedLinearCrossEntropy, ops/fused_linear_cross_entropy.py):
    logits = bias + h_c @ weight^T                               (torch.addmm: the GEMMs stay with cuBLAS)
    a Triton program per row: lse = log sum_v exp(logits_v) by the online softmax (running max and sum over blocks
    of the vocabulary, fp32), loss = lse - logits_label, then the logits are overwritten in place by
    dlogits = softmax(logits) - onehot(label)
    grad_hidden[rows] = dlogits @ weight,  grad_weight += dlogits^T @ h_c,  grad_bias += sum_rows(dlogits)
The gradients of the sum are kept (only those of inputs that need one) and the backward scales them by the incoming
gradient, so a training step runs no GEMM twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops.triton._jit import device_guard, jit, on_gpu

_CHUNK_BYTES = 64 << 20
_MAX_CHUNK_ROWS = 4096


@jit
def _cross_entropy_rows(
    Logits,  # [C, V] in: the chunk's logits; out (with WRITE_GRAD): d(loss)/d(logits)
    Labels,  # int64 [C], each in [0, V)
    Loss,  # fp32 [C] out
    stride_row,
    V,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_row
    label = tl.load(Labels + row)
    cols = tl.arange(0, BLOCK_V)
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        x = tl.load(Logits + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    tl.store(Loss + row, lse - tl.load(Logits + label).to(tl.float32))
    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(Logits + start + cols, mask=mask, other=0.0).to(tl.float32)
            grad = tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0)
            tl.store(Logits + start + cols, grad.to(Logits.dtype.element_ty), mask=mask)


def _block_v(logits: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096-wide vocabulary blocks on the GPU; 32 under the interpreter, so that small test
    vocabularies span several blocks."""
    vocab = logits.shape[1]
    if on_gpu(logits):
        return min(triton.next_power_of_2(vocab), 4096), 8
    return min(triton.next_power_of_2(vocab), 32), 1


def _chunk_rows(chunk_size: int, vocab: int) -> int:
    if chunk_size > 0:
        return chunk_size
    return max(1, min(_CHUNK_BYTES // max(1, vocab * 4), _MAX_CHUNK_ROWS))


@torch.library.custom_op("mtbert_fast::triton_mlm_gather_loss", mutates_args=())
def _op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss_sum fp32 [], and the gradients of loss_sum: d_hidden [N, H], d_weight [V, H], d_bias [V] in the
    inputs' dtype, each empty ([0]) unless its grad_* flag asks for it."""
    vocab, hidden_size = weight.shape
    kept = (labels != ignore_index).nonzero().squeeze(1)
    kept_labels = labels.index_select(0, kept)
    if kept_labels.numel() and bool(((kept_labels < 0) | (kept_labels >= vocab)).any()):
        bad = kept_labels[(kept_labels < 0) | (kept_labels >= vocab)][0].item()
        raise RuntimeError(
            f"mlm_gather_loss: label {bad} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
        )
    write_grad = grad_hidden or grad_weight or grad_bias
    loss = hidden.new_zeros((), dtype=torch.float32)
    d_hidden = torch.zeros_like(hidden) if grad_hidden else hidden.new_empty((0,))
    # fp32 accumulators across chunks
    d_weight = weight.new_zeros((vocab, hidden_size), dtype=torch.float32) if grad_weight else None
    d_bias = bias.new_zeros((vocab,), dtype=torch.float32) if grad_bias else None
    chunk = _chunk_rows(chunk_size, vocab)
    weight_t = weight.t()
    with device_guard(hidden):
        for start in range(0, kept.numel(), chunk):
            rows = kept[start : start + chunk]
            h = hidden.index_select(0, rows)
            logits = torch.addmm(bias, h, weight_t)  # [c, V], contiguous
            row_loss = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
            block_v, warps = _block_v(logits)
            _cross_entropy_rows[(rows.numel(),)](
                logits, kept_labels[start : start + chunk], row_loss, logits.stride(0), vocab,
                WRITE_GRAD=write_grad, BLOCK_V=block_v, num_warps=warps,
            )
            loss += row_loss.sum()
            if grad_hidden:
                d_hidden.index_copy_(0, rows, logits @ weight)
            if grad_weight:
                if d_weight.dtype == logits.dtype:
                    d_weight.addmm_(logits.t(), h)
                else:
                    d_weight += logits.t() @ h
            if grad_bias:
                d_bias += logits.sum(0, dtype=torch.float32)
    d_weight = d_weight.to(weight.dtype) if grad_weight else weight.new_empty((0,))
    d_bias = d_bias.to(bias.dtype) if grad_bias else bias.new_empty((0,))
    return loss, d_hidden, d_weight, d_bias


@_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, chunk_size, grad_hidden, grad_weight, grad_bias):
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape if grad_hidden else (0,)),
        weight.new_empty(weight.shape if grad_weight else (0,)),
        bias.new_empty(bias.shape if grad_bias else (0,)),
    )


def _setup_context(ctx, inputs, output):
    _, d_hidden, d_weight, d_bias = output
    ctx.save_for_backward(d_hidden, d_weight, d_bias)
    ctx.mark_non_differentiable(d_hidden, d_weight, d_bias)
    ctx.needs = inputs[6:9]


def _backward(ctx, grad, _g_hidden, _g_weight, _g_bias):
    grads = tuple(g * grad if need else None for g, need in zip(ctx.saved_tensors, ctx.needs))
    return grads + (None,) * 6


_op.register_autograd(_backward, setup_context=_setup_context)


def mlm_gather_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Summed masked-LM cross-entropy by the chunked Triton path -> fp32 []; differentiable in hidden, weight, bias.
    The gradients are computed in the forward only for the inputs that need one (and only when grad mode is on)."""
    track = torch.is_grad_enabled()
    needs = tuple(track and t.requires_grad for t in (hidden, weight, bias))
    return _op(hidden, weight, bias, labels, ignore_index, chunk_size, *needs)[0]
