"""pack_mask: where an attention mask's real tokens sit once packed, and what is wrong with the mask, in one pass.

The encoder checks a mask (only 0 and 1, a real token in every row), finds its real tokens (unpad_indices) and, for
HF's pooler, whether a row starts with padding: a dozen small calls, each reading the mask again, and as many reads
of a result on the host. The kernel answers all of it in one pass, with its counts in one small tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops.registry import Backend, Op


class MaskStats(NamedTuple):
    """pack_mask's stats, read on the host."""

    tokens: int  # real tokens T
    longest: int  # the most real tokens of a row
    first_other: int  # slot of the first real entry that is not 1 (-1: none)
    first_empty_row: int  # the first row without a real token (-1: none)
    first_column_padded: bool  # some row starts with padding


def pack_mask(attention_mask: torch.Tensor, *, backend: str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_mask [B, L] of any real dtype (nonzero = real token) -> (slots int64 [B * L], cu_seqlens int32
    [B + 1], stats int64 [5]).

    slots: the real tokens' slots of the flattened mask, in order (the first T are unpad_indices' indices), then
    the padding's; cu_seqlens as unpad_indices gives it; stats as `MaskStats` names them (read them with
    `mask_stats`). A value other than 0 and 1 counts as real and is reported, not refused.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"pack_mask: attention_mask must be [batch, seqlen], got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_complex:
        raise TypeError(f"pack_mask: attention_mask must hold integers, bools or floats, got {attention_mask.dtype}")
    return OP(attention_mask, backend=backend)


def mask_stats(stats: torch.Tensor) -> MaskStats:
    tokens, longest, other, empty, padded = stats.tolist()
    return MaskStats(tokens, longest, other, empty, bool(padded))


def _fake(attention_mask):
    b, l = attention_mask.shape
    long = dict(dtype=torch.int64, device=attention_mask.device)
    return (torch.empty(b * l, **long), torch.empty(b + 1, dtype=torch.int32, device=attention_mask.device),
            torch.empty(5, **long))


OP = Op(
    name="pack_mask",
    # attention_mask [B, L] -> slots int64 [B * L], cu_seqlens int32 [B + 1], stats int64 [5]
    schema="(Tensor attention_mask) -> (Tensor, Tensor, Tensor)",
    reference=reference.pack_mask,
    backends={"cpu": Backend(dtypes=None)},
    fake=_fake,
    result_outputs=3,
)
