"""The attention-dropout mask in plain PyTorch: the oracle for the kernels' fused dropout.

Every backend draws the same mask from the same rng_state (int64 [2] on the CPU: seed, offset), with
Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011) as a counter-based generator:
    key = (seed mod 2^32, seed >> 32 mod 2^32),  counter = (j >> 2, i, h, offset mod 2^32)
for the score of query row i and key row j (packed row indices in [0, T)) of head h; element (h, i, j) takes word
j & 3 of the four, and is kept iff that word >= floor(dropout_p * 2^32).  Kept probabilities are scaled by
1 / (1 - dropout_p), as torch.nn.functional.dropout scales them.  Because the mask is a pure function of
(rng_state, h, i, j), the backward regenerates it instead of storing it.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def new_rng_state() -> torch.Tensor:
    """A fresh rng_state (int64 [2] on the CPU: seed, offset 0), drawn from torch's default CPU generator, so that
    torch.manual_seed reproduces every mask; it never touches a device, so it costs no synchronisation."""
    return torch.cat([torch.randint(0, 2**62, (1,), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])


def check_rng_state(op: str, dropout_p: float, rng_state: torch.Tensor | None) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        return
    if rng_state is None:
        raise ValueError(f"{op}: dropout_p = {dropout_p} needs rng_state (int64 [2]: seed, offset)")
    if rng_state.device.type != "cpu" or rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
        raise ValueError(
            f"{op}: rng_state must be an int64 CPU tensor of shape [2] (seed, offset), got {rng_state.dtype} "
            f"{tuple(rng_state.shape)} on {rng_state.device}"
        )


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) 32-bit halves of a * b, for a 32-bit constant a and int64 tensor b of 32-bit values, without
    overflowing int64: b is split into 16-bit halves."""
    p_lo = a * (b & 0xFFFF)  # < 2^48
    p_hi = a * (b >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return mid & _MASK32, (p_hi >> 16) + (mid >> 32)


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit values (broadcast together) -> its four words, int64."""
    c0, c1, c2, c3 = torch.broadcast_tensors(*(torch.as_tensor(c, dtype=torch.int64) for c in (c0, c1, c2, c3)))
    for _ in range(10):
        lo0, hi0 = _mulhilo(_MUL[0], c0)
        lo1, hi1 = _mulhilo(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _MASK32, (k1 + _WEYL[1]) & _MASK32
    return c0, c1, c2, c3


def threshold(dropout_p: float) -> int:
    """Words below this are dropped."""
    return min(math.floor(dropout_p * 2.0**32), _MASK32)


def keep_mask(
    rng_state: torch.Tensor, dropout_p: float, heads: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """bool [heads, len(rows), len(cols)]: which probabilities of query rows `rows` against key rows `cols` (packed
    row indices, int64 [n] and [m]) are kept."""
    seed, offset = (int(v) for v in rng_state.tolist())
    seed &= 2**64 - 1
    k0, k1 = seed & _MASK32, seed >> 32
    h = torch.arange(heads, dtype=torch.int64).view(-1, 1, 1)
    i = rows.to(torch.int64).cpu().view(1, -1, 1)
    j = cols.to(torch.int64).cpu().view(1, 1, -1)
    words = torch.stack(philox4x32_10(j >> 2, i, h, offset & _MASK32, k0, k1))  # [4, heads, n, m]
    word = words.gather(0, (j & 3).expand(1, heads, i.shape[1], j.shape[2])).squeeze(0)
    return (word >= threshold(dropout_p)).to(rows.device)


def attention_dropout_masks(
    rng_state: torch.Tensor, dropout_p: float, heads: int, cu_seqlens: torch.Tensor
) -> list[torch.Tensor]:
    """The mask an attention_varlen call with this rng_state applies, per sequence: bool [heads, L_b, L_b] (True
    where a probability is kept).  For tests and debugging; the kernels never form it."""
    bounds = cu_seqlens.tolist()
    masks = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        rows = torch.arange(start, end, dtype=torch.int64, device=cu_seqlens.device)
        masks.append(keep_mask(rng_state, dropout_p, heads, rows, rows))
    return masks
