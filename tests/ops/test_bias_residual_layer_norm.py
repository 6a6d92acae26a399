"""bias_residual_layer_norm on every backend that runs here, forward and backward, against the reference; the
tests both LayerNorm ops take are in layer_norm_testing.py (the tolerances are stated there)."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import ops
from layer_norm_testing import (  # noqa: F401  (the shared tests and their fixture, collected here)
    EPS, test_constant_rows_normalize_to_beta, LayerNormOp, ln, test_autocast_param_grads_sum_in_fp32, test_bad_shapes_are_named,
    test_compile_non_contiguous_inputs, test_fp32_params_forward_and_backward, test_kernel_returns_param_grads_in_param_dtype,
    test_kernels, test_leading_dims_and_strides, test_same_dtype_params_unchanged_outside_autocast,
    test_forward_does_not_depend_on_threads, test_weight_grads_do_not_depend_on_threads, test_wrapper_autograd,
    test_wrong_param_dtypes_are_refused,
)
from op_testing import rand

OP_NAME = "bias_residual_layer_norm"
APPROXIMATE = ["none"]  # no GELU in this op


def test_autocast_casts_other_params_with_the_activations(backend):
    """Under autocast, weight and beta that are not both fp32 follow the activations into autocast's dtype (a mixed
    pair is then no error); their gradients come back in their own dtype through autocast's cast."""
    x, b, r, w, beta = LayerNormOp(OP_NAME).inputs((5, 16), torch.float32, device=backend.device)
    leaves = [x, b, r, w.half().requires_grad_(), beta.requires_grad_()]
    with torch.autocast(device_type=backend.device.type, dtype=torch.bfloat16):
        out = ops.bias_residual_layer_norm(*leaves, EPS, backend=backend.name)
    assert out.dtype == torch.bfloat16
    grad_w, grad_beta = torch.autograd.grad(out.float().sum(), leaves[3:])
    assert grad_w.dtype == torch.float16 and grad_beta.dtype == torch.float32


def test_residual_is_checked(backend):
    x, b, r, w, beta = LayerNormOp(OP_NAME).inputs((4, 8), torch.bfloat16, device=backend.device)
    with pytest.raises(TypeError, match="residual has dtype torch.float32 but x has torch.bfloat16"):
        ops.bias_residual_layer_norm(x, b, r.float(), w, beta, EPS, backend=backend.name)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 5\)"):
        ops.bias_residual_layer_norm(x, b, r[:, :5], w, beta, EPS, backend=backend.name)


def test_cpu_kernel_checks_name_the_op_and_tensor():
    """The C++ kernels check their own arguments too, naming the op and the tensor."""
    op = lambda *args: torch.ops.mtbert_fast.bias_residual_layer_norm(*args, "cpu")  # noqa: E731
    backward = lambda *args: torch.ops.mtbert_fast.bias_residual_layer_norm_backward(*args, "cpu")  # noqa: E731
    x, bias = rand(4, 8), rand(8)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: residual has shape"):
        op(x, bias, rand(5, 8), bias, bias, EPS)
    with pytest.raises(RuntimeError, match=r"bias_residual_layer_norm: weight.size\(0\) must be 8"):
        op(x, bias, x, rand(3), bias, EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm_backward: mean must be Float"):
        backward(x, x, bias, x, bias, torch.zeros(4).double(), torch.ones(4))
    xb, bb, wf = x.bfloat16(), bias.bfloat16(), bias
    mean, rstd = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: beta has dtype BFloat16 but weight has Float"):
        op(xb, bb, xb, wf, bb, EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: weight has dtype Half but x has BFloat16"):
        op(xb, bb, xb, wf.half(), wf.half(), EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: bias has dtype Float but x has BFloat16"):
        op(xb, bias, xb, wf, wf, EPS)
    with pytest.raises(RuntimeError, match="layer_norm_backward: weight has dtype Half but x has BFloat16"):
        backward(xb, xb, bb, xb, wf.half(), mean, rstd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_variance_past_the_fp32_range(dtype):
    """A row whose squared deviations overflow fp32 (|x - mean| past ~1e19): the CPU kernel takes that row's variance
    again in double, giving the LayerNorm of float64 math, where fp32 sums would give rstd 0 and every output beta."""
    x = torch.tensor([[1e20, 1.0, 2.0, -3.0], [4e30, -4e30, 0.0, 1.0], [0.5, 1.0, 2.0, -3.0]]).to(dtype)
    zero = torch.zeros(4, dtype=dtype)
    weight, beta = torch.full((4,), 2.0, dtype=dtype), torch.full((4,), 0.5, dtype=dtype)
    out = ops.bias_residual_layer_norm(x, zero, torch.zeros_like(x), weight, beta, EPS, backend="cpu")
    x64 = x.double()
    want = (x64 - x64.mean(1, keepdim=True)) / torch.sqrt(x64.var(1, unbiased=False, keepdim=True) + EPS) * 2.0 + 0.5
    torch.testing.assert_close(out.double(), want.to(dtype).double(), atol=1e-5 if dtype == torch.float32 else 2e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)
