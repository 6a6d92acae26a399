"""gather_rows, scatter_rows and the unpad/pad helpers built on them, on every backend that runs here, against the
reference: rows of any dtype are copied, so every result must equal the reference exactly."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.ops import reference
from op_testing import rand

OP_NAME = "gather_rows"  # scatter_rows has the same backends


def _scatter(backend, *args):
    return torch.ops.mtbert_fast.scatter_rows(*args, backend=backend.name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
@pytest.mark.parametrize("n", [0, 1, 5, 37])
def test_gather_scatter_round_trip(backend, dtype, n):
    rows = 40
    x = backend.to(rand(rows, 3, 5, scale=4.0).to(dtype))[0]
    indices = backend.to(torch.randperm(rows, generator=torch.Generator().manual_seed(1))[:n])[0]
    gathered = backend.forward(x, indices)
    assert torch.equal(gathered, reference.gather_rows(x, indices))
    scattered = _scatter(backend, gathered, indices, rows)
    assert torch.equal(scattered, reference.scatter_rows(gathered, indices, rows))
    keep = torch.zeros(rows, dtype=torch.bool, device=backend.device)
    keep[indices] = True
    assert torch.equal(scattered[keep], x[keep]) and not scattered[~keep].any()


def test_shapes_and_strides(backend):
    x = backend.to(torch.arange(12.0).view(6, 2).t())[0]  # [2, 6], not contiguous
    indices, ids, empty = backend.to(torch.tensor([1, 1, 0]), torch.arange(5), torch.zeros(0, dtype=torch.long))
    out = backend.forward(x, indices)
    assert torch.equal(out, x[indices]) and out.is_contiguous()
    assert torch.equal(backend.forward(ids, indices.flip(0) + 3), ids[[3, 4, 4]])
    assert torch.equal(_scatter(backend, torch.zeros(0, 4, device=backend.device), empty, 3),
                       torch.zeros(3, 4, device=backend.device))
    scattered = _scatter(backend, x.t()[:2], indices.unique(), 4)
    assert scattered.is_contiguous() and torch.equal(scattered[:2], x.t()[:2])


def test_unpad_pad_round_trip(backend):
    mask, hidden = backend.to(torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]]), rand(4, 4, 6))
    packed, indices, cu, max_len = ops.unpad(hidden, mask)
    assert cu.tolist() == [0, 3, 4, 8, 10] and max_len == 4 and cu.dtype == torch.int32
    assert torch.equal(packed, hidden[mask.bool()])
    assert torch.equal(ops.pad(packed, indices, 4, 4), hidden * mask[..., None])
    ids = backend.to(torch.arange(16).reshape(4, 4))[0]
    assert torch.equal(ops.gather_rows(ids.flatten(), indices, backend=backend.name), ids[mask.bool()])


def test_gradients(backend):
    """The gradient of gather_rows adds up repeated indices; that of scatter_rows gathers."""
    x = backend.to(rand(6, 3))[0].requires_grad_()
    idx, scatter_idx, weights = backend.to(torch.tensor([4, 0, 4, 2]), torch.tensor([5, 1, 2]), torch.arange(7.0))
    ops.gather_rows(x, idx, backend=backend.name).sum().backward()
    assert x.grad[:, 0].tolist() == [1.0, 0.0, 1.0, 0.0, 2.0, 0.0]
    y = backend.to(rand(3, 2))[0].requires_grad_()
    out = ops.scatter_rows(y, scatter_idx, 7, backend=backend.name)
    (out * weights[:, None]).sum().backward()
    assert y.grad[:, 0].tolist() == [5.0, 1.0, 2.0]


def test_bad_input_is_named(backend):
    x, idx = backend.to(rand(5, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="gather_rows: indices must be a 1-D int64 tensor"):
        ops.gather_rows(x, idx.int(), backend=backend.name)
    with pytest.raises(ValueError, match="gather_rows: x must have at least 1 dim"):
        ops.gather_rows(x[0, 0], idx, backend=backend.name)
    with pytest.raises(ValueError, match="scatter_rows: indices are on meta"):
        ops.scatter_rows(x[:2], idx.to("meta"), 6, backend=backend.name)
    with pytest.raises(ValueError, match="scatter_rows: 2 indices for 5 rows of x"):
        ops.scatter_rows(x, idx, 6, backend=backend.name)
    with pytest.raises(ValueError, match=r"unpad: hidden is \(5, 4\) but attention_mask is \(5, 3\)"):
        ops.unpad(x, x[:, :3])


def test_cpu_kernel_bad_indices():
    """Indices out of range or repeated (scatter) are named with their position, through the wrappers too."""
    gather = lambda *args: torch.ops.mtbert_fast.gather_rows(*args, backend="cpu")  # noqa: E731
    scatter = lambda *args: torch.ops.mtbert_fast.scatter_rows(*args, backend="cpu")  # noqa: E731
    x = rand(5, 4)
    with pytest.raises(ValueError, match=r"gather_rows: indices\[1\] = 5 is out of range for x with 5 rows"):
        gather(x, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"indices\[1\] = 3 is out of range"):
        ops.gather_rows(x[:3], torch.tensor([0, 3]), backend="cpu")
    with pytest.raises(ValueError, match=r"gather_rows: indices\[0\] = -1 is out of range"):
        gather(x, torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="gather_rows: indices must be Long"):
        gather(x, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"scatter_rows: indices\[2\] = 9 is out of range for num_rows = 6"):
        scatter(x[:3], torch.tensor([0, 1, 9]), 6)
    with pytest.raises(ValueError, match=r"indices must be distinct, but indices\[0\] and indices\[2\] are both 3"):
        scatter(x[:3], torch.tensor([3, 1, 3]), 6)
    with pytest.raises(RuntimeError, match=r"scatter_rows: indices.size\(0\) must be 5"):
        scatter(x, torch.tensor([0, 1]), 6)


def test_reference_refuses_what_the_kernels_refuse():
    """Indices out of range, negative (which Python's indexing would wrap around) or repeated in a scatter."""
    x = rand(5, 4)
    with pytest.raises(ValueError, match=r"gather_rows: indices\[0\] = -1 is out of range for x with 5 rows"):
        ops.gather_rows(x, torch.tensor([-1, 0]), backend="reference")
    with pytest.raises(ValueError, match=r"scatter_rows: indices\[2\] = 9 is out of range for num_rows = 6"):
        ops.scatter_rows(x[:3], torch.tensor([0, 1, 9]), 6, backend="reference")
    with pytest.raises(ValueError, match="scatter_rows: indices must be distinct"):
        ops.scatter_rows(x[:3], torch.tensor([3, 1, 3]), 6, backend="reference")

