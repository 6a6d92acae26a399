"""bias_gelu in Triton: y = GELU(x + bias), and its backward; also the GELU device functions that
bias_gelu_layer_norm reuses.

x [..., D], bias [D] -> y [..., D] in x's dtype, computed in fp32 (loaded in the input dtype, stored once).
GELU, exact:  g(s) = 0.5 s (1 + erf(s / sqrt 2)) = s Phi(s),  g'(s) = Phi(s) + s phi(s),  phi = exp(-s^2/2) / sqrt(2 pi)
GELU, tanh:   g(s) = 0.5 s (1 + tanh u) = s sigmoid(2u),  u = sqrt(2/pi) (s + 0.044715 s^3)
              g'(s) = sigmoid(2u) + 2 s sigmoid(2u) (1 - sigmoid(2u)) u'(s),  u'(s) = sqrt(2/pi) (1 + 3 * 0.044715 s^2)
(Hendrycks & Gimpel, "Gaussian Error Linear Units", 2016; sigmoid(2u) replaces 0.5 (1 + tanh u), which Triton lacks
as a portable builtin and which loses precision near 0 when written with exp.)
The kernels run over the flat [N * D] elements, BLOCK at a time; the op (mtbert_fast.ops.bias_gelu) sums grad_x
over rows for grad_bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.triton._jit import device_guard, jit

_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_C = tl.constexpr(0.044715)

# elements per program of the elementwise kernels
_BLOCK = 1024


@jit
def gelu(s, TANH: tl.constexpr):
    """GELU of an fp32 block s (see the module docstring)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (s + _TANH_C * s * s * s)
        return s / (1.0 + tl.exp(-2.0 * u))
    else:
        return 0.5 * s * (1.0 + tl.math.erf(s * _INV_SQRT_2))


@jit
def gelu_grad(s, TANH: tl.constexpr):
    """dGELU/ds of an fp32 block s (see the module docstring)."""
    if TANH:
        u = _SQRT_2_OVER_PI * (s + _TANH_C * s * s * s)
        sig = 1.0 / (1.0 + tl.exp(-2.0 * u))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_C * s * s)
        return sig + 2.0 * s * sig * (1.0 - sig) * du
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(s * _INV_SQRT_2))
        pdf = tl.exp(-0.5 * s * s) * _INV_SQRT_2PI
        return cdf + s * pdf


@jit
def _bias_gelu_fwd(
    X,  # [n] (the flat [N, D] input)
    Bias,  # [D]
    Y,  # [n] out
    n,  # N * D
    D,
    TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs % D, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, gelu(x + b, TANH).to(Y.dtype.element_ty), mask=mask)


@jit
def _bias_gelu_bwd(
    GradY,  # [n]
    X,  # [n]
    Bias,  # [D]
    GradX,  # [n] out: GradY * GELU'(X + Bias)
    n,  # N * D
    D,
    TANH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(GradY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(Bias + offs % D, mask=mask, other=0.0).to(tl.float32)
    tl.store(GradX + offs, (dy * gelu_grad(x + b, TANH)).to(GradX.dtype.element_ty), mask=mask)


def _launch(kernel, out: torch.Tensor, tensors: tuple[torch.Tensor, ...], d: int, approximate: str) -> torch.Tensor:
    n = out.numel()
    if n:
        with device_guard(out):
            grid = (triton.cdiv(n, _BLOCK),)
            kernel[grid](*tensors, out, n, d, TANH=approximate == "tanh", BLOCK=_BLOCK, num_warps=4)
    return out


def forward(x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """GELU(x + bias).  x [..., D], bias [D] -> [..., D] in x's dtype."""
    check_gelu("bias_gelu", approximate)
    x = x.contiguous()
    return _launch(_bias_gelu_fwd, torch.empty_like(x), (x, bias.contiguous()), x.shape[-1], approximate)


def backward(grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
    """-> grad_x [..., D]: grad_y * GELU'(x + bias)."""
    x = x.contiguous()
    tensors = (grad_y.contiguous(), x, bias.contiguous())
    return _launch(_bias_gelu_bwd, torch.empty_like(x), tensors, x.shape[-1], approximate)
