"""C++ CPU kernels of attention_varlen and mlm_gather_loss (forward and backward) against the pure-PyTorch
references (mtbert_fast/ops/reference.py), with autograd through the reference for the backward.

Tolerances: fp32 within 1e-5 of the reference (looser only where a value sums many terms);
bf16 error against an fp32 reference at most twice PyTorch's own bf16 error on the same computation, plus a small
floor. The fp32 reference of a bf16 case runs on the same bf16 inputs, upcast.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast.ops import dropout, reference

KERNEL_OPS = ["attention_varlen", "attention_varlen_backward", "mlm_gather_loss", "mlm_gather_loss_backward"]

DTYPES = [torch.float32, torch.bfloat16]
RAGGED = [5, 1, 0, 17, 33, 64]  # a length-1 and a zero-length sequence among ragged ones
# With dropout also one over 64 keys (several Philox calls per row) and over the backward's block of 128; most
# sequences start off a multiple of 4, so that a group of four keys sharing a Philox call straddles their start.
DROPOUT_RAGGED = [5, 1, 0, 17, 150, 33]


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


def _rng(seed=20240611, offset=0) -> torch.Tensor:
    return torch.tensor([seed, offset], dtype=torch.int64)


def _exact_attention(qkv, cu, scale, grad_out, dropout_p=0.0, rng_state=None):
    """fp32 reference: out, lse [heads, T] (of the undropped probabilities) and the gradient of qkv for grad_out."""
    qkv32 = qkv.float().requires_grad_()
    out = reference.attention_varlen(qkv32, cu, 0, scale, dropout_p, rng_state)
    (grad,) = torch.autograd.grad(out, qkv32, grad_out.float())
    lse = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[start:end].float().unbind(1)
        lse.append(torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * scale, -1))
    lse = torch.cat(lse, 1) if lse else qkv.new_zeros((qkv.shape[2], 0), dtype=torch.float32)
    return out.detach(), lse, grad


def _torch_bf16_attention(qkv, cu, scale, grad_out, dropout_p=0.0, rng_state=None):
    """PyTorch's own bf16 attention and its gradient: the error baseline of the bf16 kernel. SDPA per sequence; with
    dropout, which SDPA cannot take as a given mask, the eager form of HF's BERT attention in bf16 (probabilities
    from an fp32 softmax, rounded to bf16, dropped with the reference mask)."""
    leaf = qkv.clone().requires_grad_()
    bounds = cu.tolist()
    masks = dropout.attention_dropout_masks(rng_state, dropout_p, qkv.shape[2], cu) if dropout_p > 0 else None
    outs = []
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end == start:
            continue
        q, k, v = leaf[start:end].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim]
        if masks is None:
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale).permute(1, 0, 2))
        else:
            probs = torch.softmax(q @ k.transpose(1, 2) * scale, -1, dtype=torch.float32).to(qkv.dtype)
            probs = probs * masks[b].to(qkv.dtype) / (1 - dropout_p)
            outs.append((probs @ v).permute(1, 0, 2))
    out = torch.cat(outs)
    (grad,) = torch.autograd.grad(out, leaf, grad_out)
    return out.detach(), grad


def _check_attention(
    ops, lens, heads, head_dim, dtype, scale=None, qkv=None, seed=0, dropout_p=0.0, rng_state=None, max_seqlen=None
):
    cu = _cu(lens)
    total = int(cu[-1])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if qkv is None:
        qkv = _make((total, 3, heads, head_dim), dtype, seed)
    grad_out = _make((total, heads, head_dim), dtype, seed + 1)
    max_seqlen = max(lens) if max_seqlen is None else max_seqlen

    out, lse = ops.attention_varlen(qkv, cu, max_seqlen, scale, dropout_p, rng_state)
    grad = ops.attention_varlen_backward(grad_out, qkv, out, lse, cu, max_seqlen, scale, dropout_p, rng_state)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype
    assert lse.shape == (heads, total) and lse.dtype == torch.float32
    assert grad.shape == (total, 3, heads, head_dim) and grad.dtype == dtype

    exact_out, exact_lse, exact_grad = _exact_attention(qkv, cu, scale, grad_out, dropout_p, rng_state)
    torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, exact_grad, atol=1e-5, rtol=1e-5)
    else:
        torch_out, torch_grad = _torch_bf16_attention(qkv, cu, scale, grad_out, dropout_p, rng_state)
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


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_attention_longer_than_one_key_block(ops, dropout_p):
    """Sequences over 512 keys take the streamed softmax across key blocks."""
    rng_state = _rng() if dropout_p else None
    _check_attention(ops, [700, 1], heads=1, head_dim=32, dtype=torch.float32, seed=2, dropout_p=dropout_p,
                     rng_state=rng_state)


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
        (lambda a: a.update(cu=torch.tensor([0], dtype=torch.int32)), r"cu_seqlens = \[0\] describes no sequence"),
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
    with pytest.raises(RuntimeError, match=r"cu_seqlens = \[0\] describes no sequence, but qkv has 9 rows"):
        ops.attention_varlen_backward(out, qkv, out, lse, torch.tensor([0], dtype=torch.int32), 5, 0.5)


@pytest.mark.parametrize(
    "dropout_p, rng_state, match",
    [
        (1.0, _rng(), r"dropout_p must be in \[0, 1\)"),
        (-0.1, _rng(), r"dropout_p must be in \[0, 1\)"),
        (0.1, None, "needs rng_state"),
        (0.1, torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64 CPU tensor of shape \\[2\\]"),
        (0.1, torch.tensor([1, 2, 3]), "rng_state must be an int64 CPU tensor of shape \\[2\\]"),
    ],
)
def test_attention_bad_dropout_inputs(ops, dropout_p, rng_state, match):
    qkv, cu = torch.zeros(9, 3, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = ops.attention_varlen(qkv, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match=match):
        ops.attention_varlen(qkv, cu, 5, 0.5, dropout_p, rng_state)
    with pytest.raises(RuntimeError, match=match):
        ops.attention_varlen_backward(out, qkv, out, lse, cu, 5, 0.5, dropout_p, rng_state)


# ---- attention_varlen: max_seqlen and dropout ----


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("max_seqlen", [0, 4, 149])
def test_attention_max_seqlen_only_sizes(ops, max_seqlen, dropout_p):
    """A max_seqlen below the longest sequence (even 0) changes nothing: every sequence is computed in full."""
    rng_state = _rng() if dropout_p else None
    _check_attention(ops, DROPOUT_RAGGED, heads=2, head_dim=32, dtype=torch.float32, seed=4, dropout_p=dropout_p,
                     rng_state=rng_state, max_seqlen=max_seqlen)


@pytest.mark.parametrize("head_dim", [7, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_dropout_matches_reference(ops, dtype, head_dim):
    """Forward and backward with dropout against the reference with the same rng_state (autograd backward)."""
    _check_attention(ops, DROPOUT_RAGGED, heads=3, head_dim=head_dim, dtype=dtype, seed=5, dropout_p=0.3,
                     rng_state=_rng(987654321987, 5))


def _one_hot_attention(ops, lens, heads, dropout_p, rng_state):
    """The kernel's dropout multipliers, read off exactly: with Q = K = 0 every probability of a sequence of length L
    is 1/L, and with V_j one-hot at j's place in its sequence out_i[j] = M_ij / L; with dO_i one-hot at i's place the
    backward gives dV_j[i] = M_ij / L. -> per sequence, forward and backward L * (P * M), each [heads, L, L]."""
    cu = _cu(lens)
    head_dim = max(lens)
    qkv = torch.zeros(int(cu[-1]), 3, heads, head_dim)
    grad_out = torch.zeros(int(cu[-1]), heads, head_dim)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        place = torch.arange(end - start)
        qkv[start + place, 2, :, place] = 1.0
        grad_out[start + place, :, place] = 1.0
    out, lse = ops.attention_varlen(qkv, cu, head_dim, 1.0, dropout_p, rng_state)
    grad = ops.attention_varlen_backward(grad_out, qkv, out, lse, cu, head_dim, 1.0, dropout_p, rng_state)
    seqs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        fwd = out[start:end, :, :n].permute(1, 0, 2) * n  # [heads, i, j]
        bwd = grad[start:end, 2, :, :n].permute(1, 2, 0) * n  # dV_j[i] -> [heads, i, j]
        seqs.append((fwd, bwd))
    return cu, seqs


@pytest.mark.parametrize("lens", [[3, 70, 1, 0, 130, 5], [2, 600]])
def test_attention_dropout_mask_is_the_reference_mask(ops, lens):
    """Element for element, the forward and the backward drop exactly what mtbert_fast.ops.dropout drops, also past
    one forward key block (600 keys) and across backward blocks, from starts off a multiple of 4."""
    heads, p, rng_state = 2, 0.3, _rng(5, 77)
    cu, seqs = _one_hot_attention(ops, lens, heads, p, rng_state)
    for keep, (fwd, bwd) in zip(dropout.attention_dropout_masks(rng_state, p, heads, cu), seqs):
        assert torch.equal(fwd != 0, keep) and torch.equal(bwd != 0, keep)
        want = keep / (1 - p)
        torch.testing.assert_close(fwd, want, atol=0, rtol=1e-6)
        torch.testing.assert_close(bwd, want, atol=0, rtol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_attention_dropout_keep_rate(ops, p):
    """The kept fraction is 1 - p within 5 binomial standard deviations."""
    _, seqs = _one_hot_attention(ops, [600, 300], 2, p, _rng(31337))
    kept = sum(int((fwd != 0).sum()) for fwd, _ in seqs)
    n = sum(fwd.numel() for fwd, _ in seqs)
    assert abs(kept / n - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), (kept / n, 1 - p)


def test_attention_dropout_mean_is_the_undropped_output(ops):
    """Kept probabilities are scaled by 1 / (1 - p), so over many seeds the mean output is the undropped output:
    within 6 standard errors, element for element, from the exact variance sum_j P_ij^2 v_j^2 p / (1 - p)."""
    lens, heads, head_dim, p, draws = [40, 24], 2, 16, 0.5, 1000
    cu = _cu(lens)
    qkv = _make((int(cu[-1]), 3, heads, head_dim), torch.float32, 6)
    undropped, _ = ops.attention_varlen(qkv, cu, max(lens), 0.25)
    mean = sum(ops.attention_varlen(qkv, cu, max(lens), 0.25, p, _rng(seed))[0] for seed in range(draws)) / draws
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[start:end].double().unbind(1)
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) * 0.25, -1)
        var = torch.einsum("hij,jhd->ihd", probs**2, v**2) * p / (1 - p)
        err = (mean[start:end] - undropped[start:end]).double().abs()
        assert (err <= 6 * (var / draws).sqrt() + 1e-6).all(), (err / (var / draws).sqrt()).max()


def test_attention_dropout_gradients_by_finite_differences(ops):
    """gradcheck confirms the reference's autograd gradient with dropout in float64 (the mask fixed by rng_state);
    the kernel's fp32 backward must match that gradient."""
    lens, heads, head_dim, scale, p, rng_state = [2, 0, 5], 2, 2, 0.5, 0.3, _rng(11, 2)  # small: each call draws the mask
    cu = _cu(lens)
    keep = torch.cat([m.flatten() for m in dropout.attention_dropout_masks(rng_state, p, heads, cu)])
    assert 0 < int(keep.sum()) < keep.numel()  # some probabilities dropped, some kept
    qkv = _make((int(cu[-1]), 3, heads, head_dim), torch.float32, 8)
    grad_out = _make((int(cu[-1]), heads, head_dim), torch.float32, 9)

    def ref(x):
        return reference.attention_varlen(x, cu, 0, scale, p, rng_state)

    qkv64 = qkv.double().requires_grad_()
    assert torch.autograd.gradcheck(ref, (qkv64,))
    (want,) = torch.autograd.grad(ref(qkv64), qkv64, grad_out.double())
    out, lse = ops.attention_varlen(qkv, cu, max(lens), scale, p, rng_state)
    torch.testing.assert_close(out.double(), ref(qkv64).detach(), atol=1e-6, rtol=1e-6)
    grad = ops.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(lens), scale, p, rng_state)
    torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-5)


def test_attention_dropout_is_reproducible(ops):
    """The same rng_state gives the same output and gradient twice; another seed or offset, another mask."""
    lens, heads, head_dim = DROPOUT_RAGGED, 2, 16
    cu = _cu(lens)
    qkv = _make((int(cu[-1]), 3, heads, head_dim), torch.float32, 10)
    grad_out = _make((int(cu[-1]), heads, head_dim), torch.float32, 11)

    def run(rng_state):
        out, lse = ops.attention_varlen(qkv, cu, max(lens), 0.25, 0.2, rng_state)
        return out, ops.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(lens), 0.25, 0.2, rng_state)

    first, again = run(_rng(42, 0)), run(_rng(42, 0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (_rng(43, 0), _rng(42, 1)):
        assert not torch.equal(run(other)[0], first[0])
    masks = {}
    for name, rng_state in {"seed": _rng(42, 0), "other seed": _rng(43, 0), "other offset": _rng(42, 1)}.items():
        _, seqs = _one_hot_attention(ops, [150], heads, 0.2, rng_state)
        masks[name] = seqs[0][0] != 0
    assert not torch.equal(masks["seed"], masks["other seed"])
    assert not torch.equal(masks["seed"], masks["other offset"])


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
