"""The op layer: every backend against the reference, autograd, opcheck, torch.compile, backend choice, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import _ext, ops
from mtbert_fast.ops import dispatch, reference

CPU = torch.device("cpu")
BACKENDS = [b for b in ("cpu", "reference") if dispatch.reason(b, "bias_gelu", CPU, torch.float32) is None]
KERNEL_BACKENDS = [b for b in BACKENDS if b != "reference"]
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"mtbert_fast._C not built: {_ext.load_error}")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype)


def assert_close_to_reference(out, ref32, native, dtype, floor=1e-6):
    """fp32: within 1e-5 (plus 1e-5 relative). bf16/fp16: the error against the fp32 reference is at most twice
    the error of PyTorch's own computation in that dtype (`native`), plus a tiny floor."""
    out, ref32 = out.float(), ref32.float()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, atol=1e-5, rtol=1e-5)
        return
    err = (out - ref32).abs().max().item() if out.numel() else 0.0
    native_err = (native.float() - ref32).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * native_err + floor, f"error {err} vs PyTorch's own {dtype} error {native_err}"


# --- elementwise and LayerNorm ops -------------------------------------------------------------------------------

ROW_SHAPES = [(1, 1), (5, 7), (37, 31), (3, 768), (2, 3, 1000), (0, 16)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(backend, dtype, shape, approximate):
    x, b = _rand(*shape, seed=1, scale=2), _rand(shape[-1], seed=2)
    out = ops.bias_gelu(x.to(dtype), b.to(dtype), approximate, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference.bias_gelu(x.to(dtype).float(), b.to(dtype).float(), approximate)
    native = F.gelu(x.to(dtype) + b.to(dtype), approximate=approximate)
    assert_close_to_reference(out, ref, native, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_bias_residual_layer_norm(backend, dtype, shape):
    d = shape[-1]
    x, r = _rand(*shape, seed=1), _rand(*shape, seed=3, scale=3)
    b, w, beta = _rand(d, seed=2), 1 + _rand(d, seed=4, scale=0.1), _rand(d, seed=5)
    args = [t.to(dtype) for t in (x, b, r, w, beta)]
    out = ops.bias_residual_layer_norm(*args, 1e-12, backend=backend)
    ref = reference.bias_residual_layer_norm(*[a.float() for a in args], 1e-12)
    xb, bb, rb, wb, betab = args
    native = F.layer_norm(xb + bb + rb, (d,), wb, betab, 1e-12)
    assert_close_to_reference(out, ref, native, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_layer_norm(backend, dtype, shape, approximate):
    d = shape[-1]
    x, b, w, beta = _rand(*shape, seed=1, scale=2), _rand(d, seed=2), 1 + _rand(d, seed=4, scale=0.1), _rand(d, seed=5)
    args = [t.to(dtype) for t in (x, b, w, beta)]
    out = ops.bias_gelu_layer_norm(*args, 1e-5, approximate, backend=backend)
    ref = reference.bias_gelu_layer_norm(*[a.float() for a in args], 1e-5, approximate)
    xb, bb, wb, betab = args
    native = F.layer_norm(F.gelu(xb + bb, approximate=approximate), (d,), wb, betab, 1e-5)
    assert_close_to_reference(out, ref, native, dtype)


def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    out.backward(_rand(*out.shape, seed=9, dtype=out.dtype))
    return [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (9, 130)])
def test_row_ops_backward_match_reference(backend, shape):
    d = shape[-1]
    x, r, b = _rand(*shape, seed=1), _rand(*shape, seed=3), _rand(d, seed=2)
    w, beta = 1 + _rand(d, seed=4, scale=0.1), _rand(d, seed=5)
    cases = [
        (lambda x, b: ops.bias_gelu(x, b, "tanh", backend=backend), lambda x, b: reference.bias_gelu(x, b, "tanh"),
         [x, b]),
        (lambda *a: ops.bias_residual_layer_norm(*a, 1e-6, backend=backend),
         lambda *a: reference.bias_residual_layer_norm(*a, 1e-6), [x, b, r, w, beta]),
        (lambda *a: ops.bias_gelu_layer_norm(*a, 1e-6, "none", backend=backend),
         lambda *a: reference.bias_gelu_layer_norm(*a, 1e-6, "none"), [x, b, w, beta]),
    ]
    for fn, ref_fn, inputs in cases:
        for got, want in zip(_grads(fn, inputs), _grads(ref_fn, inputs)):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --- attention ---------------------------------------------------------------------------------------------------


def _packed(lengths, heads, head_dim, dtype=torch.float32, seed=0):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    qkv = _rand(int(cu[-1]), 3, heads, head_dim, seed=seed).to(dtype)
    return qkv, cu, max(lengths) if lengths else 0


def _sdpa_native(qkv, cu, scale):
    """PyTorch's own attention in qkv's dtype, one sequence at a time."""
    outs = []
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[s:e].permute(1, 2, 0, 3).unbind(0)  # [heads, L, d] each
        outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lengths,heads,head_dim",
    [([1], 1, 32), ([5, 1, 17], 2, 64), ([3, 0, 9], 3, 80), ([33, 64], 2, 128), ([512], 1, 32)],
)
def test_attention_varlen(backend, dtype, lengths, heads, head_dim):
    qkv, cu, max_len = _packed(lengths, heads, head_dim, dtype)
    out = ops.attention_varlen(qkv, cu, max_len, backend=backend)
    assert out.shape == (qkv.shape[0], heads, head_dim) and out.dtype == dtype
    scale = 1 / math.sqrt(head_dim)
    ref = reference.attention_varlen(qkv.float(), cu, max_len)
    assert_close_to_reference(out, ref, _sdpa_native(qkv, cu, scale), dtype)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("lengths,head_dim", [([1, 6, 13], 32), ([40, 2], 80)])
def test_attention_varlen_backward(backend, lengths, head_dim):
    qkv, cu, max_len = _packed(lengths, 2, head_dim)
    got = _grads(lambda q: ops.attention_varlen(q, cu, max_len, backend=backend), [qkv])[0]
    want = _grads(lambda q: reference.attention_varlen(q, cu, max_len), [qkv])[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_attention_varlen_sequences_do_not_leak():
    """Changing one sequence's tokens must leave every other sequence's output unchanged."""
    qkv, cu, max_len = _packed([4, 7, 3], 2, 32)
    changed = qkv.clone()
    changed[4:11] += 1.0
    for backend in BACKENDS:
        a = ops.attention_varlen(qkv, cu, max_len, backend=backend)
        b = ops.attention_varlen(changed, cu, max_len, backend=backend)
        assert torch.equal(a[:4], b[:4]) and torch.equal(a[11:], b[11:])
        assert not torch.allclose(a[4:11], b[4:11])


# --- masked-LM loss ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,vocab,chunk", [(1, 7, 0), (13, 101, 4), (40, 1000, 0)])
def test_mlm_gather_loss(backend, dtype, rows, vocab, chunk):
    h, w, b = _rand(rows, 24, seed=1).to(dtype), _rand(vocab, 24, seed=2, scale=0.3).to(dtype), _rand(vocab, seed=3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=_gen(4))
    labels[1::3] = -100
    loss = ops.mlm_gather_loss(h, w, b, labels, chunk_size=chunk, backend=backend)
    ref = reference.mlm_gather_loss(h.float(), w.float(), b.float(), labels)
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        return
    # A mean of row losses: its rounding errors partly cancel, so the bound is PyTorch's own mean per-row error.
    keep = labels != -100
    rows_native = F.cross_entropy(F.linear(h[keep], w, b).float(), labels[keep], reduction="none")
    rows_ref = F.cross_entropy(F.linear(h[keep].float(), w.float(), b.float()), labels[keep], reduction="none")
    native_err = (rows_native - rows_ref).abs().mean().item()
    assert abs(loss.item() - ref.item()) <= 2 * native_err + 1e-5


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mlm_gather_loss_backward(backend):
    h, w, b = _rand(11, 16, seed=1), _rand(50, 16, seed=2), _rand(50, seed=3)
    labels = torch.randint(0, 50, (11,), generator=_gen(4))
    labels[3] = -100
    got = _grads(lambda *a: ops.mlm_gather_loss(*a, labels, chunk_size=4, backend=backend), [h, w, b])
    want = _grads(lambda *a: reference.mlm_gather_loss(*a, labels), [h, w, b])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_mlm_gather_loss_all_ignored_is_nan_like_cross_entropy():
    h, w, b = _rand(3, 8), _rand(5, 8), _rand(5)
    labels = torch.full((3,), -100)
    for backend in BACKENDS:
        assert torch.isnan(ops.mlm_gather_loss(h, w, b, labels, backend=backend))
        assert ops.mlm_gather_loss(h, w, b, labels, reduction="sum", backend=backend).item() == 0.0


# --- packing -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpad_pad_round_trip(backend):
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    hidden = _rand(4, 4, 6)
    packed, indices, cu, max_len = ops.unpad(hidden, mask)
    assert cu.tolist() == [0, 3, 4, 8, 10] and max_len == 4 and cu.dtype == torch.int32
    torch.testing.assert_close(packed, hidden[mask.bool()])
    back = ops.pad(packed, indices, 4, 4)
    torch.testing.assert_close(back, hidden * mask[..., None])
    ids = torch.arange(16).reshape(4, 4)
    assert torch.equal(ops.gather_rows(ids.flatten(), indices, backend=backend), ids[mask.bool()])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_scatter_gradients(backend):
    x = _rand(6, 3).requires_grad_()
    idx = torch.tensor([4, 0, 4, 2])
    ops.gather_rows(x, idx, backend=backend).sum().backward()
    assert x.grad[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 2.0, 0.0]
    y = _rand(3, 2).requires_grad_()
    out = ops.scatter_rows(y, torch.tensor([5, 1, 2]), 7, backend=backend)
    (out * torch.arange(7.0)[:, None]).sum().backward()
    assert y.grad[:, 0].tolist() == [5.0, 1.0, 2.0]


# --- opcheck and torch.compile -----------------------------------------------------------------------------------


def _samples():
    x, b, r = _rand(5, 12, seed=1), _rand(12, seed=2), _rand(5, 12, seed=3)
    w, beta = 1 + _rand(12, seed=4, scale=0.1), _rand(12, seed=5)
    qkv, cu, max_len = _packed([3, 1, 4], 2, 16)
    labels = torch.tensor([1, -100, 0, 6, 2])
    idx = torch.tensor([4, 0, 2])
    return {
        "bias_gelu": (x, b, "none"),
        "bias_residual_layer_norm": (x, b, r, w, beta, 1e-12),
        "bias_gelu_layer_norm": (x, b, w, beta, 1e-12, "tanh"),
        "attention_varlen": (qkv, cu, max_len, 0.25),
        "mlm_gather_loss": (x, _rand(7, 12, seed=6), _rand(7, seed=7), labels, -100, 2),
        "gather_rows": (x, idx),
        "scatter_rows": (x[:3], idx, 6),
    }


@needs_ext
@pytest.mark.parametrize("name", sorted(_samples()))
def test_opcheck(name):
    op = getattr(torch.ops.mtbert_fast_C, name)
    args = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _samples()[name]]
    torch.library.opcheck(op, args)


_WRAPPERS = {
    "bias_gelu": lambda x, b, a, **k: ops.bias_gelu(x, b, a, **k),
    "bias_residual_layer_norm": lambda *a, **k: ops.bias_residual_layer_norm(*a, **k),
    "bias_gelu_layer_norm": lambda *a, **k: ops.bias_gelu_layer_norm(*a, **k),
    "attention_varlen": lambda q, cu, m, s, **k: ops.attention_varlen(q, cu, m, s, **k),
    "mlm_gather_loss": lambda h, w, b, lab, ig, ch, **k: ops.mlm_gather_loss(h, w, b, lab, ig, chunk_size=ch, **k),
    "gather_rows": lambda x, i, **k: ops.gather_rows(x, i, **k),
    "scatter_rows": lambda x, i, n, **k: ops.scatter_rows(x, i, n, **k),
}


@needs_ext
@pytest.mark.parametrize("name", sorted(_WRAPPERS))
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    args = _samples()[name]
    fn = _WRAPPERS[name]
    eager = fn(*args, backend="cpu")
    compiled = torch.compile(lambda *a: fn(*a, backend="cpu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), eager)


@needs_ext
def test_attention_dropout_opcheck_and_compile():
    """The dropout arguments pass opcheck, and torch.compile(fullgraph=True) traces the wrapper that draws
    rng_state from torch's generator: compiled and eager give the same result for the same seed."""
    qkv, cu, max_len = _packed([3, 1, 6], 2, 16)
    rng = torch.tensor([77, 0])
    torch.library.opcheck(torch.ops.mtbert_fast_C.attention_varlen, (qkv.clone().requires_grad_(), cu, max_len, 0.25,
                                                                   0.3, rng))
    torch._dynamo.reset()

    def fn(q):
        return ops.attention_varlen(q, cu, max_len, dropout_p=0.3, backend="cpu")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(qkv)
    torch.manual_seed(5)
    torch.testing.assert_close(out, fn(qkv))


@needs_ext
def test_compile_fullgraph_backward():
    torch._dynamo.reset()
    x, b, r = _rand(5, 12, seed=1), _rand(12, seed=2), _rand(5, 12, seed=3)
    w, beta = 1 + _rand(12, seed=4, scale=0.1), _rand(12, seed=5)

    def block(x, b, r, w, beta):
        h = ops.bias_gelu(x, b, backend="cpu")
        return ops.bias_residual_layer_norm(h, b, r, w, beta, 1e-12, backend="cpu").square().sum()

    inputs = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
    torch.compile(block, fullgraph=True, backend="aot_eager")(*inputs).backward()
    eager = [t.clone().requires_grad_() for t in (x, b, r, w, beta)]
    block(*eager).backward()
    for t, e in zip(inputs, eager):
        torch.testing.assert_close(t.grad, e.grad, atol=1e-5, rtol=1e-5)


# --- backend choice ----------------------------------------------------------------------------------------------


def test_auto_prefers_compiled_cpu_kernel():
    x, b = _rand(2, 8), _rand(8)
    ops.bias_gelu(x, b)
    chosen, passed_over = dispatch.last_choices()[("bias_gelu", "cpu", torch.float32)]
    assert chosen == ("cpu" if _ext.has_kernel("bias_gelu", "CPU") else "reference")
    assert set(passed_over) >= {"cuda", "triton"}


def test_forced_backend_that_cannot_run_names_every_reason():
    x, b = _rand(2, 8), _rand(8)
    with pytest.raises(ops.BackendUnavailable, match=r"backend 'cuda' cannot run.*cuda:.*triton:.*cpu:.*reference:"):
        ops.bias_gelu(x, b, backend="cuda")


@needs_ext
def test_forced_cpu_backend_names_the_dtype():
    x, b = _rand(2, 8).double(), _rand(8).double()
    with pytest.raises(ops.BackendUnavailable, match=r"dtype float64 is not supported \(bfloat16, float32\)"):
        ops.bias_gelu(x, b, backend="cpu")


def test_env_var_forces_backend(monkeypatch):
    x, b = _rand(2, 8), _rand(8)
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ops.BackendUnavailable):
        ops.bias_gelu(x, b)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    torch.testing.assert_close(ops.bias_gelu(x, b), reference.bias_gelu(x, b))
    monkeypatch.setenv(dispatch.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=r"MTBERT_FAST_BACKEND=.*'fastest'.*auto, cuda, triton, cpu, reference"):
        ops.bias_gelu(x, b)


def test_float64_falls_back_to_reference_automatically():
    x, b = _rand(3, 5).double(), _rand(5).double()
    torch.testing.assert_close(ops.bias_gelu(x, b), F.gelu(x + b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout_runs_on_every_backend_with_the_reference_mask(backend):
    qkv, cu, max_len = _packed([4, 2, 9], 2, 8)
    rng = torch.tensor([1234, 0])
    out = ops.attention_varlen(qkv, cu, max_len, dropout_p=0.5, rng_state=rng, backend=backend)
    torch.testing.assert_close(out, reference.attention_varlen(qkv, cu, max_len, None, 0.5, rng), atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    first = ops.attention_varlen(qkv, cu, max_len, dropout_p=0.5, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(ops.attention_varlen(qkv, cu, max_len, dropout_p=0.5, backend=backend), first)


def test_attention_dropout_refuses_a_bad_rng_state():
    qkv, cu, max_len = _packed([4], 1, 8)
    with pytest.raises(ValueError, match=r"rng_state must be an int64 CPU tensor of shape \[2\]"):
        ops.attention_varlen(qkv, cu, max_len, dropout_p=0.1, rng_state=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        ops.attention_varlen(qkv, cu, max_len, dropout_p=1.0)


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_is_named(backend):
    x, b = _rand(4, 6), _rand(6)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(6,\)"):
        ops.bias_gelu(x, _rand(5), backend=backend)
    with pytest.raises(TypeError, match="bias has dtype torch.bfloat16"):
        ops.bias_gelu(x, b.bfloat16(), backend=backend)
    with pytest.raises(ValueError, match="bias is on meta"):
        ops.bias_gelu(x, b.to("meta"), backend=backend)
    with pytest.raises(ValueError, match="approximate must be"):
        ops.bias_gelu(x, b, "sigmoid", backend=backend)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 5\)"):
        ops.bias_residual_layer_norm(x, b, _rand(4, 5), b, b, backend=backend)
    with pytest.raises(ValueError, match=r"qkv must be \[T, 3, heads, head_dim\]"):
        ops.attention_varlen(_rand(4, 2, 1, 8), torch.tensor([0, 4], dtype=torch.int32), 4, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        ops.attention_varlen(_rand(4, 3, 1, 8), torch.tensor([0, 4]), 4, backend=backend)
    with pytest.raises(ValueError, match=r"labels must be int64 \[4\]"):
        ops.mlm_gather_loss(x, _rand(9, 6), None, torch.zeros(3, dtype=torch.int64), backend=backend)


@needs_ext
def test_kernel_checks_name_bad_contents():
    qkv = _rand(5, 3, 1, 8)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] must equal the 5 rows of qkv, got 4"):
        ops.attention_varlen(qkv, torch.tensor([0, 3, 4], dtype=torch.int32), 3, backend="cpu")
    with pytest.raises(ValueError, match=r"cu_seqlens = \[0\] describes no sequence, but qkv has 5 rows"):
        ops.attention_varlen(qkv, torch.tensor([0], dtype=torch.int32), 0, backend="cpu")
    with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
        ops.attention_varlen(qkv, torch.tensor([0, 4, 3, 5], dtype=torch.int32), 4, backend="cpu")
    with pytest.raises(RuntimeError, match="max_seqlen must be >= 0, got -1"):
        torch.ops.mtbert_fast_C.attention_varlen(qkv, torch.tensor([0, 5], dtype=torch.int32), -1, 0.5)
    with pytest.raises(RuntimeError, match="label"):
        ops.mlm_gather_loss(_rand(2, 4), _rand(5, 4), _rand(5), torch.tensor([1, 9]), backend="cpu")
    with pytest.raises(RuntimeError, match=r"indices\[1\] = 3 is out of range"):
        ops.gather_rows(_rand(3, 2), torch.tensor([0, 3]), backend="cpu")


def test_extension_is_built_unless_skipped():
    """A broken build must fail the suite, not quietly turn every kernel test into a skip."""
    import os

    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
        pytest.skip("pure-Python install requested")
    assert _ext.loaded(), _ext.load_error
    for op in ("attention_varlen", "bias_gelu", "bias_residual_layer_norm", "bias_gelu_layer_norm",
               "gather_rows", "scatter_rows", "mlm_gather_loss"):
        assert _ext.has_kernel(op, "CPU"), f"no CPU kernel registered for {op}"
