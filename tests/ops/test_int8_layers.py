"""int8_layers, a stack of post-norm encoder layers with int8 products in one call: against the same kernels called
one by one (bit for bit), against the reference, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.models.int8 import quantize_linear
from mtbert_fast.ops import reference
from mtbert_fast.ops.int8 import panels_vnni
from mtbert_fast.ops.int8_layers import PER_LAYER, product_weights
from op_testing import cu_seqlens, num_threads, rand, sequence_groups

OP_NAME = "int8_layers"


def _product(n, k, dtype, seed, spikes):
    """One product's 7 tensors, quantized from random float weights [n, k] with calibration ranges that carry
    `spikes` channels far above the rest (they become outlier channels, computed in fp32)."""
    absmax = 1 + rand(k, seed=seed + 2, scale=0.2).abs()
    absmax[torch.randperm(k, generator=torch.Generator().manual_seed(seed))[:spikes]] *= 40
    lin = quantize_linear(rand(n, k, seed=seed, scale=k**-0.5), rand(n, seed=seed + 1, scale=0.1).to(dtype), absmax,
                          pairs=not panels_vnni())
    assert lin.outlier_index.numel() == spikes
    return product_weights(ops.pack_int8_panels(lin.weight), lin.weight_scale, lin.weight_sum, lin.bias, lin.smooth,
                           lin.outlier_index, lin.outlier_weight)


def _layer(h, inner, dtype, seed, spikes=(1, 0, 2, 1)):
    """One layer's 32 tensors: the QKV, attention output, intermediate and output products (with `spikes` outlier
    channels each), then the two LayerNorms' weight and bias."""
    s = seed * 40
    shapes = ((3 * h, h), (h, h), (inner, h), (h, inner))
    weights = [t for i, ((n, k), o) in enumerate(zip(shapes, spikes)) for t in _product(n, k, dtype, s + 4 * i, o)]
    return weights + [1 + rand(h, seed=s + 30, scale=0.1, dtype=dtype), rand(h, seed=s + 31, scale=0.1, dtype=dtype),
                      1 + rand(h, seed=s + 32, scale=0.1, dtype=dtype), rand(h, seed=s + 33, scale=0.1, dtype=dtype)]


def _one_by_one(x, cu, max_seqlen, weights, heads, scale, eps, approximate, rel_bias):
    """The layers as the int8 ops' public wrappers run them, one call at a time."""
    t, h = x.shape

    def product(w, q, outlier_x):
        panels, weight_scale, weight_sum, bias, _, index, outlier_weight = w
        outliers = (outlier_x, outlier_weight) if index.numel() else None
        return (*q, weight_scale, weight_sum, bias), {"outliers": outliers, "panels": panels}

    layers = [weights[i:i + PER_LAYER] for i in range(0, len(weights), PER_LAYER)]
    q = ops.quantize_rows(x, layers[0][4])
    for i, w in enumerate(layers):
        qkv_w, out_w, inner_w, ffn_w = (w[j:j + 7] for j in range(0, 28, 7))
        args, kw = product(qkv_w, q, x.index_select(1, qkv_w[5]).float())
        qkv = ops.int8_linear(*args, **kw).view(t, 3, heads, h // heads)
        ctx = ops.attention_varlen(qkv, cu, max_seqlen, scale, rel_bias=rel_bias).reshape(t, h)
        args, kw = product(out_w, ops.quantize_rows(ctx, out_w[4]), ctx.index_select(1, out_w[5]).float())
        x, *q = ops.int8_linear_residual_layer_norm_quantize(*args, x, w[28], w[29], eps, inner_w[4], **kw)
        args, kw = product(inner_w, q, x.index_select(1, inner_w[5]).float())
        *q, kept = ops.int8_linear_gelu_quantize(*args, approximate, ffn_w[4], keep=ffn_w[5], **kw)
        args, kw = product(ffn_w, q, kept)
        if i + 1 == len(layers):
            x = ops.int8_linear_residual_layer_norm(*args, x, w[30], w[31], eps, **kw)
        else:
            x, *q = ops.int8_linear_residual_layer_norm_quantize(*args, x, w[30], w[31], eps, layers[i + 1][4], **kw)
    return x


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("relative", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_equals_the_kernels_called_one_by_one(backend, dtype, approximate, relative, threads):
    """The stack runs exactly the int8 layer's kernels: the same result, bit for bit, with outlier channels in
    three of the four products (none in the attention output's), three layers, an intermediate size with a part
    panel, a relative position bias or none, on one thread and on two."""
    lengths, h, heads, inner = [9, 1, 14], 48, 4, 72
    t, scale, eps = sum(lengths), 1 / math.sqrt(h // heads), 1e-12
    weights = [w for seed in (1, 2, 3) for w in _layer(h, inner, dtype, seed)]
    rel_bias = rand(heads, 2 * max(lengths) - 1, seed=7) if relative else None
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    with num_threads(threads), torch.inference_mode():
        out = backend.forward(x, cu, max(lengths), weights, heads, scale, eps, approximate, rel_bias)
        want = _one_by_one(x, cu, max(lengths), weights, heads, scale, eps, approximate, rel_bias)
    assert out.dtype == dtype and out.shape == (t, h)
    assert torch.equal(out, want)


def test_groups_of_sequences_equal_the_kernels_called_one_by_one(backend, dtype):
    """On two threads a batch of enough rows runs as two groups of sequences, one a thread (ops.stack_groups: each
    layer's attention then runs once a group, on two threads): every int8 kernel gives each row the same bits at any
    row count, so the result is still the kernels' called one by one on the whole batch, bit for bit, and the
    stack's on each group run on its own."""
    lengths, h, heads, inner = [20, 24, 18, 22, 9], 48, 4, 72
    t, scale, eps = sum(lengths), 1 / math.sqrt(h // heads), 1e-12
    weights = [w for seed in (1, 2) for w in _layer(h, inner, dtype, seed)]
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    first = ops.stack_groups(cu, 2, h, inner)
    assert first == [0, 2, 5]

    def run(rows, offsets):
        return backend.forward(rows, offsets, max(lengths), weights, heads, scale, eps, "none", None)

    with torch.inference_mode():
        with sequence_groups(True) as grouped:
            out = run(x, cu)
        with sequence_groups(False) as whole:
            parts = [run(x[int(cu[a]):int(cu[b])], (cu[a:b + 1] - cu[a]).to(torch.int32))
                     for a, b in zip(first, first[1:])]
            want = _one_by_one(x, cu, max(lengths), weights, heads, scale, eps, "none", None)
    assert len(grouped) == 2 * 2 and len(set(grouped)) == 2
    assert len(whole) == 2 * 2 + 2 and len(set(whole)) == 1
    assert torch.equal(out, want)
    assert torch.equal(out, torch.cat(parts))


@pytest.mark.parametrize("lengths", [[1], [5, 12]])
def test_kernel_against_the_reference(backend, dtype, lengths):
    """Against the reference (fp64-exact sums, PyTorch's GELU and LayerNorm): the kernels' fp32 steps round as the
    reference's do to within an ulp or so, which moves no value to another quantized level on these inputs."""
    h, heads, inner = 32, 2, 40
    t, scale, eps = sum(lengths), 1 / math.sqrt(h // heads), 1e-12
    weights = [w for seed in (1, 2) for w in _layer(h, inner, dtype, seed)]
    x, cu = rand(t, h, seed=3, dtype=dtype), cu_seqlens(lengths)
    with torch.inference_mode():
        out = backend.forward(x, cu, max(lengths), weights, heads, scale, eps, "none", None)
        ref = reference.int8_layers(x, cu, max(lengths), weights, heads, scale, eps, "none")
    assert ref.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bfloat16: an ulp of the outputs (|y| < 4) is at most 1.6e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)


def _args(dtype=torch.float32, layers=2):
    weights = [w for seed in range(1, layers + 1) for w in _layer(16, 24, dtype, seed)]
    return rand(6, 16, dtype=dtype), cu_seqlens([2, 4]), 4, weights, 2, 0.25


@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_errors_name_the_problem(backend, call):
    x, cu, max_seqlen, weights, heads, scale = _args()
    run = ops.int8_layers if call == "wrapper" else (lambda *a: backend.forward(*a, 1e-12, "none", None))
    with pytest.raises((ValueError, RuntimeError), match="32 tensors per layer"):
        run(x, cu, max_seqlen, weights[:-1], heads, scale)
    with pytest.raises((ValueError, RuntimeError), match="32 tensors per layer"):
        run(x, cu, max_seqlen, [], heads, scale)
    with pytest.raises((ValueError, RuntimeError), match="multiple of heads"):
        run(x, cu, max_seqlen, weights, 3, scale)
    with pytest.raises((ValueError, RuntimeError), match="x must"):
        run(x[None], cu, max_seqlen, weights, heads, scale)
    bad = list(weights)  # layer 1's output product: weight_scale one short
    bad[PER_LAYER + 3 * 7 + 1] = bad[PER_LAYER + 3 * 7 + 1][:-1]
    with pytest.raises((ValueError, RuntimeError), match="layer 1, the output product"):
        run(x, cu, max_seqlen, bad, heads, scale)
    bad = list(weights)  # layer 0's intermediate product: outlier_index of the wrong dtype
    bad[2 * 7 + 5] = bad[2 * 7 + 5].int()
    with pytest.raises((ValueError, RuntimeError), match="layer 0, the intermediate product.*outlier_index"):
        run(x, cu, max_seqlen, bad, heads, scale)
    bad = list(weights)  # layer 0's QKV product: an outlier channel past x's 16 columns
    bad[5] = torch.tensor([16])
    with pytest.raises((ValueError, RuntimeError), match="layer 0, the QKV product.*outlier_index holds channel 16"):
        run(x, cu, max_seqlen, bad, heads, scale)
    bad = list(weights)  # layer 1's attention output product: panels of another weight
    bad[PER_LAYER + 7] = ops.pack_int8_panels(torch.ones(16, 24, dtype=torch.int8))
    with pytest.raises((ValueError, RuntimeError), match="layer 1, the attention output product.*panels"):
        run(x, cu, max_seqlen, bad, heads, scale)


def test_wrapper_refuses_a_gelu_it_does_not_know():
    x, cu, max_seqlen, weights, heads, scale = _args(layers=1)
    with pytest.raises(ValueError, match="approximate"):
        ops.int8_layers(x, cu, max_seqlen, weights, heads, scale, approximate="sigmoid")


@pytest.mark.parametrize("name", ["cpu", "reference"])
def test_wrapper_checks_cu_seqlens_on_every_backend(name):
    x, cu, max_seqlen, weights, heads, scale = _args()
    with pytest.raises(ValueError, match=r"int8_layers: cu_seqlens\[-1\] must equal the 6 rows of x, got 5"):
        ops.int8_layers(x, torch.tensor([0, 2, 5], dtype=torch.int32), max_seqlen, weights, heads, scale, backend=name)
    with pytest.raises(ValueError, match="int8_layers: cu_seqlens must be a 1-D int32 tensor"):
        ops.int8_layers(x, cu.long(), max_seqlen, weights, heads, scale, backend=name)

