"""bias_gelu_layer_norm on every backend that runs here, forward and backward, against the reference; the tests
both LayerNorm ops take are in layer_norm_testing.py (the tolerances are stated there)."""

from __future__ import annotations

import pytest
import torch

from layer_norm_testing import (  # noqa: F401  (the shared tests and their fixture, collected here)
    EPS, test_constant_rows_normalize_to_beta, ln, test_autocast_param_grads_sum_in_fp32, test_bad_shapes_are_named, test_compile_non_contiguous_inputs,
    test_fp32_params_forward_and_backward, test_kernel_returns_param_grads_in_param_dtype, test_kernels,
    test_leading_dims_and_strides, test_same_dtype_params_unchanged_outside_autocast,
    test_forward_does_not_depend_on_threads, test_weight_grads_do_not_depend_on_threads, test_wrapper_autograd,
    test_wrong_param_dtypes_are_refused,
)
from mtbert_fast import ops
from op_testing import rand

OP_NAME = "bias_gelu_layer_norm"
APPROXIMATE = ["none", "tanh"]


def test_bad_approximate_is_named(backend):
    x, b = backend.to(rand(4, 8), rand(8))
    with pytest.raises(ValueError, match="bias_gelu_layer_norm: approximate must be 'none' .* got 'sigmoid'"):
        ops.bias_gelu_layer_norm(x, b, b, b, EPS, "sigmoid", backend=backend.name)


def test_cpu_kernel_checks_name_the_op_and_tensor():
    """The C++ kernels check their own arguments too, naming the op and the tensor."""
    op = lambda *args: torch.ops.mtbert_fast.bias_gelu_layer_norm(*args, "cpu")  # noqa: E731
    backward = lambda *args: torch.ops.mtbert_fast.bias_gelu_layer_norm_backward(*args, "cpu")  # noqa: E731
    x, bias = rand(4, 8), rand(8)
    with pytest.raises(RuntimeError, match=r"bias_gelu_layer_norm_backward: rstd.size\(0\) must be 4"):
        backward(x, x, bias, bias, torch.zeros(4), torch.ones(3), "none")
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: beta has dtype BFloat16"):
        op(x, bias, bias, bias.bfloat16(), EPS, "none")
    xb, bb = x.bfloat16(), bias.bfloat16()
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: beta has dtype Half but weight has Float"):
        op(xb, bb, bias, bias.half(), EPS, "none")
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: weight has dtype BFloat16 but x has Float"):
        op(x, bias, bb, bb, EPS, "none")
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm_backward: weight has dtype Half"):
        backward(xb, xb, bb, bias.half(), torch.zeros(4), torch.ones(4), "none")
