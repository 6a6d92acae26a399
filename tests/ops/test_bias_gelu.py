"""bias_gelu on every backend that runs here, forward and backward, against the reference (op_testing.py states the
backends and tolerances: fp32 within 1e-5; bf16/fp16 at most twice PyTorch's own error, plus a small floor)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import _ext, ops
from mtbert_fast.ops import reference
from op_testing import assert_close, compare, rand

OP_NAME = "bias_gelu"
GELUS = ["none", "tanh"]


@pytest.mark.interpreter_cases(D=[1, 31, 1000], N=[0, 1, 37])
@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", [0, 1, 5, 37])
@pytest.mark.parametrize("D", [1, 7, 31, 768, 1000])
def test_kernels(backend, dtype, D, N, approximate):
    """The forward and backward kernels against the reference's output and autograd gradient."""
    x, bias, grad_out = backend.to(rand(N, D, scale=2.0, dtype=dtype), rand(D, seed=1, dtype=dtype),
                                   rand(N, D, seed=2, dtype=dtype))
    out = backend.forward(x, bias, approximate)
    grad_x = backend.backward(grad_out, x, bias, approximate)
    assert out.dtype == grad_x.dtype == dtype

    x32 = x.float().requires_grad_()
    exact = reference.bias_gelu(x32, bias.float(), approximate)
    (exact_grad,) = torch.autograd.grad(exact, x32, grad_out.float())
    xt = x.clone().requires_grad_()
    native = F.gelu(xt + bias, approximate=approximate)
    (native_grad,) = torch.autograd.grad(native, xt, grad_out)
    assert_close(out, exact, native, dtype, "out", floor=1e-5)
    assert_close(grad_x, exact_grad, native_grad, dtype, "grad_x", floor=1e-5)


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (37, 31), (7, 300), (3, 768), (2, 3, 1000), (0, 16)])
def test_wrapper_autograd(backend, dtype, shape, approximate):
    """ops.bias_gelu with backend= forced: the output and the gradients of x and bias through autograd."""
    x, b = backend.to(rand(*shape, seed=1, scale=2), rand(shape[-1], seed=2))
    compare(lambda x, b: ops.bias_gelu(x, b, approximate, backend=backend.name),
            lambda x, b: reference.bias_gelu(x, b, approximate),
            lambda x, b: F.gelu(x + b, approximate=approximate),
            [x, b], dtype, f"bias_gelu {approximate}", atol=2e-5, rtol=1e-4)


def test_cpu_bf16_output_is_the_fp32_result_rounded_to_nearest_even():
    """The CPU kernels' bf16 stores round as torch does, to nearest with ties to even (AVX512-BF16's own conversion
    where the CPU has it, ATen's rounding elsewhere): bias_gelu in bf16 is its fp32 result on the same values,
    rounded."""
    x, bias = rand(64, 1000, scale=2.0, dtype=torch.bfloat16), rand(1000, seed=1, dtype=torch.bfloat16)
    with torch.no_grad():
        out = ops.bias_gelu(x, bias, backend="cpu")
        want = ops.bias_gelu(x.float(), bias.float(), backend="cpu").to(torch.bfloat16)
    assert torch.equal(out, want)


@pytest.mark.parametrize("approximate", GELUS)
def test_special_values(backend, approximate):
    """Far tails against a float64 GELU; +inf stays inf (the limit) and NaN stays NaN."""
    x = torch.tensor([[-1e4, -30.0, -8.0, -1e-20, 0.0, 1e-20, 8.0, 30.0, 1e4, float("inf"), float("nan")]])
    x, zero = backend.to(x, torch.zeros(x.shape[1]))
    out = backend.forward(x, zero, approximate)[0]
    want = F.gelu(x[0, :9].double(), approximate=approximate).float()
    torch.testing.assert_close(out[:9], want, atol=1e-6, rtol=1e-6)
    assert out[9] == float("inf") and out[10].isnan()


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi from erfc, which keeps the lower tail that 1 + erf cancels (x float64)."""
    return 0.5 * torch.special.erfc(-x / 2**0.5)


def test_erf_form_past_the_tail_cap():
    """The CPU kernels' erf form around |x| = 12.5, past which they take Phi's tail (under 4e-36) as 0: within 1e-33
    or 3 % of an exact float64 GELU (x Phi(x) with Phi from erfc, which keeps the tail that 1 + erf cancels) and
    of its derivative (the erfc approximation's relative error this deep in the tail), past it exactly x and 1 above,
    exactly 0 below. Computed, the tail passes through subnormal numbers, whose microcode assists made a GELU pass
    over such inputs 10-20x slower."""
    x = torch.tensor([[-1e6, -30.0, -15.0, -13.1, -12.6, -12.4, -11.0, -8.0, 8.0, 11.0, 12.4, 12.6, 13.1, 15.0, 1e6]])
    zero = torch.zeros(x.shape[1])
    out = ops.bias_gelu(x, zero, backend="cpu")[0]
    leaf = x.clone().requires_grad_()
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(ops.bias_gelu(leaf, zero, backend="cpu").sum(), leaf)
    xd = x[0].double()
    cdf = _normal_cdf(xd)
    want, want_grad = xd * cdf, cdf + xd * torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(out, want.float(), atol=1e-33, rtol=3e-2)
    torch.testing.assert_close(grad[0], want_grad.float(), atol=1e-33, rtol=3e-2)
    past = x[0].abs() > 12.5
    above, below = past & (x[0] > 0), past & (x[0] < 0)
    assert torch.equal(out[above], x[0][above]) and (out[below] == 0).all()
    assert (grad[0][above] == 1).all() and (grad[0][below] == 0).all()


def test_erf_form_accuracy_on_a_dense_grid():
    """The CPU kernels' erf GELU on a grid of 400,001 points over [-8, 12] (and the boundary -8 and its
    neighbours) against a float64 GELU. On AVX-512 it comes from degree-6 polynomials for Phi over 32 intervals
    (csrc/include/phi_polynomials.h): within 5e-7 of GELU scaled by max(1, |x|) and 1e-6 relative where |GELU| > 1e-3;
    the erfc form (Abramowitz & Stegun 7.1.26) elsewhere: within 3e-7 scaled and 3e-4 relative. Both within 2 % in the
    far lower tail (GELU under 1e-3; the erfc form below -8 on AVX-512 too, 1 % off at -8)."""
    edge = torch.tensor([-8.0])
    x = torch.cat([torch.linspace(-8, 12, 400_001), edge, edge.nextafter(torch.tensor(0.0)),
                   edge.nextafter(torch.tensor(-9.0))])[None]
    out = ops.bias_gelu(x, torch.zeros(x.shape[1]), backend="cpu")[0].double()
    exact = x[0].double() * _normal_cdf(x[0].double())
    err = (out - exact).abs()
    polynomials = _ext.cpu_isa() == "avx512"
    scaled, relative = (5e-7, 1e-6) if polynomials else (3e-7, 3e-4)
    assert (err / x[0].double().abs().clamp_min(1)).max() <= scaled
    big = exact.abs() > 1e-3
    assert (err[big] / exact[big].abs()).max() <= relative
    tail = (exact != 0) & ~big
    assert (err[tail] / exact[tail].abs()).max() <= 2e-2


def test_erf_form_each_lane_on_its_own():
    """A value's GELU does not depend on its neighbours: on AVX-512 a vector of 16 with a lane below -8 (or NaN) takes
    the erfc form there and the polynomials in its other lanes, which give what they give where every lane is in
    range. Checked bit for bit, a row of 48 values with a far lane placed in each vector in turn. And the backward that
    recomputes the forward's GELU (bias_gelu_layer_norm's, for its LayerNorm) gets the same values: on rows of one
    value the forward normalizes each to exactly 0, so the norm weight's gradient is exactly 0 only if the recomputed
    values equal the forward's bit for bit (a difference of an ulp, times rstd = 1 / sqrt(eps), would show)."""
    base = torch.linspace(-7.9, 11.0, 48)[None]
    zero = torch.zeros(48)
    clean = ops.bias_gelu(base, zero, backend="cpu")[0]
    for lane in (0, 21, 47):
        for far in (-20.0, float("nan"), float("-inf")):
            x = base.clone()
            x[0, lane] = far
            out = ops.bias_gelu(x, zero, backend="cpu")[0]
            others = torch.arange(48) != lane
            assert torch.equal(out[others], clean[others]), (lane, far)
            assert out[lane].isnan() if far != -20.0 else out[lane] == 0
    column = torch.cat([base[0], torch.tensor([-20.0])])[:, None]
    weight = torch.ones(1, requires_grad=True)
    with torch.enable_grad():
        y = ops.bias_gelu_layer_norm(column, torch.zeros(1), weight, torch.zeros(1), 1e-5, "none", backend="cpu")
        (grad_weight,) = torch.autograd.grad(y.sum(), weight)
    assert grad_weight.item() == 0


def test_tanh_form_far_below_zero(backend):
    """The tanh form past x = -10, where its sigmoid is under 1e-35: 0 as PyTorch's (-0), never a value that grows with
    |x|, and the derivative 0 as PyTorch's, or NaN as PyTorch's where x^2 overflows fp32."""
    x = torch.tensor([[-3e38, -1e30, -1e20, -1e10, -1e4, -100.0, -20.0, -10.5]])
    x, zero = backend.to(x, torch.zeros(x.shape[1]))
    out = backend.forward(x, zero, "tanh")[0]
    leaf = x.detach().clone().requires_grad_()
    want = F.gelu(leaf, approximate="tanh")
    (want_grad,) = torch.autograd.grad(want.sum(), leaf)
    torch.testing.assert_close(out, want[0], atol=0, rtol=0)
    grad = backend.backward(torch.ones_like(x), x, zero, "tanh")[0]
    torch.testing.assert_close(grad, want_grad[0], atol=0, rtol=0, equal_nan=True)


def test_leading_dims_and_strides(backend, dtype):
    """x [2, 3, D] transposed and a strided bias: the output keeps x's shape, contiguous, the values of the
    contiguous copies; so does the gradient."""
    d = 40
    x, bias, grad = backend.to(rand(d, 3, 2, dtype=dtype).permute(2, 1, 0), rand(2 * d, seed=2, dtype=dtype)[::2],
                               rand(d, 2, 3, seed=3, dtype=dtype).permute(1, 2, 0))
    assert not (x.is_contiguous() or bias.is_contiguous() or grad.is_contiguous())
    out = backend.forward(x, bias, "none")
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, backend.forward(x.contiguous(), bias.contiguous(), "none"))
    grad_x = backend.backward(grad, x, bias, "tanh")
    assert grad_x.shape == x.shape
    assert torch.equal(grad_x, backend.backward(grad.contiguous(), x.contiguous(), bias.contiguous(), "tanh"))


def test_bad_input_is_named(backend):
    x, b = backend.to(rand(4, 6), rand(6))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        ops.bias_gelu(x, b[:5], backend=backend.name)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16"):
        ops.bias_gelu(x, b.bfloat16(), backend=backend.name)
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_gelu(x, b.to("meta"), backend=backend.name)
    with pytest.raises(ValueError, match="approximate must be"):
        ops.bias_gelu(x, b, "sigmoid", backend=backend.name)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.bias_gelu(x.long(), b.long(), backend=backend.name)


def test_cpu_kernel_checks_name_the_op_and_tensor():
    """The C++ kernels check their own arguments too, naming the op and the tensor."""
    op = lambda *args: torch.ops.mtbert_fast.bias_gelu(*args, "cpu")  # noqa: E731
    backward = lambda *args: torch.ops.mtbert_fast.bias_gelu_backward(*args, "cpu")  # noqa: E731
    x, bias = rand(4, 8), rand(8)
    with pytest.raises(RuntimeError, match=r"bias_gelu: bias.size\(0\) must be 8"):
        op(x, rand(7), "none")
    with pytest.raises(RuntimeError, match="bias_gelu: bias has dtype BFloat16"):
        op(x, bias.bfloat16(), "none")
    with pytest.raises(RuntimeError, match="bias_gelu: x must be float32 or bfloat16"):
        op(x.double(), bias.double(), "none")
    with pytest.raises(RuntimeError, match='approximate must be "none" or "tanh"'):
        op(x, bias, "sigmoid")
    with pytest.raises(RuntimeError, match="bias_gelu_backward: grad_out has shape"):
        backward(rand(4, 9), x, bias, "none")
