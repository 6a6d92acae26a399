"""The Triton kernels (mtbert_fast/ops/triton), forward and backward, run on CPU tensors by Triton's interpreter
against the pure-PyTorch references; their registration (opcheck, torch.compile); the dispatch hookup; and a
compile of every kernel for an H100 (sm_90) at the GPU launch settings, which needs no GPU.

TRITON_INTERPRET=1 is set per test (monkeypatch), never for the session: with it set, the automatic backend choice
takes Triton for CPU tensors (dispatch.py), which the other test files must not see.  The kernels pick compiled or
interpreted at launch time (mtbert_fast/ops/triton/_jit.py), so it does not matter that triton was imported earlier
(conftest.py's backend list imports it) without the variable.  Under the interpreter the kernels take small blocks
(16 for attention, 32 vocabulary columns for the loss, 4 programs for the LayerNorm backward), so these small shapes
still run the multi-block and multi-program paths.

Tolerances: fp32 within 1e-5 (2e-5 absolute, 1e-4 relative where a value sums over a row, a
sequence or the vocabulary); bf16/fp16: the error against the fp32 reference, on the same low-precision inputs
upcast, is at most twice PyTorch's own error computing the same thing in that dtype, plus 1e-6.  bf16 under the
interpreter behaves as on the GPU (round-to-nearest casts, exact bf16 products in tl.dot) thanks to _jit.py's fixes.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import mtbert_fast.ops.triton as tk  # noqa: E402
from mtbert_fast import ops  # noqa: E402
from mtbert_fast.ops import dispatch, dropout, reference  # noqa: E402
from mtbert_fast.ops.triton import _jit  # noqa: E402

attention_module = sys.modules["mtbert_fast.ops.triton.attention_varlen"]

FLOOR = 1e-6


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _rand(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


def _run(fn, inputs, grad_out):
    """fn(*inputs) and the gradients of sum(out * grad_out) in every floating-point input -> (out, grads)."""
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


def _check(got, ref32, native, dtype, what, atol=1e-5, rtol=1e-5):
    assert got.shape == ref32.shape and got.dtype == native.dtype, what
    got, ref32 = got.double(), ref32.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref32, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
        return
    if not got.numel():
        return
    err = (got - ref32).abs().max().item()
    native_err = (native.double() - ref32).abs().max().item()
    assert err <= 2 * native_err + FLOOR, f"{what}: error {err:.3g} vs PyTorch's own {dtype} error {native_err:.3g}"


def _compare(triton_fn, ref_fn, native_fn, inputs, dtype, what, **tol):
    """Forward and backward of triton_fn on the dtype inputs against ref_fn on them upcast to fp32, and against
    native_fn (PyTorch in the dtype) for the allowed error."""
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    upcast = [t.float() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        grad_out = _rand(*ref_fn(*upcast).shape, seed=9).to(dtype)
    out, grads = _run(triton_fn, inputs, grad_out)
    ref, ref_grads = _run(ref_fn, upcast, grad_out.float())
    native, native_grads = _run(native_fn, inputs, grad_out) if dtype != torch.float32 else (out, grads)
    _check(out, ref, native, dtype, f"{what} forward", **tol)
    for i, (g, r, n) in enumerate(zip(grads, ref_grads, native_grads)):
        _check(g, r, n, dtype, f"{what} grad of input {i}", **tol)


# --- bias_gelu ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,approximate,shape",
    [
        (torch.float32, "none", (5, 37)),
        (torch.float32, "tanh", (1, 1)),
        (torch.float32, "none", (0, 16)),
        (torch.bfloat16, "none", (2, 3, 50)),
        (torch.float16, "tanh", (7, 300)),  # 2100 elements: three programs of 1024
        (torch.bfloat16, "tanh", (3, 65)),
    ],
)
def test_bias_gelu(dtype, approximate, shape):
    x, b = _rand(*shape, seed=1, scale=2), _rand(shape[-1], seed=2)
    _compare(
        lambda x, b: tk.bias_gelu(x, b, approximate),
        lambda x, b: reference.bias_gelu(x, b, approximate),
        lambda x, b: F.gelu(x + b, approximate=approximate),
        [x, b], dtype, f"bias_gelu {approximate}",
    )


# --- LayerNorms --------------------------------------------------------------------------------------------------

ROW_CASES = [
    (torch.float32, (1, 7)),  # one token
    (torch.float32, (13, 100)),  # 4 backward programs of 4, 4, 4, 1 rows; D not a power of two
    (torch.float32, (0, 16)),
    (torch.bfloat16, (2, 3, 33)),
    (torch.float16, (6, 64)),
]


@pytest.mark.parametrize("dtype,shape", ROW_CASES)
def test_bias_residual_layer_norm(dtype, shape):
    d = shape[-1]
    inputs = [_rand(*shape, seed=1), _rand(d, seed=2), _rand(*shape, seed=3, scale=3),
              1 + _rand(d, seed=4, scale=0.1), _rand(d, seed=5)]
    _compare(
        lambda *a: tk.bias_residual_layer_norm(*a, 1e-5),
        lambda *a: reference.bias_residual_layer_norm(*a, 1e-5),
        lambda x, b, r, w, beta: F.layer_norm(x + b + r, (d,), w, beta, 1e-5),
        inputs, dtype, "bias_residual_layer_norm", atol=2e-5, rtol=1e-4,
    )


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype,shape", ROW_CASES)
def test_bias_gelu_layer_norm(dtype, shape, approximate):
    d = shape[-1]
    inputs = [_rand(*shape, seed=1, scale=2), _rand(d, seed=2), 1 + _rand(d, seed=4, scale=0.1), _rand(d, seed=5)]
    _compare(
        lambda *a: tk.bias_gelu_layer_norm(*a, 1e-5, approximate),
        lambda *a: reference.bias_gelu_layer_norm(*a, 1e-5, approximate),
        lambda x, b, w, beta: F.layer_norm(F.gelu(x + b, approximate=approximate), (d,), w, beta, 1e-5),
        inputs, dtype, f"bias_gelu_layer_norm {approximate}", atol=2e-5, rtol=1e-4,
    )


# --- attention ---------------------------------------------------------------------------------------------------


def _packed(lengths, heads, head_dim, seed=0):
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    return _rand(int(cu[-1]), 3, heads, head_dim, seed=seed), cu, max(lengths, default=0)


def _native_attention(qkv, cu, fused, dropout_p=0.0, rng_state=None):
    """PyTorch's own attention in qkv's dtype, one sequence at a time: its fused kernel
    (F.scaled_dot_product_attention), or the eager form (matmul, softmax, dropout with the reference's mask, matmul
    in the dtype, as HF's eager attention; flash-attention's tests measure their kernels' gradients against that
    form)."""
    outs = [qkv.new_zeros((0,) + qkv.shape[2:])]
    bounds = cu.tolist()
    masks = dropout.attention_dropout_masks(rng_state, dropout_p, qkv.shape[2], cu) if dropout_p else None
    for b, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[s:e].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim] each
        if fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            probs = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
            if dropout_p:
                probs = probs * masks[b] / (1.0 - dropout_p)
            out = probs @ v
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "dtype,lengths,heads,head_dim",
    [
        (torch.float32, [1, 17, 5, 40], 2, 32),  # 40: three query and three key blocks of 16
        (torch.float32, [2, 0, 3], 1, 64),  # a zero-length sequence
        (torch.bfloat16, [3, 1, 20], 2, 80),  # head_dim 80: a 128-wide masked block
        (torch.float16, [1], 1, 64),  # one token
        (torch.float16, [6, 18], 3, 32),
    ],
)
def test_attention_varlen(dtype, lengths, heads, head_dim):
    """Forward and gradients within twice the error of PyTorch's eager attention; the forward also within twice
    that of its fused kernel."""
    qkv, cu, max_len = _packed(lengths, heads, head_dim)
    what = f"attention_varlen {lengths} x {heads} heads x {head_dim}"
    _compare(
        lambda q: tk.attention_varlen(q, cu, max_len),
        lambda q: reference.attention_varlen(q, cu, max_len),
        lambda q: _native_attention(q, cu, fused=False),
        [qkv], dtype, what, atol=2e-5, rtol=1e-4,
    )
    qkv = qkv.to(dtype)
    out = tk.attention_varlen(qkv, cu, max_len)
    ref = reference.attention_varlen(qkv.float(), cu, max_len)
    _check(out, ref, _native_attention(qkv, cu, fused=True), dtype, f"{what} forward vs the fused kernel")


def test_attention_varlen_no_tokens():
    qkv = torch.zeros(0, 3, 2, 32, requires_grad=True)
    out = tk.attention_varlen(qkv, torch.zeros(1, dtype=torch.int32), 0)
    assert out.shape == (0, 2, 32)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


def test_attention_varlen_scale_and_lse():
    qkv, cu, max_len = _packed([5, 9], 2, 32)
    out, lse = torch.ops.mtbert_fast.triton_attention_varlen(qkv, cu, max_len, 0.3, 0.0, None)
    torch.testing.assert_close(out, reference.attention_varlen(qkv, cu, max_len, 0.3), atol=1e-5, rtol=1e-5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, _ = qkv[s:e].unbind(1)
        want = torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * 0.3, dim=-1)  # [heads, L]
        torch.testing.assert_close(lse[:, s:e], want, atol=1e-5, rtol=1e-5)


def _rng_state(seed, offset=0):
    return torch.tensor([seed, offset], dtype=torch.int64)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("max_seqlen", [16, 0])
def test_attention_varlen_max_seqlen_below_the_longest(max_seqlen, dropout_p):
    """max_seqlen sizes the launch only: with it below the longest sequence (here 70 tokens, five blocks of 16), or
    0, every row still gets the reference's output and gradients."""
    qkv, cu, _ = _packed([70, 5, 1], 2, 32)
    rng_state = _rng_state(11)
    _compare(
        lambda q: tk.attention_varlen(q, cu, max_seqlen, None, dropout_p, rng_state),
        lambda q: reference.attention_varlen(q, cu, 70, None, dropout_p, rng_state),
        None, [qkv], torch.float32, f"attention_varlen max_seqlen={max_seqlen} dropout_p={dropout_p}",
        atol=2e-5, rtol=1e-4,
    )


@pytest.mark.parametrize("cap", [1, 2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_attention_varlen_capped_grid(cap, dropout_p, monkeypatch):
    """With the grid's axis 1 capped below a sequence's block count (CUDA allows 65,535; here 1 or 2 programs for
    three blocks of 16), each program loops over its blocks."""
    monkeypatch.setattr(attention_module, "_MAX_GRID_Y", cap)
    grids = {}
    run = _jit.Kernel.run

    def record(kernel, *args, grid, **kwargs):
        grids[kernel.fn.__name__] = grid
        return run(kernel, *args, grid=grid, **kwargs)

    monkeypatch.setattr(_jit.Kernel, "run", record)
    qkv, cu, max_len = _packed([40, 3, 33], 2, 32, seed=3)
    rng_state = _rng_state(-5, 2**32 + 9)
    _compare(
        lambda q: tk.attention_varlen(q, cu, max_len, None, dropout_p, rng_state),
        lambda q: reference.attention_varlen(q, cu, max_len, None, dropout_p, rng_state),
        None, [qkv], torch.float32, f"attention_varlen capped at {cap} programs", atol=2e-5, rtol=1e-4,
    )
    assert {name: grid[1] for name, grid in grids.items() if name != "_bwd_delta"} == {
        "_fwd": cap, "_bwd_dkdv": cap, "_bwd_dq": cap}
    assert len(grids["_bwd_delta"]) == 1  # rows of T x heads on axis 0


@pytest.mark.parametrize(
    "dtype,lengths,heads,head_dim",
    [
        (torch.float32, [1, 40, 7], 2, 32),  # one token, three blocks of 16, one partial block
        (torch.bfloat16, [1, 40, 7], 2, 32),
        (torch.bfloat16, [19, 1], 3, 80),  # head_dim 80: a 128-wide masked block
    ],
)
def test_attention_varlen_dropout(dtype, lengths, heads, head_dim):
    """Fused dropout, forward and gradients, against the reference with the same rng_state (the same mask), within
    twice the error of PyTorch's eager attention with that mask."""
    qkv, cu, max_len = _packed(lengths, heads, head_dim, seed=5)
    rng_state = _rng_state(0x1234_5678_9ABC_DEF0, 3)
    _compare(
        lambda q: tk.attention_varlen(q, cu, max_len, None, 0.3, rng_state),
        lambda q: reference.attention_varlen(q, cu, max_len, None, 0.3, rng_state),
        lambda q: _native_attention(q, cu, False, 0.3, rng_state),
        [qkv], dtype, f"attention_varlen dropout {lengths} x {heads} heads x {head_dim}", atol=2e-5, rtol=1e-4,
    )


def _mask_probe(cu, heads, dropout_p, rng_state):
    """The dropout mask the kernels apply, read off exactly: with q = 0 every probability of a sequence of length L
    is 1/L, and with v_j the j-th unit vector (j within the sequence) out_i = (M_i1, ..., M_iL) / L; with dO_i the
    i-th unit vector the gradient of v_j is (M_1j, ..., M_Lj) / L.  -> (forward's, backward's) bool
    [heads, L, L] per sequence (True where kept)."""
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    max_len = max(e - s for s, e in bounds)
    width = max(16, max_len)
    qkv = torch.zeros(int(cu[-1]), 3, heads, width)
    grad_out = torch.zeros(int(cu[-1]), heads, width)
    for s, e in bounds:
        qkv[s:e, 2] = torch.eye(e - s, width).unsqueeze(1)
        grad_out[s:e] = torch.eye(e - s, width).unsqueeze(1)
    qkv.requires_grad_()
    out = tk.attention_varlen(qkv, cu, max_len, None, dropout_p, rng_state)
    grad_v = torch.autograd.grad(out, qkv, grad_out)[0][:, 2]
    forward, backward = [], []
    for s, e in bounds:
        kept = (e - s) * (1.0 - dropout_p)
        fwd = out[s:e, :, : e - s].detach().permute(1, 0, 2) * kept  # [heads, i, j]
        bwd = grad_v[s:e, :, : e - s].permute(1, 2, 0) * kept  # [heads, i, j]
        for m in (fwd, bwd):
            assert torch.allclose(m, m.round(), atol=1e-4) and set(m.round().unique().tolist()) <= {0.0, 1.0}
        forward.append(fwd.round().bool())
        backward.append(bwd.round().bool())
    return forward, backward


@pytest.mark.parametrize(
    "seed,offset,dropout_p",
    [
        (0x1234_5678_9ABC_DEF0, 3, 0.3),
        (-5, 2**32 + 9, 0.1),  # the key's high word 0xffffffff, the offset taken mod 2^32
        (2**31 + 7, 2**31, 0.75),  # words >= 2^31, passed to the kernels as negative int32
    ],
)
def test_attention_varlen_dropout_mask_is_the_reference_mask(seed, offset, dropout_p):
    """The forward and the backward apply exactly mtbert_fast.ops.dropout's mask (keep_mask), keep within binomial
    bounds of 1 - dropout_p, and the same rng_state gives the same result."""
    heads = 2
    qkv, cu, max_len = _packed([1, 37, 6], heads, 32, seed=8)
    rng_state = _rng_state(seed, offset)
    forward, backward = _mask_probe(cu, heads, dropout_p, rng_state)
    want = dropout.attention_dropout_masks(rng_state, dropout_p, heads, cu)
    for f, b, w in zip(forward, backward, want, strict=True):
        assert torch.equal(f, w) and torch.equal(b, w)
    kept = torch.cat([w.flatten() for w in want]).double()
    n = kept.numel()
    assert abs(kept.mean().item() - (1 - dropout_p)) <= 5 * math.sqrt(dropout_p * (1 - dropout_p) / n)

    first, second = (_run(lambda q: tk.attention_varlen(q, cu, max_len, None, dropout_p, rng_state), [qkv],
                          _rand(int(cu[-1]), heads, 32, seed=9)) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])
    other = tk.attention_varlen(qkv, cu, max_len, None, dropout_p, _rng_state(seed, offset + 1))
    assert not torch.equal(other, first[0])


@pytest.mark.parametrize("dtype,dropout_p", [(torch.float32, 0.0), (torch.float32, 0.2), (torch.bfloat16, 0.2)])
def test_attention_varlen_backward_function(dtype, dropout_p):
    """attention_varlen_backward, the path taken after a CUDA forward (from that forward's out and lse), equals
    autograd through the Triton op."""
    qkv, cu, max_len = _packed([3, 20], 2, 32, seed=4)
    qkv = qkv.to(dtype)
    rng_state = _rng_state(99, 1)
    grad_out = _rand(int(cu[-1]), 2, 32, seed=6, dtype=dtype)
    out, (grad,) = _run(lambda q: tk.attention_varlen(q, cu, max_len, 0.2, dropout_p, rng_state), [qkv], grad_out)
    fwd, lse = torch.ops.mtbert_fast.triton_attention_varlen(qkv, cu, max_len, 0.2, dropout_p, rng_state)
    assert torch.equal(fwd, out)
    got = tk.KERNELS["attention_varlen_backward"](grad_out, qkv, fwd, lse, cu, max_len, 0.2, dropout_p, rng_state)
    assert got.shape == qkv.shape and got.dtype == dtype
    assert torch.equal(got, grad)


def test_attention_varlen_refuses_bad_inputs():
    """The checks every backend makes, without reading a device tensor."""
    qkv, cu, max_len = _packed([3, 2], 2, 16)
    rng_state = _rng_state(1)
    with pytest.raises(ValueError, match="qkv must be"):
        tk.attention_varlen(qkv[:, 0], cu, max_len)
    with pytest.raises(ValueError, match="int32"):
        tk.attention_varlen(qkv, cu.long(), max_len)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]"):
        tk.attention_varlen(qkv, torch.tensor([0, 3, 4], dtype=torch.int32), max_len)
    with pytest.raises(ValueError, match="max_seqlen"):
        tk.attention_varlen(qkv, cu, -1)
    with pytest.raises(ValueError, match="needs rng_state"):
        tk.attention_varlen(qkv, cu, max_len, None, 0.1)
    with pytest.raises(ValueError, match="rng_state must be"):
        tk.attention_varlen(qkv, cu, max_len, None, 0.1, rng_state.int())
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        tk.attention_varlen(qkv, cu, max_len, None, 1.0, rng_state)
    out, lse = torch.ops.mtbert_fast.triton_attention_varlen(qkv, cu, max_len, 0.25, 0.0, None)
    backward = tk.KERNELS["attention_varlen_backward"]
    with pytest.raises(ValueError, match="grad_out must be"):
        backward(out[:, :1], qkv, out, lse, cu, max_len, 0.25)
    with pytest.raises(ValueError, match="out must be"):
        backward(out, qkv, out.bfloat16(), lse, cu, max_len, 0.25)
    with pytest.raises(ValueError, match="lse must be"):
        backward(out, qkv, out, lse.t(), cu, max_len, 0.25)
    with pytest.raises(ValueError, match="needs rng_state"):
        backward(out, qkv, out, lse, cu, max_len, 0.25, 0.1)


# --- masked-LM loss ----------------------------------------------------------------------------------------------


def _mlm_inputs(rows, vocab, hidden, seed=0, ignored=(1, 4)):
    h, w, b = _rand(rows, hidden, seed=seed + 1), _rand(vocab, hidden, seed=seed + 2, scale=0.3), _rand(vocab, seed=3)
    labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(seed + 4))
    labels[list(ignored)] = -100
    return h, w, b, labels


def _native_ce_sum(labels):
    def fn(h, w, b):
        keep = labels != -100
        return F.cross_entropy(F.linear(h[keep], w, b), labels[keep], reduction="sum").float()

    return fn


@pytest.mark.parametrize(
    "dtype,rows,vocab,chunk",
    [
        (torch.float32, 9, 100, 4),  # three chunks of the 7 counted rows (4, 3); 4 vocabulary blocks of 32
        (torch.float32, 1, 7, 0),
        (torch.bfloat16, 12, 50, 0),
    ],
)
def test_mlm_gather_loss(dtype, rows, vocab, chunk):
    h, w, b, labels = _mlm_inputs(rows, vocab, 24, ignored=(1, 4) if rows > 4 else ())
    _compare(
        lambda h, w, b: tk.mlm_gather_loss(h, w, b, labels, -100, chunk),
        lambda h, w, b: reference.mlm_gather_loss(h, w, b, labels, -100, "sum"),
        _native_ce_sum(labels),
        [h, w, b], dtype, f"mlm_gather_loss {dtype}", atol=2e-5, rtol=1e-4,
    )


def test_mlm_gather_loss_all_ignored():
    h, w, b, _ = _mlm_inputs(3, 10, 8, ignored=())
    labels = torch.full((3,), -100)
    h.requires_grad_()
    loss = tk.mlm_gather_loss(h, w, b, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(h.grad) == 0
    assert ops.mlm_gather_loss(h, w, b, labels, backend="triton").isnan()  # a mean over no rows, as F.cross_entropy


def test_mlm_gather_loss_computes_only_needed_gradients():
    h, w, b, labels = _mlm_inputs(6, 20, 8)
    _, d_hidden, d_weight, d_bias = torch.ops.mtbert_fast.triton_mlm_gather_loss(h, w, b, labels, -100, 0, True, False,
                                                                                 False)
    assert d_hidden.shape == h.shape and d_weight.numel() == 0 and d_bias.numel() == 0
    with torch.no_grad():
        loss = tk.mlm_gather_loss(h.requires_grad_(), w, b, labels)
    torch.testing.assert_close(loss, reference.mlm_gather_loss(h, w, b, labels, -100, "sum"))
    w.requires_grad_()
    tk.mlm_gather_loss(h.detach(), w, b, labels).backward()
    want = torch.autograd.grad(reference.mlm_gather_loss(h.detach(), w, b, labels, -100, "sum"), w)[0]
    torch.testing.assert_close(w.grad, want, atol=1e-5, rtol=1e-5)


def test_mlm_gather_loss_bad_label():
    h, w, b, labels = _mlm_inputs(4, 10, 8, ignored=())
    labels[2] = 10
    with pytest.raises(RuntimeError, match=r"label 10 is outside \[0, 10\)"):
        tk.mlm_gather_loss(h, w, b, labels)


# --- registration: opcheck, torch.compile ------------------------------------------------------------------------


def _op_samples():
    x, b, r = _rand(3, 20, seed=1), _rand(20, seed=2), _rand(3, 20, seed=3)
    w, beta = 1 + _rand(20, seed=4, scale=0.1), _rand(20, seed=5)
    qkv, cu, max_len = _packed([3, 1], 1, 16)
    h, vw, vb, labels = _mlm_inputs(5, 9, 20)
    mean, rstd = torch.ops.mtbert_fast.triton_bias_residual_layer_norm(x, b, r, w, beta, 1e-5)[1:]
    gmean, grstd = torch.ops.mtbert_fast.triton_bias_gelu_layer_norm(x, b, w, beta, 1e-5, "tanh")[1:]
    rng_state = torch.tensor([5, 0])
    out, lse = torch.ops.mtbert_fast.triton_attention_varlen(qkv, cu, max_len, 0.25, 0.1, rng_state)
    return {
        "triton_bias_gelu": (x, b, "tanh"),
        "triton_bias_gelu_backward": (r, x, b, "none"),
        "triton_bias_residual_layer_norm": (x, b, r, w, beta, 1e-5),
        "triton_bias_residual_layer_norm_backward": (r, x, b, r, w, mean, rstd),
        "triton_bias_gelu_layer_norm": (x, b, w, beta, 1e-5, "tanh"),
        "triton_bias_gelu_layer_norm_backward": (r, x, b, w, gmean, grstd, "tanh"),
        "triton_attention_varlen": (qkv, cu, max_len, 0.25, 0.1, rng_state),
        "triton_attention_varlen_backward": (out.clone(), qkv, out, lse, cu, max_len, 0.25, 0.1, rng_state),
        "triton_mlm_gather_loss": (h, vw, vb, labels, -100, 2, True, True, True),
    }


OPS = ["triton_attention_varlen", "triton_attention_varlen_backward", "triton_bias_gelu", "triton_bias_gelu_backward",
       "triton_bias_gelu_layer_norm", "triton_bias_gelu_layer_norm_backward", "triton_bias_residual_layer_norm",
       "triton_bias_residual_layer_norm_backward", "triton_mlm_gather_loss"]


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name):
    needs_grad = not name.endswith("_backward")
    args = [a.clone().requires_grad_(needs_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in _op_samples()[name]]
    torch.library.opcheck(getattr(torch.ops.mtbert_fast, name), args)


def test_compile_fullgraph_forward_and_backward():
    """Every Triton op, through the public wrappers with backend="triton", traced whole by torch.compile."""
    torch._dynamo.reset()
    x, b, r = _rand(4, 16, seed=1), _rand(16, seed=2), _rand(4, 16, seed=3)
    w, beta = 1 + _rand(16, seed=4, scale=0.1), _rand(16, seed=5)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    labels = torch.tensor([1, -100, 5, 0])

    def model(x, b, r, w, beta, decoder):
        h = ops.bias_gelu(x, b, backend="triton")
        h = ops.bias_residual_layer_norm(h, b, r, w, beta, 1e-5, backend="triton")
        qkv = torch.stack([h, 0.5 * h, h.flip(-1)], 1).unsqueeze(2)  # [4, 3, 1 head, 16]
        h = h + ops.attention_varlen(qkv, cu, 3, backend="triton").view(4, 16)
        h = ops.bias_gelu_layer_norm(h, b, w, beta, 1e-5, backend="triton")
        return ops.mlm_gather_loss(h, decoder, None, labels, backend="triton")

    inputs = [x, b, r, w, beta, _rand(8, 16, seed=6)]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    model(*eager_in).backward()
    compiled_in = [t.clone().requires_grad_() for t in inputs]
    torch.compile(model, fullgraph=True, backend="aot_eager")(*compiled_in).backward()
    for e, c in zip(eager_in, compiled_in):
        torch.testing.assert_close(c.grad, e.grad, atol=1e-6, rtol=1e-6)


# --- dispatch ----------------------------------------------------------------------------------------------------


def _wrapper_calls():
    x, b, r = _rand(3, 12, seed=1), _rand(12, seed=2), _rand(3, 12, seed=3)
    w, beta = 1 + _rand(12, seed=4, scale=0.1), _rand(12, seed=5)
    qkv, cu, max_len = _packed([2, 3], 2, 16)
    h, vw, vb, labels = _mlm_inputs(5, 9, 12)
    return {
        "bias_gelu": (lambda **k: ops.bias_gelu(x, b, "tanh", **k), lambda: reference.bias_gelu(x, b, "tanh")),
        "bias_residual_layer_norm": (lambda **k: ops.bias_residual_layer_norm(x, b, r, w, beta, 1e-5, **k),
                                     lambda: reference.bias_residual_layer_norm(x, b, r, w, beta, 1e-5)),
        "bias_gelu_layer_norm": (lambda **k: ops.bias_gelu_layer_norm(x, b, w, beta, 1e-5, "tanh", **k),
                                 lambda: reference.bias_gelu_layer_norm(x, b, w, beta, 1e-5, "tanh")),
        "attention_varlen": (lambda **k: ops.attention_varlen(qkv, cu, max_len, **k),
                             lambda: reference.attention_varlen(qkv, cu, max_len)),
        "mlm_gather_loss": (lambda **k: ops.mlm_gather_loss(h, vw, vb, labels, chunk_size=2, **k),
                            lambda: reference.mlm_gather_loss(h, vw, vb, labels)),
    }


@pytest.mark.parametrize("name", sorted(n for n in dispatch.triton_kernels if not n.endswith("_backward")))
def test_forced_triton_backend_runs_the_triton_kernel(name, monkeypatch):
    calls = []
    kernel = dispatch.triton_kernels[name]

    def spy(*args):
        calls.append(name)
        return kernel(*args)

    monkeypatch.setitem(dispatch.triton_kernels, name, spy)
    call, ref = _wrapper_calls()[name]
    assert dispatch.reason("triton", name, torch.device("cpu"), torch.float32) is None
    torch.testing.assert_close(call(backend="triton"), ref(), atol=2e-5, rtol=1e-5)
    assert calls == [name]


def test_every_op_has_a_triton_kernel():
    assert set(tk.KERNELS) == {"attention_varlen", "attention_varlen_backward", "bias_gelu", "bias_gelu_layer_norm",
                               "bias_residual_layer_norm", "mlm_gather_loss"}
    for name, fn in tk.KERNELS.items():
        assert dispatch.triton_kernels[name] is fn


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, b = _rand(2, 8), _rand(8)
    with pytest.raises(ops.BackendUnavailable, match="TRITON_INTERPRET=1"):
        ops.bias_gelu(x, b, backend="triton")
    assert dispatch.choose("bias_gelu", x) != "triton"


# --- the GPU build of every kernel -------------------------------------------------------------------------------

_SIGNATURE_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int32: "i32",
                    torch.int64: "i64"}
# an H100's shared memory per block (227 KiB)
_SM90_SHARED_BYTES = 232448


def test_kernels_compile_for_sm90(monkeypatch):
    """Runs every op and its backward with the GPU launch settings, compiling each launch for sm_90 (Triton's own
    compiler and ptxas, no GPU needed) instead of running it: catches what the interpreter accepts and the compiler
    does not, and checks that each kernel's shared memory fits an H100."""
    from triton import compiler
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget

    if "nvidia" not in backends:
        pytest.skip(f"this Triton has no NVIDIA backend (only {sorted(backends)})")

    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = []

    def compile_launch(kernel, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        bound = {**dict(zip(kernel.arg_names, args)), **kwargs}
        signature, constexprs = {}, {}
        for p in kernel.params:
            value = bound[p.name]
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = "*" + _SIGNATURE_TYPES[value.dtype]
            elif isinstance(value, int):
                signature[p.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            else:
                signature[p.name] = "fp32"
        src = compiler.ASTSource(kernel, signature, constexprs)
        try:
            binary = compiler.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as exc:  # noqa: BLE001 - the message names the kernel and its constants
            raise AssertionError(f"{kernel.fn.__name__} {constexprs} does not compile for sm_90: {exc}") from exc
        assert binary.metadata.shared <= _SM90_SHARED_BYTES, (kernel.fn.__name__, constexprs, binary.metadata.shared)
        compiled.append(f"{kernel.fn.__module__}.{kernel.fn.__name__}")

    monkeypatch.setattr(_jit.Kernel, "run", compile_launch)
    for module in ("attention_varlen", "mlm_gather_loss"):
        monkeypatch.setattr(sys.modules[f"mtbert_fast.ops.triton.{module}"], "on_gpu", lambda t: True)

    dt = torch.bfloat16
    x, b = _rand(4, 768, dtype=dt).requires_grad_(), _rand(768, dtype=dt).requires_grad_()
    w, beta = _rand(768, dtype=dt).requires_grad_(), _rand(768, dtype=dt).requires_grad_()
    tk.bias_gelu(x, b, "tanh").sum().backward()
    tk.bias_residual_layer_norm(x, b, x.detach(), w, beta, 1e-12).sum().backward()
    tk.bias_gelu_layer_norm(x, b, w, beta, 1e-12, "none").sum().backward()
    cu = torch.tensor([0, 10], dtype=torch.int32)
    rng_state = torch.tensor([-5, 2**32 + 9])
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.float16, 80), (torch.bfloat16, 128), (torch.float32, 64)):
        for dropout_p in (0.0, 0.1):
            qkv = _rand(10, 3, 2, head_dim, dtype=dtype).requires_grad_()
            tk.attention_varlen(qkv, cu, 10, None, dropout_p, rng_state).sum().backward()
    h, vw = _rand(6, 32, dtype=dt).requires_grad_(), _rand(50, 32, dtype=dt)
    tk.mlm_gather_loss(h, vw, torch.zeros(50, dtype=dt), torch.randint(0, 50, (6,))).backward()
    # bias_gelu, and each LayerNorm: forward and backward; attention: forward, delta, dK/dV, dQ; the loss: one
    assert len(set(compiled)) == 11, sorted(set(compiled))
