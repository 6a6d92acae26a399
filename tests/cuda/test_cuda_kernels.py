"""The CUDA kernels (csrc/cuda/) against the pure-PyTorch references (mtbert_fast/ops/reference.py). GPU only: the
whole file is skipped where torch sees no CUDA device, or where mtbert_fast._C was built without its CUDA kernels.

Tolerances (DESIGN.md habit 7): fp32 within 1e-5 of the reference for the row kernels (1e-4 for the row-summed
weight gradients, growing like sqrt(rows) past 64 rows), 1e-4 for attention; fp16/bf16: the error against the fp32
reference is at most twice the error of PyTorch's own computation in that dtype on the same inputs, plus a small floor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mtbert_fast  # noqa: F401  (loads mtbert_fast._C, which registers the kernels)
from mtbert_fast import ops as mops
from mtbert_fast.ops import reference

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
            has = torch._C._dispatch_has_kernel_for_dispatch_key(f"mtbert_fast::{op}", "CUDA")
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
OPS = torch.ops.mtbert_fast
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


def test_gather_rows_bad_index_is_named():
    x = _make((6, 4), torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"indices\[2\] = 6 is out of range for x with 6 rows"):
        OPS.gather_rows(x, torch.tensor([0, 5, 6, -1], device=DEV))
    with pytest.raises(RuntimeError, match=r"indices\[0\] = -1 is out of range"):
        OPS.gather_rows(x, torch.tensor([-1], device=DEV))


def test_scatter_rows_bad_indices_are_named():
    x = _make((3, 4), torch.float32, 0)
    with pytest.raises(RuntimeError, match=r"indices\[1\] = 9 is out of range for num_rows = 5"):
        OPS.scatter_rows(x, torch.tensor([0, 9, 1], device=DEV), 5)
    with pytest.raises(RuntimeError, match=r"indices\[0\] and indices\[2\] are both 4"):
        OPS.scatter_rows(x, torch.tensor([4, 1, 4], device=DEV), 5)


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


def _native_attention(qkv, cu, scale):
    """PyTorch's own attention in qkv's dtype (scores, softmax and P V each rounded to it), as HF's eager runs it."""
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[s:e].unbind(1)
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(scores, dim=-1), v))
    return torch.cat(outs) if outs else qkv.new_zeros((0,) + qkv.shape[2:])


def _exact_lse(qkv, cu, scale):
    out = torch.empty(qkv.shape[2], qkv.shape[0], device=DEV)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[s:e].float().unbind(1)
        out[:, s:e] = torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * scale, dim=-1)
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
    grad = OPS.attention_varlen_backward(grad_out, qkv, out, lse, cu, max(seqlens), scale)

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
        "attention_varlen": (qkv, cu, 9, 0.25),
    }


@pytest.mark.parametrize("name", list(_opcheck_samples()))
def test_opcheck(name):
    args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _opcheck_samples()[name]]
    torch.library.opcheck(getattr(OPS, name), args)
