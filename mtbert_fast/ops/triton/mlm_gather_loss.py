"""mlm_gather_loss in Triton: the masked-LM cross-entropy over the counted rows, chunk by chunk, and its backward.

hidden [N, H], weight [V, H] (the tied decoder), bias [V], labels int64 [N] -> loss_sum fp32 [] = sum over the rows
with label != ignore_index of CE(hidden_i @ weight^T + bias, label_i), and lse fp32 [N] (the rows' log-sum-exp, 0 at
ignored rows), saved for the backward.  The rows counted are gathered first, then projected to the vocabulary
chunk_size rows at a time (0: as many as fit 64 MiB of fp32 logits, at most 4096, the default of
csrc/cpu/mlm_gather_loss.cpp), so memory never holds more than one chunk's [chunk, V] logits.
Forward, per chunk:
    logits = bias + h_c @ weight^T                       (torch.addmm: the GEMMs stay with cuBLAS)
    a Triton program per row: lse = log sum_v exp(logits_v) by the online softmax (running max and sum over blocks
    of the vocabulary, fp32), loss = lse - logits_label
Backward, per chunk (the logits recomputed, as the C++ kernel does, rather than kept from the forward):
    a Triton program per row overwrites the logits in place with dlogits = g (exp(logits - lse) - onehot(label))
    grad_hidden[rows] = dlogits @ weight,  grad_weight += dlogits^T @ h_c,  grad_bias += sum_rows(dlogits)
with g the incoming gradient of loss_sum, read by the kernel from device memory (no synchronisation).
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
    Logits,  # [C, V]: the chunk's logits
    Labels,  # int64 [C], each in [0, V)
    Loss,  # fp32 [C] out
    Lse,  # fp32 [C] out
    stride_row,
    V,
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
    tl.store(Lse + row, lse)
    tl.store(Loss + row, lse - tl.load(Logits + label).to(tl.float32))


@jit
def _logits_grad_rows(
    Logits,  # [C, V] in: the chunk's logits; out: d(g * loss)/d(logits)
    Labels,  # int64 [C], each in [0, V)
    Lse,  # fp32 [C]: the rows' log-sum-exp from the forward
    G,  # fp32 []: the incoming gradient of loss_sum
    stride_row,
    V,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    Logits += row * stride_row
    label = tl.load(Labels + row)
    lse = tl.load(Lse + row)
    g = tl.load(G)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        x = tl.load(Logits + start + cols, mask=mask, other=0.0).to(tl.float32)
        grad = g * (tl.exp(x - lse) - tl.where(start + cols == label, 1.0, 0.0))
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


def _counted_rows(labels: torch.Tensor, ignore_index: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the indices of the rows whose label != ignore_index, their labels); a counted label outside [0, V) raises."""
    kept = (labels != ignore_index).nonzero().squeeze(1)
    kept_labels = labels.index_select(0, kept)
    if kept_labels.numel() and bool(((kept_labels < 0) | (kept_labels >= vocab)).any()):
        bad = kept_labels[(kept_labels < 0) | (kept_labels >= vocab)][0].item()
        raise ValueError(
            f"mlm_gather_loss: label {bad} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
        )
    return kept, kept_labels


def _chunks(hidden, weight, bias, labels, ignore_index, chunk_size):
    """Per chunk of counted rows: (their indices, their labels, h_c [c, H], logits [c, V] contiguous)."""
    kept, kept_labels = _counted_rows(labels, ignore_index, weight.shape[0])
    chunk = _chunk_rows(chunk_size, weight.shape[0])
    weight_t = weight.t()
    for start in range(0, kept.numel(), chunk):
        rows = kept[start : start + chunk]
        h = hidden.index_select(0, rows)
        yield rows, kept_labels[start : start + chunk], h, torch.addmm(bias, h, weight_t)


def forward(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, ignore_index: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> loss_sum fp32 [], lse fp32 [N] (0 at the rows not counted)."""
    loss = hidden.new_zeros((), dtype=torch.float32)
    lse = hidden.new_zeros((hidden.shape[0],), dtype=torch.float32)
    with device_guard(hidden):
        for rows, row_labels, _, logits in _chunks(hidden, weight, bias, labels, ignore_index, chunk_size):
            row_loss = logits.new_empty((rows.numel(),), dtype=torch.float32)
            row_lse = torch.empty_like(row_loss)
            block_v, warps = _block_v(logits)
            _cross_entropy_rows[(rows.numel(),)](
                logits, row_labels, row_loss, row_lse, logits.stride(0), logits.shape[1], BLOCK_V=block_v,
                num_warps=warps,
            )
            loss += row_loss.sum()
            lse.index_copy_(0, rows, row_lse)
    return loss, lse


def backward(
    grad_loss_sum: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor,
    lse: torch.Tensor, ignore_index: int, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_hidden [N, H], grad_weight [V, H], grad_bias [V] in the inputs' dtypes (weight's and bias's summed in
    fp32 across chunks)."""
    g = grad_loss_sum.reshape(()).to(torch.float32)
    grad_hidden = torch.zeros_like(hidden)
    grad_weight = weight.new_zeros(weight.shape, dtype=torch.float32)
    grad_bias = bias.new_zeros(bias.shape, dtype=torch.float32)
    with device_guard(hidden):
        for rows, row_labels, h, logits in _chunks(hidden, weight, bias, labels, ignore_index, chunk_size):
            block_v, warps = _block_v(logits)
            _logits_grad_rows[(rows.numel(),)](
                logits, row_labels, lse.index_select(0, rows), g, logits.stride(0), logits.shape[1],
                BLOCK_V=block_v, num_warps=warps,
            )
            grad_hidden.index_copy_(0, rows, logits @ weight)
            if logits.dtype == torch.float32:
                grad_weight.addmm_(logits.t(), h)
            else:
                grad_weight += logits.t() @ h
            grad_bias += logits.sum(0, dtype=torch.float32)
    return grad_hidden, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
