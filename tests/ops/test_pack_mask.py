"""pack_mask, an attention mask's packing and checks in one pass, on every backend that runs here: exactly the
reference's outputs on masks of every dtype and shape the encoder meets, good and bad."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import ops
from mtbert_fast.ops import reference
from mtbert_fast.ops.pack_mask import MaskStats, mask_stats

OP_NAME = "pack_mask"


def _mask(lengths, seqlen, left=False):
    return torch.tensor([[int((seqlen - n <= i) if left else (i < n)) for i in range(seqlen)] for n in lengths])


MASKS = {
    "right_padded": lambda: _mask([5, 1, 12, 12], 12),
    "left_padded": lambda: _mask([3, 7], 9, left=True),
    "no_padding": lambda: torch.ones(2, 6, dtype=torch.int64),
    "one_token": lambda: torch.ones(1, 1, dtype=torch.int64),
    "holes": lambda: torch.tensor([[1, 0, 1, 1, 0], [0, 1, 0, 0, 1]]),
    "empty_row": lambda: _mask([4, 0, 2, 0], 5),
    "no_columns": lambda: torch.ones(3, 0, dtype=torch.int64),
    "a_two_and_a_minus_one": lambda: torch.tensor([[1, 1, 2, 0], [1, -1, 1, 0]]),
}
DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(MASKS))
def test_kernel_equals_the_reference(backend, case, dtype):
    mask = MASKS[case]()
    if dtype in (torch.uint8, torch.bool) and case == "a_two_and_a_minus_one":
        mask = mask.clamp(min=0)  # -1 has no uint8; bool holds no 2
    mask = mask.to(dtype)
    got = backend.forward(*backend.to(mask))
    want = reference.pack_mask(mask)
    for name, g, w in zip(("slots", "cu_seqlens", "stats"), got, want):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), (name, g, w)


def test_what_the_stats_say(backend):
    """The stats of a mask with padding on the left of one row, a 2 in another and an empty row."""
    mask = torch.tensor([[0, 1, 1, 0], [1, 2, 1, 1], [0, 0, 0, 0]])
    slots, cu_seqlens, stats = backend.forward(*backend.to(mask))
    assert mask_stats(stats) == MaskStats(tokens=6, longest=4, first_other=5, first_empty_row=2,
                                          first_column_padded=True)
    assert slots[:6].tolist() == [1, 2, 4, 5, 6, 7] and sorted(slots.tolist()) == list(range(12))
    assert cu_seqlens.tolist() == [0, 2, 6, 6]


def test_the_real_slots_are_unpad_indices(backend):
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]])
    slots, cu_seqlens, stats = backend.forward(*backend.to(mask))
    indices, cu, longest = ops.unpad_indices(mask)
    tokens = mask_stats(stats).tokens
    assert torch.equal(slots[:tokens].cpu(), indices) and torch.equal(cu_seqlens.cpu(), cu)
    assert mask_stats(stats).longest == longest


@pytest.mark.parametrize("mask,error,message", [
    (torch.ones(4, dtype=torch.int64), ValueError, r"attention_mask must be \[batch, seqlen\], got shape \(4,\)"),
    (torch.ones(1, 2, 3, dtype=torch.int64), ValueError, r"must be \[batch, seqlen\], got shape \(1, 2, 3\)"),
    (torch.ones(2, 3, dtype=torch.complex64), TypeError, "must hold integers, bools or floats, got torch.complex64"),
])
def test_bad_masks_are_named(mask, error, message):
    with pytest.raises(error, match=message):
        ops.pack_mask(mask)
