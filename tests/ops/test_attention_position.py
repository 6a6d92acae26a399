"""attention_varlen's position terms on every backend that runs here, forward and backward, against the reference: a
relative position bias table (MPNet's and T5's bucketed bias, rel_bias [heads, 2R+1] indexed by the clamped
distance j - i) and a local window (ModernBERT's sliding-window layers: |j - i| <= window), each alone, together and
with dropout.

Tolerances as in test_attention_varlen.py: fp32 within 1e-5 of the fp32 reference; bf16 within twice PyTorch's own
error (SDPA with the bias as a float mask for the CPU kernels, the eager form for Triton) plus a small floor. The
bias's gradient is fp32 on every backend and is held to the fp32 tolerance scaled by the number of scores it sums.
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
RAGGED = [5, 1, 0, 17, 33, 70]  # a length-1 and a zero-length sequence; 70 spans several blocks of every backend


def _lens(backend, lens=RAGGED):
    """lens, or under Triton's interpreter (slow) a shorter ragged batch that still spans three blocks of 16."""
    return [5, 1, 0, 40] if backend.interpreted else lens


def _table(heads, r, seed=11, device="cpu"):
    return rand(heads, 2 * r + 1, seed=seed, scale=2.0, device=device)


def _scores(q, k, scale, rel_bias, window):
    """[heads, L, L] fp32 scores of one sequence with the position terms, as the reference forms them."""
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    pos = torch.arange(q.shape[0], device=q.device)
    rel = pos[None, :] - pos[:, None]
    if rel_bias is not None:
        r = (rel_bias.shape[1] - 1) // 2
        scores = scores + rel_bias.to(scores.dtype)[:, rel.clamp(-r, r) + r]
    if window >= 0:
        scores = scores.masked_fill(rel.abs() > window, float("-inf"))
    return scores


def _exact(qkv, cu, scale, grad_out, rel_bias, window, dropout_p=0.0, rng=None):
    """fp32 reference: out, lse [heads, T], the gradient of qkv and that of rel_bias (None without one)."""
    qkv32 = qkv.float().requires_grad_()
    bias32 = None if rel_bias is None else rel_bias.detach().clone().requires_grad_()
    out = reference.attention_varlen(qkv32, cu, 0, scale, dropout_p, rng, bias32, window)
    wrt = [qkv32] if bias32 is None else [qkv32, bias32]
    grads = torch.autograd.grad(out, wrt, grad_out.float())
    lse = [qkv.new_zeros((qkv.shape[2], 0), dtype=torch.float32)]
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[start:end].float().unbind(1)
        lse.append(torch.logsumexp(_scores(q, k, scale, rel_bias, window), -1))
    return out.detach(), torch.cat(lse, 1), grads[0], (grads[1] if bias32 is not None else None)


def _native(qkv, cu, scale, rel_bias, window, fused, dropout_p=0.0, rng=None):
    """PyTorch's own attention in qkv's dtype, one sequence at a time, with the position terms as an additive mask in
    that dtype: SDPA (fused), or the eager form (softmax in the dtype, dropped with the reference mask)."""
    masks = dropout.attention_dropout_masks(rng, dropout_p, qkv.shape[2], cu.cpu()) if dropout_p > 0 else None
    outs = [qkv.new_zeros((0,) + qkv.shape[2:])]
    bounds = cu.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim]
        zero = torch.zeros(q.shape[1], 1, q.shape[2], device=q.device)
        mask = _scores(zero, zero, 1.0, rel_bias, window).to(qkv.dtype)  # [heads, L, L]: the position terms alone
        if masks is None and fused:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).permute(1, 0, 2))
            continue
        probs = torch.softmax(q @ k.transpose(1, 2) * scale + mask, -1)
        if masks is not None:
            probs = probs * masks[b].to(probs) / (1 - dropout_p)
        outs.append((probs @ v).permute(1, 0, 2))
    return torch.cat(outs)


def _check(backend, lens, heads, head_dim, dtype, rel_r=None, window=-1, dropout_p=0.0, seed=0):
    """The forward kernel's out and lse and the backward kernel's gradients against the reference."""
    cu = cu_seqlens(lens, backend.device)
    total, max_seqlen = int(cu[-1]), max(lens, default=0)
    scale = 1.0 / math.sqrt(head_dim)
    qkv = rand(total, 3, heads, head_dim, seed=seed, dtype=dtype, device=backend.device)
    grad_out = rand(total, heads, head_dim, seed=seed + 1, dtype=dtype, device=backend.device)
    rel_bias = None if rel_r is None else _table(heads, rel_r, seed + 2, backend.device)
    rng = rng_state(seed + 3) if dropout_p > 0 else None

    out, lse = backend.forward(qkv, cu, max_seqlen, scale, dropout_p, rng, rel_bias, window)
    grad, grad_bias, *_ = backend.backward(grad_out, qkv, out, lse, cu, max_seqlen, scale, dropout_p, rng, rel_bias,
                                       window)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype
    assert grad.shape == (total, 3, heads, head_dim) and grad.dtype == dtype
    exact_out, exact_lse, exact_grad, exact_grad_bias = _exact(qkv, cu, scale, grad_out, rel_bias, window, dropout_p,
                                                               rng)
    torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
    leaf = qkv.clone().requires_grad_()
    fused = backend.name == "cpu"
    native = _native(leaf, cu, scale, rel_bias, window, fused, dropout_p, rng) if dtype != torch.float32 else out
    native_grad = torch.autograd.grad(native, leaf, grad_out)[0] if dtype != torch.float32 else grad
    assert_close(out, exact_out, native, dtype, "out", floor=1e-5)
    for part, name in enumerate("qkv"):
        assert_close(grad[:, part], exact_grad[:, part], native_grad[:, part], dtype, f"grad {name}", floor=1e-5)
    if rel_bias is None:
        assert grad_bias.shape == (0,)
        return
    assert grad_bias.shape == rel_bias.shape and grad_bias.dtype == torch.float32
    # each entry sums dS over up to T pairs: fp32 to 1e-5 relative to that sum's size; bf16 inputs move dS by their
    # rounding, so the bound there is PyTorch's own error in the bias gradient of the same computation
    if dtype == torch.float32:
        torch.testing.assert_close(grad_bias, exact_grad_bias, atol=1e-5 * max(1, max_seqlen), rtol=1e-4)
    else:
        native_bias = rel_bias.clone().requires_grad_()
        native_out = _native(qkv, cu, scale, native_bias, window, fused, dropout_p, rng)
        (native_grad_bias,) = torch.autograd.grad(native_out, native_bias, grad_out)
        assert_close(grad_bias, exact_grad_bias, native_grad_bias, dtype, "grad rel_bias",
                     floor=table_grad_floor(max_seqlen))


@pytest.mark.interpreter_cases(head_dim=[7])
@pytest.mark.parametrize("head_dim", [7, 32, 64])
@pytest.mark.parametrize("rel_r", [3, 128])  # distances clamped inside every sequence, and a table wider than all
def test_rel_bias(backend, dtype, head_dim, rel_r):
    _check(backend, _lens(backend), 2, head_dim, dtype, rel_r=rel_r)


@pytest.mark.interpreter_cases(window=[0, 20])
@pytest.mark.parametrize("window", [0, 1, 20, 64, 200])  # self only, a band inside a block, across blocks, all keys
def test_window(backend, dtype, window):
    _check(backend, _lens(backend), 3, 32, dtype, window=window)


@pytest.mark.interpreter_cases(dropout_p=[0.2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_rel_bias_and_window(backend, dtype, dropout_p):
    _check(backend, _lens(backend), 2, 32, dtype, rel_r=9, window=12, dropout_p=dropout_p, seed=5)


@pytest.mark.interpreter_cases(length=[1])
@pytest.mark.parametrize("length", [1, 512])
def test_lengths_one_and_max(backend, length):
    """One token, and BERT's longest sequence with MPNet's table width (R = 128) and ModernBERT's window (64)."""
    _check(backend, [length], 2, 64, torch.float32, rel_r=128, window=64, seed=7)


def test_gradient_through_wrapper_and_gather(backend):
    """Autograd through the wrapper: the table is gathered from an embedding of buckets (as MPNet forms it), and the
    embedding's gradient equals the reference's."""
    lens = _lens(backend, [9, 30])
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(int(cu[-1]), 3, 2, 16, seed=3, device=backend.device)
    emb = rand(6, 2, seed=4, device=backend.device)
    buckets = torch.tensor([0, 1, 1, 2, 2, 2, 3, 4, 4, 5, 5], device=backend.device)  # R = 5

    def run(fn, **kw):
        q, e = qkv.clone().requires_grad_(), emb.clone().requires_grad_()
        out = fn(q, cu, max(lens), 0.3, rel_bias=e[buckets].t().contiguous(), window=7, **kw)
        return torch.autograd.grad(out.square().sum(), [q, e])

    got = run(ops.attention_varlen, backend=backend.name)
    want = run(lambda q, c, m, s, **kw: reference.attention_varlen(q, c, m, s, **kw))
    torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)


def test_no_tokens(backend):
    cu = cu_seqlens([0, 0], backend.device)
    qkv = torch.zeros((0, 3, 2, 16), device=backend.device)
    rel_bias = _table(2, 4, device=backend.device)
    out, lse = backend.forward(qkv, cu, 0, 0.25, 0.0, None, rel_bias, 3)
    grad, grad_bias, *_ = backend.backward(torch.zeros_like(out), qkv, out, lse, cu, 0, 0.25, 0.0, None, rel_bias, 3)
    assert out.shape == (0, 2, 16) and grad.shape == (0, 3, 2, 16)
    assert torch.equal(grad_bias, torch.zeros_like(rel_bias))


def test_wrapper_refuses_bad_position_args(backend):
    qkv = rand(9, 3, 2, 8, device=backend.device)
    cu = cu_seqlens([4, 5], backend.device)
    table = _table(2, 3, device=backend.device)
    cases = [
        (dict(rel_bias=table[:1]), ValueError, r"rel_bias must be \[heads, 2R\+1\] = \[2, odd\], got shape \(1, 7\)"),
        (dict(rel_bias=table[:, :6]), ValueError, r"got shape \(2, 6\)"),
        (dict(rel_bias=table[0]), ValueError, r"rel_bias must be \[heads, 2R\+1\]"),
        (dict(rel_bias=table.bfloat16()), TypeError, "rel_bias must be float32, got torch.bfloat16"),
        (dict(rel_bias=table.t().contiguous().t()), ValueError, "rel_bias must be contiguous"),
        (dict(window=-2), ValueError, r"window must be >= 0 \(local attention\) or -1 \(none\), got -2"),
    ]
    if backend.device.type != "cpu":
        cases.append((dict(rel_bias=table.cpu()), ValueError, "rel_bias is on cpu but qkv is on"))
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ops.attention_varlen(qkv, cu, 5, **kwargs, backend=backend.name)


def test_backward_op_refuses_bad_position_args(backend):
    """The kernels' own checks (the backward op is callable by anyone, and the C++ kernels are reachable without the
    wrapper): a table of the wrong shape or dtype is refused by name, not read past its end."""
    qkv = rand(9, 3, 2, 8, device=backend.device)
    cu = cu_seqlens([4, 5], backend.device)
    op = registry.OPS["attention_varlen"]
    out, lse = op.op(qkv, cu, 5, 0.25, backend=backend.name)
    table = _table(2, 3, device=backend.device)
    for bad in (table[:, :6].contiguous(), table[:1].contiguous(), table.double()):
        with pytest.raises((ValueError, TypeError, RuntimeError), match="rel_bias"):
            op.op(qkv, cu, 5, 0.25, 0.0, None, bad, -1, backend=backend.name)
        with pytest.raises((ValueError, TypeError, RuntimeError), match="rel_bias"):
            op.backward_op(out, qkv, out, lse, cu, 5, 0.25, 0.0, None, bad, -1, backend=backend.name)
    with pytest.raises((ValueError, RuntimeError), match="window"):
        op.op(qkv, cu, 5, 0.25, 0.0, None, None, -3, backend=backend.name)
