"""mlm_gather_loss on every backend that runs here, forward (loss_sum, lse) and backward, against the reference.

Tolerances: fp32 loss within 1e-4 absolute (a sum over rows), lse and gradients within 1e-5; bf16/fp16: at most
twice PyTorch's own error in that dtype, plus a small floor; through the wrapper a mean loss within twice PyTorch's
mean per-row error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import assert_close, compare, rand

OP_NAME = "mlm_gather_loss"


def _inputs(dtype=torch.float32, rows=37, hidden=48, vocab=1003, seed=0, device="cpu"):
    h = rand(rows, hidden, seed=seed, dtype=dtype, device=device)
    w = rand(vocab, hidden, seed=seed + 1, scale=0.3, dtype=dtype, device=device)
    b = rand(vocab, seed=seed + 2, dtype=dtype, device=device)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 3))
    labels[2::3] = -100
    return h, w, b, labels.to(device)


def _exact(h, w, b, labels, grad_loss, ignore_index=-100):
    leaves = [t.float().requires_grad_() for t in (h, w, b)]
    loss = reference.mlm_gather_loss(*leaves, labels, ignore_index, reduction="sum")
    grads = torch.autograd.grad(loss, leaves, torch.tensor(grad_loss, device=h.device))
    keep = labels != ignore_index
    lse = torch.zeros(h.shape[0], device=h.device)
    lse[keep] = torch.logsumexp(F.linear(h[keep].float(), w.float(), b.float()), -1)
    return loss.detach(), lse, grads


@pytest.mark.interpreter_cases(chunk_size=[4], dtype=[torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [0, 4, 1000])
def test_kernels(backend, dtype, chunk_size):
    h, w, b, labels = _inputs(dtype, device=backend.device)
    grad_loss = 0.5
    loss, lse = backend.forward(h, w, b, labels, -100, chunk_size)
    grads = backend.backward(torch.tensor(grad_loss, device=backend.device), h, w, b, labels, lse, -100, chunk_size)
    assert loss.shape == () and loss.dtype == torch.float32 and lse.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3

    exact_loss, exact_lse, exact_grads = _exact(h, w, b, labels, grad_loss)
    assert (lse[labels == -100] == 0).all() and (grads[0][labels == -100] == 0).all()
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    keep = labels != -100
    native = F.cross_entropy(F.linear(leaves[0][keep], leaves[1], leaves[2]), labels[keep], reduction="sum")
    native_grads = torch.autograd.grad(native, leaves, torch.tensor(grad_loss, dtype=dtype, device=backend.device))
    native_lse = torch.zeros_like(lse)
    native_lse[keep] = torch.logsumexp(F.linear(h[keep], w, b), -1).float()
    assert_close(loss, exact_loss, native, dtype, "loss", atol=1e-4, rtol=1e-6, floor=1e-5)
    assert_close(lse, exact_lse, native_lse, dtype, "lse", atol=1e-5, rtol=1e-6, floor=1e-5)
    for name, got, want, base in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, exact_grads, native_grads):
        assert_close(got, want, base, dtype, name, floor=1e-5)


def test_all_rows_ignored(backend, dtype):
    h, w, b, labels = _inputs(dtype, rows=5, device=backend.device)
    labels[:] = 3
    loss, lse = backend.forward(h, w, b, labels, 3, 0)
    assert loss.item() == 0 and (lse == 0).all()
    grads = backend.backward(torch.tensor(1.0, device=backend.device), h, w, b, labels, lse, 3, 0)
    for got, like in zip(grads, (h, w, b)):
        assert got.shape == like.shape and got.dtype == dtype and (got == 0).all()
    labels[:] = -100
    assert torch.isnan(ops.mlm_gather_loss(h, w, b, labels, backend=backend.name))  # a mean over no rows
    assert ops.mlm_gather_loss(h, w, b, labels, reduction="sum", backend=backend.name).item() == 0.0


@pytest.mark.parametrize("bad", [1003, -1])
def test_bad_label(backend, bad):
    h, w, b, labels = _inputs(device=backend.device)
    labels[4] = bad
    match = rf"label {bad} (at row 4 )?is outside \[0, 1003\)"
    with pytest.raises(ValueError, match=match):
        backend.forward(h, w, b, labels, -100, 0)
    with pytest.raises(ValueError, match=match):
        backend.backward(torch.tensor(1.0), h, w, b, labels, torch.zeros(h.shape[0]), -100, 0)
    with pytest.raises(ValueError, match=match):
        ops.mlm_gather_loss(h, w, b, labels, backend=backend.name)


def test_reference_refuses_a_label_that_is_not_its_ignore_index():
    """With ignore_index -1, a -100 label is a bad label for the reference as for the kernels (F.cross_entropy's own
    default would drop it from the sum but count it in the mean)."""
    h, w, b, labels = _inputs()
    labels = labels.clamp(min=0)
    labels[2], labels[5] = -1, -100
    with pytest.raises(ValueError, match=r"label -100 at row 5 is outside \[0, 1003\) and is not ignore_index \(-1\)"):
        ops.mlm_gather_loss(h, w, b, labels, ignore_index=-1, backend="reference")
    labels[5] = 7
    keep = labels != -1
    want = torch.nn.functional.cross_entropy(h[keep].double() @ w.double().T + b.double(), labels[keep])
    torch.testing.assert_close(ops.mlm_gather_loss(h, w, b, labels, ignore_index=-1, backend="reference").double(),
                               want, atol=1e-5, rtol=1e-5)


@pytest.mark.interpreter_cases(rows=[1, 9, 13])
@pytest.mark.parametrize("rows,vocab,chunk", [(1, 7, 0), (9, 100, 4), (13, 101, 4), (40, 1000, 0)])
def test_wrapper_mean(backend, dtype, rows, vocab, chunk):
    """ops.mlm_gather_loss with its default mean reduction."""
    h, w, b, labels = _inputs(dtype, rows, 24, vocab, device=backend.device)
    loss = ops.mlm_gather_loss(h, w, b, labels, chunk_size=chunk, backend=backend.name)
    ref = reference.mlm_gather_loss(h.float(), w.float(), b.float(), labels)
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        return
    # A mean of row losses: its rounding errors partly cancel, so the bound is PyTorch's own mean per-row error.
    keep = labels != -100
    rows_native = F.cross_entropy(F.linear(h[keep], w, b).float(), labels[keep], reduction="none")
    rows_ref = F.cross_entropy(F.linear(h[keep].float(), w.float(), b.float()), labels[keep], reduction="none")
    native_err = (rows_native - rows_ref).abs().mean().item()
    assert abs(loss.item() - ref.item()) <= 2 * native_err + 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab,chunk", [(1, 7, 0), (11, 50, 4), (12, 50, 0)])
def test_wrapper_autograd(backend, dtype, rows, vocab, chunk):
    """The summed loss and the gradients of hidden, weight and bias through autograd (fp16: see test_kernels; the
    Triton gradient of weight, summed in fp16 chunk products, is up to 3x PyTorch's own fp16 error there)."""
    h, w, b, labels = _inputs(torch.float32, rows, 16, vocab, device=backend.device)
    keep = labels != -100
    compare(lambda h, w, b: ops.mlm_gather_loss(h, w, b, labels, reduction="sum", chunk_size=chunk,
                                                backend=backend.name),
            lambda h, w, b: reference.mlm_gather_loss(h, w, b, labels, -100, "sum"),
            lambda h, w, b: F.cross_entropy(F.linear(h[keep], w, b), labels[keep], reduction="sum").float(),
            [h, w, b], dtype, f"mlm_gather_loss {rows} x {vocab}", atol=2e-5, rtol=1e-4)


def test_bad_input_is_named(backend):
    h, w, b, labels = _inputs(rows=4, hidden=6, vocab=9, device=backend.device)
    loss = lambda *args, **kw: ops.mlm_gather_loss(*args, backend=backend.name, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"labels must be int64 \[4\]"):
        loss(h, w, None, labels[:3])
    with pytest.raises(ValueError, match=r"labels must be int64 \[4\]"):
        loss(h, w, None, labels.int())
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\] and weight \[V, H\]"):
        loss(h, w[:, :5], b, labels)
    with pytest.raises(ValueError, match=r"bias has shape \(8,\), expected \(9,\)"):
        loss(h, w, b[:8], labels)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16 but hidden has torch.float32"):
        loss(h, w, b.bfloat16(), labels)
    with pytest.raises(ValueError, match="weight is on meta"):
        loss(h, w.to("meta"), b, labels)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        loss(h, w, b, labels, reduction="none")


def test_cpu_kernel_bad_inputs():
    """The C++ kernels check their own arguments too, naming the tensor."""
    op = lambda *args: torch.ops.mtbert_fast.mlm_gather_loss(*args, backend="cpu")  # noqa: E731
    h, w, b, labels = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="weight must be"):
        op(h, w[:, :5], b, labels, -100, 0)
    with pytest.raises(RuntimeError, match="bias has dtype BFloat16 but hidden has Float"):
        op(h, w, b.bfloat16(), labels, -100, 0)
    with pytest.raises(RuntimeError, match="labels must be Long"):
        op(h, w, b, labels.int(), -100, 0)
    with pytest.raises(RuntimeError, match="labels must have N = 37"):
        op(h, w, b, labels[:5], -100, 0)
