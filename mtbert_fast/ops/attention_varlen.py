"""attention_varlen: bidirectional softmax attention over packed (unpadded) sequences, with fused dropout and optional
position terms: a relative position bias per distance, per-token position terms (disentangled attention) and a local
window."""

from __future__ import annotations

import math
import os

import torch

from mtbert_fast.ops import dispatch, dropout, reference
from mtbert_fast.ops.registry import CPU_DTYPES, CUDA_MAX_HEADS, INT32_ROWS, MAX_HEAD_DIM, Backend, Limit, Op

DEBUG_CHECKS_ENV = "MTBERT_FAST_DEBUG_CHECKS"


def attention_varlen(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    *,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    window: int = -1,
    pos_q: torch.Tensor | None = None,
    pos_k: torch.Tensor | None = None,
    pos_index: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(scale * Q K^T + bias) V per sequence, with the softmax in fp32 and no padding anywhere.

    qkv [T, 3, heads, head_dim]: the packed output of the fused QKV projection, viewed per head.
    cu_seqlens int32 [B+1]: sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]; cu_seqlens[0] == 0, [-1] == T.
    max_seqlen: the longest sequence; it sizes the kernel launch only (a longer sequence is still computed in full).
    scale: default 1/sqrt(head_dim).
    dropout_p: dropout on the attention probabilities (training), fused into the kernels; the mask is a Philox
        function of rng_state (see mtbert_fast.ops.dropout), regenerated in the backward.
    rng_state: int64 [2] on the CPU (seed, offset); default a fresh one from torch's CPU generator, so that
        torch.manual_seed reproduces the masks.
    rel_bias fp32 [heads, 2R+1], contiguous, on qkv's device: a relative position bias added to the scaled scores,
        bias_ij = rel_bias[h, clamp(j - i, -R, R) + R] with i, j the query's and the key's positions in their
        sequence (MPNet's and T5's bucketed biases are such a table: every distance beyond R shares the last bucket).
        It has a gradient (fp32, as rel_bias).
    window: where >= 0, query i attends only to the keys with |j - i| <= window (ModernBERT's local attention with
        local_attention = 2 * window); -1 attends to the whole sequence.
    pos_q, pos_k [heads, T, W] in qkv's dtype, contiguous, and pos_index int32 [2P+1] in [0, W): per-token position
        terms, DeBERTa's disentangled attention: the score of query i and key j gains pos_q[h, i, c] + pos_k[h, j, c]
        with c = pos_index[clamp(j - i, -P, P) + P] (DeBERTa: pos_q = Q_i . K_pos, the content-to-position term,
        pos_k = K_j . Q_pos, position-to-content, both already scaled, as a batched product per head writes them;
        pos_index the bucket column of each distance). Either table may be None; pos_index comes with them. Both
        have gradients.
    -> [T, heads, head_dim] in qkv's dtype. In fp16 and bf16 the product with V takes the unnormalized probabilities
    rounded to that dtype (the row sums stay fp32), as PyTorch's own CPU attention and FlashAttention do.

    Shapes, dtypes and devices are checked on every backend without a device synchronisation; the values of
    cu_seqlens (0 first, non-decreasing, T last) are checked where that is free (CPU tensors) and on the GPU only
    with MTBERT_FAST_DEBUG_CHECKS=1 (each check then reads cu_seqlens back to the host).
    """
    op = "attention_varlen"
    check_inputs(op, qkv, cu_seqlens, max_seqlen)
    check_position_args(op, qkv, rel_bias, window, pos_q, pos_k, pos_index)
    if dropout_p > 0.0 and rng_state is None:
        rng_state = dropout.new_rng_state()
    dropout.check_rng_state(op, dropout_p, rng_state)
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    if dropout_p == 0.0:
        rng_state = None
    return OP(qkv, cu_seqlens, max_seqlen, scale, dropout_p, rng_state, rel_bias, window, pos_q, pos_k, pos_index,
              backend=backend)


def check_position_args(op: str, qkv: torch.Tensor, rel_bias: torch.Tensor | None, window: int,
                        pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None,
                        pos_index: torch.Tensor | None = None) -> None:
    """Every position term: rel_bias fp32 [heads, 2R+1] or None; window >= -1; pos_q / pos_k [heads, T, W] in qkv's
    dtype with pos_index int32 [2P+1], whose values (read where free: on the CPU, or with MTBERT_FAST_DEBUG_CHECKS=1)
    are columns of them. Each tensor contiguous on qkv's device."""
    if rel_bias is not None:
        heads = qkv.shape[2]
        if rel_bias.dim() != 2 or rel_bias.shape[0] != heads or rel_bias.shape[1] % 2 != 1:
            raise ValueError(f"{op}: rel_bias must be [heads, 2R+1] = [{heads}, odd], got shape "
                             f"{tuple(rel_bias.shape)}")
        if rel_bias.dtype != torch.float32:
            raise TypeError(f"{op}: rel_bias must be float32, got {rel_bias.dtype}")
        _check_beside_qkv(op, "rel_bias", rel_bias, qkv)
    if window < -1:
        raise ValueError(f"{op}: window must be >= 0 (local attention) or -1 (none), got {window}")
    _check_token_tables(op, qkv, pos_q, pos_k, pos_index)


def _check_beside_qkv(op: str, name: str, t: torch.Tensor, qkv: torch.Tensor) -> None:
    if t.device != qkv.device:
        raise ValueError(f"{op}: {name} is on {t.device} but qkv is on {qkv.device}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()}")


def _check_token_tables(op: str, qkv: torch.Tensor, pos_q: torch.Tensor | None, pos_k: torch.Tensor | None,
                        pos_index: torch.Tensor | None) -> None:
    tables = {name: t for name, t in (("pos_q", pos_q), ("pos_k", pos_k)) if t is not None}
    if not tables:
        if pos_index is not None:
            raise ValueError(f"{op}: pos_index given without pos_q or pos_k")
        return
    if pos_index is None:
        raise ValueError(f"{op}: {next(iter(tables))} needs pos_index (the column of each distance)")
    t, _, heads, _ = qkv.shape
    width = next(iter(tables.values())).shape[-1]
    for name, table in tables.items():
        if table.dim() != 3 or tuple(table.shape[:2]) != (heads, t) or table.shape[2] != width or width < 1:
            raise ValueError(f"{op}: {name} must be [heads, T, W] = [{heads}, {t}, W], W >= 1 and the same for "
                             f"pos_q and pos_k, got shape {tuple(table.shape)}")
        if table.dtype != qkv.dtype:
            raise TypeError(f"{op}: {name} has dtype {table.dtype} but qkv has {qkv.dtype}")
        _check_beside_qkv(op, name, table, qkv)
    if pos_index.dim() != 1 or pos_index.dtype != torch.int32 or pos_index.shape[0] % 2 != 1:
        raise ValueError(f"{op}: pos_index must be a 1-D int32 tensor of odd length 2P+1, got {pos_index.dtype} of "
                         f"shape {tuple(pos_index.shape)}")
    if pos_index.device != qkv.device:
        raise ValueError(f"{op}: pos_index is on {pos_index.device} but qkv is on {qkv.device}")
    if torch.compiler.is_compiling() or not pos_index.numel():
        return
    if pos_index.device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1":
        lo, hi = (int(v) for v in torch.aminmax(pos_index))
        if lo < 0 or hi >= width:
            raise ValueError(f"{op}: pos_index holds {lo if lo < 0 else hi}, outside the tables' columns [0, {width})")


def check_inputs(op: str, qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> None:
    """Every check that needs no device synchronisation, and the value checks of cu_seqlens where they are free."""
    if qkv.dim() != 4 or qkv.shape[1] != 3 or qkv.shape[2] < 1 or qkv.shape[3] < 1:
        raise ValueError(f"{op}: qkv must be [T, 3, heads, head_dim] with heads and head_dim >= 1, got shape "
                         f"{tuple(qkv.shape)}")
    if not qkv.dtype.is_floating_point:
        raise TypeError(f"{op}: qkv must be a floating-point tensor, got {qkv.dtype}")
    check_sequences(op, cu_seqlens, max_seqlen, qkv, "qkv")


def check_sequences(op: str, cu_seqlens: torch.Tensor, max_seqlen: int, rows: torch.Tensor, name: str) -> None:
    """cu_seqlens and max_seqlen for `rows`, a tensor of T rows named `name`: the checks that need no device
    synchronisation, and the value checks of cu_seqlens where they are free."""
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"{op}: cu_seqlens must be a 1-D int32 tensor, got {cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != rows.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu_seqlens.device} but {name} is on {rows.device}")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must hold B + 1 >= 1 offsets, got an empty tensor")
    if cu_seqlens.numel() == 1 and rows.shape[0] > 0:
        raise ValueError(f"{op}: cu_seqlens = [0] describes no sequence, but {name} has {rows.shape[0]} rows")
    if max_seqlen < 0:
        raise ValueError(f"{op}: max_seqlen must be >= 0, got {max_seqlen}")
    if torch.compiler.is_compiling():
        return
    if cu_seqlens.device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1":
        check_cu_seqlens_values(op, cu_seqlens, rows.shape[0], name)


def check_backward_inputs(
    grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
    max_seqlen: int, dropout_p: float, rng_state: torch.Tensor | None, rel_bias: torch.Tensor | None = None,
    window: int = -1, pos_q: torch.Tensor | None = None, pos_k: torch.Tensor | None = None,
    pos_index: torch.Tensor | None = None,
) -> None:
    """The backward's inputs: those of the forward, and grad_out, out [T, heads, head_dim] in qkv's dtype and lse
    fp32 [heads, T] on qkv's device (the C++ kernels check the same in C++)."""
    op = "attention_varlen_backward"
    check_inputs(op, qkv, cu_seqlens, max_seqlen)
    check_position_args(op, qkv, rel_bias, window, pos_q, pos_k, pos_index)
    dropout.check_rng_state(op, dropout_p, rng_state)
    t, _, heads, head_dim = qkv.shape
    for name, x, shape, dtype in (
        ("grad_out", grad_out, (t, heads, head_dim), qkv.dtype),
        ("out", out, (t, heads, head_dim), qkv.dtype),
        ("lse", lse, (heads, t), torch.float32),
    ):
        if tuple(x.shape) != shape or x.dtype != dtype or x.device != qkv.device:
            raise ValueError(f"{op}: {name} must be {dtype} of shape {list(shape)} on {qkv.device}, got {x.dtype} "
                             f"of shape {list(x.shape)} on {x.device}")


def check_cu_seqlens_values(op: str, cu_seqlens: torch.Tensor, tokens: int, name: str = "qkv") -> None:
    """cu_seqlens[0] == 0, non-decreasing, cu_seqlens[-1] == tokens, the rows of `name` (reads cu_seqlens on the
    host)."""
    c = cu_seqlens.tolist()
    if c[0] != 0:
        raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {c[0]}")
    if c[-1] != tokens:
        raise ValueError(f"{op}: cu_seqlens[-1] must equal the {tokens} rows of {name}, got {c[-1]}")
    for b, (lo, hi) in enumerate(zip(c[:-1], c[1:])):
        if hi < lo:
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got cu_seqlens[{b}] = {lo} > "
                             f"cu_seqlens[{b + 1}] = {hi}")


def _fake(qkv, cu_seqlens, max_seqlen, scale, dropout_p=0.0, rng_state=None, rel_bias=None, window=-1, pos_q=None,
          pos_k=None, pos_index=None):
    t, _, heads, head_dim = qkv.shape
    return qkv.new_empty((t, heads, head_dim)), qkv.new_empty((heads, t), dtype=torch.float32)


def _fake_backward(grad_out, qkv, out, lse, cu_seqlens, max_seqlen, scale, dropout_p=0.0, rng_state=None,
                   rel_bias=None, window=-1, pos_q=None, pos_k=None, pos_index=None):
    return (qkv.new_empty(qkv.shape), grad_rel_bias_like(qkv, rel_bias), grad_table_like(qkv, pos_q),
            grad_table_like(qkv, pos_k))


def grad_table_like(qkv: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """The backward's gradient of pos_q or pos_k, uninitialised: as the table, or [0] in qkv's dtype without one."""
    return qkv.new_empty((0,)) if table is None else torch.empty_like(table, memory_format=torch.contiguous_format)


def grad_rel_bias_like(qkv: torch.Tensor, rel_bias: torch.Tensor | None) -> torch.Tensor:
    """The backward's second output, uninitialised: fp32 as rel_bias, or [0] without one."""
    shape = (0,) if rel_bias is None else tuple(rel_bias.shape)
    return qkv.new_empty(shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, scale, dropout_p, rng_state, rel_bias, window, pos_q, pos_k, pos_index = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens, rng_state, rel_bias, pos_q, pos_k, pos_index)
    ctx.mark_non_differentiable(lse)
    ctx.max_seqlen, ctx.scale, ctx.dropout_p, ctx.window = max_seqlen, scale, dropout_p, window


def _backward(ctx, grad, _grad_lse):
    qkv, out, lse, cu_seqlens, rng_state, rel_bias, pos_q, pos_k, pos_index = ctx.saved_tensors
    # the backward runs where it is fastest for this input, which need not be where the forward ran: every backend
    # keeps lse in the same layout and draws the same dropout mask from rng_state
    backend = dispatch.backward_backend(OP.name, ctx.backend, qkv)
    grad_qkv, grad_rel_bias, grad_pos_q, grad_pos_k = OP.backward_kernel(backend)(
        grad.contiguous(), qkv, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale, ctx.dropout_p, rng_state, rel_bias,
        ctx.window, pos_q, pos_k, pos_index,
    )
    return (grad_qkv, None, None, None, None, None, grad_rel_bias if rel_bias is not None else None, None,
            grad_pos_q if pos_q is not None else None, grad_pos_k if pos_k is not None else None, None)


def _head_dim(qkv: torch.Tensor) -> str | None:
    d = qkv.shape[-1]
    return None if d <= MAX_HEAD_DIM else f"head_dim {d} > {MAX_HEAD_DIM}"


def _heads(qkv: torch.Tensor) -> str | None:
    h = qkv.shape[2]
    return None if h <= CUDA_MAX_HEADS else f"{h} heads > {CUDA_MAX_HEADS} (the grid's y limit)"


def _tokens(qkv: torch.Tensor) -> str | None:
    n = qkv.shape[0]
    return None if n < INT32_ROWS else f"{n} rows: cu_seqlens (int32) indexes at most {INT32_ROWS - 1}"


_HEAD_DIM = Limit(f"head_dim <= {MAX_HEAD_DIM}", _head_dim)
_TOKENS = Limit(f"T <= {INT32_ROWS - 1} rows (int32 cu_seqlens)", _tokens)

OP = Op(
    name="attention_varlen",
    # qkv [T, 3, heads, head_dim], cu_seqlens int32 [B+1], rel_bias fp32 [heads, 2R+1], pos_q / pos_k [heads, T, W],
    # pos_index int32 [2P+1] -> out [T, heads, head_dim], lse fp32 [heads, T] (the log-sum-exp of the full scores)
    schema="(Tensor qkv, Tensor cu_seqlens, SymInt max_seqlen, float scale, float dropout_p=0., Tensor? rng_state=None, "
           "Tensor? rel_bias=None, int window=-1, Tensor? pos_q=None, Tensor? pos_k=None, Tensor? pos_index=None) "
           "-> (Tensor, Tensor)",
    # -> grad_qkv [T, 3, heads, head_dim], grad_rel_bias fp32 [heads, 2R+1], grad_pos_q, grad_pos_k [heads, T, W]
    # (each [0] without its input)
    backward_schema="(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, "
                    "float scale, float dropout_p=0., Tensor? rng_state=None, Tensor? rel_bias=None, int window=-1, "
                    "Tensor? pos_q=None, Tensor? pos_k=None, Tensor? pos_index=None) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=reference.attention_varlen,
    backends={
        "cuda": Backend(limits=(_HEAD_DIM, Limit(f"heads <= {CUDA_MAX_HEADS}", _heads), _TOKENS)),
        "triton": Backend("forward", "backward", limits=(_HEAD_DIM, _TOKENS)),
        "cpu": Backend(dtypes=CPU_DTYPES, limits=(_TOKENS,)),
    },
    fake=_fake,
    backward_fake=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
)
