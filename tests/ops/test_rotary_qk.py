"""rotary_qk on every backend that runs here, forward and backward, against the reference and against HF's own
rotary embedding (op_testing.py states the backends and tolerances)."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.ops import reference
from mtbert_fast.ops.rotary_qk import rotary_tables
from op_testing import assert_close, compare, rand

OP_NAME = "rotary_qk"


def _positions(lengths, device="cpu"):
    """Each packed token's position in its sequence: what the encoder passes for sequences of these lengths."""
    return torch.cat([torch.arange(n) for n in lengths]).to(device) if lengths else torch.zeros(0, dtype=torch.int64)


@pytest.mark.interpreter_cases(head_dim=[2, 64], lengths=[[1], [5, 1, 3]])
@pytest.mark.parametrize("lengths", [[1], [5, 1, 3], [17, 64], []])
@pytest.mark.parametrize("heads,head_dim", [(1, 2), (3, 10), (2, 64), (4, 32)])
def test_kernels(backend, dtype, lengths, heads, head_dim):
    """Forward and inverse against the reference, on ragged packed positions; the inverse undoes the forward."""
    cos, sin = rotary_tables(head_dim, 80, 10000.0)
    pos = _positions(lengths)
    qkv = rand(len(pos), 3, heads, head_dim, dtype=dtype)
    qkv, cos, sin, pos = backend.to(qkv, cos, sin, pos)
    out = backend.forward(qkv, cos, sin, pos, False)
    assert out.dtype == dtype and out.shape == qkv.shape
    exact = reference.rotary_qk(qkv.float(), cos, sin, pos)
    assert_close(out, exact, _native(qkv, cos, sin, pos, dtype), dtype, "out", floor=1e-5)
    assert torch.equal(out[:, 2], qkv[:, 2]), "the value heads are copied unchanged"
    back = backend.forward(out, cos, sin, pos, True)
    assert_close(back, qkv.float(), _native(out, cos, sin, pos, dtype, inverse=True), dtype, "inverse", floor=2e-2
                 if dtype != torch.float32 else 1e-6, atol=1e-5)


def _native(qkv, cos, sin, pos, dtype, inverse=False):
    """PyTorch's own computation in `dtype`, HF's way: the angles' cos and sin rounded to dtype, products in dtype."""
    half = qkv.shape[-1] // 2
    c = cos[pos.long()].to(dtype)[:, None, None, :]
    s = sin[pos.long()].to(dtype)[:, None, None, :] * (-1 if inverse else 1)
    x1, x2 = qkv[:, :2, :, :half], qkv[:, :2, :, half:]
    return torch.cat([torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1), qkv[:, 2:]], 1)


def test_matches_hf_rotary_embedding():
    """The reference is HF's rotary: transformers' apply_rotary_pos_emb with ModernBERT's frequencies."""
    hf_rotary = pytest.importorskip("transformers.models.modernbert.modeling_modernbert")
    heads, head_dim, theta = 2, 16, 160000.0
    pos = _positions([7, 3])
    qkv = rand(len(pos), 3, heads, head_dim, seed=3)
    cos, sin = rotary_tables(head_dim, 16, theta)
    out = ops.rotary_qk(qkv, cos, sin, pos)
    full_cos = torch.cat([cos, cos], -1)[pos][None]  # HF's [batch, seq, D], unsqueezed to [batch, seq, 1, D]
    full_sin = torch.cat([sin, sin], -1)[pos][None]
    q, k = hf_rotary.apply_rotary_pos_emb(qkv[None, :, 0], qkv[None, :, 1], full_cos, full_sin, unsqueeze_dim=2)
    torch.testing.assert_close(out[:, 0], q[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out[:, 1], k[0], atol=1e-6, rtol=1e-6)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    torch.testing.assert_close(cos, torch.outer(torch.arange(16).float(), inv_freq).cos())
    # a row per token for positions given as a tensor (any values: rotary positions index no table)
    given = torch.tensor([5, 0, 15, 5])
    for per_token, table in zip(rotary_tables(head_dim, given, theta), (cos, sin)):
        assert torch.equal(per_token, table[given])


@pytest.mark.parametrize("lengths", [[3], [4, 1, 6]])
def test_wrapper_autograd(backend, dtype, lengths):
    """ops.rotary_qk with backend= forced: output and gradient through autograd against the reference's."""
    cos, sin = rotary_tables(8, 12, 10000.0)
    pos = _positions(lengths)
    qkv, cos, sin, pos = backend.to(rand(len(pos), 3, 2, 8, seed=1), cos, sin, pos)
    compare(lambda x: ops.rotary_qk(x, cos, sin, pos, backend=backend.name),
            lambda x: reference.rotary_qk(x, cos, sin, pos),
            lambda x: _native(x, cos, sin, pos, x.dtype),
            [qkv], dtype, "rotary_qk", atol=1e-5, rtol=1e-5)


def test_strided_inputs_and_int32_positions(backend):
    """A qkv sliced from a wider tensor, strided tables and int32 positions: the values of the contiguous copies."""
    cos, sin = rotary_tables(16, 20, 10000.0)
    pos = _positions([5, 2])
    qkv = rand(7, 3, 2, 32, seed=2)[..., :16]
    qkv, cos2, sin2, pos = backend.to(qkv, torch.cat([cos, cos], 1)[:, ::2], sin, pos)
    assert not (qkv.is_contiguous() or cos2.is_contiguous())
    out = backend.forward(qkv, cos2, sin2, pos.int(), False)
    assert out.is_contiguous()
    torch.testing.assert_close(out, backend.forward(qkv.contiguous(), cos2.contiguous(), sin2, pos, False), atol=0,
                               rtol=0)


def test_bad_input_is_named(backend):
    cos, sin = rotary_tables(8, 10, 10000.0)
    pos = _positions([4])
    qkv, cos, sin, pos = backend.to(rand(4, 3, 2, 8), cos, sin, pos)
    call = lambda *a: ops.rotary_qk(*a, backend=backend.name)  # noqa: E731
    with pytest.raises(ValueError, match=r"qkv must be \[tokens, 3, heads, head_dim\]"):
        call(qkv[:, :2], cos, sin, pos)
    with pytest.raises(ValueError, match="head_dim must be even"):
        call(qkv[..., :7], cos, sin, pos)
    with pytest.raises(ValueError, match=r"cos must be \[positions, 4\]"):
        call(qkv, cos[:, :3], sin, pos)
    with pytest.raises(TypeError, match="sin must be float32"):
        call(qkv, cos, sin.double(), pos)
    with pytest.raises(TypeError, match="positions must be int32 or int64"):
        call(qkv, cos, sin, pos.float())
    with pytest.raises(ValueError, match=r"positions must be \[4\]"):
        call(qkv, cos, sin, pos[:3])
    with pytest.raises(ValueError, match=r"positions hold values in \[0, 10\], outside the 10 positions"):
        call(qkv, cos, sin, pos * 0 + torch.tensor([0, 1, 2, 10], device=pos.device))
    with pytest.raises(ValueError, match="positions is on meta"):
        call(qkv, cos, sin, pos.to("meta"))


def test_out_of_range_position_never_reads_another_row(backend):
    """The kernels themselves (no wrapper check): the CPU kernel raises; the GPU kernels, which cannot raise without
    a sync, give NaN for that token's query and key and leave every other value right."""
    cos, sin = rotary_tables(8, 10, 10000.0)
    qkv, cos, sin, pos = backend.to(rand(3, 3, 2, 8), cos, sin, torch.tensor([0, 10, 2]))
    if backend.name == "cpu":
        with pytest.raises(ValueError, match=r"positions\[1\] = 10 is outside the 10 positions"):
            backend.forward(qkv, cos, sin, pos, False)
        return
    out = backend.forward(qkv, cos, sin, pos, False)
    assert out[1, :2].isnan().all() and torch.equal(out[1, 2], qkv[1, 2])
    keep = torch.tensor([0, 2], device=out.device)
    want = reference.rotary_qk(qkv[keep], cos, sin, pos[keep])
    torch.testing.assert_close(out[keep], want, atol=1e-6, rtol=1e-6)


def test_cpu_kernel_checks_name_the_op_and_tensor():
    """The C++ kernel checks its own arguments too, positions' range included."""
    op = lambda *args: torch.ops.mtbert_fast.rotary_qk(*args, "cpu")  # noqa: E731
    cos, sin = rotary_tables(8, 10, 10000.0)
    qkv, pos = rand(4, 3, 2, 8), _positions([4])
    with pytest.raises(RuntimeError, match=r"rotary_qk: cos.size\(1\) must be 4"):
        op(qkv, cos[:, :3], sin[:, :3], pos, False)
    with pytest.raises(ValueError, match=r"rotary_qk: positions\[3\] = 12 is outside the 10 positions"):
        op(qkv, cos, sin, torch.tensor([0, 1, 2, 12]), False)
    with pytest.raises(RuntimeError, match="rotary_qk: qkv must be float32 or bfloat16"):
        op(qkv.double(), cos, sin, pos, False)
