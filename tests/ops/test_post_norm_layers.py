"""post_norm_layers, a stack of post-norm encoder layers in one call, on every backend that runs here: against the
reference, against the same kernels called one by one (bit for bit), and its errors."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.models import weight_pack
from mtbert_fast.ops import reference
from mtbert_fast.ops.post_norm_layers import layer_weights
from op_testing import assert_close, cu_seqlens, rand, sequence_groups

OP_NAME = "post_norm_layers"
mkl_module = importlib.import_module("mtbert_fast.ops.mkl_linear")
encoder_module = importlib.import_module("mtbert_fast.models.encoder")


def _layer(h, inner, dtype, seed):
    """One layer's plain weights: (Wqkv, bqkv, Wo, bo, g1, b1, Wi, bi, Wf, bf, g2, b2)."""
    s = seed * 20
    return (rand(3 * h, h, seed=s, scale=h**-0.5, dtype=dtype), rand(3 * h, seed=s + 1, scale=0.1, dtype=dtype),
            rand(h, h, seed=s + 2, scale=h**-0.5, dtype=dtype), rand(h, seed=s + 3, scale=0.1, dtype=dtype),
            1 + rand(h, seed=s + 4, scale=0.1, dtype=dtype), rand(h, seed=s + 5, scale=0.1, dtype=dtype),
            rand(inner, h, seed=s + 6, scale=h**-0.5, dtype=dtype), rand(inner, seed=s + 7, scale=0.1, dtype=dtype),
            rand(h, inner, seed=s + 8, scale=inner**-0.5, dtype=dtype), rand(h, seed=s + 9, scale=0.1, dtype=dtype),
            1 + rand(h, seed=s + 10, scale=0.1, dtype=dtype), rand(h, seed=s + 11, scale=0.1, dtype=dtype))


@pytest.fixture
def whole_batch():
    """The stack over the whole batch on every thread, as the kernels called one by one on the batch see it (no
    groups of sequences on threads of their own); the switch restored after."""
    before = ops.stack_by_sequences()
    ops.stack_by_sequences(False)
    yield
    ops.stack_by_sequences(before)


def _packed(plain):
    """The op's 12 tensors of a layer: each matrix as panels."""
    return layer_weights(*(ops.pack_panels(t) if t.dim() == 2 else t for t in plain))


def _onednn(t):
    return torch.ops.mkldnn._reorder_linear_weight(t)


def _onednn_packed(plain, dtype):
    """The op's 12 tensors of a layer: each matrix in oneDNN's blocked layout."""
    if not weight_pack.AVAILABLE or weight_pack.onednn_dtype(dtype) != dtype:
        pytest.skip(f"oneDNN does not multiply {dtype} weights on this CPU")
    return layer_weights(*(_onednn(t) if t.dim() == 2 else t for t in plain))


def _native(x, lengths, layers, heads, scale, eps, approximate, rel_bias):
    """The layers in x's dtype with PyTorch's own ops (softmax attention per sequence)."""
    t, h = x.shape
    for wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 in layers:
        q, k, v = F.linear(x, wqkv, bqkv).view(t, 3, heads, h // heads).unbind(1)
        ctx, start = [], 0
        for n in lengths:
            s = torch.einsum("ihd,jhd->hij", q[start:start + n], k[start:start + n]) * scale
            if rel_bias is not None:
                r = (rel_bias.shape[1] - 1) // 2
                pos = torch.arange(n)
                s = s + rel_bias.to(s.dtype)[:, (pos[None, :] - pos[:, None]).clamp(-r, r) + r]
            ctx.append(torch.einsum("hij,jhd->ihd", s.softmax(-1), v[start:start + n]))
            start += n
        a = F.linear(torch.cat(ctx).reshape(t, h), wo, bo) + x
        x = F.layer_norm(a, (h,), g1, b1, eps)
        f = F.linear(F.gelu(F.linear(x, wi, bi), approximate=approximate), wf, bf) + x
        x = F.layer_norm(f, (h,), g2, b2, eps)
    return x


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("lengths,h,heads,inner", [([1], 8, 2, 8), ([5, 1, 12], 24, 3, 40), ([17, 30], 64, 4, 96)])
def test_kernel_against_the_reference(backend, dtype, lengths, h, heads, inner, approximate, relative):
    """Ragged sequences down to one token, head sizes of 4 to 16, an intermediate size with a part panel (40), two
    layers; with and without a relative position bias."""
    t, scale, eps = sum(lengths), 1 / math.sqrt(h // heads), 1e-12
    plain = [_layer(h, inner, dtype, seed) for seed in (1, 2)]
    weights = [w for layer in plain for w in _packed(layer)]
    rel_bias = rand(heads, 2 * max(lengths) - 1, seed=7) if relative else None
    x, cu = backend.to(rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths))
    out = backend.forward(x, cu, max(lengths), backend.to(*weights), heads, scale, eps, approximate, rel_bias)
    assert out.dtype == dtype and out.shape == (t, h)
    ref = reference.post_norm_layers(x.float(), cu, max(lengths), [w.float() for w in weights], heads, scale, eps,
                                     approximate, rel_bias)
    native = _native(x, lengths, plain, heads, scale, eps, approximate, rel_bias)
    assert_close(out, ref, native, dtype, atol=1e-5, rtol=1e-5)


def test_equals_the_kernels_called_one_by_one(backend, dtype, whole_batch):
    """The stack runs exactly the encoder's per-layer kernels: the same result, bit for bit."""
    lengths, h, heads, inner = [9, 3], 48, 4, 72
    t, scale, eps = sum(lengths), 0.25, 1e-12
    weights = [w for seed in (1, 2, 3) for w in _packed(_layer(h, inner, dtype, seed))]
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    out = backend.forward(x, cu, max(lengths), weights, heads, scale, eps, "none", None)
    want = x
    for i in range(0, len(weights), 12):
        wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = weights[i:i + 12]
        qkv = ops.panel_linear(want, wqkv, bqkv, 3 * h).view(t, 3, heads, h // heads)
        ctx = ops.attention_varlen(qkv, cu, max(lengths), scale).reshape(t, h)
        want = ops.bias_residual_layer_norm(ops.panel_linear(ctx, wo, None, h), bo, want, g1, b1, eps)
        inner_out = ops.panel_linear(want, wi, bi, inner, gelu=True)
        want = ops.bias_residual_layer_norm(ops.panel_linear(inner_out, wf, None, h), bf, want, g2, b2, eps)
    assert torch.equal(out, want)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_onednn_weights_equal_the_kernels_called_one_by_one(backend, dtype, approximate, whole_batch):
    """Weights in oneDNN's layout run on oneDNN's linear, as the encoder runs a full batch: the result of the kernels
    called one by one, bit for bit, and the reference's; a stack may hold both kinds of weight, each product on the
    kernel its weight is packed for."""
    lengths, h, heads, inner = [9, 3, 20], 48, 4, 72
    t, scale, eps = sum(lengths), 0.25, 1e-12
    plain = [_layer(h, inner, dtype, seed) for seed in (1, 2)]
    weights = [w for layer in plain for w in _onednn_packed(layer, dtype)]
    rel_bias = rand(heads, 2 * max(lengths) - 1, seed=7)
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    out = backend.forward(x, cu, max(lengths), weights, heads, scale, eps, approximate, rel_bias)
    want = x
    for i in range(0, len(weights), 12):
        wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = weights[i:i + 12]
        qkv = torch.ops.mkldnn._linear_pointwise(want, wqkv, bqkv, "none", [], "").view(t, 3, heads, h // heads)
        ctx = ops.attention_varlen(qkv, cu, max(lengths), scale, rel_bias=rel_bias).reshape(t, h)
        o = torch.ops.mkldnn._linear_pointwise(ctx, wo, None, "none", [], "")
        want = ops.bias_residual_layer_norm(o, bo, want, g1, b1, eps)
        inner_out = torch.ops.mkldnn._linear_pointwise(want, wi, bi, "gelu", [], approximate)
        f = torch.ops.mkldnn._linear_pointwise(inner_out, wf, None, "none", [], "")
        want = ops.bias_residual_layer_norm(f, bf, want, g2, b2, eps)
    assert torch.equal(out, want)
    # (the reference widens a weight in oneDNN's layout itself)
    ref = reference.post_norm_layers(x.float(), cu, max(lengths), [w if w.is_mkldnn else w.float() for w in weights],
                                     heads, scale, eps, approximate, rel_bias)
    native = _native(x, lengths, plain, heads, scale, eps, approximate, rel_bias)
    assert_close(out, ref, native, dtype, atol=1e-5, rtol=1e-5)
    mixed = list(weights)
    for k, w in ((0, plain[0][0]), (8, plain[0][8]), (12 + 6, plain[1][6])):
        mixed[k] = ops.pack_panels(w)
    both = backend.forward(x, cu, max(lengths), mixed, heads, scale, eps, approximate, rel_bias)
    assert_close(both, ref, native, dtype, atol=1e-5, rtol=1e-5)


def test_onednn_row_blocks():
    """Where oneDNN multiplies bf16 on AMX tiles, products of 448-1,280 rows with weights of 768-1,024 output features
    run in equal blocks of at most 384 rows (oneDNN runs them at half its rate in one call); every other product, and
    every product elsewhere, in one call."""
    block = torch.ops.mtbert_fast_C.onednn_row_block
    amx = weight_pack.ONEDNN_AMX_BF16
    for rows, features, blocked in [(1024, 768, 342), (448, 768, 224), (1280, 1024, 320), (1024, 3072, 1024),
                                    (1024, 384, 1024), (1281, 768, 1281), (447, 768, 447), (384, 768, 384)]:
        assert block(rows, features, torch.bfloat16) == (blocked if amx else rows), (rows, features)
        assert block(rows, features, torch.float32) == rows


def test_onednn_products_in_row_blocks_equal_the_kernels_called_one_by_one(backend, monkeypatch, whole_batch):
    """A bf16 layer of BERT-base's width on 480 tokens: where the products of 768 output features run in row blocks
    (onednn_row_block), the stack gives the products called block by block, bit for bit, and the encoder's own
    layer-by-layer linear, where it takes oneDNN (here every product: panel_linear's row limits at 0), does the same;
    within bf16's bound of the reference either way."""
    dtype, lengths, h, heads, inner = torch.bfloat16, [200, 130, 150], 768, 12, 1536
    t, scale, eps = sum(lengths), 0.125, 1e-12
    plain = _layer(h, inner, dtype, 1)
    weights = _onednn_packed(plain, dtype)
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    out = backend.forward(x, cu, max(lengths), weights, heads, scale, eps, "none", None)
    rows = torch.ops.mtbert_fast_C.onednn_row_block(t, h, dtype)
    assert rows == (240 if weight_pack.ONEDNN_AMX_BF16 else t)

    def product(a, w, b, gelu=False):
        parts = [torch.ops.mkldnn._linear_pointwise(r, w, b, "gelu" if gelu else "none", [], "none" if gelu else "")
                 for r in a.split(torch.ops.mtbert_fast_C.onednn_row_block(a.shape[0], w.shape[0], dtype))]
        return torch.cat(parts)

    wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = weights
    ctx = ops.attention_varlen(product(x, wqkv, bqkv).view(t, 3, heads, h // heads), cu, max(lengths), scale)
    want = ops.bias_residual_layer_norm(product(ctx.reshape(t, h), wo, None), bo, x, g1, b1, eps)
    inner_out = product(want, wi, bi, gelu=True)
    want = ops.bias_residual_layer_norm(product(inner_out, wf, None), bf, want, g2, b2, eps)
    assert torch.equal(out, want)
    linear = encoder_module._Linear(True, "cpu")
    monkeypatch.setattr(encoder_module, "panel_rows", lambda dtype, *weight: 0)
    assert torch.equal(linear(ctx.reshape(t, h), plain[2]), product(ctx.reshape(t, h), wo, None))
    ref = reference.post_norm_layers(x.float(), cu, max(lengths), [w if w.is_mkldnn else w.float() for w in weights],
                                     heads, scale, eps, "none", None)
    native = _native(x, lengths, [plain], heads, scale, eps, "none", None)
    assert_close(out, ref, native, dtype, atol=1e-5, rtol=1e-5)


def test_stack_groups():
    """The groups of sequences the stack runs one a thread: whole consecutive sequences, each boundary at the sequence
    start nearest its even share of the rows. None with one thread, fewer sequences than threads, fewer rows a thread
    than 0.4 of a layer's sum K N / sum (K + N) (123 at MiniLM's sizes, 246 at bert-base's) or more than 768, or a
    group of more than 1.25 times an even share."""
    minilm, bert_base = (384, 1536), (768, 3072)
    full = cu_seqlens([128] * 8)
    assert ops.stack_groups(full, 2, *minilm) == [0, 4, 8]
    assert ops.stack_groups(full, 4, *bert_base) == [0, 2, 4, 6, 8]
    assert ops.stack_groups(cu_seqlens([128] * 3), 3, *minilm) == [0, 1, 2, 3]
    assert ops.stack_groups(full, 1, *minilm) == []
    assert ops.stack_groups(cu_seqlens([512]), 2, *minilm) == []
    assert ops.stack_groups(cu_seqlens([32] * 8), 2, *minilm) == [0, 4, 8]  # 128 rows a thread
    assert ops.stack_groups(cu_seqlens([30] * 8), 2, *minilm) == []  # 120
    assert ops.stack_groups(cu_seqlens([32] * 8), 2, *bert_base) == []
    assert ops.stack_groups(cu_seqlens([62] * 8), 2, *bert_base) == [0, 4, 8]
    assert ops.stack_groups(cu_seqlens([192] * 8), 2, *minilm) == [0, 4, 8]  # 768 rows a thread
    assert ops.stack_groups(cu_seqlens([194] * 8), 2, *minilm) == []  # 776
    # 480 rows: the start nearest 240 is 200 (not 330), and 280 rows are within 1.25 x 240
    assert ops.stack_groups(cu_seqlens([200, 130, 150]), 2, *minilm) == [0, 1, 3]
    assert ops.stack_groups(cu_seqlens([320, 60, 60, 40]), 2, *minilm) == []
    # empty sequences go with a neighbour; no group is left without a sequence
    assert ops.stack_groups(cu_seqlens([0, 128, 0, 0, 128, 0]), 2, *minilm) == [0, 4, 6]
    with pytest.raises(RuntimeError, match="stack_groups: cu_seqlens must be a 1-D int32"):
        ops.stack_groups(full.long(), 2, *minilm)


@pytest.mark.parametrize("kind", ["panels", "onednn"])
def test_groups_of_sequences_equal_the_stack_on_each_group(backend, dtype, kind):
    """On two threads a batch of enough rows runs as two groups of sequences, one a thread (each layer's attention
    then runs once a group, on two threads): the result of the stack on each group run whole, bit for bit; on panels
    (each row's bits the same at any row count) also the result of the whole batch run whole; within the dtype's
    bound of the reference either way."""
    lengths, h, heads, inner = [20, 24, 18, 22, 9], 48, 4, 72
    t, scale, eps = sum(lengths), 0.25, 1e-12
    plain = [_layer(h, inner, dtype, seed) for seed in (1, 2)]
    weights = [w for layer in plain for w in (_packed(layer) if kind == "panels" else _onednn_packed(layer, dtype))]
    rel_bias = rand(heads, 2 * max(lengths) - 1, seed=7)
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    first = ops.stack_groups(cu, 2, h, inner)
    assert first == [0, 2, 5]

    def run(rows, offsets):
        return ops.post_norm_layers(rows, offsets, max(lengths), weights, heads, scale, eps, "none", rel_bias,
                                    backend=backend.name)

    with torch.inference_mode():
        with sequence_groups(True) as grouped:
            out = run(x, cu)
        with sequence_groups(False) as whole:
            whole_out = run(x, cu)
            parts = [run(x[int(cu[a]):int(cu[b])], (cu[a:b + 1] - cu[a]).to(torch.int32))
                     for a, b in zip(first, first[1:])]
    assert len(grouped) == 2 * 2 and len(set(grouped)) == 2
    assert len(whole) == 2 + 2 * 2 and len(set(whole)) == 1
    assert torch.equal(out, torch.cat(parts))
    if kind == "panels":
        assert torch.equal(out, whole_out)
    ref = reference.post_norm_layers(x.float(), cu, max(lengths), [w if w.is_mkldnn else w.float() for w in weights],
                                     heads, scale, eps, "none", rel_bias)
    native = _native(x, lengths, plain, heads, scale, eps, "none", rel_bias)
    assert_close(out, ref, native, dtype, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_onednn_weight_errors_name_the_weight(backend, call):
    """A weight in oneDNN's layout of another shape or dtype than its product's is refused with its place and
    shape, before anything runs."""
    x, cu, max_seqlen, _, heads, scale = _args()
    layer = _layer(16, 24, torch.float32, 1)
    weights = list(_onednn_packed(layer, torch.float32))
    run = ops.post_norm_layers if call == "wrapper" else (
        lambda *a: backend.forward(*a, 1e-12, "none", None))
    bad = list(weights)
    bad[6] = _onednn(rand(24, 12))
    with pytest.raises((ValueError, RuntimeError), match=r"weights\[6\] \(layer 0.*oneDNN's layout must .*24, 16"):
        run(x, cu, max_seqlen, bad, heads, scale)
    if weight_pack.onednn_dtype(torch.bfloat16) == torch.bfloat16:
        bad = list(weights)
        bad[8] = _onednn(layer[8].bfloat16())
        with pytest.raises((ValueError, RuntimeError), match=r"weights\[8\] \(layer 0.*oneDNN's layout.*dtype"):
            run(x, cu, max_seqlen, bad, heads, scale)


@pytest.mark.skipif(not mkl_module.available(), reason="this PyTorch has no MKL")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_plain_weights_with_mkl_packs_equal_the_kernels_called_one_by_one(backend, approximate, dtype, whole_batch):
    """Plain weights with their MKL packs run on mkl_linear, as the encoder runs a full batch on an Intel CPU
    (bf16 where the CPU has no bf16 arithmetic): the result of the kernels called one by one, bit for bit, and the
    reference's (which reads the plain weights); a stack may mix them with panels."""
    lengths, h, heads, inner = [9, 3, 20], 48, 4, 72
    t, scale, eps = sum(lengths), 0.25, 1e-12
    plain = [_layer(h, inner, dtype, seed) for seed in (1, 2)]
    weights = [w for layer in plain for w in layer_weights(*layer)]
    packs = [ops.pack_mkl(w) for layer in plain for w in (layer[0], layer[2], layer[6], layer[8])]
    rel_bias = rand(heads, 2 * max(lengths) - 1, seed=7)
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    out = ops.post_norm_layers(x, cu, max(lengths), weights, heads, scale, eps, approximate, rel_bias, packs,
                               backend=backend.name)
    want = x
    for i in range(0, len(weights), 12):
        wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = weights[i:i + 12]
        pqkv, po, pi, pf = packs[i // 3:i // 3 + 4]
        qkv = ops.mkl_linear(want, pqkv, wqkv, bqkv).view(t, 3, heads, h // heads)
        ctx = ops.attention_varlen(qkv, cu, max(lengths), scale, rel_bias=rel_bias).reshape(t, h)
        want = ops.bias_residual_layer_norm(ops.mkl_linear(ctx, po, wo), bo, want, g1, b1, eps)
        inner_out = ops.mkl_linear(want, pi, wi, bi, gelu=True, approximate=approximate)
        want = ops.bias_residual_layer_norm(ops.mkl_linear(inner_out, pf, wf), bf, want, g2, b2, eps)
    assert torch.equal(out, want)
    ref = reference.post_norm_layers(x.double(), cu, max(lengths), [w.double() for w in weights], heads, scale, eps,
                                     approximate, rel_bias.double())
    native = _native(x, lengths, plain, heads, scale, eps, approximate, rel_bias)
    assert_close(out, ref, native, dtype, atol=1e-5, rtol=1e-5)
    mixed = list(weights)
    mixed[12 + 6] = ops.pack_panels(plain[1][6])
    both = ops.post_norm_layers(x, cu, max(lengths), mixed, heads, scale, eps, approximate, rel_bias, packs,
                                backend=backend.name)
    assert_close(both, ref, native, dtype, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not mkl_module.available(), reason="this PyTorch has no MKL")
@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_plain_weight_errors_name_the_weight(backend, call):
    """A plain weight without packs, packs of another count, a plain weight of the wrong shape or dtype: refused with
    its place, before anything runs."""
    x, cu, max_seqlen, _, heads, scale = _args()
    layer = _layer(16, 24, torch.float32, 1)
    weights = list(layer_weights(*layer))
    packs = [ops.pack_mkl(w) for w in (layer[0], layer[2], layer[6], layer[8])]
    run = (lambda *a: ops.post_norm_layers(*a[:6], 1e-12, "none", None, a[6])) if call == "wrapper" else (
        lambda *a: backend.forward(*a[:6], 1e-12, "none", None, a[6]))
    with pytest.raises((ValueError, RuntimeError), match=r"weights\[0\] \(layer 0.* plain .*needs its MKL pack"):
        run(x, cu, max_seqlen, weights, heads, scale, [])
    with pytest.raises((ValueError, RuntimeError), match="packs must be empty or hold 4"):
        run(x, cu, max_seqlen, weights, heads, scale, packs[:3])
    bad = list(weights)
    bad[8] = rand(16, 23)
    with pytest.raises((ValueError, RuntimeError), match=r"weights\[8\] \(layer 0.*\[16, 24\]"):
        run(x, cu, max_seqlen, bad, heads, scale, packs)
    bad[8] = layer[8].bfloat16()
    with pytest.raises((ValueError, RuntimeError), match=r"weights\[8\] \(layer 0.*plain weight, must .*x's dtype"):
        run(x, cu, max_seqlen, bad, heads, scale, packs)


def _args(dtype=torch.float32, layers=1):
    weights = [w for seed in range(1, layers + 1) for w in _packed(_layer(16, 24, dtype, seed))]
    return rand(6, 16, dtype=dtype), cu_seqlens([2, 4]), 4, weights, 2, 0.25


@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_errors_name_the_problem(backend, call):
    x, cu, max_seqlen, weights, heads, scale = _args(layers=2)
    run = ops.post_norm_layers if call == "wrapper" else (
        lambda *a: backend.forward(*a, 1e-12, "none", None))
    with pytest.raises((ValueError, RuntimeError), match="12 tensors per layer"):
        run(x, cu, max_seqlen, weights[:-1], heads, scale)
    with pytest.raises((ValueError, RuntimeError), match="12 tensors per layer"):
        run(x, cu, max_seqlen, [], heads, scale)
    with pytest.raises((ValueError, RuntimeError), match="multiple of heads"):
        run(x, cu, max_seqlen, weights, 3, scale)
    bad = list(weights)
    bad[12 + 9] = bad[12 + 9][:-1]
    with pytest.raises((ValueError, RuntimeError), match=r"weights\[21\] \(layer 1, the output bias \[H\]\).*16"):
        run(x, cu, max_seqlen, bad, heads, scale)
    bad = list(weights)
    bad[6] = ops.pack_panels(rand(24, 12))
    with pytest.raises((ValueError, RuntimeError), match="panels must have shape"):
        run(x, cu, max_seqlen, bad, heads, scale)
    with pytest.raises((ValueError, RuntimeError), match="x must"):
        run(x[None], cu, max_seqlen, weights, heads, scale)


def test_wrapper_refuses_a_gelu_it_does_not_know():
    x, cu, max_seqlen, weights, heads, scale = _args()
    with pytest.raises(ValueError, match="approximate"):
        ops.post_norm_layers(x, cu, max_seqlen, weights, heads, scale, approximate="sigmoid")


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_wrapper_checks_cu_seqlens_on_every_backend(name):
    """The wrapper checks cu_seqlens and max_seqlen against x before any backend runs, naming the op: the reference
    would otherwise fail on a reshape far from the cause."""
    x, cu, max_seqlen, weights, heads, scale = _args()
    cases = [
        (cu.long(), max_seqlen, "post_norm_layers: cu_seqlens must be a 1-D int32 tensor, got torch.int64"),
        (torch.tensor([1, 2, 6], dtype=torch.int32), max_seqlen, r"post_norm_layers: cu_seqlens\[0\] must be 0"),
        (torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen,
         r"post_norm_layers: cu_seqlens\[-1\] must equal the 6 rows of x, got 5"),
        (torch.tensor([0, 4, 2, 6], dtype=torch.int32), max_seqlen, "post_norm_layers: cu_seqlens must be non-decreasing"),
        (cu, -1, "post_norm_layers: max_seqlen must be >= 0"),
    ]
    for bad_cu, bad_max, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.post_norm_layers(x, bad_cu, bad_max, weights, heads, scale, backend=name)
