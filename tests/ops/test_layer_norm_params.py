"""LayerNorm weight and beta in fp32 under mixed precision, for bias_residual_layer_norm and bias_gelu_layer_norm.

The contract: x, bias (and residual) share the activation dtype T; weight and beta share a dtype W, T or fp32. The
output is in T; grad_weight and grad_beta come back in W, summed in fp32. Under torch.autocast the wrappers cast
the activations to autocast's dtype but leave fp32 weight and beta alone, so their gradients (sums over every
token) neither overflow fp16 under a loss scale nor round to bf16. Also: the fakes of the ops describe the kernels'
contiguous outputs, so torch.compile (inductor) takes transposed, sliced and expanded inputs.

Backends: the reference and Triton (TRITON_INTERPRET=1, set per test) in fp16 and bf16, the C++ CPU kernels in bf16
(the only low-precision dtype they take). Tolerances: outputs and activation gradients in T:
the error against the fp32 reference on the same T inputs upcast is at most twice PyTorch's own error computing
the same thing in T, plus 1e-6; fp32 weight and beta gradients: within 1e-4 relative (1e-5 absolute; 1e-4 of the
largest column for the sums past fp16's range) of the fp32 reference on the same T inputs, as only the order of fp32
additions differs.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import _ext, ops
from mtbert_fast.ops import dispatch, reference

CPU = torch.device("cpu")
EPS = 1e-5
FLOOR = 1e-6
LOSS_SCALE = 2.0**16
FP16_MAX = torch.finfo(torch.float16).max  # 65504

HAS_CPU_KERNELS = dispatch.reason("cpu", "bias_residual_layer_norm", CPU, torch.bfloat16) is None
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"mtbert_fast._C not built: {_ext.load_error}")

# (backend, activation dtype T) pairs that run here
LOW_PRECISION = [("reference", torch.float16), ("reference", torch.bfloat16)]
if HAS_TRITON:
    LOW_PRECISION += [("triton", torch.float16), ("triton", torch.bfloat16)]
if HAS_CPU_KERNELS:
    LOW_PRECISION += [("cpu", torch.bfloat16)]
BACKENDS = ["reference"] + (["triton"] if HAS_TRITON else []) + (["cpu"] if HAS_CPU_KERNELS else [])


# Each op as f(x, bias, residual, weight, beta), its reference, PyTorch's own computation, and its pre-norm values.
OPS = {
    "bias_residual_layer_norm": (
        lambda x, b, r, w, beta, backend=None: ops.bias_residual_layer_norm(x, b, r, w, beta, EPS, backend=backend),
        lambda x, b, r, w, beta: reference.bias_residual_layer_norm(x, b, r, w, beta, EPS),
        lambda x, b, r, w, beta: F.layer_norm(x + b + r, (x.shape[-1],), w, beta, EPS),
        lambda x, b, r: x + b + r,
    ),
    "bias_gelu_layer_norm": (
        lambda x, b, r, w, beta, backend=None: ops.bias_gelu_layer_norm(x, b, w, beta, EPS, "tanh", backend=backend),
        lambda x, b, r, w, beta: reference.bias_gelu_layer_norm(x, b, w, beta, EPS, "tanh"),
        lambda x, b, r, w, beta: F.layer_norm(F.gelu(x + b, approximate="tanh"), (x.shape[-1],), w, beta, EPS),
        lambda x, b, r: F.gelu(x + b, approximate="tanh"),
    ),
}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """Triton runs CPU tensors under its interpreter, for this file's tests only."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _inputs(shape, dtype, param_dtype=torch.float32, seed=0):
    """x, bias, residual in dtype; weight, beta in param_dtype."""
    d = shape[-1]
    x, r = _rand(*shape, seed=seed, scale=2), _rand(*shape, seed=seed + 1)
    b, w, beta = _rand(d, seed=seed + 2), 1 + _rand(d, seed=seed + 3, scale=0.1), _rand(d, seed=seed + 4)
    return x.to(dtype), b.to(dtype), r.to(dtype), w.to(param_dtype), beta.to(param_dtype)


def _forward_backward(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of sum(out * grad_out) in every input (None for an input fn does not use)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad_out.to(out.dtype), allow_unused=True))


def _assert_low_precision_close(got, ref32, native, what):
    """got and native are results in T of the same computation; ref32 is the fp32 reference."""
    assert got.dtype == native.dtype and got.shape == ref32.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - ref32.double()).abs().max().item()
    native_err = (native.double() - ref32.double()).abs().max().item()
    assert err <= 2 * native_err + FLOOR, f"{what}: error {err:.3g} vs PyTorch's own {got.dtype} error {native_err:.3g}"


def _assert_fp32_sums_close(got, want, what, rtol=1e-4, atol=1e-5):
    assert got.dtype == torch.float32, f"{what}: dtype {got.dtype}, expected torch.float32"
    assert torch.isfinite(got).all(), f"{what}: non-finite values {got}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# --- fp32 weight and beta with low-precision activations ---------------------------------------------------------


@pytest.mark.parametrize("backend,dtype", LOW_PRECISION)
@pytest.mark.parametrize("op", sorted(OPS))
def test_fp32_params_forward_and_backward(op, backend, dtype):
    """T activations with fp32 weight and beta: the output and the activation gradients in T are as close to the
    fp32 reference as PyTorch in T is; grad_weight and grad_beta are fp32 and match the fp32 reference."""
    fn, ref_fn, native_fn, _ = OPS[op]
    inputs = _inputs((3, 7, 40), dtype)
    grad_out = _rand(3, 7, 40, seed=9).to(dtype)
    out, grads = _forward_backward(lambda *a: fn(*a, backend=backend), inputs, grad_out)
    ref, ref_grads = _forward_backward(ref_fn, [t.float() for t in inputs], grad_out.float())
    native, native_grads = _forward_backward(native_fn, [t.to(dtype) for t in inputs], grad_out)

    assert out.dtype == dtype
    _assert_low_precision_close(out, ref, native, f"{op} {backend} forward")
    for name, got, want, base in zip(("x", "bias", "residual"), grads[:3], ref_grads[:3], native_grads[:3]):
        if want is None:  # residual, in bias_gelu_layer_norm
            continue
        _assert_low_precision_close(got, want, base, f"{op} {backend} grad_{name}")
    for name, got, want in zip(("weight", "beta"), grads[3:], ref_grads[3:]):
        _assert_fp32_sums_close(got, want, f"{op} {backend} grad_{name}")


@needs_ext
@pytest.mark.parametrize("op", sorted(OPS))
def test_cpu_kernel_returns_param_grads_in_param_dtype(op):
    """The C++ ops themselves: bf16 activations with fp32 weight and beta give fp32 grad_weight and grad_beta, the
    same as the fp32 reference; with bf16 weight and beta (the same fp32 sums, rounded once) they are bf16."""
    x, b, r, w, beta = _inputs((37, 24), torch.bfloat16)
    g = _rand(37, 24, seed=9).to(torch.bfloat16)
    kernels = torch.ops.mtbert_fast_C
    results = {}
    for wd in (torch.float32, torch.bfloat16):
        wt, bt = w.to(wd), beta.to(wd)
        if op == "bias_residual_layer_norm":
            out, mean, rstd = kernels.bias_residual_layer_norm(x, b, r, wt, bt, EPS)
            grads = kernels.bias_residual_layer_norm_backward(g, x, b, r, wt, mean, rstd)
        else:
            out, mean, rstd = kernels.bias_gelu_layer_norm(x, b, wt, bt, EPS, "tanh")
            grads = kernels.bias_gelu_layer_norm_backward(g, x, b, wt, mean, rstd, "tanh")
        assert out.dtype == torch.bfloat16 and grads[0].dtype == torch.bfloat16
        assert grads[1].dtype == wd and grads[2].dtype == wd
        results[wd] = grads
    _, ref_grads = _forward_backward(OPS[op][1], [t.float() for t in (x, b, r, w, beta)], g.float())
    for got, want, name in zip(results[torch.float32][1:], ref_grads[3:], ("grad_weight", "grad_beta")):
        _assert_fp32_sums_close(got, want, f"{op} {name}")
    for fp32, bf16 in zip(results[torch.float32][1:], results[torch.bfloat16][1:]):
        assert torch.equal(bf16, fp32.bfloat16())


# --- gradient sums that overflow fp16 ----------------------------------------------------------------------------

# (backend, autocast dtype, tokens): fp16 where the backend takes it, bf16 on the CPU kernels. Triton's interpreter
# runs a Python loop per row, so it gets fewer tokens with proportionally larger gradients: the column sums are the
# same size.
AUTOCAST_CASES = [("reference", torch.float16, 4096)]
if HAS_TRITON:
    AUTOCAST_CASES += [("triton", torch.float16, 256)]
if HAS_CPU_KERNELS:
    AUTOCAST_CASES += [("cpu", torch.bfloat16, 4096)]


@pytest.mark.parametrize("backend,dtype,tokens", AUTOCAST_CASES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_autocast_param_grads_sum_in_fp32(op, backend, dtype, tokens):
    """fp32 parameters under torch.autocast, with the gradients of a 2^16 loss scale over `tokens` tokens: every
    column of grad_weight and grad_beta sums past fp16's largest value. They come back fp32, finite, and within
    1e-4 relative of the fp32 reference on the same autocast-rounded activations."""
    fn, ref_fn, _, prenorm = OPS[op]
    d = 32
    x, _, r, w, beta = _inputs((tokens, d), torch.float32, seed=3)
    b = _rand(d, seed=4, scale=0.1)  # small, so that every column of xhat has a mean near 0 and a variance near 1
    xt, bt, rt = x.to(dtype).float(), b.to(dtype).float(), r.to(dtype).float()
    s = prenorm(xt, bt, rt)
    xhat = (s - s.mean(-1, keepdim=True)) * torch.rsqrt(s.var(-1, unbiased=False, keepdim=True) + EPS)
    # dL/dy of a per-token mean loss times the loss scale, correlated with xhat so that grad_weight grows too:
    # column sums near 2 * 2^16 for both
    grad_out = (LOSS_SCALE / tokens * (2.0 + 2.0 * xhat)).to(dtype)
    assert (grad_out.float().sum(0) > FP16_MAX).all() and ((grad_out.float() * xhat).sum(0) > FP16_MAX).all()

    leaves = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
    with torch.autocast(device_type="cpu", dtype=dtype):
        out = fn(*leaves, backend=backend)
    assert out.dtype == dtype
    grad_w, grad_beta = torch.autograd.grad(out, leaves[3:], grad_out)

    ref_leaves = [t.clone().requires_grad_() for t in (xt, bt, rt, w, beta)]
    want_w, want_beta = torch.autograd.grad(ref_fn(*ref_leaves), ref_leaves[3:], grad_out.float())
    for name, got, want in (("grad_weight", grad_w, want_w), ("grad_beta", grad_beta, want_beta)):
        assert want.abs().min() > FP16_MAX
        _assert_fp32_sums_close(got, want, f"{op} {backend} {name}", rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_casts_other_params_with_the_activations(backend):
    """Under autocast, weight and beta that are not both fp32 follow the activations into autocast's dtype (a mixed
    pair is then no error); their gradients come back in their own dtype through autocast's cast."""
    x, b, r, w, beta = _inputs((5, 16), torch.float32)
    leaves = [x, b, r, w.half().requires_grad_(), beta.requires_grad_()]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = ops.bias_residual_layer_norm(*leaves, EPS, backend=backend)
    assert out.dtype == torch.bfloat16
    grad_w, grad_beta = torch.autograd.grad(out.float().sum(), leaves[3:])
    assert grad_w.dtype == torch.float16 and grad_beta.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_same_dtype_params_unchanged_outside_autocast(op, backend):
    """Outside autocast, bf16 weight and beta stay bf16, and so do their gradients (summed in fp32, rounded once)."""
    fn, ref_fn = OPS[op][:2]
    inputs = _inputs((6, 24), torch.bfloat16, torch.bfloat16)
    grad_out = _rand(6, 24, seed=9).to(torch.bfloat16)
    out, grads = _forward_backward(lambda *a: fn(*a, backend=backend), inputs, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads if g is not None)
    _, ref_grads = _forward_backward(ref_fn, [t.float() for t in inputs], grad_out.float())
    for got, want in zip(grads[3:], ref_grads[3:]):
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-5)


# --- refusals ----------------------------------------------------------------------------------------------------

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
BAD_DTYPES = [
    # (x, bias, residual, weight, beta) dtypes, the message
    ((BF16, BF16, BF16, F32, BF16), "beta has dtype torch.bfloat16 but weight has torch.float32"),
    ((BF16, BF16, BF16, F16, F16), "weight has dtype torch.float16 but x has torch.bfloat16"),
    ((F32, F32, F32, BF16, BF16), "weight has dtype torch.bfloat16 but x has torch.float32"),
    ((F16, F16, F16, BF16, F32), "weight has dtype torch.bfloat16 but x has torch.float16"),
    ((BF16, F32, BF16, F32, F32), "bias has dtype torch.float32 but x has torch.bfloat16"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes,message", BAD_DTYPES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_wrong_param_dtypes_are_refused(op, dtypes, message, backend):
    fn = OPS[op][0]
    args = [t.to(dt) for t, dt in zip(_inputs((4, 8), torch.float32), dtypes)]
    with pytest.raises(TypeError, match=f"{op}: {message}"):
        fn(*args, backend=backend)


def test_wrong_residual_dtype_is_refused():
    x, b, r, w, beta = _inputs((4, 8), torch.bfloat16)
    with pytest.raises(TypeError, match="residual has dtype torch.float32 but x has torch.bfloat16"):
        ops.bias_residual_layer_norm(x, b, r.float(), w, beta, EPS)


@needs_ext
def test_cpu_kernels_refuse_wrong_param_dtypes():
    k = torch.ops.mtbert_fast_C
    x, b, r, w, beta = _inputs((4, 8), torch.bfloat16)
    mean, rstd = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: beta has dtype BFloat16 but weight has Float"):
        k.bias_residual_layer_norm(x, b, r, w, beta.bfloat16(), EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: weight has dtype Half but x has BFloat16"):
        k.bias_residual_layer_norm(x, b, r, w.half(), beta.half(), EPS)
    with pytest.raises(RuntimeError, match="bias_residual_layer_norm: bias has dtype Float but x has BFloat16"):
        k.bias_residual_layer_norm(x, b.float(), r, w, beta, EPS)
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: beta has dtype Half but weight has Float"):
        k.bias_gelu_layer_norm(x, b, w, beta.half(), EPS, "none")
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm: weight has dtype BFloat16 but x has Float"):
        k.bias_gelu_layer_norm(x.float(), b.float(), w.bfloat16(), beta.bfloat16(), EPS, "none")
    with pytest.raises(RuntimeError, match="layer_norm_backward: weight has dtype Half but x has BFloat16"):
        k.bias_residual_layer_norm_backward(x, x, b, r, w.half(), mean, rstd)
    with pytest.raises(RuntimeError, match="bias_gelu_layer_norm_backward: weight has dtype Half"):
        k.bias_gelu_layer_norm_backward(x, x, b, w.half(), mean, rstd, "none")


# --- torch.compile and opcheck with inputs that are not contiguous ----------------------------------------------

LN_OP_NAMES = ["bias_gelu_layer_norm", "bias_gelu_layer_norm_backward", "bias_residual_layer_norm",
               "bias_residual_layer_norm_backward"]


def _strided(dtype, n=6, d=16):
    """Leaves, and a function making views of them that are not contiguous: x transposed, residual sliced, weight
    strided, beta expanded from one element. weight and beta are fp32, x, bias and residual in dtype."""
    leaves = [
        _rand(d, n, seed=1, dtype=dtype),  # x.t()
        _rand(d, seed=2, dtype=dtype),
        _rand(n, 2 * d, seed=3, dtype=dtype),  # residual[:, ::2]
        1 + _rand(2 * d, seed=4, scale=0.1),  # weight[::2]
        _rand(1, seed=5),  # beta.expand(d)
    ]

    def views(x, b, r, w, beta):
        return x.t(), b, r[:, ::2], w[::2], beta.expand(d)

    return leaves, views


def _op_args(prefix, dtype):
    """name -> arguments of the op <prefix><name> (the C++ kernels' torch.ops.mtbert_fast_C.<name>, or Triton's
    torch.ops.mtbert_fast.triton_<name>), for each name in LN_OP_NAMES, on the
    views of _strided (the backward ops: a contiguous grad_out, x transposed, weight strided)."""
    leaves, views = _strided(dtype)
    x, b, r, w, beta = views(*leaves)
    assert not (x.is_contiguous() or r.is_contiguous() or w.is_contiguous() or beta.is_contiguous())
    k = torch.ops.mtbert_fast if prefix else torch.ops.mtbert_fast_C
    mean, rstd = getattr(k, prefix + "bias_residual_layer_norm")(x, b, r, w, beta, EPS)[1:]
    gmean, grstd = getattr(k, prefix + "bias_gelu_layer_norm")(x, b, w, beta, EPS, "tanh")[1:]
    g = _rand(6, 16, seed=9, dtype=dtype)
    return {
        "bias_residual_layer_norm": (x, b, r, w, beta, EPS),
        "bias_residual_layer_norm_backward": (g, x, b, r, w, mean, rstd),
        "bias_gelu_layer_norm": (x, b, w, beta, EPS, "tanh"),
        "bias_gelu_layer_norm_backward": (g, x, b, w, gmean, grstd, "tanh"),
    }


def _inductor(fn):
    """fn compiled whole by inductor, which trusts the fakes' strides and dtypes (it asserts them after each op);
    with its caches off, so that a graph compiled with an earlier fake cannot stand in."""
    compiled = torch.compile(fn, fullgraph=True, backend="inductor")

    def run(*args):
        with torch._inductor.config.patch(force_disable_caches=True):
            return compiled(*args)

    return run


def _check_compiled_equals_eager(op, backend, dtype):
    prefix = "triton_" if backend == "triton" else ""
    fn = OPS[op][0]
    args = _op_args(prefix, dtype)

    # the forward through the public wrapper, and the backward op: the non-contiguous views are the graph's inputs
    wrapper = lambda x, b, r, w, beta: fn(x, b, r, w, beta, backend=backend)  # noqa: E731
    forward_args = args["bias_residual_layer_norm"][:5]
    backward_op = getattr(torch.ops.mtbert_fast if prefix else torch.ops.mtbert_fast_C, prefix + op + "_backward")
    backward_args = args[op + "_backward"]
    for f, f_args in ((wrapper, forward_args), (backward_op, backward_args)):
        torch._dynamo.reset()
        eager = f(*f_args)
        eager = eager if isinstance(eager, tuple) else (eager,)
        compiled = _inductor(f)(*f_args)
        compiled = compiled if isinstance(compiled, tuple) else (compiled,)
        for got, want in zip(compiled, eager):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert backward_op(*backward_args)[1].dtype == torch.float32  # grad_weight in the weight's dtype

    # forward and backward through autograd, the views taken inside the graph
    torch._dynamo.reset()
    leaves, views = _strided(dtype)
    grad_out = _rand(6, 16, seed=9)

    def loss(*tensors):
        return (fn(*views(*tensors), backend=backend).float() * grad_out).sum()

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


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", sorted(OPS))
def test_compile_non_contiguous_inputs(op, dtype):
    """torch.compile(fullgraph=True) of each LayerNorm op on the CPU kernels with a transposed x, a sliced
    residual, a strided weight and an expanded beta (fp32 weight and beta, fp32 or bf16 activations): the forward
    and the backward op by inductor, and forward with backward through autograd, equal eager."""
    _check_compiled_equals_eager(op, "cpu", dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("op", sorted(OPS))
def test_compile_non_contiguous_inputs_triton(op):
    """The same for the Triton custom ops (under the interpreter), bf16 activations with fp32 weight and beta."""
    _check_compiled_equals_eager(op, "triton", torch.bfloat16)


OPCHECK_CASES = [pytest.param("", name, marks=needs_ext) for name in LN_OP_NAMES] + [
    pytest.param("triton_", name, marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed"))
    for name in LN_OP_NAMES
]


@pytest.mark.parametrize("prefix,name", OPCHECK_CASES)
def test_opcheck_mixed_dtypes_and_strides(prefix, name):
    """torch.library.opcheck (fake against real: shapes, dtypes, strides; the autograd registration) of each op
    with bf16 activations, fp32 parameters and inputs that are not contiguous."""
    needs_grad = not name.endswith("_backward")
    args = [a.detach().requires_grad_(needs_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _op_args(prefix, torch.bfloat16)[name]]
    torch.library.opcheck(getattr(torch.ops.mtbert_fast if prefix else torch.ops.mtbert_fast_C, prefix + name), args)
