"""C++ CPU kernels of bias_gelu, bias_residual_layer_norm, bias_gelu_layer_norm, gather_rows and scatter_rows
against the pure-PyTorch references (mtbert_fast/ops/reference.py).

Tolerances: fp32 within 1e-5 of the reference (1e-4 for the row-summed weight gradients);
bf16 error against an fp32 reference at most twice PyTorch's own bf16 error on the same computation, plus 1e-5.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from mtbert_fast.ops import reference

KERNEL_OPS = [
    "bias_gelu",
    "bias_gelu_backward",
    "bias_residual_layer_norm",
    "bias_residual_layer_norm_backward",
    "bias_gelu_layer_norm",
    "bias_gelu_layer_norm_backward",
    "gather_rows",
    "scatter_rows",
]

DTYPES = [torch.float32, torch.bfloat16]
DIMS = [1, 7, 31, 768, 1000]
ROWS = [0, 1, 5, 37]
GELUS = ["none", "tanh"]
EPS = 1e-5


@pytest.fixture(scope="module")
def ops(compiled_kernels):
    return compiled_kernels(KERNEL_OPS)


def _make(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_bf16_close(ours: torch.Tensor, torch_bf16: torch.Tensor, exact: torch.Tensor, what: str):
    """ours and torch_bf16 are bf16 results of the same computation; exact is its fp32 reference."""
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    err, base = _max_err(ours, exact), _max_err(torch_bf16, exact)
    assert err <= 2 * base + 1e-5, f"{what}: bf16 kernel error {err:.3g} vs PyTorch bf16 error {base:.3g}"


# ---- bias_gelu ----


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu(ops, dtype, D, N, approximate):
    x, bias, grad_out = _make((N, D), dtype, 0, 2.0), _make((D,), dtype, 1), _make((N, D), dtype, 2)
    out = ops.bias_gelu(x, bias, approximate)
    grad_x = ops.bias_gelu_backward(grad_out, x, bias, approximate)

    x32 = x.float().requires_grad_()
    exact = reference.bias_gelu(x32, bias.float(), approximate)
    (exact_grad,) = torch.autograd.grad(exact, x32, grad_out.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, exact, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_x, exact_grad, atol=1e-5, rtol=1e-5)
    else:
        xt = x.clone().requires_grad_()
        torch_out = F.gelu(xt + bias, approximate=approximate)
        (torch_grad,) = torch.autograd.grad(torch_out, xt, grad_out)
        _assert_bf16_close(out, torch_out, exact, "out")
        _assert_bf16_close(grad_x, torch_grad, exact_grad, "grad_x")


@pytest.mark.parametrize("approximate", GELUS)
def test_bias_gelu_special_values(ops, approximate):
    """Far tails against a float64 GELU; +inf stays inf (the limit) and NaN stays NaN."""
    x = torch.tensor([[-1e4, -30.0, -8.0, -1e-20, 0.0, 1e-20, 8.0, 30.0, 1e4, float("inf"), float("nan")]])
    out = ops.bias_gelu(x, torch.zeros(x.shape[1]), approximate)[0]
    torch.testing.assert_close(out[:9], F.gelu(x[0, :9].double(), approximate=approximate).float(), atol=1e-6, rtol=1e-6)
    assert out[9] == float("inf") and out[10].isnan()


# ---- LayerNorm ops ----


def _ln_exact(s: torch.Tensor):
    mean = s.mean(-1)
    rstd = torch.rsqrt((s - mean[..., None]).square().mean(-1) + EPS)
    return mean, rstd


def _rstd_tol(rstd: torch.Tensor, tol: float) -> float:
    """fp32 tolerance of the gradients that carry a factor rstd (input and weight): rstd reaches 1/sqrt(eps) on
    constant rows (D = 1), and the reference's rounding before that factor is amplified with it."""
    return tol * max(1.0, rstd.max().item()) if rstd.numel() else tol


@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_residual_layer_norm(ops, dtype, D, N):
    x, residual = _make((N, D), dtype, 0), _make((N, D), dtype, 1, 3.0)
    bias, weight, beta = _make((D,), dtype, 2), _make((D,), dtype, 3), _make((D,), dtype, 4)
    grad_out = _make((N, D), dtype, 5)
    out, mean, rstd = ops.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
    grad_s, grad_weight, grad_beta = ops.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd)

    leaves = [t.float().requires_grad_() for t in (x, weight, beta)]
    exact = reference.bias_residual_layer_norm(leaves[0], bias.float(), residual.float(), leaves[1], leaves[2], EPS)
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
    exact_mean, exact_rstd = _ln_exact(x.float() + bias.float() + residual.float())
    torch.testing.assert_close(mean, exact_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, exact_rstd, atol=1e-5, rtol=1e-5)
    ours = (out, grad_s, grad_weight, grad_beta)
    if dtype == torch.float32:
        for name, got, want, tol in zip(("out", "grad_s", "grad_weight", "grad_beta"), ours, (exact,) + exact_grads,
                                        (1e-5, _rstd_tol(rstd, 1e-5), _rstd_tol(rstd, 1e-4), 1e-4)):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    else:
        tleaves = [t.clone().requires_grad_() for t in (x, weight, beta)]
        torch_out = F.layer_norm(tleaves[0] + bias + residual, (D,), tleaves[1], tleaves[2], EPS)
        torch_grads = torch.autograd.grad(torch_out, tleaves, grad_out)
        for name, got, base, want in zip(("out", "grad_s", "grad_weight", "grad_beta"), ours,
                                         (torch_out,) + torch_grads, (exact,) + exact_grads):
            _assert_bf16_close(got, base, want, name)


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", ROWS)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_layer_norm(ops, dtype, D, N, approximate):
    x = _make((N, D), dtype, 0, 2.0)
    bias, weight, beta = _make((D,), dtype, 2), _make((D,), dtype, 3), _make((D,), dtype, 4)
    grad_out = _make((N, D), dtype, 5)
    out, mean, rstd = ops.bias_gelu_layer_norm(x, bias, weight, beta, EPS, approximate)
    grad_x, grad_weight, grad_beta = ops.bias_gelu_layer_norm_backward(grad_out, x, bias, weight, mean, rstd, approximate)

    leaves = [t.float().requires_grad_() for t in (x, weight, beta)]
    exact = reference.bias_gelu_layer_norm(leaves[0], bias.float(), leaves[1], leaves[2], EPS, approximate)
    exact_grads = torch.autograd.grad(exact, leaves, grad_out.float())
    exact_mean, exact_rstd = _ln_exact(F.gelu(x.float() + bias.float(), approximate=approximate))
    torch.testing.assert_close(mean, exact_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, exact_rstd, atol=1e-5, rtol=1e-5)
    ours = (out, grad_x, grad_weight, grad_beta)
    if dtype == torch.float32:
        for name, got, want, tol in zip(("out", "grad_x", "grad_weight", "grad_beta"), ours, (exact,) + exact_grads,
                                        (1e-5, _rstd_tol(rstd, 1e-5), _rstd_tol(rstd, 1e-4), 1e-4)):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")
    else:
        tleaves = [t.clone().requires_grad_() for t in (x, weight, beta)]
        torch_out = F.layer_norm(F.gelu(tleaves[0] + bias, approximate=approximate), (D,), tleaves[1], tleaves[2], EPS)
        torch_grads = torch.autograd.grad(torch_out, tleaves, grad_out)
        for name, got, base, want in zip(("out", "grad_x", "grad_weight", "grad_beta"), ours,
                                         (torch_out,) + torch_grads, (exact,) + exact_grads):
            _assert_bf16_close(got, base, want, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_leading_dims_and_strides(ops, dtype):
    """Inputs [2, 3, D] that are not contiguous: outputs keep the shape, statistics are per row of 6."""
    D = 40
    x = _make((D, 3, 2), dtype, 0).permute(2, 1, 0)
    residual = _make((2, D, 3), dtype, 1).transpose(1, 2)
    bias, weight, beta = _make((2 * D,), dtype, 2)[::2], _make((D,), dtype, 3), _make((D,), dtype, 4)
    assert not (x.is_contiguous() or residual.is_contiguous() or bias.is_contiguous())

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    out = ops.bias_gelu(x, bias, "none")
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference.bias_gelu(x.contiguous(), bias.contiguous()), atol=tol, rtol=tol)

    out, mean, rstd = ops.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
    assert out.shape == x.shape and mean.shape == (6,) and rstd.shape == (6,)
    want = reference.bias_residual_layer_norm(x.contiguous(), bias.contiguous(), residual.contiguous(), weight, beta, EPS)
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    grad_s, _, _ = ops.bias_residual_layer_norm_backward(out, x, bias, residual, weight, mean, rstd)
    assert grad_s.shape == x.shape

    out, mean, rstd = ops.bias_gelu_layer_norm(x, bias, weight, beta, EPS, "tanh")
    assert out.shape == x.shape and mean.shape == (6,)
    grad_x, grad_weight, grad_beta = ops.bias_gelu_layer_norm_backward(out, x, bias, weight, mean, rstd, "tanh")
    assert grad_x.shape == x.shape and grad_weight.shape == (D,) and grad_beta.dtype == dtype


def test_weight_grads_do_not_depend_on_threads(ops):
    """Row blocks are fixed, so the summed gradients are bitwise the same with 1 and 2 threads."""
    N, D = 300, 96
    x, residual, grad_out = _make((N, D), torch.float32, 0), _make((N, D), torch.float32, 1), _make((N, D), torch.float32, 2)
    bias, weight, beta = _make((D,), torch.float32, 3), _make((D,), torch.float32, 4), _make((D,), torch.float32, 5)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            _, mean, rstd = ops.bias_residual_layer_norm(x, bias, residual, weight, beta, EPS)
            results.append(ops.bias_residual_layer_norm_backward(grad_out, x, bias, residual, weight, mean, rstd))
            _, mean, rstd = ops.bias_gelu_layer_norm(x, bias, weight, beta, EPS, "none")
            results.append(ops.bias_gelu_layer_norm_backward(grad_out, x, bias, weight, mean, rstd, "none"))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[:2], results[2:]):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


# ---- input checks ----


def test_checks_name_the_op_and_tensor(ops):
    x, bias = torch.randn(4, 8), torch.randn(8)
    with pytest.raises(RuntimeError, match=r"bias_gelu: bias.size\(0\) must be 8"):
        ops.bias_gelu(x, torch.randn(7), "none")
    with pytest.raises(RuntimeError, match="bias_gelu: bias has dtype BFloat16"):
        ops.bias_gelu(x, bias.bfloat16(), "none")
    with pytest.raises(RuntimeError, match="bias_gelu: x must be float32 or bfloat16"):
        ops.bias_gelu(x.double(), bias.double(), "none")
    with pytest.raises(RuntimeError, match='approximate must be "none" or "tanh"'):
        ops.bias_gelu(x, bias, "sigmoid")
    with pytest.raises(RuntimeError, match="bias_gelu_backward: grad_out has shape"):
        ops.bias_gelu_backward(torch.randn(4, 9), x, bias, "none")
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: residual has shape"):
        ops.bias_residual_layer_norm(x, bias, torch.randn(5, 8), bias, bias, EPS)
    with pytest.raises(RuntimeError, match=r"bias_residual_layer_norm: weight.size\(0\) must be 8"):
        ops.bias_residual_layer_norm(x, bias, x, torch.randn(3), bias, EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm_backward: mean must be Float"):
        ops.bias_residual_layer_norm_backward(x, x, bias, x, bias, torch.zeros(4).double(), torch.ones(4))
    with pytest.raises(RuntimeError, match=r"bias_gelu_layer_norm_backward: rstd.size\(0\) must be 4"):
        ops.bias_gelu_layer_norm_backward(x, x, bias, bias, torch.zeros(4), torch.ones(3), "none")
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: beta has dtype BFloat16"):
        ops.bias_gelu_layer_norm(x, bias, bias, bias.bfloat16(), EPS, "none")


# ---- gather_rows / scatter_rows ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("N", [0, 1, 5, 37])
def test_gather_scatter_round_trip(ops, dtype, N):
    R = 40
    x = _make((R, 3, 5), torch.float32, 0, 4.0).to(dtype)
    indices = torch.randperm(R, generator=torch.Generator().manual_seed(1))[:N]
    gathered = ops.gather_rows(x, indices)
    assert torch.equal(gathered, reference.gather_rows(x, indices))
    scattered = ops.scatter_rows(gathered, indices, R)
    assert torch.equal(scattered, reference.scatter_rows(gathered, indices, R))
    keep = torch.zeros(R, dtype=torch.bool)
    keep[indices] = True
    assert torch.equal(scattered[keep], x[keep]) and not scattered[~keep].any()


def test_gather_scatter_shapes(ops):
    x = torch.arange(12.0).view(6, 2).t()  # [2, 6], not contiguous
    indices = torch.tensor([1, 1, 0])
    assert torch.equal(ops.gather_rows(x, indices), x[indices])
    assert torch.equal(ops.gather_rows(torch.arange(5), torch.tensor([4, 0])), torch.tensor([4, 0]))
    assert ops.scatter_rows(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 3).equal(torch.zeros(3, 4))


def test_gather_scatter_bad_indices(ops):
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"gather_rows: indices\[1\] = 5 is out of range for x with 5 rows"):
        ops.gather_rows(x, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match=r"gather_rows: indices\[0\] = -1 is out of range"):
        ops.gather_rows(x, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="gather_rows: indices must be Long"):
        ops.gather_rows(x, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"scatter_rows: indices\[2\] = 9 is out of range for num_rows = 6"):
        ops.scatter_rows(x[:3], torch.tensor([0, 1, 9]), 6)
    with pytest.raises(RuntimeError, match=r"indices must be distinct, but indices\[0\] and indices\[2\] are both 3"):
        ops.scatter_rows(x[:3], torch.tensor([3, 1, 3]), 6)
    with pytest.raises(RuntimeError, match=r"scatter_rows: indices.size\(0\) must be 5"):
        ops.scatter_rows(x, torch.tensor([0, 1]), 6)
