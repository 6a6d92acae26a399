"""attention_varlen in Triton: bidirectional softmax attention over packed sequences, FlashAttention-2 style, with
fused dropout on the probabilities, an optional relative position bias, optional per-token position terms (DeBERTa's
disentangled attention) and an optional local window.

qkv [T, 3, heads, head_dim] (the fused QKV projection viewed per head), cu_seqlens int32 [B+1] (sequence b owns rows
cu_seqlens[b]:cu_seqlens[b+1], cu_seqlens[0] == 0, cu_seqlens[-1] == T), max_seqlen (the longest sequence: it sizes
the launch only) -> out [T, heads, head_dim] in qkv's dtype, lse fp32 [heads, T] (saved for the backward).

Per sequence and head, with S = scale Q K^T + B, P = softmax_rows(S) and the dropout multipliers M (M_ij = 0 where
probability ij is dropped, 1 / (1 - dropout_p) where it is kept; M = 1 without dropout); B_ij = rel_bias[h, clamp(j - i,
-R, R) + R] + pos_q[h, row i, c_ij] + pos_k[h, row j, c_ij], c_ij = pos_index[clamp(j - i, -P, P) + P], for positions
i, j in the sequence and their packed rows (each term 0 without its table), and -inf where |j - i| > window (with a
window):
    O = (P * M) V,   lse_i = log sum_j exp(S_ij)   (the normalizer is that of the undropped P)
Forward (Dao, "FlashAttention-2", 2023, Algorithm 1): a program per (sequence x head, block of BLOCK_M queries)
walks the sequence's keys BLOCK_N at a time with the online softmax in fp32 (running max m, running sum l, the
accumulator rescaled by exp(m_old - m_new)); scores go through exp2 with log2(e) folded into the scale.  Dropout
zeroes the dropped probabilities before they meet V; the 1 / (1 - dropout_p) is applied once, with 1 / l.
Backward (Algorithm 2):  delta_i = rowsum(dO_i * O_i)  (a preprocess kernel),  P = exp(S - lse),
    dV = (P * M)^T dO,   dP = (dO V^T) * M,   dS = P * (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q
one kernel per key block for dK, dV (looping over the query blocks) and one per query block for dQ (looping over the
key blocks), so that no gradient of qkv needs atomics.  The bias table's gradient, dB[h, d] = sum of dS_ij over the
pairs with clamp(j - i, -R, R) + R == d, is added with atomics into an fp32 buffer by the dK, dV kernel, where dS is
formed: the pairs of a tile in the two end buckets (distances clamped to -R or R: most pairs of a sequence much
longer than R) as one sum each, the others per element.  The per-token tables' gradients, d pos_q[h, row i, c] = sum
of dS_ij over the keys j with c_ij == c and d pos_k[h, row j, c] = sum over the queries i with c_ij == c, are added
with atomics into fp32 [heads, T, W] buffers by the kernel that owns those rows (pos_q's by the dQ kernel, pos_k's
by the dK, dV kernel), so no two programs write one address; the end distances again as one sum per row.
With a window every kernel visits only the blocks that meet the band |j - i| <= window of its own block.  The bias,
each per-token table and the window are constexpr flags (HAS_BIAS, HAS_POS_Q, HAS_POS_K, WINDOWED): without them the
kernels compile as they would without the code.
The dropout mask is the one every backend draws (csrc/include/philox.h, mtbert_fast/ops/dropout.py): Philox4x32-10
with key (seed mod 2^32, seed >> 32) and counter (j >> 2, i, h, offset mod 2^32), for packed query row i, packed key
row j and head h; probability (h, i, j) takes word j & 3 and is kept iff that word >= floor(dropout_p * 2^32).  The
kernels regenerate it per tile (one Philox per probability: four keys share a counter, but a tile's keys need not
start at a multiple of four); the DROPOUT=False kernels compile without it.

Launch: axis 0 is sequence x head, axis 1 the blocks of one sequence: max(1, cdiv(max_seqlen, BLOCK)) programs,
capped at CUDA's 65,535, each looping over the blocks start, start + programs, ...; so every row is computed whatever
max_seqlen says, and a program past the end of its (shorter) sequence does nothing.
head_dim need not be a power of two: the head-dim block is the next power of two (at least 16, the smallest tl.dot
operand), masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops import dropout
from mtbert_fast.ops.attention_varlen import (
    check_backward_inputs, check_inputs, check_position_args, grad_rel_bias_like, grad_table_like,
)
from mtbert_fast.ops.registry import MAX_HEAD_DIM
from mtbert_fast.ops.triton._jit import device_guard, jit, on_gpu

_LOG2E = 1.4426950408889634
_LOG2E_TL = tl.constexpr(_LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
_MAX_HEAD_DIM = MAX_HEAD_DIM
# CUDA's limit on a grid's second axis: the programs per sequence (and head); the kernels loop over the rest
_MAX_GRID_Y = 65535
# Philox4x32's round multipliers and key increments (Weyl sequence)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@jit
def _philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors (broadcast together): the four words for counter (c0, c1, c2, c3) under key
    (k0, k1)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@jit
def _dropout_keep(i, j, h, seed_lo, seed_hi, rng_offset, threshold):
    """Whether probability (h, i, j) is kept, for packed query rows i and key rows j (int64, broadcast together: the
    result has their shape) of head h; seed_lo, seed_hi, rng_offset, threshold: 32-bit words passed as int32."""
    j = j.to(tl.uint32)
    w0, w1, w2, w3 = _philox4x32_10(
        j >> 2, i.to(tl.uint32), h.to(tl.uint32), tl.cast(rng_offset, tl.uint32, bitcast=True),
        tl.cast(seed_lo, tl.uint32, bitcast=True), tl.cast(seed_hi, tl.uint32, bitcast=True),
    )
    lane = j & 3
    word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
    return word >= tl.cast(threshold, tl.uint32, bitcast=True)


@jit
def _band(start, BLOCK: tl.constexpr, seqlen, window, WINDOWED: tl.constexpr):
    """The positions [lo, hi) of the other side (keys of a query block, queries of a key block) that the block
    [start, start + BLOCK) meets: those within the window of one of its own (clamped to the sequence), or all."""
    lo = 0
    hi = seqlen
    if WINDOWED:
        lo = tl.maximum(start - window, 0)
        hi = tl.minimum(seqlen - window, start + BLOCK) + window  # min(seqlen, start + BLOCK + window), within int32
    return lo, hi


@jit
def _position_scores(s, i, j, h, RelBias, rel_r, window, HAS_BIAS: tl.constexpr, WINDOWED: tl.constexpr):
    """Scores s (log2 units) of query positions i and key positions j (broadcast to s's shape) with the bias of
    distance j - i added and -inf outside the window."""
    if HAS_BIAS:
        # the clamped index stays inside the table for every element, masked or not: the load needs no mask
        bucket = tl.minimum(tl.maximum(j - i, -rel_r), rel_r) + rel_r
        s += tl.load(RelBias + h * (2 * rel_r + 1) + bucket) * _LOG2E_TL
    if WINDOWED:
        s = tl.where(tl.abs(j - i) <= window, s, float("-inf"))
    return s


@jit
def _pos_column(rel, PosIndex, pos_r):
    """The tables' column of each distance rel = j - i: pos_index[clamp(rel, -P, P) + P] (the clamped index stays
    inside pos_index for every element, masked or not: the load needs no mask)."""
    return tl.load(PosIndex + tl.minimum(tl.maximum(rel, -pos_r), pos_r) + pos_r)


@jit
def _token_scores(s, col, rows_i, rows_j, live, h, T, PosQ, PosK, width, HAS_POS_Q: tl.constexpr,
                  HAS_POS_K: tl.constexpr):
    """Scores s (log2 units) with the per-token terms pos_q[h, row i, col] + pos_k[h, row j, col] added, for packed
    query rows rows_i and key rows rows_j and the column col of each pair (broadcast to s's shape); the loads are
    masked to the pairs inside the sequence (live): a row past the last sequence's end is past the tables'."""
    head = h.to(tl.int64) * T
    if HAS_POS_Q:
        s += tl.load(PosQ + (head + rows_i) * width + col, mask=live, other=0.0).to(tl.float32) * _LOG2E_TL
    if HAS_POS_K:
        s += tl.load(PosK + (head + rows_j) * width + col, mask=live, other=0.0).to(tl.float32) * _LOG2E_TL
    return s


@jit
def _add_pos_grad(GradRows, ds, rel, col, live, PosIndex, pos_r):
    """Adds a tile's dS (the gradient of a score is that of both its per-token terms) into the gradient of the table
    whose rows the program owns: GradRows [ROWS] points at each owned row of an fp32 [heads, T, W] buffer, and ds,
    rel = j - i, col (each pair's column), live (the pairs inside the sequence) are [ROWS, OTHER]; pair (r, o) adds
    into column col of row r.  The pairs clamped to an end distance (-P or P) share that end's column in a row: they
    go in as one sum per row and end, as a sequence much longer than P puts most pairs there and per-element atomics
    on one address would serialise.  The others go per element: distances that share a column (log buckets) still
    meet on one address within the tile, which the atomics sum correctly.  A pair with dS = 0 (outside the window,
    dropped, or its probability underflowed) adds nothing and issues no atomic."""
    upper = live & (rel >= pos_r)
    lower = live & (rel <= -pos_r) & (rel < pos_r)  # with P = 0 both ends are column pos_index[0]: count it once
    upper_sum = tl.sum(tl.where(upper, ds, 0.0), axis=1)
    lower_sum = tl.sum(tl.where(lower, ds, 0.0), axis=1)
    tl.atomic_add(GradRows + tl.load(PosIndex + 2 * pos_r), upper_sum, mask=upper_sum != 0.0, sem="relaxed")
    tl.atomic_add(GradRows + tl.load(PosIndex), lower_sum, mask=lower_sum != 0.0, sem="relaxed")
    inner = live & (rel > -pos_r) & (rel < pos_r) & (ds != 0.0)
    tl.atomic_add(GradRows[:, None] + col, ds, mask=inner, sem="relaxed")


@jit
def _fwd(
    QKV,  # [T, 3, heads, head_dim], head_dim contiguous
    Out,  # [T, heads, head_dim] out, contiguous
    Lse,  # fp32 [heads, T] out
    CuSeqlens,  # int32 [B+1]
    RelBias,  # fp32 [heads, 2R+1] (unread without HAS_BIAS)
    PosQ,  # [heads, T, W] in qkv's dtype, contiguous (unread without HAS_POS_Q)
    PosK,  # [heads, T, W] in qkv's dtype, contiguous (unread without HAS_POS_K)
    PosIndex,  # int32 [2P+1], values in [0, W) (unread without either table)
    qk_scale,  # scale * log2(e)
    seed_lo,  # the dropout mask's Philox key, offset and threshold, 32-bit words as int32 (see _dropout_args)
    seed_hi,
    rng_offset,
    drop_threshold,
    drop_scale,  # 1 / (1 - dropout_p)
    rel_r,  # R, the largest distance with a bucket of its own
    pos_r,  # P, the largest distance with an entry of its own in pos_index
    width,  # W, the tables' columns
    window,  # the largest |j - i| attended (unread without WINDOWED)
    stride_t,  # qkv's stride over tokens
    stride_3,  # over q / k / v
    stride_h,  # over heads
    T,
    heads,
    head_dim,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS_Q: tl.constexpr,
    HAS_POS_K: tl.constexpr,
    WINDOWED: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    seq_start = seq_start.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    Q = QKV + h * stride_h
    K = Q + stride_3
    V = K + stride_3
    for start_m in range(tl.program_id(1) * BLOCK_M, seqlen, tl.num_programs(1) * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        rows_m = seq_start + offs_m
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + rows_m[:, None] * stride_t + offs_d[None, :], mask=q_mask, other=0.0)

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        lo, hi = _band(start_m, BLOCK_M, seqlen, window, WINDOWED)
        for start_n in range(lo, hi, BLOCK_N):
            mask_n = start_n + offs_n < seqlen
            rows_n = seq_start + start_n + offs_n
            kv_offs = rows_n[:, None] * stride_t + offs_d[None, :]
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            if HAS_POS_Q or HAS_POS_K:
                col = _pos_column((start_n + offs_n)[None, :] - offs_m[:, None], PosIndex, pos_r)
                s = _token_scores(s, col, rows_m[:, None], rows_n[None, :], mask_m[:, None] & mask_n[None, :], h, T,
                                  PosQ, PosK, width, HAS_POS_Q, HAS_POS_K)
            s = _position_scores(s, offs_m[:, None], (start_n + offs_n)[None, :], h, RelBias, rel_r, window,
                                 HAS_BIAS, WINDOWED)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_ref = m_new
            if WINDOWED:
                # a row may have no key of this block in its window yet (m_new = -inf): its p and alpha must be 0,
                # not exp2(-inf - (-inf)) = NaN
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
            alpha = tl.exp2(m_i - m_ref)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if DROPOUT:
                keep = _dropout_keep(rows_m[:, None], rows_n[None, :], h, seed_lo, seed_hi, rng_offset, drop_threshold)
                p = tl.where(keep, p, 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

        if WINDOWED:
            # a row past the sequence's end may have no key within its window, so l_i = 0 (the row is not stored)
            l_i = tl.where(mask_m, l_i, 1.0)
        out = acc / l_i[:, None]
        if DROPOUT:
            out = out * drop_scale
        o_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
        tl.store(Out + o_offs, out.to(Out.dtype.element_ty), mask=q_mask)
        tl.store(Lse + h.to(tl.int64) * T + rows_m, (m_i + tl.log2(l_i)) * _LN2, mask=mask_m)


@jit
def _bwd_delta(
    Out,  # [T, heads, head_dim], contiguous: rows of [T * heads, head_dim]
    GradOut,  # [T, heads, head_dim], contiguous
    Delta,  # fp32 [heads, T] out: rowsum(dO * O)
    T,
    rows,  # T * heads
    heads,
    head_dim,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # row t * heads + h
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = r < rows
    mask = mask_m[:, None] & (offs_d < head_dim)[None, :]
    offs = r[:, None] * head_dim + offs_d[None, :]
    o = tl.load(Out + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(GradOut + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + (r % heads) * T + r // heads, tl.sum(o * do, axis=1), mask=mask_m)


@jit
def _add_bias_grad(GradRow, ds, rel, live, rel_r, window, WINDOWED: tl.constexpr):
    """Adds a tile's dS (the gradient of the biased score is that of its bias too) into its head's row of the bias
    table's gradient, GradRow fp32 [2R+1], by the distance rel = j - i of each element (ds's shape; live: the pairs
    inside the sequence).  The pairs clamped to an end bucket go in as one sum per end: a sequence much longer than
    R puts most pairs there, and one atomic per element on a single address would serialise; the others go per
    element, spread over the 2R - 1 inner buckets (one address per diagonal of the tile)."""
    if WINDOWED:
        live = live & (tl.abs(rel) <= window)
    upper = rel >= rel_r
    lower = (rel <= -rel_r) & (rel < rel_r)  # with R = 0 both ends are bucket 0: count it once
    tl.atomic_add(GradRow + 2 * rel_r, tl.sum(tl.where(live & upper, ds, 0.0)), sem="relaxed")
    tl.atomic_add(GradRow, tl.sum(tl.where(live & lower, ds, 0.0)), sem="relaxed")
    tl.atomic_add(GradRow + rel + rel_r, ds, mask=live & (rel > -rel_r) & (rel < rel_r), sem="relaxed")


@jit
def _bwd_dkdv(
    QKV,  # [T, 3, heads, head_dim], head_dim contiguous
    GradOut,  # [T, heads, head_dim], contiguous
    Lse,  # fp32 [heads, T]
    Delta,  # fp32 [heads, T]
    GradQKV,  # [T, 3, heads, head_dim] out (its k and v parts), strided as QKV
    CuSeqlens,  # int32 [B+1]
    RelBias,  # fp32 [heads, 2R+1] (unread without HAS_BIAS)
    PosQ,  # [heads, T, W] (unread without HAS_POS_Q)
    PosK,  # [heads, T, W] (unread without HAS_POS_K)
    PosIndex,  # int32 [2P+1] (unread without either table)
    GradRelBias,  # fp32 [heads, 2R+1], zeroed: accumulated into (untouched without HAS_BIAS)
    GradPosK,  # fp32 [heads, T, W], zeroed: each program adds into its own key rows (untouched without HAS_POS_K)
    qk_scale,  # scale * log2(e)
    scale,
    seed_lo,  # the dropout mask, as in _fwd
    seed_hi,
    rng_offset,
    drop_threshold,
    drop_scale,
    rel_r,  # as in _fwd
    pos_r,
    width,
    window,
    stride_t,
    stride_3,
    stride_h,
    T,
    heads,
    head_dim,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS_Q: tl.constexpr,
    HAS_POS_K: tl.constexpr,
    WINDOWED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program step
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    seq_start = seq_start.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    lse_row = Lse + h.to(tl.int64) * T + seq_start
    delta_row = Delta + h.to(tl.int64) * T + seq_start
    for start_n in range(tl.program_id(1) * BLOCK_N, seqlen, tl.num_programs(1) * BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seqlen
        rows_n = seq_start + offs_n
        kv_offs = rows_n[:, None] * stride_t + h * stride_h + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(QKV + stride_3 + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(QKV + 2 * stride_3 + kv_offs, mask=kv_mask, other=0.0)

        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        lo, hi = _band(start_n, BLOCK_N, seqlen, window, WINDOWED)
        for start_m in range(lo, hi, BLOCK_M):
            mask_m = start_m + offs_m < seqlen
            rows_m = seq_start + start_m + offs_m
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = tl.load(QKV + rows_m[:, None] * stride_t + h * stride_h + offs_d[None, :], mask=q_mask, other=0.0)
            do_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
            do = tl.load(GradOut + do_offs, mask=q_mask, other=0.0)
            lse = tl.load(lse_row + start_m + offs_m, mask=mask_m, other=0.0)
            delta = tl.load(delta_row + start_m + offs_m, mask=mask_m, other=0.0)
            s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M], log2 units
            live_t = mask_n[:, None] & mask_m[None, :]
            if HAS_POS_Q or HAS_POS_K:
                rel_t = offs_n[:, None] - (start_m + offs_m)[None, :]  # j - i
                col_t = _pos_column(rel_t, PosIndex, pos_r)
                s_t = _token_scores(s_t, col_t, rows_m[None, :], rows_n[:, None], live_t, h, T, PosQ, PosK, width,
                                    HAS_POS_Q, HAS_POS_K)
            s_t = _position_scores(s_t, (start_m + offs_m)[None, :], offs_n[:, None], h, RelBias, rel_r, window,
                                   HAS_BIAS, WINDOWED)
            p_t = tl.exp2(s_t - lse[None, :] * _LOG2E_TL)
            p_t = tl.where(live_t, p_t, 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if DROPOUT:
                keep_t = _dropout_keep(rows_m[None, :], rows_n[:, None], h, seed_lo, seed_hi, rng_offset,
                                       drop_threshold)
                dv += tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, input_precision=PRECISION)
                dp_t = tl.where(keep_t, dp_t * drop_scale, 0.0)
            else:
                dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
            if HAS_BIAS:
                _add_bias_grad(GradRelBias + h * (2 * rel_r + 1), ds_t, offs_n[:, None] - (start_m + offs_m)[None, :],
                               live_t, rel_r, window, WINDOWED)
            if HAS_POS_K:
                _add_pos_grad(GradPosK + (h.to(tl.int64) * T + rows_n) * width, ds_t, rel_t, col_t, live_t, PosIndex,
                              pos_r)

        if DROPOUT:
            dv = dv * drop_scale
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
    RelBias,  # fp32 [heads, 2R+1] (unread without HAS_BIAS)
    PosQ,  # [heads, T, W] (unread without HAS_POS_Q)
    PosK,  # [heads, T, W] (unread without HAS_POS_K)
    PosIndex,  # int32 [2P+1] (unread without either table)
    GradPosQ,  # fp32 [heads, T, W], zeroed: each program adds into its own query rows (untouched without HAS_POS_Q)
    qk_scale,  # scale * log2(e)
    scale,
    seed_lo,  # the dropout mask, as in _fwd
    seed_hi,
    rng_offset,
    drop_threshold,
    drop_scale,
    rel_r,  # as in _fwd
    pos_r,
    width,
    window,
    stride_t,
    stride_3,
    stride_h,
    T,
    heads,
    head_dim,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_POS_Q: tl.constexpr,
    HAS_POS_K: tl.constexpr,
    WINDOWED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program step
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    b = pid_bh // heads
    h = pid_bh % heads
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    seq_start = seq_start.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < head_dim
    for start_m in range(tl.program_id(1) * BLOCK_M, seqlen, tl.num_programs(1) * BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seqlen
        rows_m = seq_start + offs_m
        q_offs = rows_m[:, None] * stride_t + h * stride_h + offs_d[None, :]
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(QKV + q_offs, mask=q_mask, other=0.0)
        do_offs = rows_m[:, None] * (heads * head_dim) + h * head_dim + offs_d[None, :]
        do = tl.load(GradOut + do_offs, mask=q_mask, other=0.0)
        lse = tl.load(Lse + h.to(tl.int64) * T + rows_m, mask=mask_m, other=0.0) * _LOG2E_TL
        delta = tl.load(Delta + h.to(tl.int64) * T + rows_m, mask=mask_m, other=0.0)

        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        lo, hi = _band(start_m, BLOCK_M, seqlen, window, WINDOWED)
        for start_n in range(lo, hi, BLOCK_N):
            mask_n = start_n + offs_n < seqlen
            rows_n = seq_start + start_n + offs_n
            kv_offs = rows_n[:, None] * stride_t + h * stride_h + offs_d[None, :]
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(QKV + stride_3 + kv_offs, mask=kv_mask, other=0.0)
            v = tl.load(QKV + 2 * stride_3 + kv_offs, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
            live = mask_m[:, None] & mask_n[None, :]
            if HAS_POS_Q or HAS_POS_K:
                rel = (start_n + offs_n)[None, :] - offs_m[:, None]  # j - i
                col = _pos_column(rel, PosIndex, pos_r)
                s = _token_scores(s, col, rows_m[:, None], rows_n[None, :], live, h, T, PosQ, PosK, width, HAS_POS_Q,
                                  HAS_POS_K)
            s = _position_scores(s, offs_m[:, None], (start_n + offs_n)[None, :], h, RelBias, rel_r, window,
                                 HAS_BIAS, WINDOWED)
            p = tl.where(live, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep(rows_m[:, None], rows_n[None, :], h, seed_lo, seed_hi, rng_offset, drop_threshold)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if HAS_POS_Q:
                _add_pos_grad(GradPosQ + (h.to(tl.int64) * T + rows_m) * width, ds, rel, col, live, PosIndex, pos_r)

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


def _programs(max_seqlen: int, block: int) -> int:
    """The grid's axis 1: a program per block of the longest sequence, at least one, at most _MAX_GRID_Y (the
    kernels loop over the blocks a program does not cover)."""
    return min(max(1, triton.cdiv(max_seqlen, block)), _MAX_GRID_Y)


def _as_int32(word: int) -> int:
    """A 32-bit word as the int32 of the same bits: Triton passes it as i32, and the kernel bitcasts it back."""
    return word - (1 << 32) if word >= 1 << 31 else word


def _dropout_args(dropout_p: float, rng_state: torch.Tensor | None) -> tuple[int, int, int, int, float]:
    """(seed_lo, seed_hi, rng_offset, threshold, 1 / (1 - dropout_p)): the kernels' dropout arguments, read on the
    host from the CPU rng_state (no device synchronisation); zeros (unused) without dropout."""
    if dropout_p == 0.0:
        return 0, 0, 0, 0, 1.0
    seed, offset = rng_state.tolist()
    seed &= 2**64 - 1
    words = (seed & 0xFFFFFFFF, seed >> 32, offset & 0xFFFFFFFF, dropout.threshold(dropout_p))
    return (*(_as_int32(w) for w in words), 1.0 / (1.0 - dropout_p))


def _position_args(rel_bias: torch.Tensor | None, window: int, t: int, pos_q: torch.Tensor | None,
                   pos_k: torch.Tensor | None, pos_index: torch.Tensor | None, unread: torch.Tensor) -> tuple:
    """(RelBias, PosQ, PosK, PosIndex), (rel_r, pos_r, width, window) and the constexpr flags: the kernels' position
    arguments; `unread` (any fp32 tensor) stands for a missing table.  A window of T - 1 or more masks nothing in
    any sequence: it runs as none."""
    windowed = 0 <= window < t - 1
    rel_r = 0 if rel_bias is None else (rel_bias.shape[1] - 1) // 2
    pos_r = 0 if pos_index is None else (pos_index.shape[0] - 1) // 2
    width = next((x.shape[2] for x in (pos_q, pos_k) if x is not None), 0)
    tables = tuple(unread if x is None else x for x in (rel_bias, pos_q, pos_k, pos_index))
    flags = dict(HAS_BIAS=rel_bias is not None, HAS_POS_Q=pos_q is not None, HAS_POS_K=pos_k is not None,
                 WINDOWED=windowed)
    return tables, (rel_r, pos_r, width, window if windowed else -1), flags


def _table_grad_buffer(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Where the kernels add a per-token table's gradient: fp32 [heads, T, W], zeroed (a column no pair lands in
    stays 0); the gradient itself for an fp32 table, else converted to the table's dtype once the kernels are done.
    [0] in qkv's dtype without the table."""
    if table is None:
        return grad_table_like(qkv, None)
    return torch.zeros(table.shape, dtype=torch.float32, device=table.device)


def forward(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, scale: float, dropout_p: float,
    rng_state: torch.Tensor | None, rel_bias: torch.Tensor | None = None, window: int = -1,
    pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None, pos_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out [T, heads, head_dim], lse fp32 [heads, T]."""
    check_inputs("attention_varlen", qkv, cu_seqlens, max_seqlen)
    check_position_args("attention_varlen", qkv, rel_bias, window, pos_q, pos_k, pos_index)
    dropout.check_rng_state("attention_varlen", dropout_p, rng_state)
    qkv, cu_seqlens = qkv.contiguous(), cu_seqlens.contiguous()
    pos_index = None if pos_index is None else pos_index.contiguous()
    t, _, heads, head_dim = qkv.shape
    out = qkv.new_empty((t, heads, head_dim))
    lse = qkv.new_empty((heads, t), dtype=torch.float32)
    batch = cu_seqlens.numel() - 1
    if t and batch > 0:
        cfg = _settings(qkv)
        grid = (batch * heads, _programs(max_seqlen, cfg["fwd_m"]))
        tables, sizes, flags = _position_args(rel_bias, window, t, pos_q, pos_k, pos_index, lse)
        with device_guard(qkv):
            _fwd[grid](
                qkv, out, lse, cu_seqlens, *tables, scale * _LOG2E, *_dropout_args(dropout_p, rng_state), *sizes,
                qkv.stride(0), qkv.stride(1), qkv.stride(2), t, heads, head_dim, DROPOUT=dropout_p > 0.0, **flags,
                PRECISION=cfg["PRECISION"], BLOCK_M=cfg["fwd_m"], BLOCK_N=cfg["fwd_n"], BLOCK_D=cfg["BLOCK_D"],
                num_warps=cfg["warps"], num_stages=cfg["stages"],
            )
    return out, lse


def backward(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, scale: float, dropout_p: float, rng_state: torch.Tensor | None,
    rel_bias: torch.Tensor | None = None, window: int = -1, pos_q: torch.Tensor | None = None,
    pos_k: torch.Tensor | None = None, pos_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> grad_qkv [T, 3, heads, head_dim], grad_rel_bias fp32 [heads, 2R+1], grad_pos_q, grad_pos_k [heads, T, W]
    (each [0] without its input)."""
    check_backward_inputs(grad_out, qkv, out, lse, cu_seqlens, max_seqlen, dropout_p, rng_state, rel_bias, window,
                          pos_q, pos_k, pos_index)
    qkv, out, grad_out, lse = qkv.contiguous(), out.contiguous(), grad_out.contiguous(), lse.contiguous()
    cu_seqlens = cu_seqlens.contiguous()
    pos_index = None if pos_index is None else pos_index.contiguous()
    t, _, heads, head_dim = qkv.shape
    grad_qkv = qkv.new_empty(qkv.shape)
    batch = cu_seqlens.numel() - 1
    # zeroed: the dK, dV kernel adds into it, and a bucket no pair lands in stays 0
    grad_rel_bias = grad_rel_bias_like(qkv, rel_bias).zero_()
    # the tables' gradients, added with atomics (the dQ kernel pos_q's, the dK, dV kernel pos_k's) into fp32: a
    # program's rows are its own, but a row's W columns (512 for DeBERTa-v3) times a block of rows do not fit in
    # registers, and the pairs of a tile scatter over them
    grad_pos_q, grad_pos_k = _table_grad_buffer(qkv, pos_q), _table_grad_buffer(qkv, pos_k)
    if not (t and batch > 0):
        return grad_qkv.zero_(), grad_rel_bias, *_table_grads(grad_pos_q, grad_pos_k, pos_q, pos_k)
    cfg = _settings(qkv)
    delta = lse.new_empty((heads, t))
    tables, sizes, flags = _position_args(rel_bias, window, t, pos_q, pos_k, pos_index, lse)
    common = dict(DROPOUT=dropout_p > 0.0, **flags, PRECISION=cfg["PRECISION"], BLOCK_D=cfg["BLOCK_D"],
                  num_warps=cfg["warps"], num_stages=cfg["stages"])
    head = (qkv, grad_out, lse, delta, grad_qkv, cu_seqlens, *tables)
    tail = (scale * _LOG2E, scale, *_dropout_args(dropout_p, rng_state), *sizes, qkv.stride(0), qkv.stride(1),
            qkv.stride(2), t, heads, head_dim)
    with device_guard(qkv):
        _bwd_delta[(triton.cdiv(t * heads, cfg["fwd_m"]),)](
            out, grad_out, delta, t, t * heads, heads, head_dim, BLOCK_M=cfg["fwd_m"], BLOCK_D=cfg["BLOCK_D"],
            num_warps=cfg["warps"],
        )
        _bwd_dkdv[(batch * heads, _programs(max_seqlen, cfg["dkdv_n"]))](
            *head, grad_rel_bias, grad_pos_k, *tail, BLOCK_M=cfg["dkdv_m"], BLOCK_N=cfg["dkdv_n"], **common
        )
        _bwd_dq[(batch * heads, _programs(max_seqlen, cfg["dq_m"]))](
            *head, grad_pos_q, *tail, BLOCK_M=cfg["dq_m"], BLOCK_N=cfg["dq_n"], **common
        )
    return grad_qkv, grad_rel_bias, *_table_grads(grad_pos_q, grad_pos_k, pos_q, pos_k)


def _table_grads(grad_pos_q: torch.Tensor, grad_pos_k: torch.Tensor, pos_q: torch.Tensor | None,
                 pos_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables' gradients from their fp32 buffers (_table_grad_buffer), in each table's dtype."""
    return tuple(g if x is None else g.to(x.dtype) for g, x in ((grad_pos_q, pos_q), (grad_pos_k, pos_k)))

