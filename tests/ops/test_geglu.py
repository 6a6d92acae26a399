"""geglu on every backend that runs here, forward and backward, against the reference (op_testing.py states the
backends and tolerances)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import assert_close, compare, rand

OP_NAME = "geglu"
GELUS = ["none", "tanh"]


def _native(x, approximate):
    """HF ModernBERT's MLP in x's dtype: act(input) * gate after chunk(2)."""
    a, g = x.chunk(2, dim=-1)
    return F.gelu(a, approximate=approximate) * g


@pytest.mark.interpreter_cases(I=[1, 37], N=[0, 5])
@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("N", [0, 1, 5, 37])
@pytest.mark.parametrize("I", [1, 7, 37, 1152])
def test_kernels(backend, dtype, I, N, approximate):
    """The forward and backward kernels against the reference's output and autograd gradient."""
    x, grad_out = backend.to(rand(N, 2 * I, scale=2.0, dtype=dtype), rand(N, I, seed=2, dtype=dtype))
    out = backend.forward(x, approximate)
    grad_x = backend.backward(grad_out, x, approximate)
    assert out.dtype == grad_x.dtype == dtype and out.shape == (N, I) and grad_x.shape == x.shape

    x32 = x.float().requires_grad_()
    exact = reference.geglu(x32, approximate)
    (exact_grad,) = torch.autograd.grad(exact, x32, grad_out.float())
    xt = x.clone().requires_grad_()
    native = _native(xt, approximate)
    (native_grad,) = torch.autograd.grad(native, xt, grad_out)
    assert_close(out, exact, native, dtype, "out", floor=1e-5)
    assert_close(grad_x, exact_grad, native_grad, dtype, "grad_x", floor=1e-5)


@pytest.mark.parametrize("approximate", GELUS)
@pytest.mark.parametrize("shape", [(1, 2), (5, 14), (2, 3, 40), (0, 8)])
def test_wrapper_autograd(backend, dtype, shape, approximate):
    """ops.geglu with backend= forced: the output and the gradient of x through autograd."""
    (x,) = backend.to(rand(*shape, seed=1, scale=2))
    compare(lambda x: ops.geglu(x, approximate, backend=backend.name),
            lambda x: reference.geglu(x, approximate),
            lambda x: _native(x, approximate),
            [x], dtype, f"geglu {approximate}", atol=2e-5, rtol=1e-4)


def test_matches_hf_modernbert_mlp():
    """The reference is ModernBERT's gated MLP activation: act(input) * gate with input, gate = Wi(x).chunk(2)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.modernbert.modeling_modernbert import ModernBertMLP

    config = transformers.ModernBertConfig(hidden_size=16, intermediate_size=24, hidden_activation="gelu",
                                           mlp_dropout=0.0)
    torch.manual_seed(0)
    mlp = ModernBertMLP(config).eval()
    x = rand(5, 16, seed=3)
    with torch.no_grad():
        want = mlp(x)
        got = mlp.Wo(ops.geglu(mlp.Wi(x)))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_strided_input(backend):
    (x,) = backend.to(rand(8, 20, seed=4).t()[:, :6])
    assert not x.is_contiguous()
    torch.testing.assert_close(backend.forward(x, "none"), backend.forward(x.contiguous(), "none"), atol=0, rtol=0)


def test_bad_input_is_named(backend):
    (x,) = backend.to(rand(4, 6))
    with pytest.raises(ValueError, match=r"last dim must be even .* got shape \(4, 5\)"):
        ops.geglu(x[:, :5], backend=backend.name)
    with pytest.raises(ValueError, match="approximate must be"):
        ops.geglu(x, "sigmoid", backend=backend.name)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.geglu(x.long(), backend=backend.name)


def test_cpu_kernel_checks_name_the_op_and_tensor():
    op = lambda *args: torch.ops.mtbert_fast.geglu(*args, "cpu")  # noqa: E731
    backward = lambda *args: torch.ops.mtbert_fast.geglu_backward(*args, "cpu")  # noqa: E731
    with pytest.raises(RuntimeError, match="geglu: x's last dim must be even"):
        op(rand(4, 5), "none")
    with pytest.raises(RuntimeError, match="geglu: x must be float32 or bfloat16"):
        op(rand(4, 6).double(), "none")
    with pytest.raises(RuntimeError, match=r"geglu_backward: grad_out must have shape \[4, 3\]"):
        backward(rand(4, 6), rand(4, 6), "none")
