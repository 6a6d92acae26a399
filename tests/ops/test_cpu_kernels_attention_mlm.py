"""C++ CPU kernels of attention_varlen and mlm_gather_loss (forward and backward) against the pure-PyTorch
references (mtbert_fast/ops/reference.py), with autograd through the reference for the backward.

Tolerances (DESIGN.md habit 7): fp32 within 1e-5 of the reference (looser only where a value sums many terms);
bf16 error against an fp32 reference at most twice PyTorch's own bf16 error on the same computation, plus a small
floor. The fp32 reference of a bf16 case runs on the same bf16 inputs, upcast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast.ops import reference

KERNEL_OPS = ["attention_varlen", "attention_varlen_backward", "mlm_gather_loss", "mlm_gather_loss_backward"]

DTYPES = [torch.float32, torch.bfloat16]
RAGGED = [5, 1, 0, 17, 33, 64]  # a length-1 and a zero-length sequence among ragged ones


@pytest.fixture(scope="module")
def ops(compiled_kernels):
    return compiled_kernels(KERNEL_OPS)


def _make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_bf16_close(ours: torch.Tensor, torch_bf16: torch.Tensor, exact: torch.Tensor, what: str, floor=1e-5):
    """ours and torch_bf16 are bf16-input results of the same computation; exact is its fp32 reference."""
    assert ours.shape == exact.shape, what
    err, base = _max_err(ours, exact), _max_err(torch_bf16, exact)
    assert err <= 2 * base + floor, f"{what}: bf16 kernel error {err:.3g} vs PyTorch bf16 error {base:.3g}"


# ---- attention_varlen ----


def _cu(lens) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)


def _exact_attention(qkv, cu, scale, grad_out):
    """fp32 reference: out, lse [heads, T] and the gradient of qkv for grad_out."""
    qkv32 = qkv.float().requires_grad_()
    out = reference.attention_varlen(qkv32, cu, 0, scale)
    (grad,) = torch.autograd.grad(out, qkv32, grad_out.float())
    lse = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[start:end].float().unbind(1)
        lse.append(torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * scale, -1))
    lse = torch.cat(lse, 1) if lse else qkv.new_zeros((qkv.shape[2], 0), dtype=torch.float32)
    return out.detach(), lse, grad


def _torch_bf16_attention(qkv, cu, scale, grad_out):
    """PyTorch's own bf16 attention (SDPA per sequence) and its gradient: the error baseline of the bf16 kernel."""
    leaf = qkv.clone().requires_grad_()
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            q, k, v = leaf[start:end].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim]
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale).permute(1, 0, 2))
    out = torch.cat(outs)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out.detach(), grad


def _check_attention(ops, lens, heads, head_dim, dtype, scale=None, qkv=None, seed=0):
    cu = _cu(lens)
    total = int(cu[-1])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if qkv is None:
        qkv = _make((total, 3, heads, head_dim), dtype, seed)
    grad_out = _make((total, heads, head_dim), dtype, seed + 1)
    max_seqlen = max(lens)

    out, lse = ops.attention_varlen(qkv, cu, max_seqlen, scale)
    grad = ops.attention_varlen_backward(grad_out, qkv, out, lse, cu, max_seqlen, scale)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype
    assert lse.shape == (heads, total) and lse.dtype == torch.float32
    assert grad.shape == (total, 3, heads, head_dim) and grad.dtype == dtype

    exact_out, exact_lse, exact_grad = _exact_attention(qkv, cu, scale, grad_out)
    torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, exact_grad, atol=1e-5, rtol=1e-5)
    else:
        torch_out, torch_grad = _torch_bf16_attention(qkv, cu, scale, grad_out)
        _assert_bf16_close(out, torch_out, exact_out, "out")
        for part, name in enumerate("qkv"):
            _assert_bf16_close(grad[:, part], torch_grad[:, part], exact_grad[:, part], f"grad {name}")


@pytest.mark.parametrize("head_dim", [7, 32, 64, 80])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_ragged(ops, dtype, head_dim):
    _check_attention(ops, RAGGED, heads=3, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_length_512(ops, dtype):
    _check_attention(ops, [512, 3], heads=1, head_dim=64, dtype=dtype, seed=1)


def test_attention_longer_than_one_key_block(ops):
    """Sequences over 512 keys take the streamed softmax across key blocks."""
    _check_attention(ops, [700, 1], heads=1, head_dim=32, dtype=torch.float32, seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_qkv_and_scale(ops, dtype):
    """qkv as a view of a wider GEMM output (token stride > 3 * heads * head_dim), with a non-default scale."""
    lens, heads, head_dim = [9, 20], 2, 64
    total = sum(lens)
    wide = _make((total, 3 * heads * head_dim + 16), dtype, 3)
    qkv = wide[:, : 3 * heads * head_dim].view(total, 3, heads, head_dim)
    assert not qkv.is_contiguous()
    _check_attention(ops, lens, heads, head_dim, dtype, scale=0.3, qkv=qkv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[], [0, 0]])
def test_attention_no_tokens(ops, dtype, lens):
    cu = _cu(lens)
    qkv = torch.zeros((0, 3, 2, 32), dtype=dtype)
    out, lse = ops.attention_varlen(qkv, cu, 0, 0.125)
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)
    grad = ops.attention_varlen_backward(torch.zeros_like(out), qkv, out, lse, cu, 0, 0.125)
    assert grad.shape == (0, 3, 2, 32)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(cu=torch.tensor([1, 5, 9], dtype=torch.int32)), r"cu_seqlens\[0\] must be 0"),
        (lambda a: a.update(cu=torch.tensor([0, 4, 3, 9], dtype=torch.int32)), "non-decreasing"),
        (lambda a: a.update(cu=torch.tensor([0, 4, 8], dtype=torch.int32)), r"cu_seqlens\[-1\] must equal"),
        (lambda a: a.update(cu=torch.tensor([0, 4, 9])), "cu_seqlens must be Int"),
        (lambda a: a.update(cu=torch.tensor([[0, 4, 9]], dtype=torch.int32)), "cu_seqlens must have 1 dim"),
        (lambda a: a.update(cu=torch.tensor([], dtype=torch.int32)), "cu_seqlens must hold"),
        (lambda a: a.update(max_seqlen=4), "max_seqlen = 4 but sequence 1 has length 5"),
        (lambda a: a.update(qkv=a["qkv"][:, 0]), r"qkv must have shape \[T, 3, heads, head_dim\]"),
        (lambda a: a.update(qkv=torch.zeros(9, 2, 2, 8)), r"qkv must have shape \[T, 3, heads, head_dim\]"),
        (lambda a: a.update(qkv=a["qkv"].half()), "qkv must be Float or BFloat16"),
    ],
)
def test_attention_bad_inputs(ops, change, match):
    args = {"qkv": torch.zeros(9, 3, 2, 8), "cu": torch.tensor([0, 4, 9], dtype=torch.int32), "max_seqlen": 5}
    change(args)
    with pytest.raises(RuntimeError, match=match):
        ops.attention_varlen(args["qkv"], args["cu"], args["max_seqlen"], 0.5)


def test_attention_backward_bad_inputs(ops):
    qkv, cu = torch.zeros(9, 3, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = ops.attention_varlen(qkv, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        ops.attention_varlen_backward(out[:, :1], qkv, out, lse, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="out has dtype BFloat16 but qkv has Float"):
        ops.attention_varlen_backward(out, qkv, out.bfloat16(), lse, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        ops.attention_varlen_backward(out, qkv, out, lse.t(), cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        ops.attention_varlen_backward(out, qkv, out, lse, torch.tensor([0, 9, 4, 9], dtype=torch.int32), 9, 0.5)


# ---- mlm_gather_loss ----


def _mlm_inputs(dtype, rows=37, hidden=48, vocab=1003, seed=0):
    h = _make((rows, hidden), dtype, seed)
    w = _make((vocab, hidden), dtype, seed + 1, 0.3)
    b = _make((vocab,), dtype, seed + 2)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 3))
    labels[::3] = -100
    return h, w, b, labels


def _exact_mlm(h, w, b, labels, grad_loss, ignore_index=-100):
    leaves = [t.float().requires_grad_() for t in (h, w, b)]
    loss = reference.mlm_gather_loss(*leaves, labels, ignore_index, reduction="sum")
    grads = torch.autograd.grad(loss, leaves, torch.tensor(grad_loss))
    keep = labels != ignore_index
    lse = torch.zeros(h.shape[0])
    lse[keep] = torch.logsumexp(F.linear(h[keep].float(), w.float(), b.float()), -1)
    return loss.detach(), lse, grads


@pytest.mark.parametrize("chunk_size", [0, 4, 1000])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlm_gather_loss(ops, dtype, chunk_size):
    h, w, b, labels = _mlm_inputs(dtype)
    grad_loss = 0.5
    loss, lse = ops.mlm_gather_loss(h, w, b, labels, -100, chunk_size)
    grads = ops.mlm_gather_loss_backward(torch.tensor(grad_loss), h, w, b, labels, lse, -100, chunk_size)
    assert loss.shape == () and loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3

    exact_loss, exact_lse, exact_grads = _exact_mlm(h, w, b, labels, grad_loss)
    assert (lse[labels == -100] == 0).all() and (grads[0][labels == -100] == 0).all()
    names = ("grad_hidden", "grad_weight", "grad_bias")
    if dtype == torch.float32:
        torch.testing.assert_close(loss, exact_loss, atol=1e-4, rtol=1e-6)
        torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-6)
        for name, got, want in zip(names, grads, exact_grads):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        keep = labels != -100
        torch_loss = F.cross_entropy(F.linear(leaves[0][keep], leaves[1], leaves[2]), labels[keep], reduction="sum")
        torch_grads = torch.autograd.grad(torch_loss, leaves, torch.tensor(grad_loss, dtype=dtype))
        torch_lse = torch.zeros_like(lse)
        torch_lse[keep] = torch.logsumexp(F.linear(h[keep], w, b), -1).float()
        _assert_bf16_close(loss, torch_loss, exact_loss, "loss")
        _assert_bf16_close(lse, torch_lse, exact_lse, "lse")
        for name, got, base, want in zip(names, grads, torch_grads, exact_grads):
            _assert_bf16_close(got, base, want, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlm_gather_loss_all_rows_ignored(ops, dtype):
    h, w, b, labels = _mlm_inputs(dtype, rows=5)
    labels[:] = 3
    loss, lse = ops.mlm_gather_loss(h, w, b, labels, 3, 0)
    assert loss.item() == 0 and (lse == 0).all()
    grads = ops.mlm_gather_loss_backward(torch.tensor(1.0), h, w, b, labels, lse, 3, 0)
    for got, like in zip(grads, (h, w, b)):
        assert got.shape == like.shape and got.dtype == dtype and (got == 0).all()


@pytest.mark.parametrize("bad", [1003, -1])
def test_mlm_gather_loss_bad_label(ops, bad):
    h, w, b, labels = _mlm_inputs(torch.float32)
    labels[4] = bad
    with pytest.raises(RuntimeError, match=rf"label {bad} at row 4 is outside \[0, 1003\)"):
        ops.mlm_gather_loss(h, w, b, labels, -100, 0)
    with pytest.raises(RuntimeError, match=rf"label {bad} at row 4"):
        ops.mlm_gather_loss_backward(torch.tensor(1.0), h, w, b, labels, torch.zeros(h.shape[0]), -100, 0)


def test_mlm_gather_loss_bad_inputs(ops):
    h, w, b, labels = _mlm_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.mlm_gather_loss(h, w[:, :5], b, labels, -100, 0)
    with pytest.raises(RuntimeError, match="bias has dtype BFloat16 but hidden has Float"):
        ops.mlm_gather_loss(h, w, b.bfloat16(), labels, -100, 0)
    with pytest.raises(RuntimeError, match="labels must be Long"):
        ops.mlm_gather_loss(h, w, b, labels.int(), -100, 0)
    with pytest.raises(RuntimeError, match="labels must have N = 37"):
        ops.mlm_gather_loss(h, w, b, labels[:5], -100, 0)
