"""The int8 ops on every backend that runs here, against the reference: quantize_rows and the three products
(int8_linear, int8_linear_gelu_quantize, int8_linear_residual_layer_norm). All four have the same backends (a C++
kernel on the CPU), so the `backend` fixture of quantize_rows serves them all.

The int32 products are exact on every backend; what may differ is the fp32 epilogue's rounding order (1e-6
relative) and, in the requantized GELU output, a level where the kernel's GELU and PyTorch's differ in the last
bits right at a rounding boundary."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import rand

OP_NAME = "quantize_rows"
SHAPES = [(0, 8), (1, 1), (5, 7), (37, 31), (19, 768), (3, 1000)]


def _rows(n, k, dtype, seed=0):
    """Rows of every kind the quantization meets: mixed signs, all positive, all negative, all zero, one outlier."""
    x = rand(n, k, seed=seed, scale=2.0)
    if n >= 5:
        x[1] = x[1].abs()
        x[2] = -x[2].abs()
        x[3] = 0.0
        x[4, k // 2] = 60.0
    return x.to(dtype)


def _weights(m, k, seed=3):
    w = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    scale = rand(m, seed=seed + 1).abs() * 0.01 + 1e-3
    return w, scale, w.float().sum(1)


def _product_args(n, k, m, dtype):
    """(q, scale, zero, weight, weight_scale, weight_sum, bias): n quantized rows of k, a weight of m outputs."""
    q, scale, zero = reference.quantize_rows(_rows(n, k, torch.float32), torch.ones(k))
    return (q, scale, zero, *_weights(m, k), rand(m, seed=7, dtype=dtype))


def _assert_quantized_close(got, want, max_level_diff=0, what="q"):
    q, scale, zero = got
    rq, rscale, rzero = want
    torch.testing.assert_close(scale, rscale, rtol=1e-6, atol=0, msg=lambda m: f"{what} scale: {m}")
    assert (zero - rzero).abs().max().item() <= max_level_diff if zero.numel() else True, f"{what} zero"
    diff = (q.int() - rq.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= max_level_diff, f"{what}: levels differ by {diff.max().item()}"


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows(backend, dtype, shape):
    n, k = shape
    x = _rows(n, k, dtype)
    smooth = rand(k, seed=5).abs() + 0.5
    got = backend.forward(*backend.to(x, smooth))
    want = reference.quantize_rows(x, smooth)
    assert got[0].dtype == torch.int8 and got[1].dtype == got[2].dtype == torch.float32
    _assert_quantized_close(got, want)
    q, scale, zero = got
    if n:
        # dequantized within half a level of the input; a row of zeros comes back as zeros
        back = scale[:, None] * (q.float() - zero[:, None])
        assert ((back - x.float() * smooth).abs() <= scale[:, None] * 0.5 + 1e-6).all()
        assert q.min() >= -128 and q.max() <= 127
    if n >= 5:
        assert scale[3] == 0 and (scale[3] * (q[3].float() - zero[3]) == 0).all()
        # an all-positive row spends every level on [0, max]; an all-negative one on [min, 0]
        assert zero[1] == -128 and q[1].max() == 127
        assert zero[2] == 127 and q[2].min() == -128


# 1030 rows: more than one block of the kernels' int32 product (1024 rows)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (37, 64, 96), (130, 96, 40), (1030, 16, 24)])
def test_int8_linear(backend, dtype, shape):
    n, k, m = shape
    q, scale, zero, w, ws, wsum, bias = _product_args(n, k, m, dtype)
    args = backend.to(q, scale, zero, w, ws, wsum, bias)
    got = ops.int8_linear(*args, backend=backend.name)
    want = reference.int8_linear(q, scale, zero, w, ws, wsum, bias)
    assert got.dtype == dtype and got.shape == (n, m)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (6, 7, 33), (37, 64, 300), (130, 48, 96), (1030, 16, 24)])
def test_int8_linear_gelu_quantize(backend, dtype, shape, approximate):
    n, k, m = shape
    q, scale, zero, w, ws, wsum, bias = _product_args(n, k, m, dtype)
    smooth = rand(m, seed=8).abs() + 0.5
    args = backend.to(q, scale, zero, w, ws, wsum, bias, approximate, smooth)
    got = ops.int8_linear_gelu_quantize(*args, backend=backend.name)
    want = reference.int8_linear_gelu_quantize(q, scale, zero, w, ws, wsum, bias, approximate, smooth)
    _assert_quantized_close(got, want, max_level_diff=1, what="gelu output")
    levels = (got[0].int() != want[0].int()).float().mean().item()
    assert levels < 0.01, f"{levels:.2%} of the levels differ from the reference's"


@pytest.mark.parametrize("param_dtype", ["activation", "float32"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (6, 7, 33), (37, 64, 300), (130, 48, 96), (1030, 16, 24)])
def test_int8_linear_residual_layer_norm(backend, dtype, shape, param_dtype):
    n, k, m = shape
    q, scale, zero, w, ws, wsum, bias = _product_args(n, k, m, dtype)
    residual = rand(n, m, seed=9, dtype=dtype)
    pdtype = dtype if param_dtype == "activation" else torch.float32
    nw, nb = 1 + rand(m, seed=10, scale=0.1, dtype=pdtype), rand(m, seed=11, dtype=pdtype)
    args = backend.to(q, scale, zero, w, ws, wsum, bias, residual, nw, nb, 1e-12)
    got = ops.int8_linear_residual_layer_norm(*args, backend=backend.name)
    want = reference.int8_linear_residual_layer_norm(q, scale, zero, w, ws, wsum, bias, residual, nw, nb, 1e-12)
    assert got.dtype == dtype and got.shape == (n, m)
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)


def test_product_approximates_the_float_linear(backend):
    """quantize_rows then int8_linear, with weights quantized per output channel, is the float product within the
    quantization error."""
    x, weight, bias = rand(64, 96, seed=1), rand(48, 96, seed=2) * 0.05, rand(48, seed=3)
    wscale = weight.abs().amax(1) / 127
    w = torch.round(weight / wscale[:, None]).to(torch.int8)
    q = ops.quantize_rows(x, torch.ones(96), backend=backend.name)
    got = ops.int8_linear(*q, w, wscale, w.float().sum(1), bias, backend=backend.name)
    want = x @ weight.T + bias
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.02, rel


@pytest.mark.parametrize("case, error, match", [
    ("q float", TypeError, "q must be torch.int8"),
    ("weight k", ValueError, "weight has shape"),
    ("scale shape", ValueError, "scale has shape"),
    ("scale dtype", TypeError, "weight_scale must be torch.float32"),
    ("bias int", TypeError, "bias must be"),
])
def test_product_errors_name_the_problem(case, error, match):
    q, scale, zero = reference.quantize_rows(rand(4, 8), torch.ones(8))
    w, ws, wsum = _weights(3, 8)
    bias = rand(3)
    if case == "q float":
        q = q.float()
    elif case == "weight k":
        w = w[:, :5]
    elif case == "scale shape":
        scale = scale[:2]
    elif case == "scale dtype":
        ws = ws.double()
    elif case == "bias int":
        bias = bias.long()
    with pytest.raises(error, match=match):
        ops.int8_linear(q, scale, zero, w, ws, wsum, bias)


def test_quantize_rows_errors_name_the_problem():
    with pytest.raises(TypeError, match="x must be float32 or bfloat16"):
        ops.quantize_rows(rand(2, 4).double(), torch.ones(4))
    with pytest.raises(ValueError, match=r"smooth must be float32 of shape \(4,\)"):
        ops.quantize_rows(rand(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="K > 0"):
        ops.quantize_rows(rand(2, 0), torch.ones(0))
