"""attention_varlen on every backend that runs here, forward and backward, against the reference (plain PyTorch,
autograd for the backward), with and without dropout.

Tolerances: fp32 within 1e-5 of the fp32 reference (2e-5 absolute, 1e-4 relative through the wrapper, where
gradients sum over a sequence); bf16/fp16: the error against the fp32 reference on the same inputs upcast is at most
twice PyTorch's own error in that dtype (SDPA per sequence, or with dropout the eager form of HF's attention with
the reference's mask), plus a small floor. Triton under its interpreter takes blocks of 16, so these short sequences
still span several blocks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import ops
from mtbert_fast.ops import dropout, reference, registry
from op_testing import assert_close, compare, cu_seqlens, max_err, packed, rand, rng_state

OP_NAME = "attention_varlen"
RAGGED = [5, 1, 0, 17, 33, 64]  # a length-1 and a zero-length sequence among ragged ones
# With dropout also one over 64 keys (several Philox calls per row) and over the CPU backward's block of 128; most
# sequences start off a multiple of 4, so that a group of four keys sharing a Philox call straddles their start.
DROPOUT_RAGGED = [5, 1, 0, 17, 150, 33]


def _dropout_ragged(backend):
    """DROPOUT_RAGGED, or under Triton's interpreter (which draws the mask element by element in Python) a shorter
    ragged batch that still spans three blocks of 16, with one token and a partial block."""
    return [1, 40, 7] if backend.interpreted else DROPOUT_RAGGED


def _exact(qkv, cu, scale, grad_out, dropout_p=0.0, rng=None):
    """fp32 reference: out, lse [heads, T] (of the undropped probabilities) and the gradient of qkv for grad_out."""
    qkv32 = qkv.float().requires_grad_()
    out = reference.attention_varlen(qkv32, cu, 0, scale, dropout_p, rng)
    (grad,) = torch.autograd.grad(out, qkv32, grad_out.float())
    lse = []
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, _ = qkv[start:end].float().unbind(1)
        lse.append(torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * scale, -1))
    lse = torch.cat(lse, 1) if lse else qkv.new_zeros((qkv.shape[2], 0), dtype=torch.float32)
    return out.detach(), lse, grad


def _native(qkv, cu, scale, fused=True, dropout_p=0.0, rng=None):
    """PyTorch's own attention in qkv's dtype, one sequence at a time: SDPA, or with dropout (which SDPA cannot take
    as a given mask) or fused=False the eager form of HF's BERT attention (probabilities from a softmax in the dtype,
    dropped with the reference mask)."""
    masks = dropout.attention_dropout_masks(rng, dropout_p, qkv.shape[2], cu.cpu()) if dropout_p > 0 else None
    outs = [qkv.new_zeros((0,) + qkv.shape[2:])]
    bounds = cu.tolist()
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        q, k, v = qkv[start:end].permute(1, 2, 0, 3).unbind(0)  # [heads, L, head_dim]
        if masks is None and fused:
            outs.append(F.scaled_dot_product_attention(q, k, v, scale=scale).permute(1, 0, 2))
            continue
        probs = torch.softmax(q @ k.transpose(1, 2) * scale, -1)
        if masks is not None:
            probs = probs * masks[b].to(probs) / (1 - dropout_p)
        outs.append((probs @ v).permute(1, 0, 2))
    return torch.cat(outs)


def _check_kernels(backend, lens, heads, head_dim, dtype, scale=None, qkv=None, seed=0, dropout_p=0.0, rng=None,
                   max_seqlen=None):
    """The forward kernel's out and lse and the backward kernel's gradient against the reference."""
    cu = cu_seqlens(lens, backend.device)
    total = int(cu[-1])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if qkv is None:
        qkv = rand(total, 3, heads, head_dim, seed=seed, dtype=dtype, device=backend.device)
    grad_out = rand(total, heads, head_dim, seed=seed + 1, dtype=dtype, device=backend.device)
    max_seqlen = max(lens, default=0) if max_seqlen is None else max_seqlen

    out, lse = backend.forward(qkv, cu, max_seqlen, scale, dropout_p, rng)
    grad, *_ = backend.backward(grad_out, qkv, out, lse, cu, max_seqlen, scale, dropout_p, rng)
    assert out.shape == (total, heads, head_dim) and out.dtype == dtype
    assert lse.shape == (heads, total) and lse.dtype == torch.float32
    assert grad.shape == (total, 3, heads, head_dim) and grad.dtype == dtype

    exact_out, exact_lse, exact_grad = _exact(qkv, cu, scale, grad_out, dropout_p, rng)
    torch.testing.assert_close(lse, exact_lse, atol=1e-5, rtol=1e-5)
    leaf = qkv.clone().requires_grad_()
    # the baseline of the CPU kernels is SDPA, that of Triton (tl.dot in the dtype) the eager form
    fused = backend.name == "cpu"
    native = _native(leaf, cu, scale, fused, dropout_p, rng) if dtype != torch.float32 else out
    native_grad = torch.autograd.grad(native, leaf, grad_out)[0] if dtype != torch.float32 else grad
    assert_close(out, exact_out, native, dtype, "out", floor=1e-5)
    for part, name in enumerate("qkv"):
        assert_close(grad[:, part], exact_grad[:, part], native_grad[:, part], dtype, f"grad {name}", floor=1e-5)


@pytest.mark.interpreter_cases(head_dim=[7, 80])
@pytest.mark.parametrize("head_dim", [7, 20, 32, 64, 80])
def test_ragged(backend, dtype, head_dim):
    _check_kernels(backend, RAGGED, heads=3, head_dim=head_dim, dtype=dtype)


@pytest.mark.interpreter_cases(dtype=[])  # 32 x 32 blocks of 16: too slow to interpret
def test_length_512(backend, dtype):
    _check_kernels(backend, [512, 3], heads=1, head_dim=64, dtype=dtype, seed=1)


@pytest.mark.interpreter_cases(dropout_p=[])  # 44 x 44 blocks of 16: too slow to interpret
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_longer_than_one_key_block(backend, dropout_p):
    """Sequences over 512 keys take the CPU kernels' streamed softmax across key blocks."""
    _check_kernels(backend, [700, 1], heads=1, head_dim=32, dtype=torch.float32, seed=2, dropout_p=dropout_p,
                   rng=rng_state() if dropout_p else None)


@pytest.mark.interpreter_cases(dtype=[])  # blocks of 16 over 512 keys: too slow to interpret
@pytest.mark.parametrize("head_dim", [32, 64])
def test_block_boundaries(backend, dtype, head_dim):
    """Lengths on either side of the CPU forward's boundaries, in one ragged batch: vectors of 16 keys, tiles of 64
    keys, query groups of 6 rows and query blocks of 64 (1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 512)."""
    lens = [1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 512, 6, 7]
    _check_kernels(backend, lens, heads=2, head_dim=head_dim, dtype=dtype, seed=12)


@pytest.mark.interpreter_cases(dtype=[])  # 38 x 38 blocks of 16: too slow to interpret
def test_longer_than_one_key_block_head_dim_64(backend, dtype):
    """The CPU forward's streamed softmax (over 512 keys) in every dtype, for query groups of 6 and a partial one."""
    _check_kernels(backend, [605, 4], heads=2, head_dim=64, dtype=dtype, seed=15)


@pytest.mark.parametrize("length", [5, 17, 130])
def test_every_score_far_below_zero(backend, dtype, length):
    """Scores around -300: the softmax is taken against the row maximum of the real keys only (a zero from padding
    taken as the maximum would make every exp underflow to 0 and the output NaN)."""
    cu = cu_seqlens([length], backend.device)
    heads, head_dim = 2, 32
    u = F.normalize(rand(1, 1, 1, head_dim, seed=13), dim=-1)
    noise = rand(length, 3, heads, head_dim, seed=14, scale=0.05)
    qkv = torch.cat([-u + noise[:, :1], u + noise[:, 1:2], noise[:, 2:] * 20], 1)
    qkv = qkv.to(dtype=dtype, device=backend.device)
    out, lse = backend.forward(qkv, cu, length, 300.0)
    assert torch.isfinite(out).all() and (lse < -200).all()
    exact_out, exact_lse, _ = _exact(qkv, cu, 300.0, torch.zeros_like(out))
    torch.testing.assert_close(lse, exact_lse, atol=1e-3, rtol=1e-5)
    native = _native(qkv, cu, 300.0, fused=backend.name == "cpu") if dtype != torch.float32 else out
    assert_close(out, exact_out, native, dtype, "out", atol=1e-4, rtol=1e-4, floor=1e-5)


@pytest.mark.parametrize("magnitude", [1e6, 1e11, 1e30])
def test_huge_scores_stay_finite(backend, dtype, magnitude):
    """One query element far past any real score (scaled scores up to ~1e30): the row's softmax picks its largest key
    as the reference's does, and nothing overflows (the row maximum of rounded scaled scores lies up to half an ulp
    under an exact one, which past 2^31 would take its exp beyond fp32)."""
    lens, heads, head_dim = [9, 20], 2, 32
    cu = cu_seqlens(lens, backend.device)
    magnitude = min(magnitude, torch.finfo(dtype).max / 8)  # fp16 holds no more
    qkv = rand(sum(lens), 3, heads, head_dim, seed=21)
    qkv[3, 0, 1, 4] = magnitude
    qkv[12, 0, 0, 7] = -magnitude
    qkv = qkv.to(dtype=dtype, device=backend.device)
    scale = 1.0 / math.sqrt(head_dim)
    out, _ = backend.forward(qkv, cu, max(lens), scale)
    assert torch.isfinite(out).all()
    exact_out = _exact(qkv, cu, scale, torch.zeros_like(out))[0]
    torch.testing.assert_close(out.float(), exact_out, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


@pytest.mark.parametrize("part", [0, 1])
def test_nan_reaches_the_gradients_it_enters(backend, dtype, part):
    """A NaN in a query or key: the backward's probabilities are NaN where the forward's are, so the value gradients
    of that head are NaN (never an infinity from an exp of NaN), as the reference's."""
    lens, heads, head_dim = [9, 20], 2, 32
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(sum(lens), 3, heads, head_dim, seed=17, dtype=dtype, device=backend.device)
    qkv[12, part, 1, 5] = float("nan")
    grad_out = rand(sum(lens), heads, head_dim, seed=18, dtype=dtype, device=backend.device)
    out, lse = backend.forward(qkv, cu, max(lens), 1.0 / math.sqrt(head_dim))
    grad, *_ = backend.backward(grad_out, qkv, out, lse, cu, max(lens), 1.0 / math.sqrt(head_dim))
    exact_grad = _exact(qkv, cu, 1.0 / math.sqrt(head_dim), grad_out)[2]
    assert torch.equal(grad.isnan().cpu(), exact_grad.isnan().cpu())
    assert not grad.isinf().any()


@pytest.mark.parametrize("part", [0, 1, 2])
def test_nan_reaches_its_sequence_only(backend, dtype, part):
    """A NaN in one token's query, key or value makes exactly the outputs it enters NaN and leaves the other sequence
    exact: a softmax must not drop a NaN score as one that underflows."""
    lens, heads, head_dim = [9, 20], 2, 32
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(sum(lens), 3, heads, head_dim, seed=16, dtype=dtype, device=backend.device)
    qkv[12, part, 1, 5] = float("nan")
    out, _ = backend.forward(qkv, cu, max(lens), 1.0 / math.sqrt(head_dim))
    expected = torch.zeros(out.shape, dtype=torch.bool)
    if part == 0:
        expected[12, 1] = True  # the query's own row
    elif part == 1:
        expected[9:, 1] = True  # every score of the sequence's head 1 against that key
    else:
        expected[9:, 1, 5] = True  # the value's entry, in every row that averages it
    assert torch.equal(out.isnan().cpu(), expected)
    exact_out = _exact(qkv[:9], cu_seqlens(lens[:1], backend.device), 1.0 / math.sqrt(head_dim),
                       torch.zeros_like(out[:9]))[0]
    torch.testing.assert_close(out[:9].float(), exact_out, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=0)


def test_strided_qkv_and_scale(backend, dtype):
    """qkv as a view of a wider GEMM output (token stride > 3 * heads * head_dim), with a non-default scale."""
    lens, heads, head_dim = [9, 20], 2, 64
    wide = rand(sum(lens), 3 * heads * head_dim + 16, seed=3, dtype=dtype, device=backend.device)
    qkv = wide[:, : 3 * heads * head_dim].view(sum(lens), 3, heads, head_dim)
    assert not qkv.is_contiguous()
    _check_kernels(backend, lens, heads, head_dim, dtype, scale=0.3, qkv=qkv)


@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_negative_and_zero_scale(backend, dtype, scale):
    """A negative scale turns the softmax towards the smallest products; zero makes it uniform."""
    _check_kernels(backend, [9, 20, 33], heads=2, head_dim=32, dtype=dtype, scale=scale, seed=16)


@pytest.mark.parametrize("lens", [[], [0, 0]])
def test_no_tokens(backend, dtype, lens):
    cu = cu_seqlens(lens, backend.device)
    qkv = torch.zeros((0, 3, 2, 32), dtype=dtype, device=backend.device)
    out, lse = backend.forward(qkv, cu, 0, 0.125)
    assert out.shape == (0, 2, 32) and lse.shape == (2, 0)
    grad, *_ = backend.backward(torch.zeros_like(out), qkv, out, lse, cu, 0, 0.125)
    assert grad.shape == (0, 3, 2, 32)
    for name in (backend.name, "reference"):
        leaf = qkv.clone().requires_grad_()
        out = ops.attention_varlen(leaf, cu, 0, backend=name)
        out.sum().backward()
        assert out.shape == (0, 2, 32) and leaf.grad.shape == qkv.shape


@pytest.mark.interpreter_cases(max_seqlen=[0], dropout_p=[0.2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("max_seqlen", [0, 4, 149])
def test_max_seqlen_only_sizes(backend, max_seqlen, dropout_p):
    """A max_seqlen below the longest sequence (even 0) changes nothing: every sequence is computed in full."""
    _check_kernels(backend, _dropout_ragged(backend), heads=2, head_dim=32, dtype=torch.float32, seed=4,
                   dropout_p=dropout_p,
                   rng=rng_state() if dropout_p else None, max_seqlen=max_seqlen)


@pytest.mark.interpreter_cases(head_dim=[64], dtype=[torch.bfloat16])
@pytest.mark.parametrize("head_dim", [7, 64])
def test_dropout_matches_reference(backend, dtype, head_dim):
    """Forward and backward with dropout against the reference with the same rng_state (autograd backward)."""
    _check_kernels(backend, _dropout_ragged(backend), heads=3, head_dim=head_dim, dtype=dtype, seed=5, dropout_p=0.3,
                   rng=rng_state(987654321987, 5))


@pytest.mark.parametrize("head_dim", [20, 64])
def test_cpu_bf16_probabilities_round_as_the_reference(head_dim):
    """In bf16 the CPU kernel's P V takes the unnormalized probabilities rounded to bf16, against the row's maximum
    where the keys fit one block of the streamed softmax (512), as the reference's definition does: the outputs agree
    with the reference's in bf16 to an ulp, nearly all of them exactly. (A P V on fp32 probabilities misses it by
    about an ulp on average and by thousands near zero; the GPU kernels round against each key block's running
    maximum, which the bounds of the tests above judge.)"""
    lens = [1, 7, 33, 130, 300]
    cu = cu_seqlens(lens)
    qkv = rand(sum(lens), 3, 2, head_dim, seed=21, scale=2.0, dtype=torch.bfloat16)
    out = ops.attention_varlen(qkv, cu, max(lens), backend="cpu").float()
    ref = reference.attention_varlen(qkv, cu, max(lens)).float()
    diff = (out - ref).abs()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
    assert (diff <= ulp).all(), f"{(diff / ulp).max().item():.1f} ulp from the reference"
    assert (diff == 0).float().mean() >= 0.99, f"only {(diff == 0).float().mean().item():.3f} of the outputs exact"


@pytest.fixture
def amx_tiles():
    """The CPU forward's AMX route, switched back on after the test. Skips where the CPU has no AMX-BF16 (or Linux
    does not grant the tiles): the bf16 tests above then run the AVX512-BF16 route only, which this one compares
    against."""
    if not ops.cpu_amx():
        pytest.skip("no AMX-BF16 tiles on this CPU")
    yield
    ops.cpu_amx(True)


def _cpu_forward_routes(qkv, cu, max_seqlen, scale):
    """The CPU kernel's (out, lse) on AMX tiles and on the AVX512-BF16 dot products."""
    forward = _cpu("attention_varlen")
    routes = []
    for allow in (True, False):
        assert ops.cpu_amx(allow) == allow
        routes.append(forward(qkv, cu, max_seqlen, scale))
    return routes


@pytest.mark.parametrize("head_dim", [1, 20, 32, 33, 64, 80, 256])
@pytest.mark.parametrize("lens", [[1], RAGGED, [31, 32, 33, 48], [600], [1030, 2]])
def test_cpu_amx_forward_is_the_dot_products_forward(amx_tiles, head_dim, lens):
    """On AMX tiles (head_dim padded to the tile's 32, keys to 32, row groups of 32 queries, several key blocks past
    512) the bf16 forward gives the outputs of the AVX512-BF16 route but for the order of its fp32 sums: nearly all
    bit for bit, the rest within the one bf16 ulp of a probability whose rounding that order can flip (bounded by
    eps * sum_j p_j |v_j| / sum_j p_j, plus an ulp of the output), lse to fp32 rounding; and within the bound of the
    tests above against the fp32 reference."""
    cu = cu_seqlens(lens)
    qkv = rand(sum(lens), 3, 2, head_dim, seed=head_dim + len(lens), scale=2.0, dtype=torch.bfloat16)
    scale = 1.0 / math.sqrt(head_dim)
    (tiles, tiles_lse), (dots, dots_lse) = _cpu_forward_routes(qkv, cu, max(lens), scale)
    torch.testing.assert_close(tiles_lse, dots_lse, atol=1e-5, rtol=1e-5)
    eps = torch.finfo(torch.bfloat16).eps
    abs_v = qkv.float().clone()
    abs_v[:, 2] = abs_v[:, 2].abs()
    spread = reference.attention_varlen(abs_v, cu, max(lens), scale)  # sum_j p_j |v_j| / sum_j p_j
    ulp = eps * torch.exp2(torch.floor(torch.log2(dots.float().abs().clamp_min(1e-30))))
    diff = (tiles.float() - dots.float()).abs()
    assert (diff <= eps * spread + ulp).all(), f"{(diff - eps * spread - ulp).max().item():.3g} past the bound"
    if diff.numel():
        assert (diff == 0).float().mean() >= 0.99, f"only {(diff == 0).float().mean().item():.4f} bit for bit"
    exact_out, exact_lse, _ = _exact(qkv, cu, scale, torch.zeros_like(tiles))
    assert_close(tiles, exact_out, _native(qkv, cu, scale), torch.bfloat16, "out")


@pytest.mark.parametrize("case", ["nan", "huge", "far below zero", "strided"])
def test_cpu_amx_forward_edge_cases(amx_tiles, case):
    """NaN in one query, huge and far-negative scores and a strided qkv take the AMX route to the same outputs as
    the dot products (NaN rows and finite rows alike)."""
    lens, heads, head_dim = [9, 40], 2, 64
    qkv = rand(sum(lens), 3, heads, head_dim, seed=5)
    scale = 1.0 / math.sqrt(head_dim)
    if case == "nan":
        qkv[3, 0, 1, 4] = float("nan")
    elif case == "huge":
        qkv[3, 0, 1, 4], qkv[12, 0, 0, 7] = 1e30, -1e30
    elif case == "far below zero":
        scale = 300.0
        u = F.normalize(rand(1, 1, 1, head_dim, seed=13), dim=-1)
        qkv = torch.cat([-u + 0.05 * qkv[:, :1], u + 0.05 * qkv[:, 1:2], qkv[:, 2:]], 1)
    qkv = qkv.bfloat16()
    if case == "strided":  # rows of qkv further apart than 3 * heads * head_dim
        qkv = torch.cat([qkv, qkv.flip(0)], 3)[..., head_dim:]
    (tiles, tiles_lse), (dots, dots_lse) = _cpu_forward_routes(qkv, cu_seqlens(lens), max(lens), scale)
    assert torch.equal(tiles.isnan(), dots.isnan()) and torch.equal(tiles_lse.isnan(), dots_lse.isnan())
    torch.testing.assert_close(tiles.float(), dots.float(), atol=2e-2, rtol=1e-2, equal_nan=True)
    torch.testing.assert_close(tiles_lse, dots_lse, atol=1e-4, rtol=1e-5, equal_nan=True)


def test_cpu_amx_switch():
    """cpu_amx(False) keeps the forward off the tiles, True lets it back where the CPU has them."""
    available = ops.cpu_amx()
    try:
        assert ops.cpu_amx(False) is False
        assert ops.cpu_amx() is False
        assert ops.cpu_amx(True) is available
    finally:
        ops.cpu_amx(True)


def _one_hot_attention(backend, lens, heads, dropout_p, rng):
    """The kernels' dropout multipliers, read off exactly: with Q = K = 0 every probability of a sequence of length L
    is 1/L, and with V_j one-hot at j's place in its sequence out_i[j] = M_ij / L; with dO_i one-hot at i's place the
    backward gives dV_j[i] = M_ij / L. -> per sequence, forward and backward L * (P * M), each [heads, L, L]."""
    cu = cu_seqlens(lens)
    head_dim = max(16, max(lens))
    qkv = torch.zeros(int(cu[-1]), 3, heads, head_dim)
    grad_out = torch.zeros(int(cu[-1]), heads, head_dim)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        place = torch.arange(end - start)
        qkv[start + place, 2, :, place] = 1.0
        grad_out[start + place, :, place] = 1.0
    qkv, grad_out, cu_dev = backend.to(qkv, grad_out, cu)
    out, lse = backend.forward(qkv, cu_dev, max(lens), 1.0, dropout_p, rng)
    grad, *_ = backend.backward(grad_out, qkv, out, lse, cu_dev, max(lens), 1.0, dropout_p, rng)
    seqs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        fwd = out[start:end, :, :n].permute(1, 0, 2).cpu() * n  # [heads, i, j]
        bwd = grad[start:end, 2, :, :n].permute(1, 2, 0).cpu() * n  # dV_j[i] -> [heads, i, j]
        seqs.append((fwd, bwd))
    return cu, seqs


@pytest.mark.interpreter_cases(lens=[[1, 37, 6]])
@pytest.mark.parametrize("seed,offset,p", [
    (5, 77, 0.3),
    (-5, 2**32 + 9, 0.1),  # the key's high word 0xffffffff, the offset taken mod 2^32
    (2**31 + 7, 2**31, 0.75),  # words >= 2^31, passed to the Triton kernels as negative int32
])  # fmt: skip
@pytest.mark.parametrize("lens", [[1, 37, 6], [3, 70, 1, 0, 130, 5], [2, 600]])
def test_dropout_mask_is_the_reference_mask(backend, lens, seed, offset, p):
    """Element for element, the forward and the backward drop exactly what mtbert_fast.ops.dropout drops, also past
    one forward key block (600 keys) and across backward blocks, from starts off a multiple of 4."""
    rng = rng_state(seed, offset)
    cu, seqs = _one_hot_attention(backend, lens, 2, p, rng)
    for keep, (fwd, bwd) in zip(dropout.attention_dropout_masks(rng, p, 2, cu), seqs, strict=True):
        assert torch.equal(fwd != 0, keep) and torch.equal(bwd != 0, keep)
        want = keep / (1 - p)
        torch.testing.assert_close(fwd, want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bwd, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(p):
    """The reference mask (the one every kernel draws, see test_dropout_mask_is_the_reference_mask) keeps 1 - p
    within 5 binomial standard deviations."""
    masks = dropout.attention_dropout_masks(rng_state(31337), p, 2, cu_seqlens([200, 100]))
    kept = torch.cat([m.flatten() for m in masks]).double()
    assert abs(kept.mean().item() - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / kept.numel())


@pytest.mark.interpreter_cases(draws=[])
@pytest.mark.parametrize("draws", [1000])
def test_dropout_mean_is_the_undropped_output(backend, draws):
    """Kept probabilities are scaled by 1 / (1 - p), so over many seeds the mean output is the undropped output:
    within 6 standard errors, element for element, from the exact variance sum_j P_ij^2 v_j^2 p / (1 - p)."""
    lens, heads, head_dim, p = [40, 24], 2, 16, 0.5
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(int(cu[-1]), 3, heads, head_dim, seed=6, device=backend.device)
    undropped, _ = backend.forward(qkv, cu, max(lens), 0.25)
    mean = sum(backend.forward(qkv, cu, max(lens), 0.25, p, rng_state(seed))[0] for seed in range(draws)) / draws
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = qkv[start:end].double().unbind(1)
        probs = torch.softmax(torch.einsum("ihd,jhd->hij", q, k) * 0.25, -1)
        var = torch.einsum("hij,jhd->ihd", probs**2, v**2) * p / (1 - p)
        err = (mean[start:end] - undropped[start:end]).double().abs()
        assert (err <= 6 * (var / draws).sqrt() + 1e-6).all(), (err / (var / draws).sqrt()).max()


def test_dropout_gradients_by_finite_differences(backend):
    """gradcheck confirms the reference's autograd gradient with dropout in float64 (the mask fixed by rng_state);
    the kernels' fp32 backward must match that gradient."""
    lens, heads, head_dim, scale, p, rng = [2, 0, 5], 2, 2, 0.5, 0.3, rng_state(11, 2)
    cu = cu_seqlens(lens)
    keep = torch.cat([m.flatten() for m in dropout.attention_dropout_masks(rng, p, heads, cu)])
    assert 0 < int(keep.sum()) < keep.numel()  # some probabilities dropped, some kept
    qkv = rand(int(cu[-1]), 3, heads, head_dim, seed=8)
    grad_out = rand(int(cu[-1]), heads, head_dim, seed=9)

    def ref(x):
        return reference.attention_varlen(x, cu, 0, scale, p, rng)

    qkv64 = qkv.double().requires_grad_()
    assert torch.autograd.gradcheck(ref, (qkv64,))
    (want,) = torch.autograd.grad(ref(qkv64), qkv64, grad_out.double())
    qkv, grad_out, cu = backend.to(qkv, grad_out, cu)
    out, lse = backend.forward(qkv, cu, max(lens), scale, p, rng)
    torch.testing.assert_close(out.double().cpu(), ref(qkv64).detach(), atol=1e-6, rtol=1e-6)
    grad, *_ = backend.backward(grad_out, qkv, out, lse, cu, max(lens), scale, p, rng)
    torch.testing.assert_close(grad.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_dropout_is_reproducible(backend):
    """The same rng_state gives the same output and gradient twice; another seed or offset, another mask; through
    the wrapper, torch.manual_seed reproduces the drawn rng_state."""
    lens, heads, head_dim = _dropout_ragged(backend), 2, 16
    cu = cu_seqlens(lens, backend.device)
    qkv = rand(int(cu[-1]), 3, heads, head_dim, seed=10, device=backend.device)
    grad_out = rand(int(cu[-1]), heads, head_dim, seed=11, device=backend.device)

    def run(rng):
        out, lse = backend.forward(qkv, cu, max(lens), 0.25, 0.2, rng)
        return out, backend.backward(grad_out, qkv, out, lse, cu, max(lens), 0.25, 0.2, rng)[0]

    first, again = run(rng_state(42, 0)), run(rng_state(42, 0))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    for other in (rng_state(43, 0), rng_state(42, 1)):
        assert not torch.equal(run(other)[0], first[0])
    torch.manual_seed(3)
    drawn = ops.attention_varlen(qkv, cu, max(lens), dropout_p=0.5, backend=backend.name)
    torch.manual_seed(3)
    assert torch.equal(ops.attention_varlen(qkv, cu, max(lens), dropout_p=0.5, backend=backend.name), drawn)
    # dropout_p = 0 ignores rng_state and equals the call without it
    assert torch.equal(backend.forward(qkv, cu, max(lens), 0.25, 0.0, rng_state())[0],
                       backend.forward(qkv, cu, max(lens), 0.25)[0])


# --- the public wrapper: autograd, dropout, bad input ----------------------------------------------------------


@pytest.mark.parametrize("lengths,heads,head_dim", [
    ([1], 1, 32), ([5, 1, 17], 2, 64), ([3, 0, 9], 3, 80), ([33, 64], 2, 128), ([1, 17, 5, 40], 2, 32),
])  # fmt: skip
def test_wrapper_autograd(backend, dtype, lengths, heads, head_dim):
    """ops.attention_varlen with backend= forced: forward and gradient within twice the error of PyTorch's eager
    attention; the forward also within twice that of SDPA."""
    qkv, cu, max_len = packed(lengths, heads, head_dim, device=backend.device)
    scale = 1 / math.sqrt(head_dim)
    compare(lambda q: ops.attention_varlen(q, cu, max_len, backend=backend.name),
            lambda q: reference.attention_varlen(q, cu, max_len),
            lambda q: _native(q, cu, scale, fused=False),
            [qkv], dtype, f"attention_varlen {lengths} x {heads} x {head_dim}", atol=2e-5, rtol=1e-4)
    qkv = qkv.to(dtype)
    out = ops.attention_varlen(qkv, cu, max_len, backend=backend.name)
    assert_close(out, reference.attention_varlen(qkv.float(), cu, max_len), _native(qkv, cu, scale), dtype,
                 "forward vs SDPA")


@pytest.mark.parametrize("lengths,heads,head_dim", [([1, 40, 7], 2, 32), ([19, 1], 3, 80)])
def test_wrapper_autograd_with_dropout(backend, dtype, lengths, heads, head_dim):
    """Fused dropout through the wrapper, forward and gradient, against the reference with the same rng_state (the
    same mask), within twice the error of PyTorch's eager attention with that mask."""
    qkv, cu, max_len = packed(lengths, heads, head_dim, seed=5, device=backend.device)
    rng = rng_state(0x1234_5678_9ABC_DEF0, 3)
    scale = 1 / math.sqrt(head_dim)
    compare(lambda q: ops.attention_varlen(q, cu, max_len, dropout_p=0.3, rng_state=rng, backend=backend.name),
            lambda q: reference.attention_varlen(q, cu, max_len, None, 0.3, rng),
            lambda q: _native(q, cu, scale, dropout_p=0.3, rng=rng),
            [qkv], dtype, f"attention_varlen dropout {lengths}", atol=2e-5, rtol=1e-4)


def test_backward_kernel_equals_autograd(backend, dtype):
    """The backward op run on the forward op's out and lse (what autograd does, and what runs after a forward on
    another backend) equals the gradient through the wrapper, with and without dropout."""
    qkv, cu, max_len = packed([3, 20], 2, 32, seed=4, dtype=dtype, device=backend.device)
    grad_out = rand(int(cu[-1]), 2, 32, seed=6, dtype=dtype, device=backend.device)
    for p, rng in ((0.0, None), (0.2, rng_state(99, 1))):
        leaf = qkv.clone().requires_grad_()
        out = ops.attention_varlen(leaf, cu, max_len, 0.2, dropout_p=p, rng_state=rng, backend=backend.name)
        (grad,) = torch.autograd.grad(out, leaf, grad_out)
        fwd, lse = backend.forward(qkv, cu, max_len, 0.2, p, rng)
        assert torch.equal(fwd, out)
        assert torch.equal(backend.backward(grad_out, qkv, fwd, lse, cu, max_len, 0.2, p, rng)[0], grad)


def test_scale_and_lse(backend):
    qkv, cu, max_len = packed([5, 9], 2, 32, device=backend.device)
    out, lse = backend.forward(qkv, cu, max_len, 0.3, 0.0, None)
    torch.testing.assert_close(out, reference.attention_varlen(qkv, cu, max_len, 0.3), atol=1e-5, rtol=1e-5)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, _ = qkv[s:e].unbind(1)
        want = torch.logsumexp(torch.einsum("ihd,jhd->hij", q, k) * 0.3, dim=-1)  # [heads, L]
        torch.testing.assert_close(lse[:, s:e], want, atol=1e-5, rtol=1e-5)


def test_sequences_do_not_leak(backend):
    """Changing one sequence's tokens must leave every other sequence's output unchanged."""
    qkv, cu, max_len = packed([4, 7, 3], 2, 32, device=backend.device)
    changed = qkv.clone()
    changed[4:11] += 1.0
    a = ops.attention_varlen(qkv, cu, max_len, backend=backend.name)
    b = ops.attention_varlen(changed, cu, max_len, backend=backend.name)
    assert torch.equal(a[:4], b[:4]) and torch.equal(a[11:], b[11:])
    assert max_err(a[4:11], b[4:11]) > 1e-3


def test_bad_input_is_named(backend):
    """The checks every backend makes in the wrapper, naming the tensor; cu_seqlens's values are checked where that
    is free (CPU tensors)."""
    qkv, cu, max_len = packed([3, 2], 2, 16, device=backend.device)
    attention = lambda *args, **kw: ops.attention_varlen(*args, backend=backend.name, **kw)  # noqa: E731
    cases = [
        (lambda: attention(qkv[:, :2], cu, max_len), r"qkv must be \[T, 3, heads, head_dim\]"),
        (lambda: attention(qkv[:, 0], cu, max_len), r"qkv must be \[T, 3, heads, head_dim\]"),
        (lambda: attention(qkv[..., :0], cu, max_len), r"qkv must be \[T, 3, heads, head_dim\] with heads and "
                                                       r"head_dim >= 1, got shape \(5, 3, 2, 0\)"),
        (lambda: attention(qkv, cu.long(), max_len), "cu_seqlens must be a 1-D int32"),
        (lambda: attention(qkv, cu.to("meta"), max_len), "cu_seqlens is on meta"),
        (lambda: attention(qkv, cu[:0], max_len), "cu_seqlens must hold B \\+ 1 >= 1 offsets"),
        (lambda: attention(qkv, cu[:1], 0), r"cu_seqlens = \[0\] describes no sequence, but qkv has 5 rows"),
        (lambda: attention(qkv, cu, -1), "max_seqlen must be >= 0, got -1"),
        (lambda: attention(qkv, cu, max_len, dropout_p=0.1, rng_state=torch.tensor([1, 2, 3])),
         r"rng_state must be an int64 CPU tensor of shape \[2\]"),
        (lambda: attention(qkv, cu, max_len, dropout_p=0.1, rng_state=rng_state().int()),
         r"rng_state must be an int64 CPU tensor of shape \[2\]"),
        (lambda: attention(qkv, cu, max_len, dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
        (lambda: attention(qkv, cu, max_len, dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    ]
    if backend.device.type == "cpu":
        cases += [
            (lambda: attention(qkv, backend.to(torch.tensor([0, 3, 4], dtype=torch.int32))[0], 3),
             r"cu_seqlens\[-1\] must equal the 5 rows of qkv, got 4"),
            (lambda: attention(qkv, backend.to(torch.tensor([1, 3, 5], dtype=torch.int32))[0], 3),
             r"cu_seqlens\[0\] must be 0"),
            (lambda: attention(qkv, backend.to(torch.tensor([0, 4, 3, 5], dtype=torch.int32))[0], 4),
             "cu_seqlens must be non-decreasing"),
        ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match="qkv must be a floating-point tensor"):
        attention(qkv.long(), cu, max_len)


def test_backward_op_refuses_bad_inputs(backend):
    """The backward op, which autograd calls but anyone may call, refuses on every backend what does not fit the
    forward it differentiates, naming the tensor, instead of reading past the end of a tensor."""
    qkv, cu, max_len = packed([3, 2], 2, 16, device=backend.device)
    op = registry.OPS["attention_varlen"]
    out, lse = op.op(qkv, cu, max_len, 0.25, backend=backend.name)
    backward = lambda *args: op.backward_op(*args, backend=backend.name)  # noqa: E731
    cases = [
        ((out[:, :1], qkv, out, lse, cu, max_len, 0.25), "grad_out must"),
        ((out, qkv, out[:, :1], lse, cu, max_len, 0.25), "out must"),
        ((out, qkv, out, lse.t(), cu, max_len, 0.25), "lse must"),
        ((out, qkv, out, lse, cu, max_len, 0.25, 0.1, None), "needs rng_state"),
    ]
    for args, match in cases:
        with pytest.raises((ValueError, RuntimeError), match=match):
            backward(*args)


def test_compile_draws_dropout_rng_like_eager(backend, fresh_inductor):
    """torch.compile(fullgraph=True) traces the attention wrapper that draws rng_state from torch's generator:
    compiled and eager give the same result for the same seed."""
    qkv = rand(10, 3, 2, 16, device=backend.device)
    cu = cu_seqlens([3, 1, 6], backend.device)

    def fn(q):
        return ops.attention_varlen(q, cu, 6, dropout_p=0.3, backend=backend.name)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    out = compiled(qkv)
    torch.manual_seed(5)
    torch.testing.assert_close(out, fn(qkv))


# --- the C++ kernels' own checks --------------------------------------------------------------------------------


def _cpu(name):
    return lambda *args: getattr(torch.ops.mtbert_fast, name)(*args, backend="cpu")


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(cu=torch.tensor([1, 5, 9], dtype=torch.int32)), r"cu_seqlens\[0\] must be 0"),
    (lambda a: a.update(cu=torch.tensor([0, 4, 3, 9], dtype=torch.int32)), "non-decreasing"),
    (lambda a: a.update(cu=torch.tensor([0, 4, 8], dtype=torch.int32)), r"cu_seqlens\[-1\] must equal"),
    (lambda a: a.update(cu=torch.tensor([0, 4, 9])), "cu_seqlens must be Int"),
    (lambda a: a.update(cu=torch.tensor([[0, 4, 9]], dtype=torch.int32)), "cu_seqlens must have 1 dim"),
    (lambda a: a.update(cu=torch.tensor([], dtype=torch.int32)), "cu_seqlens must hold"),
    (lambda a: a.update(cu=torch.tensor([0], dtype=torch.int32)), r"cu_seqlens = \[0\] describes no sequence"),
    (lambda a: a.update(qkv=a["qkv"][:, 0]), r"qkv must have shape \[T, 3, heads, head_dim\]"),
    (lambda a: a.update(qkv=torch.zeros(9, 2, 2, 8)), r"qkv must have shape \[T, 3, heads, head_dim\]"),
    (lambda a: a.update(qkv=a["qkv"].half()), "qkv must be Float or BFloat16"),
    (lambda a: a.update(max_seqlen=-1), "max_seqlen must be >= 0, got -1"),
])  # fmt: skip
def test_cpu_kernel_bad_inputs(change, match):
    args = {"qkv": torch.zeros(9, 3, 2, 8), "cu": torch.tensor([0, 4, 9], dtype=torch.int32), "max_seqlen": 5}
    change(args)
    with pytest.raises(RuntimeError, match=match):
        _cpu("attention_varlen")(args["qkv"], args["cu"], args["max_seqlen"], 0.5)


def test_cpu_kernel_backward_bad_inputs():
    forward, backward = _cpu("attention_varlen"), _cpu("attention_varlen_backward")
    qkv, cu = torch.zeros(9, 3, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = forward(qkv, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="grad_out must have shape"):
        backward(out[:, :1], qkv, out, lse, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="out has dtype BFloat16 but qkv has Float"):
        backward(out, qkv, out.bfloat16(), lse, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="lse must have shape"):
        backward(out, qkv, out, lse.t(), cu, 5, 0.5)
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        backward(out, qkv, out, lse, torch.tensor([0, 9, 4, 9], dtype=torch.int32), 9, 0.5)
    with pytest.raises(RuntimeError, match=r"cu_seqlens = \[0\] describes no sequence, but qkv has 9 rows"):
        backward(out, qkv, out, lse, torch.tensor([0], dtype=torch.int32), 5, 0.5)


@pytest.mark.parametrize("dropout_p, rng, match", [
    (1.0, rng_state(), r"dropout_p must be in \[0, 1\)"),
    (-0.1, rng_state(), r"dropout_p must be in \[0, 1\)"),
    (0.1, None, "needs rng_state"),
    (0.1, torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64 CPU tensor of shape \\[2\\]"),
    (0.1, torch.tensor([1, 2, 3]), "rng_state must be an int64 CPU tensor of shape \\[2\\]"),
])  # fmt: skip
def test_cpu_kernel_bad_dropout_inputs(dropout_p, rng, match):
    forward, backward = _cpu("attention_varlen"), _cpu("attention_varlen_backward")
    qkv, cu = torch.zeros(9, 3, 2, 8), torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = forward(qkv, cu, 5, 0.5)
    with pytest.raises(RuntimeError, match=match):
        forward(qkv, cu, 5, 0.5, dropout_p, rng)
    with pytest.raises(RuntimeError, match=match):
        backward(out, qkv, out, lse, cu, 5, 0.5, dropout_p, rng)
