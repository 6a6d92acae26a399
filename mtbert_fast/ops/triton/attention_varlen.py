"""attention_varlen in Triton: bidirectional softmax attention over packed sequences, FlashAttention-2 style.

qkv [T, 3, heads, head_dim] (the fused QKV projection viewed per head), cu_seqlens int32 [B+1] (sequence b owns rows
cu_seqlens[b]:cu_seqlens[b+1], cu_seqlens[0] == 0, cu_seqlens[-1] == T), max_seqlen >= the longest sequence
-> out [T, heads, head_dim] in qkv's dtype, lse fp32 [heads, T] (saved for the backward).

Per sequence and head, with S = scale Q K^T, P = softmax_rows(S):   O = P V,   lse_i = log sum_j exp(S_ij)
Forward (Dao, "FlashAttention-2", 2023, Algorithm 1): one program per (sequence x head, block of BLOCK_M queries)
walks the sequence's keys BLOCK_N at a time with the online softmax in fp32 (running max m, running sum l, the
accumulator rescaled by exp(m_old - m_new)); scores go through exp2 with log2(e) folded into the scale.
Backward (Algorithm 2):  delta_i = rowsum(dO_i * O_i)  (a preprocess kernel),  P = exp(S - lse),
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q
one kernel per key block for dK, dV (looping over the query blocks) and one per query block for dQ (looping over the
key blocks), so that no gradient needs atomics.
head_dim need not be a power of two: the head-dim block is the next power of two (at least 16, the smallest tl.dot
operand), masked.  Programs past the end of their sequence return at once, so a ragged batch costs its real tokens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mtbert_fast.ops.triton._jit import device_guard, jit, on_gpu

_LOG2E = 1.4426950408889634
_LOG2E_TL = tl.constexpr(_LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_MAX_HEAD_DIM = 256


@jit
def _fwd(
    QKV,  # [T, 3, heads, head_dim], head_dim contiguous
    Out,  # [T, heads, head_dim] out, contiguous
    Lse,  # fp32 [heads, T] out
    CuSeqlens,  # int32 [B+1]
    qk_scale,  # scale * log2(e)
    stride_t,  # qkv's stride over tokens
    stride_3,  # over q / k / v
    stride_h,  # over heads
    T,
    heads,
    head_dim,
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    start_m = tl.program_id(1) * BLOCK_M
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    if start_m >= seqlen:
        return
    seq_start = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < head_dim
    rows_m = seq_start + offs_m
    Q = QKV + h * stride_h
    K = Q + stride_3
    V = K + stride_3
    q = tl.load(Q + rows_m[:, None] * stride_t + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        mask_n = start_n + offs_n < seqlen
        kv_offs = (seq_start + start_n + offs_n)[:, None] * stride_t + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
    tl.store(Out + o_offs, out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + h.to(tl.int64) * T + rows_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)


@jit
def _bwd_delta(
    Out,  # [T, heads, head_dim], contiguous
    GradOut,  # [T, heads, head_dim], contiguous
    Delta,  # fp32 [heads, T] out: rowsum(dO * O)
    T,
    heads,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < T
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    offs = rows[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(GradOut + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + h.to(tl.int64) * T + rows, tl.sum(o * do, axis=1), mask=mask_m)


@jit
def _bwd_dkdv(
    QKV,  # [T, 3, heads, head_dim], head_dim contiguous
    GradOut,  # [T, heads, head_dim], contiguous
    Lse,  # fp32 [heads, T]
    Delta,  # fp32 [heads, T]
    GradQKV,  # [T, 3, heads, head_dim] out (its k and v parts), strided as QKV
    CuSeqlens,  # int32 [B+1]
    qk_scale,  # scale * log2(e)
    scale,
    stride_t,
    stride_3,
    stride_h,
    T,
    heads,
    head_dim,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys owned by the program
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    start_n = tl.program_id(1) * BLOCK_N
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    if start_n >= seqlen:
        return
    seq_start = seq_start.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    mask_d = offs_d < head_dim
    kv_offs = (seq_start + offs_n)[:, None] * stride_t + h * stride_h + offs_d[None, :]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(QKV + stride_3 + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(QKV + 2 * stride_3 + kv_offs, mask=kv_mask, other=0.0)
    lse_row = Lse + h.to(tl.int64) * T + seq_start
    delta_row = Delta + h.to(tl.int64) * T + seq_start

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        mask_m = start_m + offs_m < seqlen
        rows_m = seq_start + start_m + offs_m
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(QKV + rows_m[:, None] * stride_t + h * stride_h + offs_d[None, :], mask=q_mask, other=0.0)
        do_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
        do = tl.load(GradOut + do_offs, mask=q_mask, other=0.0)
        lse = tl.load(lse_row + start_m + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_row + start_m + offs_m, mask=mask_m, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M], log2 units
        p_t = tl.exp2(s_t - lse[None, :] * _LOG2E_TL)
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)

    tl.store(GradQKV + stride_3 + kv_offs, (dk * scale).to(GradQKV.dtype.element_ty), mask=kv_mask)
    tl.store(GradQKV + 2 * stride_3 + kv_offs, dv.to(GradQKV.dtype.element_ty), mask=kv_mask)


@jit
def _bwd_dq(
    QKV,  # [T, 3, heads, head_dim], head_dim contiguous
    GradOut,  # [T, heads, head_dim], contiguous
    Lse,  # fp32 [heads, T]
    Delta,  # fp32 [heads, T]
    GradQKV,  # [T, 3, heads, head_dim] out (its q part), strided as QKV
    CuSeqlens,  # int32 [B+1]
    qk_scale,  # scale * log2(e)
    scale,
    stride_t,
    stride_3,
    stride_h,
    T,
    heads,
    head_dim,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries owned by the program
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    start_m = tl.program_id(1) * BLOCK_M
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    if start_m >= seqlen:
        return
    seq_start = seq_start.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < head_dim
    rows_m = seq_start + offs_m
    q_offs = rows_m[:, None] * stride_t + h * stride_h + offs_d[None, :]
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(QKV + q_offs, mask=q_mask, other=0.0)
    do_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
    do = tl.load(GradOut + do_offs, mask=q_mask, other=0.0)
    lse = tl.load(Lse + h.to(tl.int64) * T + rows_m, mask=mask_m, other=0.0) * _LOG2E_TL
    delta = tl.load(Delta + h.to(tl.int64) * T + rows_m, mask=mask_m, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, seqlen, BLOCK_N):
        mask_n = start_n + offs_n < seqlen
        kv_offs = (seq_start + start_n + offs_n)[:, None] * stride_t + h * stride_h + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(QKV + stride_3 + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(QKV + 2 * stride_3 + kv_offs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(GradQKV + q_offs, (dq * scale).to(GradQKV.dtype.element_ty), mask=q_mask)


def _settings(qkv: torch.Tensor) -> dict[str, int | str]:
    """Block sizes and warps: FlashAttention-2-like tiles on the GPU; 16 (tl.dot's smallest) under the interpreter,
    so that small test sequences span several blocks."""
    head_dim = qkv.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"attention_varlen: the Triton kernel takes head_dim up to {_MAX_HEAD_DIM}, got {head_dim}")
    block_d = max(16, triton.next_power_of_2(head_dim))
    fp32 = qkv.dtype == torch.float32
    settings = dict(BLOCK_D=block_d, PRECISION="ieee" if fp32 else "tf32")
    if not on_gpu(qkv):
        return dict(settings, fwd_m=16, fwd_n=16, dkdv_m=16, dkdv_n=16, dq_m=16, dq_n=16, warps=1, stages=1)
    warps = 8 if block_d >= 128 else 4
    if fp32:
        return dict(settings, fwd_m=64, fwd_n=32, dkdv_m=32, dkdv_n=32, dq_m=32, dq_n=32, warps=warps, stages=1)
    return dict(settings, fwd_m=64, fwd_n=64, dkdv_m=32, dkdv_n=64, dq_m=64, dq_n=32, warps=warps, stages=2)


@torch.library.custom_op("mtbert_fast::triton_attention_varlen", mutates_args=())
def _op(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = qkv.contiguous()
    t, _, heads, head_dim = qkv.shape
    out = qkv.new_empty((t, heads, head_dim))
    lse = qkv.new_empty((heads, t), dtype=torch.float32)
    batch = cu_seqlens.numel() - 1
    if t and batch > 0 and max_seqlen > 0:
        cfg = _settings(qkv)
        grid = (batch * heads, triton.cdiv(max_seqlen, cfg["fwd_m"]))
        with device_guard(qkv):
            _fwd[grid](
                qkv, out, lse, cu_seqlens, scale * _LOG2E, qkv.stride(0), qkv.stride(1), qkv.stride(2),
                t, heads, head_dim, PRECISION=cfg["PRECISION"], BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"],
                BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
    return out, lse


@_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, scale):
    t, _, heads, head_dim = qkv.shape
    return qkv.new_empty((t, heads, head_dim)), qkv.new_empty((heads, t), dtype=torch.float32)


@torch.library.custom_op("mtbert_fast::triton_attention_varlen_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, scale: float,
) -> torch.Tensor:
    """-> grad_qkv [T, 3, heads, head_dim]."""
    qkv, out, grad_out = qkv.contiguous(), out.contiguous(), grad_out.contiguous()
    t, _, heads, head_dim = qkv.shape
    grad_qkv = torch.empty_like(qkv)
    batch = cu_seqlens.numel() - 1
    if not (t and batch > 0 and max_seqlen > 0):
        return grad_qkv.zero_()
    cfg = _settings(qkv)
    delta = torch.empty_like(lse)
    common = dict(PRECISION=cfg["PRECISION"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["warps"], num_stages=cfg["stages"])
    args = (qkv, grad_out, lse, delta, grad_qkv, cu_seqlens, scale * _LOG2E, scale)
    args += (qkv.stride(0), qkv.stride(1), qkv.stride(2), t, heads, head_dim)
    with device_guard(qkv):
        _bwd_delta[(triton.cdiv(t, cfg["fwd_m"]), heads)](
            out, grad_out, delta, t, heads, head_dim, BLOCK_M=cfg["fwd_m"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["warps"],
        )
        _bwd_dkdv[(batch * heads, triton.cdiv(max_seqlen, cfg["dkdv_n"]))](
            *args, BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], **common
        )
        _bwd_dq[(batch * heads, triton.cdiv(max_seqlen, cfg["dq_m"]))](
            *args, BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], **common
        )
    return grad_qkv


@_backward_op.register_fake
def _(grad_out, qkv, out, lse, cu_seqlens, max_seqlen, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.mark_non_differentiable(lse)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, grad, _grad_lse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    return _backward_op(grad, qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale), None, None, None


_op.register_autograd(_backward, setup_context=_setup_context)


def attention_varlen(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float | None = None
) -> torch.Tensor:
    """softmax(scale Q K^T) V per packed sequence by the Triton kernels; differentiable (in qkv).
    qkv [T, 3, heads, head_dim], cu_seqlens int32 [B+1] -> [T, heads, head_dim]; scale defaults to 1/sqrt(head_dim)."""
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    return _op(qkv, cu_seqlens, max_seqlen, scale)[0]
