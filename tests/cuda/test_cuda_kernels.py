"""The CUDA kernels (csrc/cuda/) against the pure-PyTorch references (mtbert_fast/ops/reference.py). GPU only: the
whole file is skipped where torch sees no CUDA device, or where mtbert_fast._C was built without its CUDA kernels.

Tolerances: fp32 within 1e-5 of the reference for the row kernels (1e-4 for the row-summed
weight gradients, growing like sqrt(rows) past 64 rows), 1e-4 for attention; fp16/bf16: the error against the fp32
reference is at most twice the error of PyTorch's own computation in that dtype on the same inputs, plus a small floor.
With fp32 LayerNorm parameters beside fp16/bf16 activations, the outputs are the fp32 result rounded once (within two
units of the last place) and the fp32 parameter gradients are held to the fp32 tolerances.

A device assert leaves the process's CUDA context unusable, so the tests that trigger one (bad row indices) run in a
subprocess each, at the end of the file.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

import mtbert_fast  # noqa: F401  (loads mtbert_fast._C, which registers the kernels)
from mtbert_fast import ops as mops
from mtbert_fast.ops import dropout, reference

CUDA_OPS = [
    "attention_varlen",
    "attention_varlen_backward",
    "bias_gelu",
    "bias_gelu_backward",
    "bias_residual_layer_norm",
    "bias_residual_layer_norm_backward",
    "bias_gelu_layer_norm",
    "bias_gelu_layer_norm_backward",
    "gather_rows",
    "scatter_rows",
]


def _missing_kernels() -> list[str]:
    missing = []
    for op in CUDA_OPS:
        try:
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mtbert_fast_C::{op}", "CUDA")
        except RuntimeError:
            has = False
        if not has:
            missing.append(op)
    return missing


if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if _missing_kernels():
    pytest.skip(f"mtbert_fast._C has no CUDA kernel for {', '.join(_missing_kernels())}", allow_module_level=True)

DEV = torch.device("cuda")
KERNELS = torch.ops.mtbert_fast_C  # the build's tensor-less queries


class _CudaBackend:
    """torch.ops.mtbert_fast.<op>(..., backend="cuda"): each op's dispatcher op forced onto the CUDA kernels."""

    def __getattr__(self, name):
        op = getattr(torch.ops.mtbert_fast, name)
        return lambda *args: op(*args, backend="cuda")


OPS = _CudaBackend()
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
LOW = [torch.float16, torch.bfloat16]
GELUS = ["none", "tanh"]
EPS = 1e-5


def _make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEV)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close(ours, native, exact, dtype, what, atol=1e-5, floor=1e-5):
    """fp32: within atol (and as much relative) of exact. fp16/bf16: error at most twice `native`'s, plus floor."""
    assert ours.dtype == dtype and ours.shape == exact.shape, f"{what}: {ours.dtype} {ours.shape} vs {exact.shape}"
    if dtype == torch.float32:
        torch.testing.assert_close(ours, exact.float(), atol=atol, rtol=atol, msg=lambda m: f"{what}: {m}")
        return
    err, base = _max_err(ours, exact), _max_err(native, exact)
    assert err <= 2 * base + floor, f"{what}: {dtype} kernel error {err:.3g} vs PyTorch's own error {base:.3g}"


# ---- bias_gelu -------------------------------------------------------------------------------------------------

ROW_DIMS = [1, 7, 16, 31, 768, 1000, 4104, 8200]
ROW_COUNTS = [0, 1, 5, 37]


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", ROW_COUNTS)
@pytest.mark.parametrize("D", ROW_DIMS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_bias_gelu(dtype, D, N, approximate):
    x, bias, grad_out = _make((N, D), dtype, 0, 2.0), _make((D,), dtype, 1), _make((N, D), dtype, 2)
    out = OPS.bias_gelu(x, bias, approximate)
    grad_x = OPS.bias_gelu_backward(grad_out, x, bias, approximate)

    x32 = x.float().requires_grad_()
    exact = reference.bias_gelu(x32, bias.float(), approximate)
    (exact_grad,) = torch.autograd.grad(exact, x32, grad_out.float())
    xt = x.clone().requires_grad_()
    native = F.gelu(xt + bias, approximate=approximate)
    (native_grad,) = torch.autograd.grad(native, xt, grad_out)
    _assert_close(out, native, exact, dtype, "out")
    _assert_close(grad_x, native_grad, exact_grad, dtype, "grad_x")


@pytest.mark.parametrize("approximate", GELUS)
def test_bias_gelu_special_values(approximate):
    x = torch.tensor([[-1e4, -30.0, -8.0, -1e-20, 0.0, 1e-20, 8.0, 30.0, 1e4, float("inf"), float("nan")]], device=DEV)
    out = OPS.bias_gelu(x, torch.zeros(x.shape[1], device=DEV), approximate)[0]
    want = F.gelu(x[0, :9].double(), approximate=approximate).float()
    torch.testing.assert_close(out[:9], want, atol=1e-6, rtol=1e-6)
    assert out[9] == float("inf") and out[10].isnan()


def test_bias_gelu_unaligned_and_strided():
    """A view that starts off the 16-byte grid takes the scalar path; a non-contiguous x is read as its values."""
    base = _make((9, 65), torch.float16, 0)
    x = base[:, 1:]  # non-contiguous, 64 columns
    bias = _make((65,), torch.float16, 1)[1:]  # contiguous but 2 bytes off alignment
    out = OPS.bias_gelu(x, bias, "none")
    torch.testing.assert_close(out.float(), reference.bias_gelu(x.float(), bias.float()).float(), atol=2e-3, rtol=2e-3)


# ---- LayerNorm ops ---------------------------------------------------------------------------------------------


def _rstd_tol(rstd: torch.Tensor, tol: float) -> float:
    """fp32 tolerance of the gradients carrying a factor rstd, which reaches 1/sqrt(eps) on constant rows (D = 1)."""
    return tol * max(1.0, rstd.max().item()) if rstd.numel() else tol


def _check_ln(dtype, ours, natives, exacts, rstd, names):
    # grad_weight and grad_beta sum N rows: the fp32 rounding of both sides grows like sqrt(N)
    rows = 1e-4 * max(1.0, math.sqrt(rstd.numel() / 64))
    tols = (1e-5, _rstd_tol(rstd, 1e-5), _rstd_tol(rstd, rows), rows)
    for name, got, native, want, tol in zip(names, ours, natives, exacts, tols):
        _assert_close(got, native, want, dtype, name, atol=tol)


@pytest.mark.parametrize("N", ROW_COUNTS + [3000])
@pytest.mark.parametrize("D", ROW_DIMS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_bias_residual_layer_norm(dtype, D, N):
    x, residual = _make((N, D), dtype, 0), _make((N, D), dtype, 1, 3.0)
    bias, weight, beta = _make((D,), dtype, 2), _make((D,), dtype, 3), _make((D,), dtype, 4)
    grad_out = _make((N, D), dtype, 5)
    out, mean, rstd = OPS.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
    grads = OPS.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd)

    leaves = [t.float().requires_grad_() for t in (x, weight, beta)]
    exact = reference.bias_residual_layer_norm(leaves[0], bias.float(), residual.float(), leaves[1], leaves[2], EPS)
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
    s = x.float() + bias.float() + residual.float()
    torch.testing.assert_close(mean, s.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(s.var(-1, unbiased=False) + EPS), atol=1e-5, rtol=1e-5)
    tleaves = [t.clone().requires_grad_() for t in (x, weight, beta)]
    native = F.layer_norm(tleaves[0] + bias + residual, (D,), tleaves[1], tleaves[2], EPS)
    native_grads = torch.autograd.grad(native, tleaves, grad_out)
    _check_ln(dtype, (out,) + tuple(grads), (native,) + native_grads, (exact,) + exact_grads, rstd,
              ("out", "grad_s", "grad_weight", "grad_beta"))


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", ROW_COUNTS + [3000])
@pytest.mark.parametrize("D", ROW_DIMS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_bias_gelu_layer_norm(dtype, D, N, approximate):
    x, bias = _make((N, D), dtype, 0, 2.0), _make((D,), dtype, 1)
    weight, beta, grad_out = _make((D,), dtype, 2), _make((D,), dtype, 3), _make((N, D), dtype, 4)
    out, mean, rstd = OPS.bias_gelu_layer_norm(x, bias, weight, beta, EPS, approximate)
    grads = OPS.bias_gelu_layer_norm_backward(grad_out, x, bias, weight, mean, rstd, approximate)

    leaves = [t.float().requires_grad_() for t in (x, weight, beta)]
    exact = reference.bias_gelu_layer_norm(leaves[0], bias.float(), leaves[1], leaves[2], EPS, approximate)
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
    g = F.gelu(x.float() + bias.float(), approximate=approximate)
    torch.testing.assert_close(mean, g.mean(-1), atol=1e-5, rtol=1e-5)
    tleaves = [t.clone().requires_grad_() for t in (x, weight, beta)]
    native = F.layer_norm(F.gelu(tleaves[0] + bias, approximate=approximate), (D,), tleaves[1], tleaves[2], EPS)
    native_grads = torch.autograd.grad(native, tleaves, grad_out)
    _check_ln(dtype, (out,) + tuple(grads), (native,) + native_grads, (exact,) + exact_grads, rstd,
              ("out", "grad_x", "grad_weight", "grad_beta"))


@pytest.mark.parametrize("dtype", FLOATS)
def test_layer_norm_backward_is_deterministic(dtype):
    N, D = 5000, 768
    x, residual, bias = _make((N, D), dtype, 0), _make((N, D), dtype, 1), _make((D,), dtype, 2)
    weight, beta, grad_out = _make((D,), dtype, 3), _make((D,), dtype, 4), _make((N, D), dtype, 5)
    _, mean, rstd = OPS.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
    first = OPS.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd)
    for _ in range(3):
        again = OPS.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_layer_norm_leading_dims_and_strides():
    """x [..., D] of any rank, non-contiguous inputs: mean and rstd come back flat [rows]."""
    x = _make((2, 3, 40), torch.bfloat16, 0)[:, :, :32]
    r = _make((2, 3, 32), torch.bfloat16, 1)
    b, w, beta = (_make((32,), torch.bfloat16, s) for s in (2, 3, 4))
    out, mean, rstd = OPS.bias_residual_layer_norm(x, b, r, w, beta, EPS)
    assert out.shape == (2, 3, 32) and mean.shape == (6,) and rstd.shape == (6,)
    want = reference.bias_residual_layer_norm(x.float(), b.float(), r.float(), w.float(), beta.float(), EPS)
    torch.testing.assert_close(out.float(), want.float(), atol=3e-2, rtol=2e-2)


def _ln_run(op, x, bias, residual, weight, beta, grad_out):
    """(out, mean, rstd) and the backward's gradients of the input, weight and beta of bias_residual_layer_norm (residual given) or
    bias_gelu_layer_norm (residual None)."""
    if op == "bias_residual_layer_norm":
        out, mean, rstd = OPS.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
        grads = OPS.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd)
    else:
        out, mean, rstd = OPS.bias_gelu_layer_norm(x, bias, weight, beta, EPS, "none")
        grads = OPS.bias_gelu_layer_norm_backward(grad_out, x, bias, weight, mean, rstd, "none")
    return (out, mean, rstd), tuple(grads)[:3]


LN_OPS = ["bias_residual_layer_norm", "bias_gelu_layer_norm"]
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@pytest.mark.parametrize("op", LN_OPS)
@pytest.mark.parametrize("D", [31, 768, 1000, 4104])
@pytest.mark.parametrize("dtype", LOW)
def test_layer_norm_fp32_params(dtype, D, op):
    """fp16/bf16 x, bias, residual with fp32 weight and beta: out and the input gradient in x's dtype, rounded once from
    fp32; grad_weight and grad_beta fp32, as exact as with fp32 inputs. D = 31 takes the scalar kernels, 768 and 1000
    the vectorized ones (8 fp32 parameters beside 8 activations), 4104 the vectorized ones with two vectors per
    thread."""
    N = 37
    x, bias, residual = _make((N, D), dtype, 0, 2.0), _make((D,), dtype, 1), _make((N, D), dtype, 2, 3.0)
    weight, beta = _make((D,), torch.float32, 3), _make((D,), torch.float32, 4)
    grad_out = _make((N, D), dtype, 5)
    res = residual if op == "bias_residual_layer_norm" else None
    (out, mean, rstd), (grad_in, grad_weight, grad_beta) = _ln_run(op, x, bias, res, weight, beta, grad_out)
    assert out.dtype == dtype and grad_in.dtype == dtype
    assert grad_weight.dtype == torch.float32 and grad_beta.dtype == torch.float32

    leaves = [t.float().requires_grad_() for t in (x, weight, beta)]
    if op == "bias_residual_layer_norm":
        exact = reference.bias_residual_layer_norm(leaves[0], bias.float(), residual.float(), leaves[1], leaves[2], EPS)
    else:
        exact = reference.bias_gelu_layer_norm(leaves[0], bias.float(), leaves[1], leaves[2], EPS)
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
    u = UNIT_ROUNDOFF[dtype]
    tol = _rstd_tol(rstd, 1e-4)
    torch.testing.assert_close(out.float(), exact, atol=1e-4, rtol=2 * u, msg=lambda m: f"out: {m}")
    torch.testing.assert_close(grad_in.float(), exact_grads[0], atol=tol, rtol=2 * u, msg=lambda m: f"grad_in: {m}")
    rows = 1e-4 * max(1.0, math.sqrt(N / 64))
    torch.testing.assert_close(grad_weight, exact_grads[1], atol=_rstd_tol(rstd, rows), rtol=rows)
    torch.testing.assert_close(grad_beta, exact_grads[2], atol=rows, rtol=rows)

    # the same parameters in x's dtype give the same statistics (they do not depend on the parameters)
    (out_low, mean_low, rstd_low), _ = _ln_run(op, x, bias, res, weight.to(dtype), beta.to(dtype), grad_out)
    assert torch.equal(mean, mean_low) and torch.equal(rstd, rstd_low)


@pytest.mark.parametrize("op", LN_OPS)
@pytest.mark.parametrize("dtype", LOW)
def test_layer_norm_fp32_param_grads_beyond_fp16_range(dtype, op):
    """grad_beta sums grad_out over 70000 rows: past fp16's largest value (65504), exact in fp32."""
    N, D = 70000, 64
    x, bias, residual = _make((N, D), dtype, 0), _make((D,), dtype, 1), _make((N, D), dtype, 2)
    weight = torch.ones(D, device=DEV)
    beta = torch.zeros(D, device=DEV)
    grad_out = torch.ones(N, D, dtype=dtype, device=DEV)
    res = residual if op == "bias_residual_layer_norm" else None
    (_, mean, rstd), (_, grad_weight, grad_beta) = _ln_run(op, x, bias, res, weight, beta, grad_out)
    assert grad_beta.dtype == torch.float32 and grad_weight.dtype == torch.float32
    assert torch.equal(grad_beta, torch.full((D,), float(N), device=DEV))
    if op == "bias_residual_layer_norm":
        s = x.double() + bias.double() + residual.double()
    else:
        s = F.gelu(x.float() + bias.float()).double()
    xhat = (s - mean.double()[:, None]) * rstd.double()[:, None]
    torch.testing.assert_close(grad_weight.double(), xhat.sum(0), atol=2e-2, rtol=1e-4)


@pytest.mark.parametrize("op", LN_OPS)
def test_layer_norm_param_dtypes_refused(op):
    x, bias, residual = (_make((4, 32), torch.float16, s) for s in (0, 1, 2))
    res = residual if op == "bias_residual_layer_norm" else None
    half, f32, f64, bf16 = (_make((32,), dt, 3) for dt in (torch.float16, torch.float32, torch.float64, torch.bfloat16))
    for weight, beta, name in [(f64, f64, "weight"), (bf16, bf16, "weight"), (half, f32, "beta"), (f32, half, "beta")]:
        with pytest.raises(RuntimeError, match=rf"{op}: {name} has dtype"):
            _ln_run(op, x, bias, res, weight, beta, x)
    with pytest.raises(RuntimeError, match=rf"{op}: bias has dtype"):
        _ln_run(op, x, f32, res, f32, f32, x)


# ---- gather_rows / scatter_rows -----------------------------------------------------------------------------------

ROW_CASES = [  # (dtype, row shape): rows of 1 byte up to 16-byte multiples, odd sizes between
    (torch.int64, ()),
    (torch.bool, ()),
    (torch.uint8, (3,)),
    (torch.int8, (5, 3)),
    (torch.float16, (7,)),
    (torch.bfloat16, (768,)),
    (torch.float32, (12, 64)),
    (torch.int32, (6,)),
]


def _rows(dtype, shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return (torch.rand((n,) + shape, generator=g) > 0.5).to(DEV)
    if not dtype.is_floating_point:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, (n,) + shape, generator=g).to(dtype).to(DEV)
    return torch.randn((n,) + shape, generator=g).to(dtype).to(DEV)


@pytest.mark.parametrize("dtype,shape", ROW_CASES)
@pytest.mark.parametrize("R,N", [(0, 0), (1, 1), (10, 25), (300, 1000)])
def test_gather_rows(dtype, shape, R, N):
    x = _rows(dtype, shape, R, 0)
    idx = torch.randint(0, max(R, 1), (N,), generator=torch.Generator().manual_seed(1)).to(DEV)
    out = OPS.gather_rows(x, idx)
    assert out.dtype == dtype and out.shape == (N,) + shape
    assert torch.equal(out, reference.gather_rows(x, idx))


@pytest.mark.parametrize("dtype,shape", ROW_CASES)
@pytest.mark.parametrize("N,num_rows", [(0, 0), (0, 7), (1, 1), (25, 40), (1000, 4096)])
def test_scatter_rows(dtype, shape, N, num_rows):
    x = _rows(dtype, shape, N, 0)
    idx = torch.randperm(num_rows, generator=torch.Generator().manual_seed(1))[:N].to(DEV)
    out = OPS.scatter_rows(x, idx, num_rows)
    assert out.dtype == dtype and out.shape == (num_rows,) + shape
    assert torch.equal(out, reference.scatter_rows(x, idx, num_rows))


def test_rows_unaligned_view():
    base = _make((50, 33), torch.float16, 0)
    x = base[:, 1:]  # 64-byte rows, 2 bytes off the 16-byte grid
    idx = torch.tensor([3, 0, 49, 3], device=DEV)
    assert torch.equal(OPS.gather_rows(x, idx), x[idx])
    assert torch.equal(OPS.scatter_rows(x[:4], torch.tensor([9, 1, 2, 0], device=DEV), 10)[9], x[0])


def test_scatter_rows_repeated_indices_keep_one_row():
    """Without MTBERT_FAST_DEBUG_CHECKS=1 a repeated index is not reported (that would need a readback): one of its
    rows wins."""
    if os.environ.get("MTBERT_FAST_DEBUG_CHECKS") == "1":
        pytest.skip("MTBERT_FAST_DEBUG_CHECKS=1 reports repeated indices")
    x = _make((3, 4), torch.float32, 0)
    out = OPS.scatter_rows(x, torch.tensor([4, 1, 4], device=DEV), 5)
    assert torch.equal(out[1], x[1]) and (torch.equal(out[4], x[0]) or torch.equal(out[4], x[2]))
    assert not out[[0, 2, 3]].any()


def _no_debug_checks():
    if os.environ.get("MTBERT_FAST_DEBUG_CHECKS") == "1":
        pytest.skip("MTBERT_FAST_DEBUG_CHECKS=1 reads values back on purpose")


def test_rows_never_synchronize():
    """gather_rows and scatter_rows launch and return: no readback of indices or flags (sync debug mode "error"
    raises on any synchronising call)."""
    _no_debug_checks()
    x = _make((50, 16), torch.float16, 0)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(1))[:30].to(DEV)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gathered = OPS.gather_rows(x, idx)
        scattered = OPS.scatter_rows(gathered, idx, 50)
        through_wrappers = mops.scatter_rows(mops.gather_rows(x, idx, backend="cuda"), idx, 50, backend="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(gathered, x[idx])
    assert torch.equal(scattered, reference.scatter_rows(x[idx], idx, 50))
    assert torch.equal(through_wrappers, scattered)


# ---- attention_varlen ------------------------------------------------------------------------------------------

SEQLENS = {
    "one_token": [1],
    "full_512": [512],
    "ragged": [3, 17, 64, 65, 130, 1],
    "empty_sequences": [0, 5, 0, 33],
    "many_short": [2, 9, 4, 31, 16, 7, 1, 63, 12, 40],
}
HEAD_DIMS = [32, 64, 80, 128]


def _packed(seqlens, heads, head_dim, dtype, seed=0, scale=1.0):
    T = sum(seqlens)
    cu = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    return _make((T, 3, heads, head_dim), dtype, seed, scale), cu


def _position_terms(length, rel_bias, window, device):
    """[heads or 1, L, L] fp32: rel_bias[h, clamp(j - i, -R, R) + R] (0 without a table), -inf outside the window."""
    pos = torch.arange(length, device=device)
    rel = pos[None, :] - pos[:, None]  # j - i
    if rel_bias is None:
        terms = torch.zeros((1, length, length), device=device)
    else:
        r = (rel_bias.shape[1] - 1) // 2
        terms = rel_bias[:, rel.clamp(-r, r) + r]
    return terms.masked_fill(rel.abs() > window, float("-inf")) if window >= 0 else terms


def _table_terms(start, length, tables):
    """[heads, L, L] in the tables' dtype: pos_q[h, start + i, c] + pos_k[h, start + j, c] with
    c = pos_index[clamp(j - i, -P, P) + P], for tables = (pos_q, pos_k, pos_index), either table None."""
    pos_q, pos_k, pos_index = tables
    pos = torch.arange(length, device=pos_index.device)
    p = (pos_index.shape[0] - 1) // 2
    column = pos_index.long()[(pos[None, :] - pos[:, None]).clamp(-p, p) + p]  # [L, L]: c(i, j)
    terms = 0
    if pos_q is not None:
        rows = pos_q[:, start:start + length]
        terms = terms + torch.gather(rows, 2, column.expand(rows.shape[0], -1, -1))
    if pos_k is not None:
        rows = pos_k[:, start:start + length]
        terms = terms + torch.gather(rows, 2, column.t().expand(rows.shape[0], -1, -1)).transpose(1, 2)
    return terms


def _native_attention(qkv, cu, scale, dropout_p=0.0, rng_state=None, rel_bias=None, window=-1, tables=None):
    """PyTorch's own attention in qkv's dtype (scores, softmax and P V each rounded to it), as HF's eager runs it;
    with dropout_p > 0 the probabilities take the mask of mtbert_fast.ops.dropout (the kernels' mask); the position
    terms (tables: (pos_q, pos_k, pos_index) or None) are added to the scores in qkv's dtype."""
    outs = []
    bounds = cu.tolist()
    masks = dropout.attention_dropout_masks(rng_state, dropout_p, qkv.shape[2], cu.cpu()) if dropout_p else None
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[s:e].unbind(1)
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        if tables is not None:
            scores = scores + _table_terms(s, e - s, tables)
        if rel_bias is not None or window >= 0:
            scores = scores + _position_terms(e - s, rel_bias, window, qkv.device).to(scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        if masks is not None:
            probs = probs * masks[b].to(qkv.device) / (1.0 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", probs, v))
    return torch.cat(outs) if outs else qkv.new_zeros((0,) + qkv.shape[2:])


def _exact_lse(qkv, cu, scale, rel_bias=None, window=-1, tables=None):
    out = torch.empty(qkv.shape[2], qkv.shape[0], device=DEV)
    if tables is not None:
        tables = tuple(t.float() if t is not None and t.is_floating_point() else t for t in tables)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[s:e].float().unbind(1)
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale + _position_terms(e - s, rel_bias, window, DEV)
        if tables is not None:
            scores = scores + _table_terms(s, e - s, tables)
        out[:, s:e] = torch.logsumexp(scores, dim=-1)
    return out


def _check_attention_forward(qkv, cu, max_seqlen, dtype):
    scale = 1.0 / math.sqrt(qkv.shape[-1])
    out, lse = OPS.attention_varlen(qkv, cu, max_seqlen, scale)
    exact = reference.attention_varlen(qkv.float(), cu, max_seqlen, scale)
    _assert_close(out, _native_attention(qkv, cu, scale), exact, dtype, "out", atol=1e-4, floor=1e-3)
    assert lse.dtype == torch.float32 and lse.shape == (qkv.shape[2], qkv.shape[0])
    torch.testing.assert_close(lse, _exact_lse(qkv, cu, scale), atol=1e-4 if dtype == torch.float32 else 2e-3,
                               rtol=1e-4)


@pytest.mark.parametrize("case", list(SEQLENS))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_varlen(dtype, head_dim, case):
    seqlens = SEQLENS[case]
    qkv, cu = _packed(seqlens, 3, head_dim, dtype, scale=1.5)
    _check_attention_forward(qkv, cu, max(seqlens), dtype)


@pytest.mark.parametrize("head_dim", [1, 16, 36, 40, 96, 100, 160, 256])
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_varlen_other_head_dims(dtype, head_dim):
    """Padded tensor-core tiles (36, 40, 100: d % 8 != 0 reads element by element) and the CUDA-core path (> 128)."""
    qkv, cu = _packed(SEQLENS["ragged"], 2, head_dim, dtype)
    _check_attention_forward(qkv, cu, 130, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_varlen_strided_qkv(dtype):
    """qkv as a view of a wider projection (rows longer than 3 * heads * head_dim, unit stride in head_dim)."""
    seqlens = [7, 70, 129]
    wide = _make((sum(seqlens), 3, 4, 72), dtype, 0)
    qkv = wide[..., :64]
    cu = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    _check_attention_forward(qkv, cu, 129, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_varlen_short_max_seqlen(dtype):
    """A max_seqlen below the longest sequence only shrinks the grid: every row is still computed."""
    qkv, cu = _packed([300, 5], 2, 64, dtype)
    _check_attention_forward(qkv, cu, 1, dtype)


@pytest.mark.parametrize("case", ["one_token", "ragged", "empty_sequences", "full_512"])
@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 160])
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_varlen_backward(dtype, head_dim, case):
    seqlens = SEQLENS[case]
    if case == "full_512" and head_dim not in (64, 128):
        pytest.skip("one long sequence per head dim class is enough")
    qkv, cu = _packed(seqlens, 2, head_dim, dtype)
    grad_out = _make((qkv.shape[0], 2, head_dim), dtype, 7)
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = OPS.attention_varlen(qkv, cu, max(seqlens), scale)
    grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(seqlens), scale)

    q32 = qkv.float().requires_grad_()
    (exact,) = torch.autograd.grad(reference.attention_varlen(q32, cu, max(seqlens), scale), q32, grad_out.float())
    qn = qkv.clone().requires_grad_()
    (native,) = torch.autograd.grad(_native_attention(qn, cu, scale), qn, grad_out)
    _assert_close(grad, native, exact, dtype, "grad_qkv", atol=1e-4, floor=2e-3)


def test_attention_varlen_autograd_through_wrapper():
    """The public op with backend='cuda': forward and backward both on the CUDA kernels."""
    qkv, cu = _packed(SEQLENS["ragged"], 4, 64, torch.float32)
    qkv.requires_grad_()
    out = mops.attention_varlen(qkv, cu, 130, backend="cuda")
    out.square().sum().backward()
    q32 = qkv.detach().clone().requires_grad_()
    reference.attention_varlen(q32, cu, 130).square().sum().backward()
    torch.testing.assert_close(qkv.grad, q32.grad, atol=1e-4, rtol=1e-4)


# ---- attention dropout -------------------------------------------------------------------------------------------

DROPOUT_P = 0.25
DROPOUT_SEQLENS = [1, 37, 512, 5, 64, 130]  # ragged, starts at every residue mod 4 (the Philox groups of four keys)


def _rng_state(seed=20240917, offset=3):
    return torch.tensor([seed, offset], dtype=torch.int64)


def _dropout_cases():
    cases = [(dtype, hd) for dtype in FLOATS for hd in HEAD_DIMS]
    return cases + [(torch.float32, 256)]


@pytest.mark.parametrize("dtype,head_dim", _dropout_cases())
def test_attention_dropout_forward_and_backward(dtype, head_dim):
    """Forward and backward with dropout against the reference drawing the same mask from the same rng_state; lse is
    the undropped one. fp16/bf16 with head_dim <= 128 run the tensor-core forward, the rest the CUDA-core one."""
    seqlens = DROPOUT_SEQLENS
    qkv, cu = _packed(seqlens, 2, head_dim, dtype)
    rng = _rng_state()
    scale = 1.0 / math.sqrt(head_dim)
    out, lse = OPS.attention_varlen(qkv, cu, max(seqlens), scale, DROPOUT_P, rng)
    q32 = qkv.float().requires_grad_()
    exact = reference.attention_varlen(q32, cu, max(seqlens), scale, DROPOUT_P, rng)
    qn = qkv.clone().requires_grad_()
    native = _native_attention(qn, cu, scale, DROPOUT_P, rng)
    _assert_close(out, native.detach(), exact.detach(), dtype, "out", atol=1e-4, floor=1e-3)
    torch.testing.assert_close(lse, _exact_lse(qkv, cu, scale), atol=1e-4 if dtype == torch.float32 else 2e-3,
                               rtol=1e-4)

    grad_out = _make((qkv.shape[0], 2, head_dim), dtype, 7)
    grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(seqlens), scale, DROPOUT_P, rng)
    (exact_grad,) = torch.autograd.grad(exact, q32, grad_out.float())
    (native_grad,) = torch.autograd.grad(native, qn, grad_out)
    _assert_close(grad, native_grad, exact_grad, dtype, "grad_qkv", atol=1e-4, floor=2e-3)


def _one_hot_case(dtype, head_dim, seqlens):
    """Small Q and K (near-uniform probabilities, none close to 0) and V whose key row j of each sequence is the unit
    vector e_j: out[i, h, j] = P_ij M_ij, so out is nonzero exactly where the mask keeps."""
    heads = 2
    qkv, cu = _packed(seqlens, heads, head_dim, dtype, scale=0.05)
    bounds = cu.tolist()
    qkv[:, 2] = 0
    for s, e in zip(bounds[:-1], bounds[1:]):
        qkv[s:e, 2] = torch.eye(e - s, head_dim, dtype=dtype, device=DEV)[:, None, :]
    return qkv, cu, bounds


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.float16, 64), (torch.bfloat16, 64),
                                            (torch.float16, 160), (torch.bfloat16, 32)])
def test_attention_dropout_mask_is_the_reference_mask(dtype, head_dim):
    """P o M revealed through a one-hot V (forward: which probabilities met V) and a one-hot dO (dK/dV kernel:
    dV_j[i] = P_ij M_ij): both equal the reference's mask element for element."""
    seqlens = [22, 1, 31, 3, 30, 17]  # <= 32: every key has a column of V; starts at every residue mod 4
    qkv, cu, bounds = _one_hot_case(dtype, head_dim, seqlens)
    rng = _rng_state(seed=987654321987, offset=11)
    masks = dropout.attention_dropout_masks(rng, DROPOUT_P, 2, cu.cpu())
    out, lse = OPS.attention_varlen(qkv, cu, max(seqlens), 1.0, DROPOUT_P, rng)
    grad_out = torch.zeros_like(out)
    for s, e in zip(bounds[:-1], bounds[1:]):
        grad_out[s:e] = torch.eye(e - s, head_dim, dtype=dtype, device=DEV)[:, None, :]
    grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(seqlens), 1.0, DROPOUT_P, rng)
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        keep = masks[b].to(DEV)  # [heads, L, L]: query i, key j
        L = e - s
        seen = out[s:e, :, :L].permute(1, 0, 2) != 0  # [heads, i, j]
        assert torch.equal(seen, keep), f"forward mask of sequence {b} (rows {s}:{e})"
        assert not out[s:e, :, L:].any()
        dv = grad[s:e, 2, :, :L].permute(1, 2, 0) != 0  # grad_v[j, h, i] -> [heads, i, j]
        assert torch.equal(dv, keep), f"backward mask of sequence {b} (rows {s}:{e})"
    assert 0.6 < torch.cat([m.flatten() for m in masks]).float().mean().item() < 0.9  # the mask drops ~25%


@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_dropout_short_max_seqlen(dtype):
    """max_seqlen below the longest sequence, with dropout: every row computed, the same mask."""
    qkv, cu = _packed([300, 5], 2, 64, dtype)
    rng = _rng_state(seed=5)
    scale = 0.125
    out, lse = OPS.attention_varlen(qkv, cu, 1, scale, DROPOUT_P, rng)
    full, full_lse = OPS.attention_varlen(qkv, cu, 300, scale, DROPOUT_P, rng)
    assert torch.equal(out, full) and torch.equal(lse, full_lse)
    exact = reference.attention_varlen(qkv.float(), cu, 300, scale, DROPOUT_P, rng)
    _assert_close(out, _native_attention(qkv, cu, scale, DROPOUT_P, rng), exact, dtype, "out", atol=1e-4, floor=1e-3)
    grad_out = _make((qkv.shape[0], 2, 64), dtype, 3)
    short_grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, 1, scale, DROPOUT_P, rng)
    full_grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, 300, scale, DROPOUT_P, rng)
    assert torch.equal(short_grad, full_grad)


def test_attention_dropout_is_a_function_of_rng_state():
    qkv, cu = _packed([40, 70], 2, 64, torch.float16)
    a = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.5, _rng_state(seed=1, offset=0))[0]
    b = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.5, _rng_state(seed=1, offset=0))[0]
    c = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.5, _rng_state(seed=1, offset=1))[0]
    d = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.5, _rng_state(seed=2, offset=0))[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    # dropout_p = 0 ignores rng_state and equals the call without it
    e = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.0, _rng_state())[0]
    assert torch.equal(e, OPS.attention_varlen(qkv, cu, 70, 0.125)[0])


def test_attention_dropout_arguments_checked():
    qkv, cu = _packed([4, 6], 2, 32, torch.float16)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        OPS.attention_varlen(qkv, cu, 6, 0.2, 1.0, _rng_state())
    with pytest.raises(RuntimeError, match="needs rng_state"):
        OPS.attention_varlen(qkv, cu, 6, 0.2, 0.1, None)
    with pytest.raises(RuntimeError, match="rng_state must be an int64 CPU tensor"):
        OPS.attention_varlen(qkv, cu, 6, 0.2, 0.1, _rng_state().to(DEV))


# ---- attention position terms ------------------------------------------------------------------------------------

POSITION_SEQLENS = [300, 1, 70, 129]  # many tiles of every kernel, a lone token, bands that start inside tiles
POSITION_CASES = [  # window, dropout_p, R of the rel_bias table
    (-1, 0.0, 100),  # the table alone, clamped at both ends of the long sequences
    (37, 0.0, 300),  # a table wider than the dQ kernel sums in shared memory (its gradient goes to global atomics)
    (37, DROPOUT_P, 100),
    (0, 0.0, 2),  # every query sees itself only: whole tiles masked for some rows
]


@pytest.mark.parametrize("head_dim", [64, 80, 128, 160])
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_position_terms(dtype, head_dim):
    """The rel_bias table and the window on every kernel path (the tensor-core forward for fp16/bf16 up to head_dim
    128, the CUDA-core one otherwise, both backward kernels) over sequences of many tiles, with grad_rel_bias summed
    over many blocks."""
    qkv, cu = _packed(POSITION_SEQLENS, 2, head_dim, dtype)
    grad_out = _make((qkv.shape[0], 2, head_dim), dtype, 7)
    scale = 1.0 / math.sqrt(head_dim)
    max_len = max(POSITION_SEQLENS)
    for window, p, r in POSITION_CASES:
        what = f"window={window} p={p} R={r}"
        table = _make((2, 2 * r + 1), torch.float32, 9, scale=2.0).contiguous()
        rng = _rng_state() if p else None
        out, lse = OPS.attention_varlen(qkv, cu, max_len, scale, p, rng, table, window)
        grad, grad_bias, *_ = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max_len, scale, p, rng, table,
                                                        window)
        q32, b32 = qkv.float().requires_grad_(), table.clone().requires_grad_()
        exact = reference.attention_varlen(q32, cu, max_len, scale, p, rng, b32, window)
        exact_grad, exact_grad_bias = torch.autograd.grad(exact, (q32, b32), grad_out.float())
        qn, bn = qkv.clone().requires_grad_(), table.clone().requires_grad_()
        native = _native_attention(qn, cu, scale, p, rng, bn, window)
        native_grad, native_grad_bias = torch.autograd.grad(native, (qn, bn), grad_out)
        _assert_close(out, native.detach(), exact.detach(), dtype, f"out {what}", atol=1e-4, floor=1e-3)
        torch.testing.assert_close(lse, _exact_lse(qkv, cu, scale, table, window), rtol=1e-4,
                                   atol=1e-4 if dtype == torch.float32 else 2e-3, msg=lambda m: f"lse {what}: {m}")
        _assert_close(grad, native_grad, exact_grad, dtype, f"grad_qkv {what}", atol=1e-4, floor=2e-3)
        assert grad_bias.dtype == torch.float32 and grad_bias.shape == table.shape, what
        if dtype == torch.float32:  # each entry sums dS over up to T pairs
            torch.testing.assert_close(grad_bias, exact_grad_bias, atol=1e-5 * max_len, rtol=1e-4,
                                       msg=lambda m: f"grad_rel_bias {what}: {m}")
        else:
            err, base = _max_err(grad_bias, exact_grad_bias), _max_err(native_grad_bias, exact_grad_bias)
            assert err <= 2 * base + 1e-3, f"grad_rel_bias {what}: {dtype} error {err:.3g} vs PyTorch's own {base:.3g}"


# ---- attention per-token position terms (DeBERTa's disentangled attention) ----------------------------------------

TABLE_SEQLENS = [300, 1, 70, 129, 5]  # many tiles of every kernel, a lone token, rows past the last tile's end
TABLE_CASES = [  # which tables, P, W, R of a rel_bias table (None: none), window, dropout_p
    ("qk", 6, 9, None, -1, 0.0),  # P far below the lengths: most pairs land in the two end columns
    ("q", 320, 400, None, -1, 0.0),  # P past every length: no distance clamped by P
    ("k", 40, 17, None, -1, 0.0),  # many distances per column (DeBERTa's log buckets)
    ("qk", 100, 64, 30, 37, DROPOUT_P),  # with a rel_bias table, a window and dropout
]


def _pos_index(p, width, seed):
    """pos_index int32 [2P+1] on the GPU: the distance's column, clamped at the table's ends, with a seeded shuffle of
    some entries, so that the columns are neither monotone nor all used."""
    index = torch.arange(-p, p + 1).clamp(-(width // 2), width - width // 2 - 1) + width // 2
    g = torch.Generator().manual_seed(seed)
    swap = torch.randperm(2 * p + 1, generator=g)[: p // 2]
    index[swap] = torch.randint(0, width, (swap.numel(),), generator=g)
    return index.to(torch.int32).to(DEV)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_token_position_tables(dtype, head_dim):
    """pos_q and pos_k on every kernel path (the tensor-core forward for fp16/bf16, the CUDA-core one for fp32, both
    backward kernels), alone, together and with a rel_bias table, a window and dropout: out, lse and the four
    gradients against the reference, the tables' gradients in their dtype and zero in the columns no pair reaches."""
    heads = 2
    qkv, cu = _packed(TABLE_SEQLENS, heads, head_dim, dtype)
    tokens = qkv.shape[0]
    grad_out = _make((tokens, heads, head_dim), dtype, 7)
    scale = 1.0 / math.sqrt(head_dim)
    max_len = max(TABLE_SEQLENS)
    for which, p, width, r, window, drop in TABLE_CASES:
        what = f"tables={which} P={p} W={width} R={r} window={window} p={drop}"
        pos_q = _make((heads, tokens, width), dtype, 11, scale=2.0) if "q" in which else None
        pos_k = _make((heads, tokens, width), dtype, 12, scale=2.0) if "k" in which else None
        index = _pos_index(p, width, seed=13)
        rel_bias = None if r is None else _make((heads, 2 * r + 1), torch.float32, 9)
        rng = _rng_state() if drop else None
        out, lse = OPS.attention_varlen(qkv, cu, max_len, scale, drop, rng, rel_bias, window, pos_q, pos_k, index)
        grads = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max_len, scale, drop, rng, rel_bias, window,
                                              pos_q, pos_k, index)

        given = (qkv, rel_bias, pos_q, pos_k)
        leaves = [t.detach().float().clone().requires_grad_() if t is not None else None for t in given]
        exact = reference.attention_varlen(leaves[0], cu, max_len, scale, drop, rng, leaves[1], window, leaves[2],
                                           leaves[3], index)
        exact_grads = iter(torch.autograd.grad(exact, [t for t in leaves if t is not None], grad_out.float()))
        exact_grads = [next(exact_grads) if t is not None else None for t in leaves]
        natives = [t.detach().clone().requires_grad_() if t is not None else None for t in given]
        native = _native_attention(natives[0], cu, scale, drop, rng, natives[1], window,
                                   (natives[2], natives[3], index))
        native_grads = iter(torch.autograd.grad(native, [t for t in natives if t is not None], grad_out))
        native_grads = [next(native_grads) if t is not None else None for t in natives]

        _assert_close(out, native.detach(), exact.detach(), dtype, f"out {what}", atol=1e-4, floor=1e-3)
        torch.testing.assert_close(lse, _exact_lse(qkv, cu, scale, rel_bias, window, (pos_q, pos_k, index)),
                                   rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 2e-3,
                                   msg=lambda m: f"lse {what}: {m}")
        _assert_close(grads[0], native_grads[0], exact_grads[0], dtype, f"grad_qkv {what}", atol=1e-4, floor=2e-3)
        unused = ~torch.isin(torch.arange(width, device=DEV), index)  # columns that no distance maps to
        for name, got, want, base, table in zip(("rel_bias", "pos_q", "pos_k"), grads[1:], exact_grads[1:],
                                                native_grads[1:], given[1:]):
            if table is None:
                assert got.shape == (0,), f"grad_{name} {what}"
                continue
            assert got.shape == table.shape and got.dtype == table.dtype, f"grad_{name} {what}"
            if name != "rel_bias":
                assert not got[..., unused].any(), f"grad_{name} {what}: nonzero where no pair lands"
            # each entry sums dS over up to a sequence's length (pos_q, pos_k) or T (rel_bias) pairs
            if dtype == torch.float32:
                torch.testing.assert_close(got, want, atol=1e-5 * max_len, rtol=1e-4,
                                           msg=lambda m: f"grad_{name} {what}: {m}")
            else:
                err, base_err = _max_err(got, want), _max_err(base, want)
                assert err <= 2 * base_err + 1e-3, f"grad_{name} {what}: {dtype} error {err:.3g} vs {base_err:.3g}"


def test_attention_token_position_arguments_checked():
    """The kernels' own checks name pos_q, pos_k and pos_index (the ops are callable without the wrapper)."""
    qkv, cu = _packed([4, 6], 2, 32, torch.float16)
    out, lse = OPS.attention_varlen(qkv, cu, 6, 0.2)
    table = _make((2, 10, 5), torch.float16, 1)
    index = torch.tensor([0, 1, 2, 3, 4], dtype=torch.int32, device=DEV)
    bad = [
        ((table.cpu(), None, index), "pos_q is on cpu"),
        ((None, table.float(), index), "pos_k has dtype Float but qkv has Half"),
        ((table[:, :9].contiguous(), None, index), r"pos_q must be \[heads, T, W\] = \[2, 10, W\]"),
        ((table[:1], None, index), r"pos_q must be \[heads, T, W\]"),
        ((table[0], None, index), r"pos_q must be \[heads, T, W\]"),
        ((table, table[..., :4].contiguous(), index), r"pos_k must be \[heads, T, W\].* the same for pos_q and pos_k"),
        ((_make((2, 5, 10), torch.float16, 1).transpose(1, 2), None, index), "pos_q must be contiguous"),
        ((table, None, None), "pos_q needs pos_index"),
        ((None, table, None), "pos_k needs pos_index"),
        ((None, None, index), "pos_index given without pos_q or pos_k"),
        ((table, None, index.cpu()), "pos_index is on cpu"),
        ((table, None, index.long()), "pos_index must be a 1-D int32 tensor of odd length 2P\\+1"),
        ((table, None, index[:4]), "pos_index must be a 1-D int32 tensor of odd length 2P\\+1"),
        ((table, None, index[None]), "pos_index must be a 1-D int32 tensor"),
    ]
    for args, match in bad:
        with pytest.raises(RuntimeError, match=match):
            OPS.attention_varlen(qkv, cu, 6, 0.2, 0.0, None, None, -1, *args)
        with pytest.raises(RuntimeError, match=match):
            OPS.attention_varlen_backward(out, qkv, out, lse, cu, 6, 0.2, 0.0, None, None, -1, *args)


def test_attention_position_arguments_checked():
    """The kernels' own checks name rel_bias and window (the ops are callable without the wrapper)."""
    qkv, cu = _packed([4, 6], 2, 32, torch.float16)
    table = _make((2, 7), torch.float32, 1)
    out, lse = OPS.attention_varlen(qkv, cu, 6, 0.2)
    bad = [
        (table.cpu(), "rel_bias is on cpu"),
        (table.double(), "rel_bias must be float32"),
        (table[:, :6].contiguous(), r"rel_bias must be \[heads, 2R\+1\] = \[2, odd\]"),
        (table[:1], r"rel_bias must be \[heads, 2R\+1\]"),
        (_make((7, 2), torch.float32, 1).t(), "rel_bias must be contiguous"),
    ]
    for t, match in bad:
        with pytest.raises(RuntimeError, match=match):
            OPS.attention_varlen(qkv, cu, 6, 0.2, 0.0, None, t, -1)
        with pytest.raises(RuntimeError, match=match):
            OPS.attention_varlen_backward(out, qkv, out, lse, cu, 6, 0.2, 0.0, None, t, -1)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        OPS.attention_varlen(qkv, cu, 6, 0.2, 0.0, None, None, -2)


def test_attention_varlen_empty_batches():
    """cu_seqlens = [0] with T > 0 is refused, naming cu_seqlens; T = 0 gives empty tensors whatever B is."""
    qkv, _ = _packed([3, 4], 2, 32, torch.float16)
    zero = torch.zeros(1, dtype=torch.int32, device=DEV)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        OPS.attention_varlen(qkv, zero, 4, 0.2)
    out = torch.zeros(7, 2, 32, dtype=torch.float16, device=DEV)
    lse = torch.zeros(2, 7, device=DEV)
    with pytest.raises(RuntimeError, match="cu_seqlens"):
        OPS.attention_varlen_backward(out, qkv, out, lse, zero, 4, 0.2)
    empty = torch.zeros(0, 3, 2, 32, dtype=torch.float16, device=DEV)
    for cu in (zero, torch.zeros(3, dtype=torch.int32, device=DEV)):
        for p, rng in ((0.0, None), (0.1, _rng_state())):
            o, lse_ = OPS.attention_varlen(empty, cu, 0, 0.2, p, rng)
            assert o.shape == (0, 2, 32) and lse_.shape == (2, 0)
            g, *_ = OPS.attention_varlen_backward(o, empty, o, lse_, cu, 0, 0.2, p, rng)
            assert g.shape == (0, 3, 2, 32)


# ---- the wrappers, autograd and opcheck on CUDA ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
def test_wrappers_autograd(dtype):
    x, r = _make((37, 768), dtype, 0).requires_grad_(), _make((37, 768), dtype, 1).requires_grad_()
    b, w, beta = (_make((768,), dtype, s).requires_grad_() for s in (2, 3, 4))
    h = mops.bias_gelu(x, b, backend="cuda")
    y = mops.bias_residual_layer_norm(h, b, r, w, beta, backend="cuda")
    z = mops.bias_gelu_layer_norm(y, b, w, beta, backend="cuda")
    z.float().square().sum().backward()
    leaves = [t.detach().float().requires_grad_() for t in (x, r, b, w, beta)]
    xf, rf, bf, wf, betaf = leaves
    hf = reference.bias_gelu(xf, bf)
    yf = reference.bias_residual_layer_norm(hf, bf, rf, wf, betaf, 1e-12)
    reference.bias_gelu_layer_norm(yf, bf, wf, betaf, 1e-12).square().sum().backward()
    tol = 1e-3 if dtype == torch.float32 else 0.15
    for name, got, want in zip("x r b w beta".split(), (x, r, b, w, beta), leaves):
        scale = want.grad.abs().max().item() + 1.0
        assert _max_err(got.grad.float(), want.grad) <= tol * scale, name


def _opcheck_samples():
    x, r, b = _make((5, 24), torch.float32, 0), _make((5, 24), torch.float32, 1), _make((24,), torch.float32, 2)
    w, beta = _make((24,), torch.float32, 3), _make((24,), torch.float32, 4)
    qkv, cu = _packed([3, 9], 2, 32, torch.float32)
    return {
        "bias_gelu": (x, b, "tanh"),
        "bias_residual_layer_norm": (x, b, r, w, beta, EPS),
        "bias_gelu_layer_norm": (x, b, w, beta, EPS, "none"),
        "gather_rows": (x, torch.tensor([4, 0, 0, 2], device=DEV)),
        "scatter_rows": (x, torch.tensor([6, 0, 3, 2, 1], device=DEV), 8),
        # every argument spelled out: the trailing backend is positional
        "attention_varlen": (qkv, cu, 9, 0.25, 0.0, None, _make((2, 9), torch.float32, 5), 3),
    }


@pytest.mark.parametrize("name", list(_opcheck_samples()))
def test_opcheck(name):
    args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _opcheck_samples()[name]]
    torch.library.opcheck(getattr(torch.ops.mtbert_fast, name), (*args, "cuda"))


# ---- non-contiguous inputs ---------------------------------------------------------------------------------------


def test_non_contiguous_inputs_equal_contiguous():
    """Transposed and sliced inputs give exactly what their contiguous copies give, for every op."""
    N, D = 40, 64
    xt = _make((D, N), torch.float16, 0).t()  # [N, D], transposed
    rs = _make((N, D + 8), torch.float16, 1)[:, 4:4 + D]  # [N, D], sliced rows
    gt = _make((D, N), torch.float16, 2).t()
    bias = _make((D,), torch.float16, 3)
    weight, beta = _make((D,), torch.float32, 4), _make((D,), torch.float32, 5)
    assert not (xt.is_contiguous() or rs.is_contiguous() or gt.is_contiguous())

    def flat(t):
        return [u for x in t for u in flat(x)] if isinstance(t, (tuple, list)) else [t]

    def same(a, b, what):
        a, b = flat(a), flat(b)
        assert len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b)), what

    c = [t.contiguous() for t in (xt, rs, gt)]
    same(OPS.bias_gelu(xt, bias, "none"), OPS.bias_gelu(c[0], bias, "none"), "bias_gelu")
    same(OPS.bias_gelu_backward(gt, xt, bias, "tanh"), OPS.bias_gelu_backward(c[2], c[0], bias, "tanh"),
         "bias_gelu_backward")
    for op in LN_OPS:
        res, res_c = (rs, c[1]) if op == "bias_residual_layer_norm" else (None, None)
        same(_ln_run(op, xt, bias, res, weight, beta, gt), _ln_run(op, c[0], bias, res_c, weight, beta, c[2]), op)

    idx = torch.tensor([5, 0, 39, 7, 7, 12, 1, 30], device=DEV)[::2]  # non-contiguous indices
    same(OPS.gather_rows(xt, idx), OPS.gather_rows(c[0], idx.contiguous()), "gather_rows")
    same(OPS.scatter_rows(xt[:4], idx, N), OPS.scatter_rows(c[0][:4], idx.contiguous(), N), "scatter_rows")

    seqlens = [30, 1, 66]
    T = sum(seqlens)
    cu = torch.tensor([0] + seqlens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEV)
    for dtype in FLOATS:
        permuted = _make((3, T, 2, 64), dtype, 6).permute(1, 0, 2, 3)  # [T, 3, heads, d], T's stride 128
        transposed = _make((T, 3, 64, 2), dtype, 7).transpose(2, 3)  # head_dim not unit-stride
        grad_out = _make((T, 64, 2), dtype, 8).transpose(1, 2)
        for qkv in (permuted, transposed):
            assert not qkv.is_contiguous()
            for p, rng in ((0.0, None), (DROPOUT_P, _rng_state())):
                got = OPS.attention_varlen(qkv, cu, 66, 0.125, p, rng)
                want = OPS.attention_varlen(qkv.contiguous(), cu, 66, 0.125, p, rng)
                same(got, want, f"attention_varlen {dtype} {tuple(qkv.stride())}")
                same(OPS.attention_varlen_backward(grad_out, qkv, got[0], got[1], cu, 66, 0.125, p, rng),
                     OPS.attention_varlen_backward(grad_out.contiguous(), qkv.contiguous(), want[0], want[1], cu, 66,
                                                   0.125, p, rng),
                     f"attention_varlen_backward {dtype} {tuple(qkv.stride())}")


# ---- no host synchronisation in a model forward ------------------------------------------------------------------


def test_model_forward_never_synchronizes(monkeypatch):
    """A whole FastBertModel forward on the CUDA kernels under sync debug mode "error": no op reads a device value
    back. The encoder's own inherent synchronisations (input validation, and unpad: torch.nonzero and int(max)) run
    once before, and the forward in the "error" region reuses their results."""
    _no_debug_checks()
    from mtbert_fast.models import EncoderConfig, FastBertModel
    from mtbert_fast.models import encoder as enc

    config = EncoderConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128)
    model = FastBertModel(config, dtype=torch.float16, device=DEV, backend="cuda").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (3, 20), generator=g).to(DEV)
    mask = torch.ones(3, 20, dtype=torch.int64)
    mask[0, 13:] = 0
    mask[2, 1:] = 0
    mask = mask.to(DEV)
    want = model(ids, mask)

    shape = enc.validate_inputs(config, model.device, ids, mask, None, None, None)
    unpadded = enc.unpad_indices(mask)
    packed = enc.PackedBatch(*unpadded, batch=shape[0], seqlen=shape[1])
    positions = enc.packed_positions(config, ids, None, packed)
    monkeypatch.setattr(enc, "validate_inputs", lambda *args: shape)
    monkeypatch.setattr(enc, "unpad_indices", lambda attention_mask: unpadded)
    monkeypatch.setattr(enc, "packed_positions", lambda *args: positions)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = model(ids, mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.last_hidden_state.shape == (3, 20, 64) and torch.isfinite(got.last_hidden_state).all()
    assert not got.last_hidden_state[mask == 0].any()
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype", FLOATS)
def test_attention_dropout_never_synchronizes(dtype):
    """The dropout forward (the public op and the kernel's op) and backward read nothing back: rng_state is a CPU
    tensor, read on the host."""
    qkv, cu = _packed([7, 70, 1], 2, 64, dtype)
    grad_out = _make((78, 2, 64), dtype, 1)
    rng = _rng_state()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = mops.attention_varlen(qkv, cu, 70, dropout_p=0.1, rng_state=rng, backend="cuda")
        o, lse = OPS.attention_varlen(qkv, cu, 70, 0.125, 0.1, rng)
        grad, *_ = OPS.attention_varlen_backward(grad_out, qkv, o, lse, cu, 70, 0.125, 0.1, rng)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert out.shape == o.shape and torch.isfinite(out).all() and torch.isfinite(grad).all()


# ---- the build's tensor-less ops ---------------------------------------------------------------------------------


def test_cuda_archs_and_attention_shared_bytes():
    """cuda_archs() names the archs of the build, which include one that runs here; the attention launches fit this
    GPU's shared memory at every head dim up to 256."""
    from mtbert_fast import _ext
    from mtbert_fast.ops import dispatch

    names = KERNELS.cuda_archs().split()
    assert names and all(re.fullmatch(r"(sm|compute)_\d+[af]?", n) for n in names), names
    sass, ptx = _ext.cuda_archs()
    assert dispatch.runs_on(sass, ptx, torch.cuda.get_device_capability(DEV)), names
    optin = torch.cuda.get_device_properties(DEV).shared_memory_per_block_optin
    for dtype in FLOATS:
        sizes = [KERNELS.cuda_attention_shared_bytes(hd, dtype) for hd in (1, 32, 64, 80, 96, 128, 160, 256)]
        assert all(0 < n <= optin for n in sizes), (dtype, sizes, optin)
        assert sizes == sorted(sizes), (dtype, sizes)
    with pytest.raises(RuntimeError, match="head_dim"):
        KERNELS.cuda_attention_shared_bytes(257, torch.float16)


# ---- device asserts, each in a fresh process ---------------------------------------------------------------------


def _run_python(code: str, **env: str) -> tuple[int, str]:
    """Runs `code` in a fresh interpreter (a device assert would leave this one's CUDA context unusable) and returns
    its exit status and stdout + stderr (device printf and assert messages go to the process's stdout)."""
    full_env = {k: v for k, v in os.environ.items() if k != "MTBERT_FAST_DEBUG_CHECKS"}
    full_env.update(env, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, capture_output=True, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


_BAD_INDEX = """
    import sys
    import torch
    import mtbert_fast  # noqa: F401
    x = torch.randn(6, 4, device="cuda")
    try:
        {call}
        torch.cuda.synchronize()
    except RuntimeError as exc:
        print("RAISED:", str(exc).splitlines()[0], flush=True)
    else:
        print("NO ERROR", flush=True)
"""


@pytest.mark.parametrize("call,message", [
    ("torch.ops.mtbert_fast.gather_rows(x, torch.tensor([0, 5, 6, 1], device='cuda'), backend='cuda')",
     r"gather_rows: indices\[2\] = 6 is out of range for x with 6 rows"),
    ("torch.ops.mtbert_fast.scatter_rows(x[:3], torch.tensor([0, 9, 1], device='cuda'), 5, backend='cuda')",
     r"scatter_rows: indices\[1\] = 9 is out of range for num_rows = 5"),
], ids=["gather_rows", "scatter_rows"])
def test_bad_row_index_is_a_device_assert(call, message):
    """An index out of range stops the kernel with a device assert that names the op (the assert's text), and the
    kernel prints the position and the index just before."""
    _, out = _run_python(_BAD_INDEX.format(call=call))
    assert "RAISED:" in out and "device-side assert" in out, out[-3000:]
    op = call.split("(")[0].rsplit(".", 1)[1]
    assert re.search(rf"{op}: an index of indices is out of range", out) or re.search(message, out), out[-3000:]
    if not re.search(message, out):
        warnings.warn(f"{op}: the device printf naming the index did not reach the output: {out[-2000:]}")


def test_scatter_rows_repeated_indices_with_debug_checks():
    """MTBERT_FAST_DEBUG_CHECKS=1: repeated scatter_rows indices are read back and reported by position."""
    code = """
        import torch
        import mtbert_fast  # noqa: F401
        x = torch.randn(3, 4, device="cuda")
        try:
            torch.ops.mtbert_fast.scatter_rows(x, torch.tensor([4, 1, 4], device="cuda"), 5, backend="cuda")
        except RuntimeError as exc:
            print("RAISED:", str(exc).splitlines()[0], flush=True)
        else:
            print("NO ERROR", flush=True)
        out = torch.ops.mtbert_fast.scatter_rows(x, torch.tensor([4, 1, 0], device="cuda"), 5, backend="cuda")
        print("DISTINCT OK" if torch.equal(out[[4, 1, 0]], x) else "DISTINCT WRONG", flush=True)
    """
    status, out = _run_python(code, MTBERT_FAST_DEBUG_CHECKS="1")
    assert status == 0, out[-3000:]
    assert re.search(r"RAISED: scatter_rows: indices must be distinct, but indices\[0\] and indices\[2\] are both 4",
                     out), out[-3000:]
    assert "DISTINCT OK" in out, out[-3000:]
