"""The tests both LayerNorm ops take (bias_residual_layer_norm, bias_gelu_layer_norm), written once: each op's test
file imports them and names its op in OP_NAME. Every op is seen as f(x, bias, residual, weight, beta) (residual
unused by bias_gelu_layer_norm).

The contract of weight and beta: x, bias (and residual) share the activation dtype T; weight and beta share a dtype
W, T or fp32. The output is in T; grad_weight and grad_beta come back in W, summed in fp32. Under torch.autocast the
wrappers cast the activations to autocast's dtype but leave fp32 weight and beta alone, so their gradients (sums
over every token) neither overflow fp16 under a loss scale nor round to bf16.

Tolerances: fp32 within 1e-5 of the reference (1e-4 for the row-summed parameter gradients, both scaled by rstd
where the gradient carries it); low precision: at most twice PyTorch's own error in that dtype, plus a floor; fp32
parameter gradients beside low-precision activations within 1e-4 relative of the fp32 reference on the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import assert_close, forward_backward, num_threads, rand, runners

EPS = 1e-5
LOSS_SCALE = 2.0**16
FP16_MAX = torch.finfo(torch.float16).max  # 65504
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@dataclass(frozen=True)
class LayerNormOp:
    name: str

    @property
    def residual(self) -> bool:
        return self.name == "bias_residual_layer_norm"

    def wrapper(self, x, b, r, w, beta, eps=EPS, approximate="none", backend=None):
        if self.residual:
            return ops.bias_residual_layer_norm(x, b, r, w, beta, eps, backend=backend)
        return ops.bias_gelu_layer_norm(x, b, w, beta, eps, approximate, backend=backend)

    def reference(self, x, b, r, w, beta, eps=EPS, approximate="none"):
        if self.residual:
            return reference.bias_residual_layer_norm(x, b, r, w, beta, eps)
        return reference.bias_gelu_layer_norm(x, b, w, beta, eps, approximate)

    def prenorm(self, x, b, r, approximate="none"):
        return x + b + r if self.residual else F.gelu(x + b, approximate=approximate)

    def native(self, x, b, r, w, beta, eps=EPS, approximate="none"):
        """PyTorch's own computation in the inputs' dtype."""
        return F.layer_norm(self.prenorm(x, b, r, approximate), (x.shape[-1],), w, beta, eps)

    def forward(self, runner, x, b, r, w, beta, eps=EPS, approximate="none"):
        """The kernel: (out, mean, rstd)."""
        if self.residual:
            return runner.forward(x, b, r, w, beta, eps)
        return runner.forward(x, b, w, beta, eps, approximate)

    def backward(self, runner, g, x, b, r, w, mean, rstd, approximate="none"):
        """The backward kernel: (grad of x, grad_weight, grad_beta, grad_bias)."""
        if self.residual:
            return runner.backward(g, x, b, r, w, mean, rstd)
        return runner.backward(g, x, b, w, mean, rstd, approximate)

    def inputs(self, shape, dtype, param_dtype=torch.float32, seed=0, device="cpu"):
        """x, bias, residual in dtype; weight, beta in param_dtype."""
        d = shape[-1]
        x, r = rand(*shape, seed=seed, scale=2), rand(*shape, seed=seed + 1, scale=3)
        b, w, beta = rand(d, seed=seed + 2), 1 + rand(d, seed=seed + 3, scale=0.1), rand(d, seed=seed + 4)
        return [t.to(dt).to(device) for t, dt in zip((x, b, r, w, beta), (dtype,) * 3 + (param_dtype,) * 2)]


@pytest.fixture
def ln(request) -> LayerNormOp:
    return LayerNormOp(request.module.OP_NAME)


def _rstd_tol(rstd: torch.Tensor, tol: float) -> float:
    """fp32 tolerance of the gradients that carry a factor rstd (input and weight): rstd reaches 1/sqrt(eps) on
    constant rows (D = 1), and the reference's rounding before that factor is amplified with it."""
    return tol * max(1.0, rstd.max().item()) if rstd.numel() else tol


NAMES = ("out", "grad_x", "grad_weight", "grad_beta", "grad_bias")


@pytest.mark.interpreter_cases(D=[1, 1000], N=[0, 37])
@pytest.mark.parametrize("N", [0, 1, 5, 37])
@pytest.mark.parametrize("D", [1, 7, 31, 768, 1000])
def test_kernels(ln, backend, dtype, D, N, approximate):
    """The forward kernel's output, mean and rstd, and the backward kernel's four gradients, against the reference
    and its autograd gradients (all parameters in the activations' dtype)."""
    x, b, r, w, beta = ln.inputs((N, D), dtype, dtype, device=backend.device)
    grad_out = rand(N, D, seed=5, dtype=dtype, device=backend.device)
    out, mean, rstd = ln.forward(backend, x, b, r, w, beta, EPS, approximate)
    grads = ln.backward(backend, grad_out, x, b, r, w, mean, rstd, approximate)

    leaves = [t.float().requires_grad_() for t in (x, b, r, w, beta)]
    exact = ln.reference(*leaves, EPS, approximate)
    exact_grads = torch.autograd.grad(exact, [leaves[0], leaves[3], leaves[4], leaves[1]], grad_out.float())
    s = ln.prenorm(x.float(), b.float(), r.float(), approximate)
    torch.testing.assert_close(mean, s.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(s.var(-1, unbiased=False) + EPS), atol=1e-5, rtol=1e-5)
    tleaves = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
    native = ln.native(*tleaves, EPS, approximate)
    native_grads = torch.autograd.grad(native, [tleaves[0], tleaves[3], tleaves[4], tleaves[1]], grad_out)
    # grad_weight, grad_beta and grad_bias sum N rows; grad_bias, a sum of grad_x, carries rstd too
    tols = (1e-5, _rstd_tol(rstd, 1e-5), _rstd_tol(rstd, 1e-4), 1e-4, _rstd_tol(rstd, 1e-4))
    for name, got, want, base, tol in zip(NAMES, (out,) + tuple(grads), (exact,) + exact_grads,
                                          (native,) + native_grads, tols):
        assert got.dtype == dtype, f"{name}: {got.dtype}"
        assert_close(got, want, base, dtype, name, atol=tol, rtol=tol, floor=1e-5)


@pytest.mark.parametrize("D", [384, 768, 1000])
def test_constant_rows_normalize_to_beta(ln, backend, D):
    """A row whose pre-norm values are all one number normalizes to exactly beta, as PyTorch's LayerNorm gives, even
    with BERT's eps of 1e-12: the rounding of sum / D, times rstd up to 1e6, gave outputs of the weights' size."""
    c = torch.tensor([123.456, -5.67, 0.3, 2.345])
    x = c[:, None].expand(-1, D).contiguous()
    if not ln.residual:  # the constant GELU(x) of the other op
        x = x.abs()
    zeros = torch.zeros(D)
    w, beta = rand(D, seed=3), rand(D, seed=4)
    args = [t.to(backend.device) for t in (x, zeros, torch.zeros_like(x), w, beta)]
    out, _, _ = ln.forward(backend, *args, 1e-12)
    assert (out.cpu() - beta).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 7), (13, 100), (37, 31), (3, 768), (2, 3, 33), (2, 3, 1000),
                                   (0, 16)])
def test_wrapper_autograd(ln, backend, dtype, shape, approximate):
    """The public op with backend= forced: the output and the gradients of every input through autograd."""
    inputs = ln.inputs(shape, dtype, dtype, device=backend.device)
    compare_all = [t.float() for t in inputs]
    grad_out = rand(*shape, seed=9, dtype=dtype, device=backend.device)
    out, grads = forward_backward(lambda *a: ln.wrapper(*a, approximate=approximate, backend=backend.name), inputs,
                                  grad_out)
    ref, ref_grads = forward_backward(lambda *a: ln.reference(*a, approximate=approximate), compare_all,
                                      grad_out.float())
    native, native_grads = forward_backward(lambda *a: ln.native(*a, approximate=approximate), inputs, grad_out)
    assert out.dtype == dtype
    assert_close(out, ref, native, dtype, "out", atol=1e-5, rtol=1e-5)
    for name, got, want, base in zip(("x", "bias", "residual", "weight", "beta"), grads, ref_grads, native_grads):
        if want is None:  # residual, in bias_gelu_layer_norm
            continue
        assert_close(got, want, base, dtype, f"grad_{name}", atol=2e-5, rtol=1e-4)


def test_fp32_params_forward_and_backward(ln, backend, dtype, approximate):
    """Activations in dtype with fp32 weight and beta: the output and the activation gradients in dtype are as close
    to the fp32 reference as PyTorch in dtype is; grad_weight and grad_beta are fp32 and match the fp32 reference."""
    inputs = ln.inputs((3, 7, 40), dtype, device=backend.device)
    grad_out = rand(3, 7, 40, seed=9, dtype=dtype, device=backend.device)
    out, grads = forward_backward(lambda *a: ln.wrapper(*a, approximate=approximate, backend=backend.name), inputs,
                                  grad_out)
    ref, ref_grads = forward_backward(lambda *a: ln.reference(*a, approximate=approximate),
                                      [t.float() for t in inputs], grad_out.float())
    native, native_grads = forward_backward(lambda *a: ln.native(*a, approximate=approximate),
                                            [t.to(dtype) for t in inputs], grad_out)
    assert out.dtype == dtype
    assert_close(out, ref, native, dtype, "forward")
    for name, got, want, base in zip(("x", "bias", "residual"), grads[:3], ref_grads[:3], native_grads[:3]):
        if want is not None:
            assert_close(got, want, base, dtype, f"grad_{name}", atol=2e-5, rtol=1e-4)
    for name, got, want in zip(("weight", "beta"), grads[3:], ref_grads[3:]):
        _assert_fp32_sums_close(got, want, f"grad_{name}")


def _assert_fp32_sums_close(got, want, what, rtol=1e-4, atol=1e-5):
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}, expected torch.float32"
    assert torch.isfinite(got).all(), f"{what}: non-finite values {got}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_kernel_returns_param_grads_in_param_dtype(ln, backend):
    """The kernels themselves: bf16 activations with fp32 weight and beta give fp32 grad_weight and grad_beta, the
    same as the fp32 reference; with bf16 weight and beta (the same fp32 sums, rounded once) they are bf16."""
    x, b, r, w, beta = ln.inputs((37, 24), torch.bfloat16, device=backend.device)
    g = rand(37, 24, seed=9, dtype=torch.bfloat16, device=backend.device)
    results = {}
    for wd in (torch.float32, torch.bfloat16):
        out, mean, rstd = ln.forward(backend, x, b, r, w.to(wd), beta.to(wd), EPS, "tanh")
        grads = ln.backward(backend, g, x, b, r, w.to(wd), mean, rstd, "tanh")
        assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16 and grads[3].dtype == torch.bfloat16
        assert grads[1].dtype == wd and grads[2].dtype == wd
        results[wd] = grads
    _, ref_grads = forward_backward(lambda *a: ln.reference(*a, approximate="tanh"),
                                    [t.float() for t in (x, b, r, w, beta)], g.float())
    for got, want, name in zip(results[torch.float32][1:3], ref_grads[3:], ("grad_weight", "grad_beta")):
        _assert_fp32_sums_close(got, want, name)
    for fp32, bf16 in zip(results[torch.float32][1:3], results[torch.bfloat16][1:3]):
        assert torch.equal(bf16, fp32.bfloat16())


def test_autocast_param_grads_sum_in_fp32(ln, backend):
    """fp32 parameters under torch.autocast (fp16 where the backend takes it, else bf16), with the gradients of a
    2^16 loss scale: every column of grad_weight and grad_beta sums past fp16's largest value. They come back fp32,
    finite, and within 1e-4 relative of the fp32 reference on the same autocast-rounded activations. Triton's
    interpreter runs a Python loop per row, so it gets fewer tokens with proportionally larger gradients: the column
    sums are the same size."""
    dtype = torch.float16 if torch.float16 in backend.dtypes else torch.bfloat16
    tokens, d = (256 if backend.interpreted else 4096), 32
    x, _, r, w, beta = ln.inputs((tokens, d), torch.float32, seed=3, device=backend.device)
    b = rand(d, seed=4, scale=0.1, device=backend.device)  # small: every column of xhat has mean ~0, variance ~1
    xt, bt, rt = x.to(dtype).float(), b.to(dtype).float(), r.to(dtype).float()
    s = ln.prenorm(xt, bt, rt, "tanh")
    xhat = (s - s.mean(-1, keepdim=True)) * torch.rsqrt(s.var(-1, unbiased=False, keepdim=True) + EPS)
    # dL/dy of a per-token mean loss times the loss scale, correlated with xhat so that grad_weight grows too
    grad_out = (LOSS_SCALE / tokens * (2.0 + 2.0 * xhat)).to(dtype)
    assert (grad_out.float().sum(0) > FP16_MAX).all() and ((grad_out.float() * xhat).sum(0) > FP16_MAX).all()

    leaves = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
    with torch.autocast(device_type=backend.device.type, dtype=dtype):
        out = ln.wrapper(*leaves, approximate="tanh", backend=backend.name)
    assert out.dtype == dtype
    grad_w, grad_beta = torch.autograd.grad(out, leaves[3:], grad_out)

    ref_leaves = [t.clone().requires_grad_() for t in (xt, bt, rt, w, beta)]
    want_w, want_beta = torch.autograd.grad(ln.reference(*ref_leaves, approximate="tanh"), ref_leaves[3:],
                                            grad_out.float())
    for name, got, want in (("grad_weight", grad_w, want_w), ("grad_beta", grad_beta, want_beta)):
        assert want.abs().min() > FP16_MAX
        _assert_fp32_sums_close(got, want, name, atol=1e-4 * want.abs().max().item())


def test_same_dtype_params_unchanged_outside_autocast(ln, backend):
    """Outside autocast, bf16 weight and beta stay bf16, and so do their gradients (summed in fp32, rounded once)."""
    inputs = ln.inputs((6, 24), torch.bfloat16, torch.bfloat16, device=backend.device)
    grad_out = rand(6, 24, seed=9, dtype=torch.bfloat16, device=backend.device)
    out, grads = forward_backward(lambda *a: ln.wrapper(*a, backend=backend.name), inputs, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads if g is not None)
    _, ref_grads = forward_backward(ln.reference, [t.float() for t in inputs], grad_out.float())
    for got, want in zip(grads[3:], ref_grads[3:]):
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)


@pytest.mark.parametrize("dtypes,message", [
    # (x, bias, residual, weight, beta) dtypes, the message
    ((BF16, BF16, BF16, F32, BF16), "beta has dtype torch.bfloat16 but weight has torch.float32"),
    ((BF16, BF16, BF16, F16, F16), "weight has dtype torch.float16 but x has torch.bfloat16"),
    ((F32, F32, F32, BF16, BF16), "weight has dtype torch.bfloat16 but x has torch.float32"),
    ((F16, F16, F16, BF16, F32), "weight has dtype torch.bfloat16 but x has torch.float16"),
    ((BF16, F32, BF16, F32, F32), "bias has dtype torch.float32 but x has torch.bfloat16"),
])  # fmt: skip
def test_wrong_param_dtypes_are_refused(ln, backend, dtypes, message):
    args = [t.to(dt) for t, dt in zip(ln.inputs((4, 8), torch.float32, device=backend.device), dtypes)]
    with pytest.raises(TypeError, match=f"{ln.name}: {message}"):
        ln.wrapper(*args, backend=backend.name)


def test_bad_shapes_are_named(ln, backend):
    x, b, r, w, beta = ln.inputs((4, 6), torch.float32, device=backend.device)
    with pytest.raises(ValueError, match=rf"{ln.name}: weight has shape \(3,\), expected \(6,\)"):
        ln.wrapper(x, b, r, w[:3], beta, backend=backend.name)
    with pytest.raises(ValueError, match=rf"{ln.name}: bias has shape \(5,\), expected \(6,\)"):
        ln.wrapper(x, b[:5], r, w, beta, backend=backend.name)
    with pytest.raises(ValueError, match=rf"{ln.name}: beta is on meta but x is on"):
        ln.wrapper(x, b, r, w, beta.to("meta"), backend=backend.name)


def test_leading_dims_and_strides(ln, backend, dtype, approximate):
    """Inputs [2, 3, D] that are not contiguous: outputs keep the shape, contiguous, statistics per row of 6, the
    values of the contiguous copies."""
    d = 40
    x = rand(d, 3, 2, dtype=dtype, device=backend.device).permute(2, 1, 0)
    r = rand(2, d, 3, seed=1, dtype=dtype, device=backend.device).transpose(1, 2)
    b = rand(2 * d, seed=2, dtype=dtype, device=backend.device)[::2]
    w, beta = (rand(d, seed=s, dtype=dtype, device=backend.device) for s in (3, 4))
    assert not (x.is_contiguous() or r.is_contiguous() or b.is_contiguous())
    out, mean, rstd = ln.forward(backend, x, b, r, w, beta, EPS, approximate)
    assert out.shape == x.shape and out.is_contiguous() and mean.shape == (6,) and rstd.shape == (6,)
    contiguous = [t.contiguous() for t in (x, b, r)]
    for got, want in zip((out, mean, rstd), ln.forward(backend, *contiguous, w, beta, EPS, approximate)):
        assert torch.equal(got, want)
    grads = ln.backward(backend, out, x, b, r, w, mean, rstd, approximate)
    assert grads[0].shape == x.shape and grads[1].shape == (d,) and grads[2].dtype == dtype
    for got, want in zip(grads, ln.backward(backend, out, *contiguous, w, mean, rstd, approximate)):
        assert torch.equal(got, want)


def test_compile_non_contiguous_inputs(ln, backend, fresh_inductor):
    """torch.compile(fullgraph=True) with a transposed x, a sliced residual, a strided weight and an expanded beta
    (fp32 weight and beta, bf16 activations): the forward through the public wrapper and the backward op compiled by
    Inductor, which trusts the fakes' strides and dtypes, equal eager; so do forward and backward through autograd
    with the views taken inside the graph (aot_eager)."""
    n, d = 6, 16
    dev = backend.device
    leaves = [rand(d, n, seed=1, dtype=BF16, device=dev), rand(d, seed=2, dtype=BF16, device=dev),
              rand(n, 2 * d, seed=3, dtype=BF16, device=dev), 1 + rand(2 * d, seed=4, scale=0.1, device=dev),
              rand(1, seed=5, device=dev)]

    def views(x, b, r, w, beta):
        return x.t(), b, r[:, ::2], w[::2], beta.expand(d)

    x, b, r, w, beta = views(*leaves)
    mean, rstd = ln.forward(backend, x, b, r, w, beta, EPS, "tanh")[1:]
    g = rand(n, d, seed=9, dtype=BF16, device=dev)

    def forward(x, b, r, w, beta):
        return ln.wrapper(x, b, r, w, beta, approximate="tanh", backend=backend.name)

    def backward(g, x, b, r, w, mean, rstd):
        return ln.backward(backend, g, x, b, r, w, mean, rstd, "tanh")

    for fn, args in ((forward, (x, b, r, w, beta)), (backward, (g, x, b, r, w, mean, rstd))):
        torch._dynamo.reset()
        eager = fn(*args)
        compiled = torch.compile(fn, fullgraph=True, backend="inductor")(*args)
        for got, want in zip(*(o if isinstance(o, (tuple, list)) else (o,) for o in (compiled, eager))):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert backward(g, x, b, r, w, mean, rstd)[1].dtype == torch.float32  # grad_weight in the weight's dtype

    torch._dynamo.reset()
    grad_out = rand(n, d, seed=9, device=dev)

    def loss(*tensors):
        return (forward(*views(*tensors)).float() * grad_out).sum()

    eager_leaves = [t.clone().requires_grad_() for t in leaves]
    eager_grads = torch.autograd.grad(loss(*eager_leaves), eager_leaves, allow_unused=True)
    compiled_leaves = [t.clone().requires_grad_() for t in leaves]
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    compiled_grads = torch.autograd.grad(compiled_loss, compiled_leaves, allow_unused=True)
    for got, want in zip(compiled_grads, eager_grads):
        if want is None:  # residual, in bias_gelu_layer_norm
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_weight_grads_do_not_depend_on_threads(ln):
    """The CPU kernels' row blocks are fixed, so the summed gradients are bitwise the same with 1 and 2 threads."""
    cpu = next(r for r in runners(ln.name) if r.name == "cpu")
    x, b, r, w, beta = ln.inputs((300, 96), torch.float32)
    grad_out = rand(300, 96, seed=7)
    results = []
    for n in (1, 2):
        with num_threads(n):
            _, mean, rstd = ln.forward(cpu, x, b, r, w, beta)
            results.append(ln.backward(cpu, grad_out, x, b, r, w, mean, rstd))
    for a, c in zip(*results):
        assert torch.equal(a, c)


def test_forward_does_not_depend_on_threads(ln):
    """Rows above the size the forward splits over threads (about 128K elements) give bitwise the output, mean and
    rstd of one thread."""
    cpu = next(r for r in runners(ln.name) if r.name == "cpu")
    x, b, r, w, beta = ln.inputs((400, 384), torch.float32)
    results = []
    for n in (1, 2):
        with num_threads(n):
            results.append(ln.forward(cpu, x, b, r, w, beta))
    for a, c in zip(*results):
        assert torch.equal(a, c)
