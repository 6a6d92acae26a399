"""int8_layers: a stack of post-norm (BERT) encoder layers with int8 products on packed tokens, in one call, for CPU
inference.

Each layer is the int8 layer (mtbert_fast.models.int8) on weights whose sums come from int8 panels, kernel for
kernel: the QKV product (int8_linear on x quantized by the previous layer's last epilogue, or by quantize_rows for the
first layer), attention_varlen, the attention output's product on quantize_rows(ctx) with its residual LayerNorm and
the quantization for the next product (int8_linear_residual_layer_norm_quantize), the intermediate product with its
GELU and quantization (int8_linear_gelu_quantize), and the output product with its residual LayerNorm, quantized for
the next layer (plain int8_linear_residual_layer_norm for the last one). Each product adds back its outlier channels
in fp32. The result equals those calls made one by one, bit for bit; on a short input a forward spends a large
share of its time between the kernels when Python calls them, and here they follow each other in C++. Inference
only (no autograd). Where a batch has enough rows on several threads, each thread runs the layers on its own
sequences, as post_norm_layers does (`stack_groups`, `stack_by_sequences`); every int8 kernel gives each row the
same bits at any row count, so the result is the same.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.attention_varlen import check_sequences
from mtbert_fast.ops.post_norm_layers import STACK_SCHEMA, check_stack, fake_stack
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op

PER_PRODUCT = 7  # panels, weight_scale, weight_sum, bias, smooth, outlier_index, outlier_weight
PRODUCTS = ("the QKV product", "the attention output product", "the intermediate product", "the output product")
PER_LAYER = len(PRODUCTS) * PER_PRODUCT + 4  # and the two norms' weight and bias


def product_weights(panels, weight_scale, weight_sum, bias, smooth, outlier_index, outlier_weight) -> list:
    """One product's 7 tensors in the order int8_layers reads them: the int8 panels (pack_int8_panels), weight_scale
    and weight_sum fp32 [N], bias [N] in x's dtype, the smooth of its input fp32 [K], outlier_index int64 [k] (k may
    be 0) and outlier_weight fp32 [k, N]."""
    return [panels, weight_scale, weight_sum, bias, smooth, outlier_index, outlier_weight]


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor], heads: int) -> None:
    op = "int8_layers"
    check_stack(op, x, weights, heads, PER_LAYER)
    h = x.shape[1]
    for layer in range(len(weights) // PER_LAYER):
        w = weights[layer * PER_LAYER:(layer + 1) * PER_LAYER]
        inner = w[2 * PER_PRODUCT + 1].shape[0] if w[2 * PER_PRODUCT + 1].dim() == 1 else 0
        for p, (name, n, k) in enumerate(zip(PRODUCTS, (3 * h, h, inner, h), (h, h, h, inner))):
            start = p * PER_PRODUCT
            panels, weight_scale, weight_sum, bias, smooth, index, outlier_weight = w[start:start + PER_PRODUCT]
            where = f"{op}: layer {layer}, {name}"
            vectors = (("weight_scale", weight_scale, (n,), (torch.float32,)),
                       ("weight_sum", weight_sum, (n,), (torch.float32,)), ("bias", bias, (n,), (x.dtype,)),
                       ("smooth", smooth, (k,), (torch.float32,)))
            for what, t, shape, dtypes in vectors:
                if tuple(t.shape) != shape or n == 0 or t.dtype not in dtypes:
                    raise ValueError(f"{where}: {what} must be {dtypes[0]} of shape {shape if n else '[I > 0]'}, got "
                                     f"{t.dtype} of shape {tuple(t.shape)}")
            if panels.dtype != torch.int8 or panels.dim() != 4:
                raise ValueError(f"{where}: panels must be int8 panels [P, K4, 32, 4] (pack_int8_panels), got "
                                 f"{panels.dtype} of shape {tuple(panels.shape)}")
            if index.dtype != torch.int64 or index.dim() != 1:
                raise ValueError(f"{where}: outlier_index must be a 1-D int64 tensor, got {index.dtype} of shape "
                                 f"{tuple(index.shape)}")
            if outlier_weight.dtype != torch.float32 or tuple(outlier_weight.shape) != (index.shape[0], n):
                raise ValueError(f"{where}: outlier_weight must be float32 of shape {(index.shape[0], n)}, got "
                                 f"{outlier_weight.dtype} of shape {tuple(outlier_weight.shape)}")
        for j, what in enumerate(("the attention norm's weight", "the attention norm's bias",
                                  "the output norm's weight", "the output norm's bias")):
            t = w[len(PRODUCTS) * PER_PRODUCT + j]
            if tuple(t.shape) != (h,) or t.dtype not in (x.dtype, torch.float32):
                raise ValueError(f"{op}: layer {layer}, {what} must be [{h}] in float32 or x's dtype, got {t.dtype} of "
                                 f"shape {tuple(t.shape)}")


def int8_layers(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, weights: Sequence[torch.Tensor],
                heads: int, scale: float, eps: float = 1e-12, approximate: str = "none",
                rel_bias: torch.Tensor | None = None, *, backend: str | None = None) -> torch.Tensor:
    """x [T, H] (float32 / bfloat16) through len(weights) / 32 post-norm encoder layers with int8 products -> [T, H]
    in x's dtype.

    cu_seqlens int32 [B+1] and max_seqlen as for attention_varlen; weights: per layer, each of the QKV, attention
    output, intermediate and output products' 7 tensors (`product_weights`), then the attention norm's weight and
    bias and the output norm's weight and bias [H]; heads the attention heads, scale the scores' scale, eps the
    LayerNorms' epsilon, approximate GELU's form ("none" or "tanh"); rel_bias fp32 [heads, 2R+1], a relative position
    bias added to every layer's scores (MPNet), or None.
    """
    check_gelu("int8_layers", approximate)
    weights = list(weights)
    _check(x, weights, heads)
    check_sequences("int8_layers", cu_seqlens, max_seqlen, x, "x")
    return OP(x, cu_seqlens, max_seqlen, weights, heads, scale, eps, approximate, rel_bias, backend=backend)


OP = Op(
    name="int8_layers",
    schema=STACK_SCHEMA,  # weights: 32 per layer (see int8_layers)
    reference=reference.int8_layers,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=fake_stack,
)
