"""attention_varlen's per-token position terms (DeBERTa's disentangled attention) on every backend that runs here,
forward and backward, against the reference: the score of query i and key j gains pos_q[h, i, c] + pos_k[h, j, c]
with c = pos_index[clamp(j - i, -P, P) + P]; either table alone or both, with a relative position bias, a window and
dropout besides.

Tolerances as in test_attention_varlen.py: fp32 within 1e-5 of the fp32 reference; bf16 / fp16 within twice
PyTorch's own error (SDPA with the terms as a float mask for the CPU kernels, the eager form for Triton) plus a small
floor. The tables' gradients sum dS over a row's keys (pos_q) or a column's queries (pos_k): fp32 to 1e-5 scaled by
the row length, bf16 within twice PyTorch's own error in the same gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import dropout, reference, registry
from op_testing import assert_close, cu_seqlens, rand, rng_state, table_grad_floor

OP_NAME = "attention_varlen"
RAGGED = [5, 1, 0, 17, 33, 70]


def _lens(backend, lens=RAGGED):
    """lens, or under Triton's interpreter (slow) a shorter ragged batch that still spans three blocks of 16."""
    return [5, 1, 0, 40] if backend.interpreted else lens


def _index(p, width, seed, device):
    """pos_index int32 [2P+1]: DeBERTa-like (the column grows with the distance, clamped at the table's ends) with a
    seeded shuffle of some entries, so that no kernel can assume the columns are monotone."""
    base = torch.arange(-p, p + 1).clamp(-(width // 2), width - width // 2 - 1) + width // 2
    g = torch.Generator().manual_seed(seed)
    swap = torch.randperm(2 * p + 1, generator=g)[: p // 2]
    base[swap] = torch.randint(0, width, (swap.numel(),), generator=g)
    return base.to(device=device, dtype=torch.int32)


def _terms(length, start, heads, rel_bias, window, pos_q, pos_k, pos_index, device):
    """[heads, L, L] fp32: every position term of one sequence (the bias, both tables, -inf outside the window)."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # j - i
    out = torch.zeros(heads, length, length, device=device)
    if rel_bias is not None:
        r = (rel_bias.shape[1] - 1) // 2
        out = out + rel_bias.float()[:, rel.clamp(-r, r) + r]
    if pos_index is not None:
        p = (pos_index.shape[0] - 1) // 2
        column = pos_index.long()[rel.clamp(-p, p) + p]
        rows = slice(start, start + length)
        if pos_q is not None:
            out = out + torch.gather(pos_q[:, rows].float(), 2, column.expand(heads, -1, -1))
        if pos_k is not None:
            t = pos_k[:, rows].float()
            out = out + torch.gather(t, 2, column.t().expand(heads, -1, -1)).transpose(1, 2)
    if window >= 0:
        out = out.masked_fill(rel.abs() > window, float("-inf"))
    return out


def _native(qkv, cu, scale, args, fused, dropout_p=0.0, rng=None):
    """PyTorch's own attention in qkv's dtype with the position terms as an additive mask in that dtype."""
    masks = dropout.attention_dropout_masks(rng, dropout_p, qkv.shape[2], cu.cpu()) if dropout_p > 0 else None
    outs = [qkv.new_zeros((0,) + qkv.shape[2:])]
    bounds = cu.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim]
        mask = _terms(end - start, start, qkv.shape[2], *args, qkv.device).to(qkv.dtype)
        if masks is None and fused:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).permute(1, 0, 2))
            continue
        probs = torch.softmax(q @ k.transpose(1, 2) * scale + mask, -1)
        if masks is not None:
            probs = probs * masks[b].to(probs) / (1 - dropout_p)
        outs.append((probs @ v).permute(1, 0, 2))
    return torch.cat(outs)


def _check(backend, lens, heads, head_dim, dtype, which="qk", p=6, width=9, rel_r=None, window=-1, dropout_p=0.0,
           seed=0):
    """The forward kernel's out and lse and the backward kernel's four gradients against the reference."""
    dev = backend.device
    cu = cu_seqlens(lens, dev)
    total, max_seqlen = int(cu[-1]), max(lens, default=0)
    scale = 1.0 / math.sqrt(3 * head_dim)
    qkv = rand(total, 3, heads, head_dim, seed=seed, dtype=dtype, device=dev)
    grad_out = rand(total, heads, head_dim, seed=seed + 1, dtype=dtype, device=dev)
    pos_q = rand(heads, total, width, seed=seed + 2, dtype=dtype, device=dev) if "q" in which else None
    pos_k = rand(heads, total, width, seed=seed + 3, dtype=dtype, device=dev) if "k" in which else None
    pos_index = _index(p, width, seed + 4, dev)
    rel_bias = None if rel_r is None else rand(heads, 2 * rel_r + 1, seed=seed + 5, device=dev)
    rng = rng_state(seed + 6) if dropout_p > 0 else None
    args = (rel_bias, window, pos_q, pos_k, pos_index)

    out, lse = backend.forward(qkv, cu, max_seqlen, scale, dropout_p, rng, *args)
    grads = backend.backward(grad_out, qkv, out, lse, cu, max_seqlen, scale, dropout_p, rng, *args)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype

    leaves = [t.detach().float().clone().requires_grad_() if t is not None else None
              for t in (qkv, rel_bias, pos_q, pos_k)]
    exact = reference.attention_varlen(leaves[0], cu, 0, scale, dropout_p, rng, leaves[1], window, leaves[2],
                                       leaves[3], pos_index)
    wrt = [t for t in leaves if t is not None]
    exact_grads = iter(torch.autograd.grad(exact, wrt, grad_out.float()))
    exact_grads = [next(exact_grads) if t is not None else None for t in leaves]
    bounds = cu.tolist()
    lse_ref = [qkv.new_zeros((heads, 0), dtype=torch.float32)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[start:end].float().unbind(1)
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale + _terms(end - start, start, heads, *args, dev)
        lse_ref.append(torch.logsumexp(scores, -1))
    torch.testing.assert_close(lse, torch.cat(lse_ref, 1), atol=1e-5, rtol=1e-5)

    fused = backend.name == "cpu"
    native_leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (qkv, rel_bias, pos_q,
                                                                                            pos_k)]
    native = _native(native_leaves[0], cu, scale, (native_leaves[1], window, native_leaves[2], native_leaves[3],
                                                     pos_index), fused, dropout_p, rng)
    native_grads = iter(torch.autograd.grad(native, [t for t in native_leaves if t is not None], grad_out))
    native_grads = [next(native_grads) if t is not None else None for t in native_leaves]
    assert_close(out, exact.detach(), native if dtype != torch.float32 else out, dtype, "out", floor=1e-5)
    names = ("qkv", "rel_bias", "pos_q", "pos_k")
    for name, got, want, base, given in zip(names, grads, exact_grads, native_grads, (qkv, rel_bias, pos_q, pos_k)):
        if given is None:
            assert got.shape == (0,), name
            continue
        assert got.shape == given.shape and got.dtype == (torch.float32 if name == "rel_bias" else dtype), name
        if dtype == torch.float32:
            atol = 1e-5 if name == "qkv" else 1e-5 * max(1, max_seqlen)
            torch.testing.assert_close(got, want, atol=atol, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")
        else:
            floor = 1e-5 if name == "qkv" else table_grad_floor(max_seqlen)
            assert_close(got, want, base, dtype, f"grad {name}", floor=floor)


@pytest.mark.interpreter_cases(head_dim=[7])
@pytest.mark.parametrize("which", ["q", "k", "qk"])
@pytest.mark.parametrize("head_dim", [7, 64])
def test_tables(backend, dtype, which, head_dim):
    """c2p alone, p2c alone and both (DeBERTa-v3), the distances clamped at P = 6 inside most sequences."""
    _check(backend, _lens(backend), 2, head_dim, dtype, which=which)


@pytest.mark.interpreter_cases(p=[3])
@pytest.mark.parametrize("p, width", [(3, 1), (80, 161), (200, 40)])
def test_index_widths(backend, p, width):
    """One column for every distance, one per distance past every sequence's length, and many distances sharing
    few columns (DeBERTa's log buckets)."""
    _check(backend, _lens(backend), 3, 32, torch.float32, p=p, width=width, seed=3)


@pytest.mark.interpreter_cases(dropout_p=[0.2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_with_bias_window_and_dropout(backend, dtype, dropout_p):
    _check(backend, _lens(backend), 2, 32, dtype, rel_r=5, window=9, dropout_p=dropout_p, seed=8)


@pytest.mark.interpreter_cases(length=[1])
@pytest.mark.parametrize("length", [1, 512])
def test_lengths_one_and_max(backend, length):
    """One token, and 512 with DeBERTa-v3's shape of index: 256 buckets, the distances past them clamped."""
    _check(backend, [length], 2, 64, torch.float32, p=511, width=512, seed=9)


def test_gradient_through_wrapper(backend):
    """Autograd through the wrapper, with the tables formed from the content as DeBERTa forms them (Q . K_pos and
    K . Q_pos): the gradients of the content and of the position projections equal the reference's."""
    lens = _lens(backend, [9, 30])
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(int(cu[-1]), 3, 2, 16, seed=3, device=backend.device)
    rows = rand(11, 2, 16, seed=4, device=backend.device)
    index = _index(8, 11, 5, backend.device)

    def run(fn, **kw):
        q, r = qkv.clone().requires_grad_(), rows.clone().requires_grad_()
        pos_q = torch.einsum("thd,whd->htw", q[:, 0], r).contiguous()
        pos_k = torch.einsum("thd,whd->htw", q[:, 1], r).contiguous()
        out = fn(q, cu, max(lens), 0.2, pos_q=pos_q, pos_k=pos_k, pos_index=index, **kw)
        return torch.autograd.grad(out.square().sum(), [q, r])

    got = run(ops.attention_varlen, backend=backend.name)
    want = run(lambda q, c, m, s, **kw: reference.attention_varlen(q, c, m, s, **kw))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_no_tokens(backend):
    cu = cu_seqlens([0, 0], backend.device)
    qkv = torch.zeros((0, 3, 2, 16), device=backend.device)
    tables = torch.zeros((2, 0, 5), device=backend.device)
    index = torch.zeros(7, dtype=torch.int32, device=backend.device)
    out, lse = backend.forward(qkv, cu, 0, 0.25, 0.0, None, None, -1, tables, tables, index)
    grads = backend.backward(torch.zeros_like(out), qkv, out, lse, cu, 0, 0.25, 0.0, None, None, -1, tables, tables,
                             index)
    assert out.shape == (0, 2, 16) and [tuple(g.shape) for g in grads] == [(0, 3, 2, 16), (0,), (2, 0, 5), (2, 0, 5)]


def test_wrapper_refuses_bad_tables(backend):
    dev = backend.device
    qkv = rand(9, 3, 2, 8, device=dev)
    cu = cu_seqlens([4, 5], dev)
    table = rand(2, 9, 5, device=dev)
    index = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=dev)
    cases = [
        (dict(pos_q=table), ValueError, r"pos_q needs pos_index"),
        (dict(pos_index=index), ValueError, "pos_index given without pos_q or pos_k"),
        (dict(pos_q=table[:, :8], pos_index=index), ValueError, r"pos_q must be \[heads, T, W\] = \[2, 9, W\]"),
        (dict(pos_q=table, pos_k=table[..., :4], pos_index=index), ValueError, "the same for pos_q and pos_k"),
        (dict(pos_k=table.double(), pos_index=index), TypeError, "pos_k has dtype torch.float64 but qkv has"),
        (dict(pos_q=table.transpose(0, 1).contiguous().transpose(0, 1), pos_index=index), ValueError,
         "pos_q must be contiguous"),
        (dict(pos_q=table, pos_index=index[:4]), ValueError, "pos_index must be a 1-D int32 tensor of odd length"),
        (dict(pos_q=table, pos_index=index.long()), ValueError, "pos_index must be a 1-D int32 tensor"),
    ]
    if dev.type == "cpu":
        cases.append((dict(pos_q=table, pos_index=index + 1), ValueError,
                      r"pos_index holds 5, outside the tables' columns \[0, 5\)"))
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ops.attention_varlen(qkv, cu, 5, **kwargs, backend=backend.name)


def test_kernels_refuse_bad_tables(backend):
    """The kernels' own checks (reachable without the wrapper): a table of the wrong shape or dtype, or an index
    of the wrong dtype, is refused by name, not read past its end."""
    dev = backend.device
    qkv = rand(9, 3, 2, 8, device=dev)
    cu = cu_seqlens([4, 5], dev)
    op = registry.OPS["attention_varlen"]
    out, lse = op.op(qkv, cu, 5, 0.25, backend=backend.name)
    table = rand(2, 9, 5, device=dev)
    index = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=dev)
    for bad, match in (((table[:, :8].contiguous(), None, index), "pos_q"), ((None, table.double(), index), "pos_k"),
                       ((table, None, index.long()), "pos_index"), ((table, None, None), "pos_index")):
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            op.op(qkv, cu, 5, 0.25, 0.0, None, None, -1, *bad, backend=backend.name)
        with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
            op.backward_op(out, qkv, out, lse, cu, 5, 0.25, 0.0, None, None, -1, *bad, backend=backend.name)
