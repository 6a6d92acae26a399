"""post_norm_layers: a stack of post-norm (BERT) encoder layers on packed tokens, in one call, for CPU inference.

Each layer is the encoder's inference layer, kernel for kernel: the QKV product, attention_varlen, the attention
output's product and bias_residual_layer_norm, the intermediate product with its GELU, the output product and
bias_residual_layer_norm; its result equals those calls made one by one, bit for bit (on each group of sequences
where the stack runs its threads apart, below). Each product runs on the kernel its weight is packed for:
panel_linear on the panels of `pack_panels` (the encoder's inputs of few rows), mkl_linear on a plain weight in x's
dtype with its pack (`pack_mkl`, in `packs`; the encoder's other float32 inputs on Intel CPUs with AVX-512, and bf16
ones where they have no bf16 arithmetic), or oneDNN's linear on a weight in oneDNN's blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`, an mkldnn tensor in x's dtype; the encoder's other inputs). Called from
Python the kernels wait between each other for the interpreter: a large share of a short input's forward and a few
percent of a full batch's; here they follow each other in C++. Inference only (no autograd).

With several threads and a batch of enough rows in whole sequences that split evenly enough, each thread runs the
whole stack on its own consecutive sequences, every kernel on that thread alone (`stack_groups` says which groups,
`stack_by_sequences` switches it): the kernels then share no parallel region, so neither thread waits at their
barriers or for the serial work between them, and each core reads the rows it wrote, at the cost of each reading every
weight (docs/cpu-full-batch.md, "Each thread on its own sequences").
"""

from __future__ import annotations

from typing import Sequence

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.attention_varlen import check_sequences
from mtbert_fast.ops.panel_linear import check_product
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op

PER_LAYER = 12  # tensors per layer in `weights`
# where each layer's vectors sit in its 12 tensors, and what they are
_VECTORS = {1: "the QKV bias [3H]", 3: "the attention output bias [H]", 4: "the attention norm's weight [H]",
            5: "the attention norm's bias [H]", 7: "the intermediate bias [I]", 9: "the output bias [H]",
            10: "the output norm's weight [H]", 11: "the output norm's bias [H]"}


def layer_weights(qkv_panels, qkv_bias, out_panels, out_bias, attn_norm_weight, attn_norm_bias, inner_panels,
                  inner_bias, ffn_out_panels, ffn_out_bias, ffn_norm_weight, ffn_norm_bias) -> list[torch.Tensor]:
    """One layer's 12 tensors in the order post_norm_layers reads them."""
    return [qkv_panels, qkv_bias, out_panels, out_bias, attn_norm_weight, attn_norm_bias, inner_panels, inner_bias,
            ffn_out_panels, ffn_out_bias, ffn_norm_weight, ffn_norm_bias]


def check_stack(op: str, x: torch.Tensor, weights: Sequence[torch.Tensor], heads: int, per_layer: int) -> None:
    """The leading checks of a stack of layers in one call: x [T, H] float32 or bfloat16, H a multiple of heads,
    `per_layer` tensors per layer in weights."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in CPU_DTYPES:
        raise TypeError(f"{op}: x must be float32 or bfloat16, got {x.dtype}")
    h = x.shape[1]
    if heads <= 0 or h % heads:
        raise ValueError(f"{op}: the hidden size {h} (x's columns) must be a multiple of heads, got heads = {heads}")
    if not weights or len(weights) % per_layer:
        raise ValueError(f"{op}: weights must hold {per_layer} tensors per layer and at least one layer, got "
                         f"{len(weights)}")


def _check(x: torch.Tensor, weights: Sequence[torch.Tensor], heads: int, packs: Sequence[torch.Tensor]) -> None:
    op = "post_norm_layers"
    check_stack(op, x, weights, heads, PER_LAYER)
    h = x.shape[1]
    if packs and len(packs) != 4 * (len(weights) // PER_LAYER):
        raise ValueError(f"{op}: packs must be empty or hold 4 tensors a layer ({4 * (len(weights) // PER_LAYER)}), "
                         f"got {len(packs)}")
    for i in range(0, len(weights), PER_LAYER):
        w = weights[i:i + PER_LAYER]
        inner = w[7].shape[0] if w[7].dim() == 1 else 0
        for k, what in _VECTORS.items():
            n = {1: 3 * h, 7: inner}.get(k, h)
            if w[k].dim() != 1 or w[k].shape[0] != n or n == 0:
                raise ValueError(f"{op}: weights[{i + k}] (layer {i // PER_LAYER}, {what}) must be a vector of "
                                 f"{n or 'I > 0'} elements for x of {h} columns, got shape {tuple(w[k].shape)}")
        for k, rows, cols in ((0, h, 3 * h), (2, h, h), (6, h, inner), (8, inner, h)):
            where = f"{op}: weights[{i + k}] (layer {i // PER_LAYER})"
            if not w[k].is_mkldnn and w[k].dim() == 2:  # a plain weight, multiplied by mkl_linear on its pack
                if tuple(w[k].shape) != (cols, rows) or w[k].dtype != x.dtype:
                    raise ValueError(f"{where}, a plain weight, must be [{cols}, {rows}] in x's dtype {x.dtype}, "
                                     f"got {w[k].dtype} {tuple(w[k].shape)}")
                if not packs:
                    raise ValueError(f"{where} is a plain weight, which needs its MKL pack (pack_mkl) in packs")
            elif not w[k].is_mkldnn:
                check_product(where, x.new_empty((0, rows)), w[k], None, cols)
            elif tuple(w[k].shape) != (cols, rows) or w[k].dtype != x.dtype:
                raise ValueError(f"{where} in oneDNN's layout must be [{cols}, {rows}] in x's dtype {x.dtype}, got "
                                 f"{tuple(w[k].shape)} {w[k].dtype}")


def post_norm_layers(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, weights: Sequence[torch.Tensor],
                     heads: int, scale: float, eps: float = 1e-12, approximate: str = "none",
                     rel_bias: torch.Tensor | None = None, packs: Sequence[torch.Tensor] | None = None, *,
                     backend: str | None = None) -> torch.Tensor:
    """x [T, H] through len(weights) / 12 post-norm encoder layers -> [T, H] in x's dtype.

    cu_seqlens int32 [B+1] and max_seqlen as for attention_varlen; weights: each layer's 12 tensors in the order of
    `layer_weights`, each [out_features, in_features] weight as its panels (pack_panels), in oneDNN's layout
    (torch.ops.mkldnn._reorder_linear_weight), in x's dtype, or plain in x's dtype with its pack_mkl in packs (the four
    products' packs of each layer in turn); heads the attention heads, scale the scores' scale, eps the LayerNorms'
    epsilon, approximate GELU's form ("none" or "tanh"); rel_bias fp32 [heads, 2R+1], a relative position bias added to
    every layer's scores (MPNet), or None.
    """
    check_gelu("post_norm_layers", approximate)
    weights, packs = list(weights), list(packs or ())
    _check(x, weights, heads, packs)
    check_sequences("post_norm_layers", cu_seqlens, max_seqlen, x, "x")
    return OP(x, cu_seqlens, max_seqlen, weights, heads, scale, eps, approximate, rel_bias, packs, backend=backend)


def stack_by_sequences(allow: bool | None = None) -> bool:
    """Whether the CPU kernels of post_norm_layers and int8_layers may run each thread on its own sequences
    (`stack_groups`): on by default. The kernels then see each group's rows instead of the batch's, so a product whose
    result depends on its row count (oneDNN's or MKL's blocking, `onednn_row_block`) can differ in its last bits from
    the batch run whole; panel_linear, attention, the LayerNorms and the int8 kernels give every row the same bits
    either way. `allow` sets it for this process (None leaves it); False where the CPU kernels are not loaded."""
    if not _ext.has_kernel("post_norm_layers", "CPU"):
        return False
    return bool(torch.ops.mtbert_fast_C.stack_by_sequences(allow))


def stack_groups(cu_seqlens: torch.Tensor, threads: int, hidden: int, intermediate: int) -> list[int]:
    """The groups of sequences the CPU kernels of post_norm_layers and int8_layers run apart, one a thread, for layers
    of that hidden and intermediate size on `threads` threads: the first sequence of each group and the sequence count
    after the last, or [] where the batch runs whole (one thread, fewer sequences than threads, too few rows a thread
    for each to read every weight or too many for the groups to gain, or no split of whole consecutive sequences near
    enough to even)."""
    if not _ext.has_kernel("post_norm_layers", "CPU"):
        return []
    return list(torch.ops.mtbert_fast_C.stack_groups(cu_seqlens, threads, hidden, intermediate))


def fake_stack(x, cu_seqlens, max_seqlen, weights, heads, scale, eps, approximate, rel_bias, packs=None):
    return x.new_empty(x.shape)


# the schema of a stack of layers in one call: x [T, H], cu_seqlens int32 [B+1], each layer's weights, rel_bias fp32
# [heads, 2R+1] -> [T, H]
STACK_SCHEMA = ("(Tensor x, Tensor cu_seqlens, SymInt max_seqlen, Tensor[] weights, int heads, float scale, float eps, "
                "str approximate, Tensor? rel_bias=None) -> Tensor")

OP = Op(
    name="post_norm_layers",
    # weights: 12 per layer (see layer_weights); packs: MKL's packs of the plain weights, 4 per layer, or none
    schema=STACK_SCHEMA.replace("Tensor? rel_bias=None)", "Tensor? rel_bias=None, Tensor[]? packs=None)"),
    reference=reference.post_norm_layers,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=fake_stack,
    more_keys=("MkldnnCPU",),  # weights in oneDNN's layout
)
