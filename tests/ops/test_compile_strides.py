"""torch.compile(fullgraph=True) with Inductor over non-contiguous inputs (transposed, sliced, expanded): the fake
implementations must describe exactly what the kernels return (contiguous outputs), or Inductor's stride
assertions fail at run time. Inductor's caches are off, so that a compiled graph of an earlier fake is never reused."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import _ext, ops

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"mtbert_fast._C not built: {_ext.load_error}")


def _rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def fresh_inductor():
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


def _packed_qkv():
    """qkv [8, 3, 2, 8] sliced out of a wider projection (head_dim 16): strided over every dim but the last."""
    wide = _rand(8, 3, 2, 16, seed=3)
    return wide[..., :8], torch.tensor([0, 5, 6, 8], dtype=torch.int32), 5


CASES = {
    "bias_gelu, transposed x, expanded bias": (
        lambda x, b: ops.bias_gelu(x, b, backend="cpu"), lambda: (_rand(64, 48).t(), _rand(1, seed=1).expand(64))),
    "gather_rows, sliced x": (
        lambda x, i: ops.gather_rows(x, i, backend="cpu"), lambda: (_rand(10, 12)[:, 2:9], torch.tensor([4, 0, 7]))),
    "scatter_rows, transposed x": (
        lambda x, i: ops.scatter_rows(x, i, 6, backend="cpu"), lambda: (_rand(5, 3).t(), torch.tensor([4, 0, 2]))),
    "attention_varlen, sliced qkv": (
        lambda q, cu, m: ops.attention_varlen(q, cu, m, backend="cpu"), _packed_qkv),
    "mlm_gather_loss, sliced hidden": (
        lambda h, w, b, lab: ops.mlm_gather_loss(h, w, b, lab, backend="cpu"),
        lambda: (_rand(5, 20)[:, ::2], _rand(7, 10, seed=1), _rand(7, seed=2), torch.tensor([1, -100, 0, 6, 2]))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inductor_matches_eager_on_strided_inputs(case):
    fn, make = CASES[case]
    args = make()
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args), "the case must be strided"
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(*args), fn(*args))


def test_inductor_backward_on_strided_inputs():
    x, b = _rand(64, 48).t().requires_grad_(), _rand(64, seed=1).requires_grad_()
    x_eager, b_eager = (t.detach().clone().requires_grad_() for t in (x, b))

    def fn(x, b):
        return ops.bias_gelu(x, b, backend="cpu").square().sum()

    torch.compile(fn, fullgraph=True)(x, b).backward()
    fn(x_eager, b_eager).backward()
    torch.testing.assert_close(x.grad, x_eager.grad)
    torch.testing.assert_close(b.grad, b_eager.grad)
