"""Every op of the registry on every backend that runs here: its declaration (reference, cpu backend, Triton
functions, the C++ schemas), torch.library.opcheck of its dispatcher ops, its fakes against what the kernels return
on inputs that are not contiguous, and torch.compile(fullgraph=True) through its public wrapper."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mtbert_fast import ops
from mtbert_fast.ops import registry
from op_testing import cu_seqlens, rand, rng_state

CPP_OP_NAMES = sorted(name for name, op in registry.OPS.items() if {"cpu", "cuda"} & set(op.backends))


def _forward_args(name, device):
    """The op's schema arguments, the tensors strided (transposed, sliced, expanded) wherever the op allows."""
    x = rand(12, 5, seed=1, device=device).t()  # [5, 12]
    args = {
        "bias_gelu": lambda: (x, rand(24, seed=2, device=device)[::2], "tanh"),
        "bias_residual_layer_norm": lambda: (x, rand(12, seed=2, device=device), rand(5, 20, seed=3, device=device)[:, 4:16],
                                             1 + rand(24, seed=4, scale=0.1, device=device)[::2],
                                             rand(1, seed=5, device=device).expand(12), 1e-12),
        "bias_gelu_layer_norm": lambda: (x, rand(12, seed=2, device=device), 1 + rand(12, seed=4, scale=0.1, device=device),
                                         rand(1, seed=5, device=device).expand(12), 1e-12, "tanh"),
        "attention_varlen": lambda: (rand(8, 3, 2, 32, seed=6, device=device)[..., :16],
                                     cu_seqlens([3, 1, 4], device), 4, 0.25, 0.1, rng_state(5),
                                     rand(2, 5, seed=11, device=device), 2, rand(2, 8, 5, seed=12, device=device),
                                     rand(2, 8, 5, seed=13, device=device),
                                     torch.tensor([0, 1, 2, 2, 3, 4, 4], dtype=torch.int32, device=device)),
        "mlm_gather_loss": lambda: (rand(5, 24, seed=7, device=device)[:, ::2], rand(7, 12, seed=8, device=device),
                                    rand(7, seed=9, device=device),
                                    torch.tensor([1, -100, 0, 6, 2], device=device), -100, 2),
        "gather_rows": lambda: (x, torch.tensor([4, 0, 2], device=device)),
        "quantize_rows": lambda: (x, rand(24, seed=2, device=device)[::2].abs()),
        # 40 out_features: a whole panel and a part of one
        "panel_linear": lambda: (x, ops.pack_panels(rand(40, 12, seed=14)).to(device).transpose(1, 2).contiguous()
                                 .transpose(1, 2), rand(80, seed=15, device=device)[::2], 40, True, "tanh"),
        # 40 out_features and 10 of 12 columns: a whole panel and a part of one, a part of the last group of four
        "int8_panel_sums": lambda: (torch.randint(0, 256, (10, 5), dtype=torch.uint8,
                                                  generator=torch.Generator().manual_seed(17)).to(device).t(),
                                    ops.pack_int8_panels(torch.randint(-64, 65, (40, 10), dtype=torch.int8,
                                                                       generator=torch.Generator().manual_seed(18)))
                                    .to(device), 40),
        "post_norm_layers": lambda: (x, cu_seqlens([3, 2], device), 3, _layer_args(device), 2, 0.3, 1e-12, "tanh",
                                     rand(2, 5, seed=16, device=device), []),
        # 40 out_features; the plain weight strided (its pack is what the kernel multiplies)
        "mkl_linear": lambda: _mkl_args(rand(40, 24, seed=14)[:, ::2], x, rand(80, seed=15, device=device)[::2]),
        "int8_layers": lambda: (x, cu_seqlens([3, 2], device), 3, _int8_layer_args(device), 2, 0.3, 1e-12, "tanh",
                                rand(2, 5, seed=16, device=device)),
        **{name: (lambda name=name: _int8_args(name, device)) for name in INT8_PRODUCTS},
        "scatter_rows": lambda: (x[:3], torch.tensor([4, 0, 2], device=device), 6),
        # rows [1, 1, 1, 0], [0, 1, 0, 0], [1, 1, 0, 0], transposed
        "pack_mask": lambda: (torch.tensor([[1, 0, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]], device=device).t(),),
        # ids [3, 7] transposed, the tables' rows strided: 5 tokens of 21 slots
        "token_embeddings": lambda: (
            torch.randint(0, 10, (7, 3), generator=torch.Generator().manual_seed(19)).to(device).t(),
            torch.tensor([0, 1, 7, 8, 20], device=device),
            torch.randint(0, 2, (3, 7), generator=torch.Generator().manual_seed(20)).to(device),
            rand(10, 24, seed=2, device=device)[:, ::2], rand(7, 12, seed=3, device=device),
            rand(2, 12, seed=4, device=device), 1 + rand(24, seed=5, scale=0.1, device=device)[::2],
            rand(12, seed=6, device=device), 1e-12),
        "geglu": lambda: (rand(12, 5, seed=1, device=device).t()[:, 2:], "tanh"),
        "rotary_qk": lambda: (rand(5, 3, 2, 16, seed=10, device=device)[..., :8], *ops.rotary_tables(8, 6, 100.0, device),
                              torch.tensor([0, 1, 2, 0, 5], device=device), False),
    }
    return args[name]()


def _mkl_args(w, x, bias):
    return x, ops.pack_mkl(w), w, bias, True, "tanh"


INT8_PRODUCTS = ("int8_linear", "int8_linear_gelu_quantize", "int8_linear_residual_layer_norm",
                 "int8_linear_residual_layer_norm_quantize")


def _layer_args(device):
    """One post-norm layer's 12 tensors for x of 12 columns (an intermediate size of 20), vectors strided."""
    shapes = [(36, 12), (72,), (12, 12), (24,), (24,), (24,), (20, 12), (40,), (12, 20), (24,), (24,), (24,)]
    out = []
    for i, shape in enumerate(shapes):
        t = rand(*shape, seed=20 + i, scale=0.3)
        out.append(ops.pack_panels(t).to(device) if t.dim() == 2 else t.to(device)[::2])
    return out


def _int8_layer_args(device):
    """One int8 layer's 32 tensors for x of 12 columns (an intermediate size of 20), quantized from random weights,
    with an outlier channel in the QKV and the intermediate products."""
    from mtbert_fast.models.int8 import quantize_linear
    from mtbert_fast.ops.int8 import panels_vnni

    out = []
    for i, (n, k) in enumerate(((36, 12), (12, 12), (20, 12), (12, 20))):
        absmax = 1 + rand(k, seed=30 + i, scale=0.1).abs()
        absmax[i % k] *= 1 if i % 2 else 40
        lin = quantize_linear(rand(n, k, seed=40 + i, scale=0.3), rand(n, seed=50 + i, scale=0.1), absmax,
                              pairs=not panels_vnni())
        out += [ops.pack_int8_panels(lin.weight), lin.weight_scale, lin.weight_sum, lin.bias, lin.smooth,
                lin.outlier_index, lin.outlier_weight]
    out += [1 + rand(12, seed=60 + i, scale=0.1) if i % 2 == 0 else rand(12, seed=60 + i, scale=0.1) for i in range(4)]
    return [t.to(device) for t in out]


def _int8_args(name, device):
    """An int8 product's arguments: the column-major int32 sums of q from quantize_rows with an int8 weight [6, 12]
    (panels None, the last argument)."""
    q, scale, zero = ops.reference.quantize_rows(rand(12, 5, seed=1).t(), torch.ones(12))
    w = torch.randint(-127, 128, (12, 6), dtype=torch.int8, generator=torch.Generator().manual_seed(3)).t()
    acc = ops.reference.int8_sums(q, w).to(torch.int32).t().contiguous().t()
    product = [t.to(device) for t in (acc, scale, zero, rand(6, seed=4).abs(), w.float().sum(1), rand(6, seed=5))]
    # two input channels' fp32 part (outlier_x [5, 2], outlier_w [2, 6]), both strided
    product += [rand(2, 5, seed=11, device=device).t(), rand(12, 2, seed=12, device=device)[::2].t()]
    if name == "int8_linear_gelu_quantize":
        return (*product, "tanh", rand(12, seed=6, device=device)[::2].abs(), torch.tensor([5, 1], device=device),
                None)
    if name.startswith("int8_linear_residual_layer_norm"):
        norm = (rand(5, 12, seed=7, device=device)[:, ::2], 1 + rand(6, seed=8, scale=0.1, device=device),
                rand(6, seed=9, device=device), 1e-12)
        smooth = (rand(12, seed=10, device=device)[::2].abs(),) if name.endswith("_quantize") else ()
        return (*product, *norm, *smooth, None)
    return (*product, None)


def _differentiable(name) -> bool:
    return registry.OPS[name].backward is not None


def _backward_args(name, args, outs):
    """The backward op's arguments after a forward on `args` that returned `outs`."""
    if name == "attention_varlen":
        return (rand(*outs[0].shape, seed=10, device=outs[0].device), args[0], *outs, *args[1:])
    if name == "mlm_gather_loss":
        return (torch.tensor(0.5, device=outs[0].device), *args[:4], outs[1], *args[4:])
    g = rand(*reversed(outs[0].shape), seed=10, dtype=outs[0].dtype, device=outs[0].device).t()
    if name in ("bias_gelu", "geglu"):
        return (g, *args)
    if name == "bias_residual_layer_norm":
        return (g, *args[:4], *outs[1:])
    assert name == "bias_gelu_layer_norm", name
    return (g, *args[:3], *outs[1:], args[5])


def _call(op, args, backend):
    out = op(*args, backend=backend)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


# floating-point arguments an op gives no gradient for: rotary_qk's cos and sin tables (constants of the model)
_CONSTANTS = {"rotary_qk": (1, 2)}


def _grad_leaves(args, requires_grad, op_name=None):
    return [a.detach().clone().requires_grad_(requires_grad and i not in _CONSTANTS.get(op_name, ()))
            if isinstance(a, torch.Tensor) and a.is_floating_point() else a for i, a in enumerate(args)]


# --- the declarations ----------------------------------------------------------------------------------------------


def test_every_op_has_a_reference_and_a_cpu_kernel():
    assert set(registry.OPS) == {"attention_varlen", "bias_gelu", "bias_gelu_layer_norm", "bias_residual_layer_norm",
                                 "gather_rows", "mlm_gather_loss", "scatter_rows", "quantize_rows", "rotary_qk",
                                 "geglu", "panel_linear", "post_norm_layers", "int8_layers", "int8_panel_sums",
                                 "token_embeddings", "pack_mask", "mkl_linear",
                                 *INT8_PRODUCTS}
    for name, op in registry.OPS.items():
        assert callable(op.reference), name
        assert "cpu" in op.backends, name
        assert set(op.backends) <= set(registry.KERNEL_BACKENDS), name
        inference_only = ("gather_rows", "scatter_rows", "quantize_rows", "panel_linear", "post_norm_layers",
                          "int8_layers", "int8_panel_sums", "token_embeddings", "pack_mask", "mkl_linear",
                          *INT8_PRODUCTS)
        # rotary_qk's backward is its own forward, rotating back
        assert (op.backward_schema is None) == (name in (*inference_only, "rotary_qk")), name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_backends_name_functions_that_exist():
    for name, op in registry.OPS.items():
        if "triton" not in op.backends:
            continue
        module = importlib.import_module(f"{registry.TRITON_MODULES}.{name}")
        spec = op.backends["triton"]
        for which in (spec.forward, spec.backward) if op.backward_schema is not None else (spec.forward,):
            assert isinstance(which, str) and callable(getattr(module, which, None)), (name, which)
        assert op.kernel("triton") is getattr(module, spec.forward)
        if op.backward_schema is not None:
            assert op.kernel("triton", backward=True) is getattr(module, spec.backward)


@pytest.mark.parametrize("name", CPP_OP_NAMES)
def test_cpp_schemas_match_the_registry(name):
    """torch.ops.mtbert_fast_C holds the C++ kernels' schemas as the registry declares them, and the dispatcher op
    takes the same arguments plus the backend."""
    op = registry.OPS[name]
    kernels = getattr(torch.ops, registry.KERNEL_NAMESPACE)
    expected = [(name, op.schema)]
    if op.backward_schema is not None:
        expected.append((f"{name}_backward", op.cpp_backward_schema or op.backward_schema))
    for kernel_name, schema in expected:
        want = torch._C.parse_schema(f"{registry.KERNEL_NAMESPACE}::{kernel_name}{registry.kernel_schema(schema)}")
        assert str(getattr(kernels, kernel_name).default._schema) == str(want)
    public = op.op._schema
    assert [a.name for a in public.arguments] == [a.name for a in torch._C.parse_schema(f"x{op.schema}").arguments] + [
        "backend"]


# --- per op and backend --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_forced_backend_runs_its_kernel(op_name, backend, mode, monkeypatch):
    """op(..., backend=b) runs b's kernel and returns its result: through the dispatcher op where autograd may
    record it, and straight to the kernel under no_grad and inference_mode."""
    op = registry.OPS[op_name]
    calls = []
    kernel = op.kernel(backend.name)

    def spy(*args):
        calls.append(backend.name)
        return kernel(*args)

    monkeypatch.setitem(op._kernels, (backend.name, "forward"), spy)
    args = _forward_args(op_name, backend.device)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        out = op(*args, backend=backend.name)
    assert calls == [backend.name]
    with torch.no_grad():
        want = op.reference(*args)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", CPP_OP_NAMES)
def test_the_default_backend_reaches_kernel_and_fake(op_name):
    """The dispatcher op called without its backend (the schema's 'auto', which the dispatcher leaves out of the
    arguments it hands a Python kernel, with every other trailing default) runs the kernel the dispatch chooses for
    the op's main input, and its fake plans the same outputs."""
    op = registry.OPS[op_name]
    args = _forward_args(op_name, "cpu")
    want = _call(op.op, args, "cpu")
    for got in (op.op(*args), op.op(*args, "auto")):
        got = tuple(got) if isinstance(got, (tuple, list)) else (got,)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=0, rtol=0)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor)
                     else [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        fake = op.op(*fake_args)
    fake = tuple(fake) if isinstance(fake, (tuple, list)) else (fake,)
    assert [(f.shape, f.dtype) for f in fake] == [(w.shape, w.dtype) for w in want]


# int8_panel_sums and pack_mask take integer tensors alone, which cannot require grad
@pytest.mark.parametrize("op_name", sorted(name for name, op in registry.OPS.items()
                                           if op.backward is None and name not in ("int8_panel_sums", "pack_mask")))
def test_ops_without_a_backward_refuse_inputs_that_require_grad(op_name):
    """An op with no backward would hand back an output no gradient reaches (or, on the reference, one that does):
    with grad enabled, an input that requires grad is refused by name, on every backend; without grad it runs."""
    op = registry.OPS[op_name]
    args = _forward_args(op_name, "cpu")
    leaves = _grad_leaves(args, True)
    if not any(isinstance(a, torch.Tensor) and a.requires_grad for a in leaves):
        leaves = [[t.detach().clone().requires_grad_(t.is_floating_point()) for t in a] if isinstance(a, list) else a
                  for a in leaves]
    for backend in ("cpu", "reference"):
        with pytest.raises(RuntimeError, match=f"{op_name} has no backward \\(it runs inference only\\)"):
            op(*leaves, backend=backend)
    with torch.no_grad():
        op(*leaves, backend="cpu")


def test_no_grad_calls_trace_through_the_dispatcher_op():
    """Under no_grad a call goes straight to the kernel, except while a dispatch mode traces it (FakeTensorMode,
    make_fx), which only the dispatcher op (with its fake) can answer."""
    x, b = rand(4, 8), rand(8)
    with torch.no_grad():
        with FakeTensorMode() as mode:
            out = ops.bias_gelu(mode.from_tensor(x), mode.from_tensor(b), "none")
        assert out.shape == (4, 8)
        graph = torch.fx.experimental.proxy_tensor.make_fx(lambda x, b: ops.bias_gelu(x, b, "none"))(x, b)
    assert "mtbert_fast.bias_gelu.default" in str(graph.graph)


# opcheck's schema, fake and AOT checks run the op on copies of its arguments; an MKL pack holds addresses into
# itself and refuses to run moved (test_mkl_linear.py), so mkl_linear's fake is checked against its kernel by
# test_fakes_describe_the_kernels_outputs and its compiled form by test_compile_fullgraph instead
_OPCHECK_UTILS = {"mkl_linear": ("test_autograd_registration",)}


def test_opcheck(op_name, backend):
    """torch.library.opcheck of the dispatcher op (schema, fake against real: shapes, dtypes, strides; the autograd
    registration) on strided inputs, and of the backward op."""
    op = registry.OPS[op_name]
    args = _forward_args(op_name, backend.device)
    utils = {"test_utils": _OPCHECK_UTILS[op_name]} if op_name in _OPCHECK_UTILS else {}
    torch.library.opcheck(op.op, (*_grad_leaves(args, _differentiable(op_name), op_name), backend.name), **utils)
    if op.backward_schema is not None:
        bargs = _backward_args(op_name, args, _call(op.op, args, backend.name))
        torch.library.opcheck(op.backward_op, (*_grad_leaves(bargs, False), backend.name))


def test_fakes_describe_the_kernels_outputs(op_name, backend):
    """The fakes (what torch.compile plans with) give each output the shape, dtype and strides the kernel returns,
    on inputs that are not contiguous, for the forward and the backward op."""
    op = registry.OPS[op_name]
    args = _forward_args(op_name, backend.device)
    assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args)
    cases = [(op.op, args)]
    if op.backward_schema is not None:
        cases.append((op.backward_op, _backward_args(op_name, args, _call(op.op, args, backend.name))))
    for fn, fn_args in cases:
        real = _call(fn, fn_args, backend.name)
        with FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor)
                         else [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in fn_args]
            fake = _call(fn, fake_args, backend.name)
        assert len(fake) == len(real)
        for i, (f, r) in enumerate(zip(fake, real)):
            assert (f.shape, f.dtype, f.stride()) == (r.shape, r.dtype, r.stride()), (fn, i)


_WRAPPERS = {
    "bias_gelu": lambda x, b, a, **k: ops.bias_gelu(x, b, a, **k),
    "bias_residual_layer_norm": lambda *a, **k: ops.bias_residual_layer_norm(*a, **k),
    "bias_gelu_layer_norm": lambda *a, **k: ops.bias_gelu_layer_norm(*a, **k),
    "attention_varlen": lambda q, cu, m, s, p, rng, rb, w, pq, pk, pi, **k: ops.attention_varlen(
        q, cu, m, s, dropout_p=p, rng_state=rng, rel_bias=rb, window=w, pos_q=pq, pos_k=pk, pos_index=pi, **k),
    "mlm_gather_loss": lambda h, w, b, lab, ig, ch, **k: ops.mlm_gather_loss(h, w, b, lab, ig, chunk_size=ch, **k),
    "gather_rows": lambda x, i, **k: ops.gather_rows(x, i, **k),
    "scatter_rows": lambda x, i, n, **k: ops.scatter_rows(x, i, n, **k),
    "quantize_rows": lambda *a, **k: ops.quantize_rows(*a, **k),
    "rotary_qk": lambda q, c, s, p, inverse, **k: ops.rotary_qk(q, c, s, p, **k),
    "geglu": lambda x, a, **k: ops.geglu(x, a, **k),
    "int8_panel_sums": lambda q, p, n, **k: ops.int8_panel_sums(q, p, n, **k),
    "panel_linear": lambda x, p, b, n, g, a, **k: ops.panel_linear(x, p, b, n, gelu=g, approximate=a, **k),
    "mkl_linear": lambda x, p, w, b, g, a, **k: ops.mkl_linear(x, p, w, b, gelu=g, approximate=a, **k),
    "post_norm_layers": lambda *a, **k: ops.post_norm_layers(*a, **k),
    "token_embeddings": lambda *a, **k: ops.token_embeddings(*a, **k),
    "pack_mask": lambda m, **k: ops.pack_mask(m, **k),
    "int8_layers": lambda *a, **k: ops.int8_layers(*a, **k),
    # the ops' arguments 6 and 7 (outlier_x, outlier_w) are the wrappers' `outliers`, their last one `panels`, the
    # GELU op's one before it `keep`
    "int8_linear": lambda *a, **k: ops.int8_linear(*a[:6], outliers=a[6:8], panels=a[8], **k),
    "int8_linear_gelu_quantize": lambda *a, **k: ops.int8_linear_gelu_quantize(*a[:6], *a[8:10], outliers=a[6:8],
                                                                               keep=a[10], panels=a[11], **k),
    "int8_linear_residual_layer_norm": lambda *a, **k: ops.int8_linear_residual_layer_norm(
        *a[:6], *a[8:-1], outliers=a[6:8], panels=a[-1], **k),
    "int8_linear_residual_layer_norm_quantize": lambda *a, **k: ops.int8_linear_residual_layer_norm_quantize(
        *a[:6], *a[8:-1], outliers=a[6:8], panels=a[-1], **k),
}


def test_compile_fullgraph(op_name, backend, fresh_inductor):
    """torch.compile(fullgraph=True) of the public wrapper by Inductor, which asserts the fakes' strides at run time,
    on strided inputs: the forward equals eager exactly; forward and backward through autograd (aot_eager) equal
    eager's gradients."""
    args = _forward_args(op_name, backend.device)

    def fn(*a):
        return _WRAPPERS[op_name](*a, backend=backend.name)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args), atol=0, rtol=0)
    torch._dynamo.reset()
    if not _differentiable(op_name):
        return
    eager_leaves, compiled_leaves = _grad_leaves(args, True, op_name), _grad_leaves(args, True, op_name)
    wrt = [a for a in eager_leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    eager = torch.autograd.grad(fn(*eager_leaves).float().square().sum(), wrt)
    loss = torch.compile(lambda *a: fn(*a).float().square().sum(), fullgraph=True, backend="aot_eager")
    compiled_wrt = [a for a in compiled_leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    compiled = torch.autograd.grad(loss(*compiled_leaves), compiled_wrt)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

