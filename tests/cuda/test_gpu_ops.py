"""Every op through its wrapper on both GPU backends (cuda, triton), forward and backward, against the reference:
fp16 / bf16 / fp32, head dims 32 to 128 (256 in fp32), ragged lengths with 1 and 512, dropout on and off, strided
inputs. Skipped without CUDA; on a GPU a backend that cannot run fails the test (a missing build is a defect there).

Tolerances: fp32 within 1e-4 (TF32 off); fp16 / bf16 error against the fp32 reference at most twice PyTorch's own
error in that dtype, plus a small floor."""

from __future__ import annotations

import math

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.ops import dispatch, dropout, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tests need CUDA (a lent GPU)")
DEV = torch.device("cuda")
GPU_BACKENDS = ["cuda", "triton"]
FLOATS = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _full_fp32(no_tf32):
    yield


def _require(backend, op, t):
    why = dispatch.why_not(backend, op, t)
    assert why is None, f"{backend} cannot run {op} on this GPU: {why}"


def _rand(shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEV)


def _close(ours, native, exact, dtype, what, floor=2e-3):
    ours, exact = ours.float(), exact.float()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, exact, atol=1e-4, rtol=1e-4, msg=what)
        return
    err = (ours - exact).abs().max().item() if ours.numel() else 0.0
    base = (native.float() - exact).abs().max().item() if ours.numel() else 0.0
    assert err <= 2 * base + floor, f"{what}: error {err:.3g} vs PyTorch's own {dtype} error {base:.3g}"


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)


def _native_attention(qkv, cu, scale, keep=None, p=0.0):
    """PyTorch's own attention in qkv's dtype, with the same dropout mask when given."""
    outs = []
    bounds = cu.tolist()
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[s:e].unbind(1)
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) * scale, dim=-1)
        if keep is not None:
            probs = probs * keep[b].to(probs.dtype) / (1 - p)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v))
    return torch.cat(outs)


LENGTHS = {"one": [1], "full_512": [512], "ragged": [3, 17, 64, 65, 130, 1, 0, 200]}


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
@pytest.mark.parametrize("case", list(LENGTHS))
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_attention_forward_backward(backend, dtype, head_dim, case, p):
    if head_dim == 256 and dtype != torch.float32:
        pytest.skip("head_dim 256 is covered in fp32")
    lengths = LENGTHS[case]
    cu, heads = _cu(lengths), 2
    qkv = _rand((sum(lengths), 3, heads, head_dim), dtype, scale=1.5)
    _require(backend, "attention_varlen", qkv)
    rng = dropout.new_rng_state() if p else None
    scale = 1.0 / math.sqrt(head_dim)
    grad_out = _rand((sum(lengths), heads, head_dim), dtype, seed=1)
    q = qkv.clone().requires_grad_()
    out = ops.attention_varlen(q, cu, max(lengths), scale, dropout_p=p, rng_state=rng, backend=backend)
    (grad,) = torch.autograd.grad(out, q, grad_out)
    q32 = qkv.double().requires_grad_()
    exact = reference.attention_varlen(q32, cu, max(lengths), scale, p, rng)
    (exact_grad,) = torch.autograd.grad(exact, q32, grad_out.double())
    keep = dropout.attention_dropout_masks(rng, p, heads, cu) if p else None
    qn = qkv.clone().requires_grad_()
    native = _native_attention(qn, cu, scale, keep, p)
    (native_grad,) = torch.autograd.grad(native, qn, grad_out)
    what = f"{backend} {dtype} d={head_dim} {case} p={p}"
    _close(out, native, exact, dtype, what + " out")
    _close(grad, native_grad, exact_grad, dtype, what + " grad", floor=5e-3)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_short_max_seqlen_and_strided_qkv(backend):
    lengths = [70, 5, 300]
    cu = _cu(lengths)
    wide = _rand((sum(lengths), 3, 4, 96), torch.bfloat16)
    qkv = wide[..., :64]  # strided: a slice of a wider projection
    _require(backend, "attention_varlen", qkv)
    out = ops.attention_varlen(qkv, cu, 16, backend=backend)  # max_seqlen below the longest sequence
    exact = reference.attention_varlen(qkv.float(), cu, 300)
    native = _native_attention(qkv, cu, 1 / 8)
    _close(out, native, exact, torch.bfloat16, f"{backend} short max_seqlen")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_attention_dropout_statistics_and_reproducibility(backend):
    lengths, heads, p = [128, 128], 4, 0.25
    cu = _cu(lengths)
    qkv = _rand((256, 3, heads, 64), torch.float32)
    rng = dropout.new_rng_state()
    a = ops.attention_varlen(qkv, cu, 128, dropout_p=p, rng_state=rng, backend=backend)
    b = ops.attention_varlen(qkv, cu, 128, dropout_p=p, rng_state=rng, backend=backend)
    assert torch.equal(a, b), "the same rng_state must give the same result"
    kept = torch.cat([m.flatten() for m in dropout.attention_dropout_masks(rng, p, heads, cu)]).float().mean().item()
    n = 2 * heads * 128 * 128
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_row_ops_forward_backward(backend, dtype):
    n, d = 300, 768
    x, r = _rand((n, d), dtype, 1), _rand((n, d), dtype, 2)
    b = _rand((d,), dtype, 3)
    w, beta = 1 + _rand((d,), torch.float32, 4, 0.1), _rand((d,), torch.float32, 5)
    for op in ("bias_gelu", "bias_residual_layer_norm", "bias_gelu_layer_norm"):
        _require(backend, op, x)
    cases = {
        "bias_gelu": (lambda x, b, r, w, beta: ops.bias_gelu(x, b, backend=backend),
                      lambda x, b, r, w, beta: reference.bias_gelu(x, b)),
        "bias_residual_layer_norm": (
            lambda x, b, r, w, beta: ops.bias_residual_layer_norm(x, b, r, w.to(dtype), beta.to(dtype), 1e-12,
                                                                  backend=backend),
            lambda x, b, r, w, beta: reference.bias_residual_layer_norm(x, b, r, w, beta, 1e-12)),
        "bias_gelu_layer_norm": (
            lambda x, b, r, w, beta: ops.bias_gelu_layer_norm(x, b, w.to(dtype), beta.to(dtype), 1e-12,
                                                              backend=backend),
            lambda x, b, r, w, beta: reference.bias_gelu_layer_norm(x, b, w, beta, 1e-12)),
    }
    g = _rand((n, d), dtype, 6)
    for name, (fn, ref) in cases.items():
        ins = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
        out = fn(*ins)
        grads = torch.autograd.grad(out, [t for t in ins], g, allow_unused=True)
        ins64 = [t.double().requires_grad_() for t in (x, b, r, w, beta)]
        exact = ref(*ins64)
        exact_grads = torch.autograd.grad(exact, ins64, g.double(), allow_unused=True)
        native_ins = [t.to(dtype).requires_grad_() for t in (x, b, r, w, beta)]
        native = ref(*native_ins)  # the reference computes in fp32: its own error is the rounding of the output
        _close(out, native, exact, dtype, f"{backend} {name} {dtype} out", floor=1e-2)
        for i, (gr, ge) in enumerate(zip(grads, exact_grads)):
            if ge is not None:
                assert gr is not None, f"{backend} {name}: no gradient for input {i}"
                tol = 1e-3 if dtype == torch.float32 else 0.1 * max(1.0, ge.abs().max().item())
                torch.testing.assert_close(gr.double(), ge, atol=tol, rtol=1e-2 if dtype != torch.float32 else 1e-4,
                                           msg=f"{backend} {name} {dtype} grad {i}")


def test_rows_round_trip():
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for i, n in enumerate([9, 1, 0, 5]):
        mask[i, :n] = True
    hidden = _rand((4, 9, 16), torch.bfloat16)
    packed, idx, cu, max_len = ops.unpad(hidden, mask.to(DEV))
    assert max_len == 9 and cu.tolist() == [0, 9, 10, 10, 15]
    back = ops.pad(packed, idx, 4, 9)
    assert torch.equal(back[mask.to(DEV)], hidden[mask.to(DEV)])
    assert not back[~mask.to(DEV)].any()
