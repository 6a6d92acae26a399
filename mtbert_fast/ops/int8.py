"""int8 products for inference: per-token quantization of activations and int8 linears with fused epilogues.

An activation row x is stored as int8 q with an fp32 scale and zero, after multiplying it by a per-channel
smoothing vector: x * smooth ~= scale * (q - zero) (asymmetric, so rows that are mostly positive keep all 256
levels). A weight is int8 [M, K] per output channel: weight_scale [M] and its row sums weight_sum [M]; the product
is scale * weight_scale * (q @ weight^T - zero * weight_sum), exact in int32 before the scaling. The products have
no autograd: this is the inference path (see mtbert_fast.quant for how weights are quantized).
"""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op

_FLOATS = (torch.float32, torch.bfloat16)


def _check_vector(op: str, name: str, t: torch.Tensor, n: int, like: torch.Tensor, dtypes=(torch.float32,)) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but q is on {like.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({n},)")


def _check_product(op, q, scale, zero, weight, weight_scale, weight_sum, bias) -> None:
    for name, t in (("q", q), ("weight", weight)):
        if t.dtype != torch.int8:
            raise TypeError(f"{op}: {name} must be torch.int8, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
    if weight.shape[1] != q.shape[1]:
        raise ValueError(f"{op}: weight has shape {tuple(weight.shape)}, expected [out, {q.shape[1]}] (q's last dim)")
    if weight.device != q.device:
        raise ValueError(f"{op}: weight is on {weight.device} but q is on {q.device}")
    rows, out = q.shape[0], weight.shape[0]
    _check_vector(op, "scale", scale, rows, q)
    _check_vector(op, "zero", zero, rows, q)
    _check_vector(op, "weight_scale", weight_scale, out, q)
    _check_vector(op, "weight_sum", weight_sum, out, q)
    _check_vector(op, "bias", bias, out, q, _FLOATS)


def quantize_rows(x: torch.Tensor, smooth: torch.Tensor, *, backend: str | None = None):
    """x [N, K] (float32 / bfloat16), smooth fp32 [K] -> (q int8 [N, K], scale fp32 [N], zero fp32 [N]) with
    x * smooth ~= scale * (q - zero)."""
    op = "quantize_rows"
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"{op}: x must be [rows, K] with K > 0, got shape {tuple(x.shape)}")
    if smooth.device != x.device:
        raise ValueError(f"{op}: smooth is on {smooth.device} but x is on {x.device}")
    if smooth.dtype != torch.float32 or smooth.shape != (x.shape[1],):
        raise ValueError(f"{op}: smooth must be float32 of shape ({x.shape[1]},), got {smooth.dtype} "
                         f"{tuple(smooth.shape)}")
    return QUANTIZE_ROWS(x, smooth, backend=backend)


def int8_linear(q, scale, zero, weight, weight_scale, weight_sum, bias, *, backend: str | None = None):
    """The dequantized product plus bias: [N, M] in bias's dtype (float32 / bfloat16)."""
    _check_product("int8_linear", q, scale, zero, weight, weight_scale, weight_sum, bias)
    return INT8_LINEAR(q, scale, zero, weight, weight_scale, weight_sum, bias, backend=backend)


def int8_linear_gelu_quantize(q, scale, zero, weight, weight_scale, weight_sum, bias, approximate: str,
                              smooth: torch.Tensor, *, backend: str | None = None):
    """GELU(product + bias) in fp32, quantized again for the next product with its smooth [M]:
    (q int8 [N, M], scale, zero fp32 [N]). The float activation is never stored."""
    op = "int8_linear_gelu_quantize"
    check_gelu(op, approximate)
    _check_product(op, q, scale, zero, weight, weight_scale, weight_sum, bias)
    _check_vector(op, "smooth", smooth, weight.shape[0], q)
    return INT8_LINEAR_GELU_QUANTIZE(q, scale, zero, weight, weight_scale, weight_sum, bias, approximate, smooth,
                                     backend=backend)


def int8_linear_residual_layer_norm(q, scale, zero, weight, weight_scale, weight_sum, bias, residual, norm_weight,
                                    norm_bias, eps: float, *, backend: str | None = None):
    """LayerNorm(product + bias + residual) * norm_weight + norm_bias, in fp32 -> [N, M] in bias's dtype.
    residual [N, M] in bias's dtype; norm_weight, norm_bias [M] in bias's dtype or float32."""
    op = "int8_linear_residual_layer_norm"
    _check_product(op, q, scale, zero, weight, weight_scale, weight_sum, bias)
    if residual.shape != (q.shape[0], weight.shape[0]):
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected "
                         f"({q.shape[0]}, {weight.shape[0]})")
    if residual.device != q.device or residual.dtype != bias.dtype:
        raise TypeError(f"{op}: residual must be {bias.dtype} (bias's dtype) on {q.device}, got {residual.dtype} "
                        f"on {residual.device}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vector(op, name, t, weight.shape[0], q, (bias.dtype, torch.float32))
    return INT8_LINEAR_RESIDUAL_LAYER_NORM(q, scale, zero, weight, weight_scale, weight_sum, bias, residual,
                                           norm_weight, norm_bias, eps, backend=backend)


def _fake_quantized(x):
    n = x.shape[0]
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((n,), dtype=torch.float32), \
        x.new_empty((n,), dtype=torch.float32)


def _fake_product(q, weight, bias):
    return q.new_empty((q.shape[0], weight.shape[0]), dtype=bias.dtype)


_PRODUCT = "Tensor q, Tensor scale, Tensor zero, Tensor weight, Tensor weight_scale, Tensor weight_sum, Tensor bias"
# the products' main input is q (int8): their kernels take any activation dtype the checks above let through
_PRODUCT_BACKENDS = {"cpu": Backend(dtypes=None)}

QUANTIZE_ROWS = Op(
    name="quantize_rows",
    schema="(Tensor x, Tensor smooth) -> (Tensor, Tensor, Tensor)",
    reference=reference.quantize_rows,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=lambda x, smooth: _fake_quantized(x),
    result_outputs=3,
)

INT8_LINEAR = Op(
    name="int8_linear",
    schema=f"({_PRODUCT}) -> Tensor",
    reference=reference.int8_linear,
    backends=_PRODUCT_BACKENDS,
    fake=lambda q, scale, zero, weight, weight_scale, weight_sum, bias: _fake_product(q, weight, bias),
)

INT8_LINEAR_GELU_QUANTIZE = Op(
    name="int8_linear_gelu_quantize",
    schema=f"({_PRODUCT}, str approximate, Tensor smooth) -> (Tensor, Tensor, Tensor)",
    reference=reference.int8_linear_gelu_quantize,
    backends=_PRODUCT_BACKENDS,
    fake=lambda q, scale, zero, weight, weight_scale, weight_sum, bias, approximate, smooth: _fake_quantized(
        _fake_product(q, weight, bias)
    ),
    result_outputs=3,
)

INT8_LINEAR_RESIDUAL_LAYER_NORM = Op(
    name="int8_linear_residual_layer_norm",
    schema=f"({_PRODUCT}, Tensor residual, Tensor norm_weight, Tensor norm_bias, float eps) -> Tensor",
    reference=reference.int8_linear_residual_layer_norm,
    backends=_PRODUCT_BACKENDS,
    fake=lambda q, scale, zero, weight, weight_scale, weight_sum, bias, *rest: _fake_product(q, weight, bias),
)
