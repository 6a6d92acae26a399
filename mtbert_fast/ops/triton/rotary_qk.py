"""rotary_qk in Triton: the query and key heads of a packed qkv rotated by each token's position angles, the value
heads copied.

qkv [N, 3, H, D], cos/sin [P, D/2] fp32, positions [N] -> out [N, 3, H, D] in qkv's dtype, computed in fp32. For the
pairs (i, i + D/2) of a query or key head at position p, with c = cos[p, i], s = sin[p, i] (negated for the inverse):
out[i] = x[i] c - x[i + D/2] s,  out[i + D/2] = x[i + D/2] c + x[i] s  (RoFormer; the half-split form of GPT-NeoX).
One program per token and head of the 3H, the half row in one block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops.triton._jit import device_guard, jit


@jit
def _rotary_fwd(
    X,  # [N, 3H, D]
    Cos,  # [P, HALF]
    Sin,  # [P, HALF]
    Pos,  # [N]
    Out,  # [N, 3H, D] out
    P,  # rows of Cos and Sin
    H,
    HALF,
    SIGN,  # -1.0: rotate by the negative angles
    BLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    row = (t * 3 * H + h) * 2 * HALF
    x1 = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    if h < 2 * H:
        p = tl.load(Pos + t).to(tl.int64)
        # an out-of-range position gives NaN (see ops.rotary_qk), never another row of the tables
        valid = (p >= 0) & (p < P)
        c = tl.load(Cos + p * HALF + offs, mask=mask & valid, other=float("nan"))
        s = tl.load(Sin + p * HALF + offs, mask=mask & valid, other=float("nan")) * SIGN
        y1 = x1 * c - x2 * s
        y2 = x2 * c + x1 * s
    else:
        y1 = x1
        y2 = x2
    tl.store(Out + row + offs, y1.to(Out.dtype.element_ty), mask=mask)
    tl.store(Out + row + HALF + offs, y2.to(Out.dtype.element_ty), mask=mask)


def forward(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
            inverse: bool) -> torch.Tensor:
    """-> qkv [N, 3, H, D] with its query and key heads rotated (see the module docstring)."""
    qkv = qkv.contiguous()
    out = torch.empty_like(qkv)
    n, _, h, d = qkv.shape
    if out.numel():
        with device_guard(out):
            half = d // 2
            _rotary_fwd[(n, 3 * h)](qkv, cos.contiguous(), sin.contiguous(), positions.contiguous(), out, cos.shape[0],
                                    h, half, -1.0 if inverse else 1.0, BLOCK=triton.next_power_of_2(half), num_warps=1)
    return out
