"""The fast encoder: embeddings, layers and pooler on packed tokens, padding removed once at the start.

The computation lives in plain functions over weight tuples (`EmbeddingWeights`, `LayerWeights`), so the same
code runs `FastBertModel` (its own fused layout) and an HF model after `mtbert_fast.swap` (HF's modules).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert_fast.models.config import MODEL_TYPES, MPNET_BUCKETS, EncoderConfig, UnsupportedModelError
from mtbert_fast.models.int8 import (
    DEFAULT_SMOOTHING, InputStats, Int8LayerWeights, ParameterWatch, Stacks, calibration_batches, check_int8_device,
    check_int8_dtype, check_model_dtype, check_smoothing, gram_passes, int8_layer_forward, int8_stack, quantize_layers,
)
from mtbert_fast.models.plain_modules import check_plain_module, refuse_hooks
from mtbert_fast.models.weight_pack import (
    ONEDNN_AMX_BF16, mkl_weight, onednn_dtype, onednn_weight, panel_weight, settled,
)
from mtbert_fast.models.weight_pack import releases as pack_releases
from mtbert_fast.ops import (
    attention_varlen, bias_gelu, bias_residual_layer_norm, dispatch, gather_rows, geglu, pad, rotary_qk, rotary_tables,
    unpad_indices,
)
from mtbert_fast.ops.attention_varlen import OP as attention_varlen_op
from mtbert_fast.ops.bias_residual_layer_norm import OP as bias_residual_layer_norm_op
from mtbert_fast.ops.int8_layers import OP as int8_layers_op
from mtbert_fast.ops.mkl_linear import OP as mkl_linear_op
from mtbert_fast.ops.mkl_linear import encoder_rows as mkl_rows
from mtbert_fast.ops.panel_linear import OP as panel_linear_op
from mtbert_fast.ops.panel_linear import encoder_rows as panel_rows
from mtbert_fast.ops.post_norm_layers import OP as post_norm_layers_op
from mtbert_fast.ops.post_norm_layers import layer_weights
from mtbert_fast.ops.pack_mask import OP as pack_mask_op
from mtbert_fast.ops.pack_mask import MaskStats, mask_stats
from mtbert_fast.ops.registry import Op
from mtbert_fast.ops.rows import GATHER as gather_rows_op
from mtbert_fast.ops.rows import SCATTER as scatter_rows_op
from mtbert_fast.ops.token_embeddings import OP as token_embeddings_op
from mtbert_fast.ops.dispatch import requested_backend


class EmbeddingWeights(NamedTuple):
    """E is the embedding width: hidden_size H, or ELECTRA's embedding_size, projected to H after the LayerNorm."""

    word: torch.Tensor  # [V, E]
    position: torch.Tensor | None  # [P, E]; None for ModernBERT, whose positions are rotary
    token_type: torch.Tensor | None  # [types, E]; None where the model has no token types (DistilBERT, MPNet, ...)
    norm_weight: torch.Tensor  # [E]
    norm_bias: torch.Tensor | None  # [E]; None where the LayerNorms have no bias (ModernBERT)
    project_weight: torch.Tensor | None = None  # [H, E] (ELECTRA's embeddings_project), None when E == H
    project_bias: torch.Tensor | None = None  # [H]


class LayerWeights(NamedTuple):
    """A post-norm (BERT) layer: attn_norm after attention, ffn_norm after the feed-forward. A pre-norm (ModernBERT)
    layer: attn_norm before attention (None in its first layer, which has none), ffn_norm before the feed-forward,
    ffn_in [2I, H] for the GeGLU halves, and any bias None where the model has none."""

    qkv_weight: torch.Tensor  # [3H, H]: query, key, value rows stacked
    qkv_bias: torch.Tensor | None  # [3H]
    attn_out_weight: torch.Tensor  # [H, H]
    attn_out_bias: torch.Tensor | None  # [H]
    attn_norm_weight: torch.Tensor | None  # [H]
    attn_norm_bias: torch.Tensor | None  # [H]
    ffn_in_weight: torch.Tensor  # [I, H], or [2I, H] (GeGLU)
    ffn_in_bias: torch.Tensor | None  # [I] or [2I]
    ffn_out_weight: torch.Tensor  # [H, I]
    ffn_out_bias: torch.Tensor | None  # [H]
    ffn_norm_weight: torch.Tensor  # [H]
    ffn_norm_bias: torch.Tensor | None  # [H]


@dataclasses.dataclass
class PackedBatch:
    """Where the real tokens of a [batch, seqlen] input sit once packed.

    indices int64 [T] into the flattened [batch * seqlen]; cu_seqlens int32 [batch + 1]; max_seqlen the longest row.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int
    all_real: bool = False  # no padding: the packed rows are the [batch, seqlen] rows in order
    first_column_padded: bool | None = None  # some row starts with padding (None: not known)
    # op name -> the backend chosen for its kernel in inference on this batch: every layer of a forward hands an op
    # inputs of one shape and dtype, so the dispatch runs once per op, not once per layer
    kernels: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def kernel_backend(self, op_name: str, t: torch.Tensor, backend: str | None) -> str:
        """dispatch.choose(op_name, t, backend), remembered for the batch (not while compiling)."""
        chosen = self.kernels.get(op_name)
        if chosen is None:
            chosen = dispatch.choose(op_name, t, backend)
            if not torch.compiler.is_compiling():
                self.kernels[op_name] = chosen
        return chosen

    @classmethod
    def dense(cls, batch: int, seqlen: int, device: torch.device) -> PackedBatch:
        """Every token real: what unpad_indices gives for an all-ones mask, without reading one."""
        indices = torch.arange(batch * seqlen, device=device)
        cu_seqlens = torch.arange(0, batch * seqlen + 1, seqlen, dtype=torch.int32, device=device)
        return cls(indices, cu_seqlens, seqlen, batch, seqlen, all_real=True)

    @property
    def first_token_rows(self) -> torch.Tensor:
        """Packed row of each sequence's first real token (its CLS with right padding): int64 [batch]."""
        return self.cu_seqlens[:-1].long()

    def inference_kernel(self, op: Op, t: torch.Tensor, backend: str | None = None) -> Callable | None:
        """op's kernel on the backend kernel_backend chose, for a caller whose inputs this batch and the encoder
        made, in inference (no autograd or tracing): the wrapper's checks would only repeat themselves on every call
        of a short forward, and the kernels check their arguments again. None where the checked op must run (with
        autograd, while tracing, or on the reference backend)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        chosen = self.kernel_backend(op.name, t, backend)
        return None if chosen == "reference" else op.kernel(chosen)

    def first_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """packed [T, ...] -> the rows of each sequence's first real token, [batch, ...] (a view when nothing is
        padded)."""
        if self.all_real:
            return packed[:: self.seqlen]
        kernel = self.inference_kernel(gather_rows_op, packed)
        if kernel is not None:
            return kernel(packed, self.first_token_rows)
        return gather_rows(packed, self.first_token_rows)

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """t [batch, seqlen, ...] -> its real tokens' entries [T, ...] (a view when nothing is padded)."""
        flat = t.reshape((self.batch * self.seqlen,) + tuple(t.shape[2:]))
        return flat if self.all_real else gather_rows(flat, self.indices)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """packed [T, ...] -> [batch, seqlen, ...], zeros at the padding; a view of `packed` when there is none."""
        shape = (self.batch, self.seqlen) + tuple(packed.shape[1:])
        if self.all_real:
            return packed.reshape(shape)
        kernel = self.inference_kernel(scatter_rows_op, packed)
        if kernel is not None:
            return kernel(packed, self.indices, self.batch * self.seqlen).reshape(shape)
        return pad(packed, self.indices, self.batch, self.seqlen)


@dataclasses.dataclass
class EncoderOutput:
    """What the encoder computes, packed: packed_hidden_state [T, H] (the last layer at the real tokens) and
    `packed`, where those tokens sit; pooler_output [B, H] or None; packed_hidden_states: the embedding output and
    each layer's output, [T, H] each, when asked for.

    last_hidden_state [B, L, H] and hidden_states ([B, L, H] each, or None) are their padded forms, zeros at
    padding, built on first access: the heads read the packed rows and never pay for a padded copy.
    """

    pooler_output: torch.Tensor | None
    packed_hidden_state: torch.Tensor
    packed: PackedBatch
    packed_hidden_states: tuple[torch.Tensor, ...] | None = None

    @functools.cached_property
    def last_hidden_state(self) -> torch.Tensor:
        return self.packed.pad(self.packed_hidden_state)

    @functools.cached_property
    def hidden_states(self) -> tuple[torch.Tensor, ...] | None:
        if self.packed_hidden_states is None:
            return None
        return tuple(self.packed.pad(s) for s in self.packed_hidden_states)


def _describe(t: torch.Tensor) -> str:
    return f"{t.dtype} {tuple(t.shape)} on {t.device}"


def validate_inputs(
    config: EncoderConfig,
    device: torch.device,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    *,
    dtype: torch.dtype | None = None,
    vocab_size: int | None = None,
) -> tuple[int, int]:
    """Checks every input and names the problem; returns (batch, seqlen). Nothing is computed on bad input.
    dtype: the model's, which inputs_embeds must have; vocab_size: its word table's rows (default: the config's).
    Position ids past the model's table (a long sequence, or position_ids out of range) are refused here too."""
    batch, seqlen, packed_mask = _validate(config, device, input_ids, attention_mask, token_type_ids, position_ids,
                                           inputs_embeds, vocab_size=vocab_size)
    if dtype is not None:
        _check_embeds_dtype(inputs_embeds, dtype)
    offset = config.position_padding_idx + 1 if config.position_padding_idx is not None else 0
    uses_positions = config.pre_norm or config.position_biased_input
    if uses_positions and (position_ids is not None or seqlen - 1 + offset >= config.max_position_embeddings):
        packed_positions(config, input_ids, position_ids, _pack(attention_mask, packed_mask, batch, seqlen, device))
    return batch, seqlen


def _check_embeds_dtype(inputs_embeds: torch.Tensor | None, dtype: torch.dtype) -> None:
    if inputs_embeds is not None and inputs_embeds.dtype != dtype:
        raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model runs in {dtype}")


def _pack(attention_mask: torch.Tensor | None, packed_mask: PackedMask | None, batch: int, seqlen: int,
          device: torch.device) -> PackedBatch:
    """The batch's packing, from pack_mask's where it ran, else from the (validated) mask."""
    if packed_mask is not None:
        return packed_mask.batch(batch, seqlen)
    if attention_mask is not None and attention_mask.dtype.is_floating_point:  # 0.0 / 1.0, as validated
        attention_mask = attention_mask != 0
    if attention_mask is None or bool(attention_mask.all()):
        return PackedBatch.dense(batch, seqlen, device)
    return PackedBatch(*unpad_indices(attention_mask), batch=batch, seqlen=seqlen)


def _validate(
    config: EncoderConfig,
    device: torch.device,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    backend: str | None = None,
    vocab_size: int | None = None,
) -> tuple[int, int, PackedMask | None]:
    """validate_inputs, also returning the mask's packing where pack_mask's kernel read it (_packed_mask).
    vocab_size: the word table's rows, where the caller holds the table (it follows a resized table; the config's
    count by default)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seqlen], got {_describe(input_ids)}")
        _check_integer_ids("input_ids", input_ids)
        shape = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.embedding_width:
            raise ValueError(f"inputs_embeds must be [batch, seqlen, {config.embedding_width}], got "
                             f"{_describe(inputs_embeds)}")
        shape = tuple(inputs_embeds.shape[:2])
    packed_mask = None
    named = {"input_ids": input_ids, "inputs_embeds": inputs_embeds, "attention_mask": attention_mask,
             "token_type_ids": token_type_ids, "position_ids": position_ids}
    for name, t in named.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the model is on {device}; move the inputs to {device}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"empty batch: input shape {shape}")
    if input_ids is not None and input_ids.numel():
        vocab = config.vocab_size if vocab_size is None else vocab_size
        lo, hi = (int(v) for v in torch.aminmax(input_ids))
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids hold token id {bad}, outside the vocabulary [0, {vocab})")
    if attention_mask is not None:
        if attention_mask.shape != shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the input is {shape}")
        if attention_mask.dtype.is_complex:
            raise TypeError(f"attention_mask must hold integers, bools or floats (1 = real token, 0 = padding), got "
                            f"{attention_mask.dtype}")
        packed_mask = _packed_mask(attention_mask, backend)
        if packed_mask is not None:
            stats = packed_mask.stats
            if stats.first_other >= 0:
                _refuse_mask_value(attention_mask, attention_mask.reshape(-1)[stats.first_other])
            if stats.first_empty_row >= 0:
                _refuse_empty_row(stats.first_empty_row)
        else:
            _check_mask_values(attention_mask)
        if config.relative_positions:
            _check_no_holes(config, attention_mask != 0)
    if token_type_ids is not None:
        if config.type_vocab_size == 0:
            raise ValueError(f"token_type_ids given, but a {config.family} model has no token types")
        _check_integer_ids("token_type_ids", token_type_ids)
        if token_type_ids.shape != shape:
            raise ValueError(f"token_type_ids has shape {tuple(token_type_ids.shape)} but the input is {shape}")
        lo, hi = (int(v) for v in torch.aminmax(token_type_ids))
        if lo < 0 or hi >= config.type_vocab_size:
            raise ValueError(f"token_type_ids must be in [0, {config.type_vocab_size}), got values in [{lo}, {hi}]")
    if position_ids is not None:
        _check_integer_ids("position_ids", position_ids)
        if position_ids.shape not in (shape, (1, shape[1])):
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)}, expected {shape} or "
                             f"(1, {shape[1]})")
        if attention_mask is None and config.family in _PACKED_POSITION_FAMILIES:
            _refuse_packed_positions(position_ids)
    return shape[0], shape[1], packed_mask


def _check_integer_ids(name: str, t: torch.Tensor) -> None:
    """Ids index embedding tables: int64 or int32, as HF's embeddings take them (nothing is cast silently)."""
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {_describe(t)}")


# The families whose HF models (transformers 5) read position_ids given without an attention_mask as several
# sequences packed in each row wherever the ids do not count up by one (transformers' flattening format), and then
# attend within each sequence only.
_PACKED_POSITION_FAMILIES = ("bert", "roberta", "electra")


def _refuse_packed_positions(position_ids: torch.Tensor) -> None:
    steps = position_ids[:, 1:] - position_ids[:, :-1]
    if steps.numel() and bool((steps != 1).any()):
        row, col = (int(i) for i in (steps != 1).nonzero()[0])
        raise ValueError(
            f"position_ids do not count up by one in row {row} (token {col + 1}) and no attention_mask is given: "
            "the Hugging Face model reads such a row as several sequences packed together and attends within "
            "each, which this encoder does not do; pass the sequences as rows of their own with an attention_mask, "
            "or pass an attention_mask to use these position_ids on one sequence per row")


class PackedMask(NamedTuple):
    """pack_mask's answers for a mask: its slots (the real tokens' first), cu_seqlens and the stats read on the
    host."""

    slots: torch.Tensor
    cu_seqlens: torch.Tensor
    stats: MaskStats

    def batch(self, batch: int, seqlen: int) -> PackedBatch:
        if self.stats.tokens == batch * seqlen:  # the slots are 0, 1, ..., as PackedBatch.dense makes them
            return PackedBatch(self.slots, self.cu_seqlens, seqlen, batch, seqlen, all_real=True,
                               first_column_padded=False)
        return PackedBatch(self.slots[: self.stats.tokens], self.cu_seqlens, self.stats.longest, batch, seqlen,
                           first_column_padded=self.stats.first_column_padded)


def _packed_mask(attention_mask: torch.Tensor | None, backend: str | None) -> PackedMask | None:
    """The checks' answers and the packing of a [B, L] mask on the CPU in one pack_mask call; None where its kernel
    does not run (no mask, another device, another backend asked for, tracing)."""
    if (attention_mask is None or attention_mask.device.type != "cpu" or torch.compiler.is_compiling()
            or requested_backend(backend) not in ("auto", "cpu")
            or dispatch.choose(pack_mask_op.name, attention_mask, backend) != "cpu"):
        return None
    slots, cu_seqlens, stats = pack_mask_op.kernel("cpu")(attention_mask)
    return PackedMask(slots, cu_seqlens, mask_stats(stats))


def _refuse_mask_value(attention_mask: torch.Tensor, value: torch.Tensor) -> None:
    if attention_mask.dtype.is_floating_point:
        raise ValueError(
            f"a float attention_mask must hold only 0.0 and 1.0 (1 = real token, 0 = padding), as HF's "
            f"tokenizers make it; it holds {float(value)}: an additive mask (0 / -inf or a large negative "
            "number at padding) or fractional weights are not accepted"
        )
    raise ValueError(f"attention_mask must hold only 0 and 1, it holds {int(value)}")


def _refuse_empty_row(row: int) -> None:
    raise ValueError(f"row {row} of attention_mask has no real token")


def _check_mask_values(attention_mask: torch.Tensor) -> None:
    """Only 0 and 1 in the mask, and a real token in every row, by tensor ops (any device)."""
    # an integer mask within [0, 1] holds only 0 and 1, and one whose least value is 1 has no padding at all:
    # one pass over it on the common path (a float mask may hold fractions: its values are compared)
    lo = hi = None
    if attention_mask.dtype != torch.bool and not attention_mask.dtype.is_floating_point:
        lo, hi = (int(v) for v in torch.aminmax(attention_mask))
    if attention_mask.dtype != torch.bool and (lo is None or lo < 0 or hi > 1):
        other = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
        if other.numel():
            _refuse_mask_value(attention_mask, other[0])
    if lo != 1:
        empty = (attention_mask == 0).all(dim=1).nonzero()
        if empty.numel():
            _refuse_empty_row(int(empty[0]))


def _check_no_holes(config: EncoderConfig, real: torch.Tensor) -> None:
    """A relative position bias or a sliding window measures distances over the padded row, and packing closes the
    gaps between real tokens: so each row's real tokens must be one run (padding at either end). real: bool [B, L]."""
    pos = torch.arange(real.shape[1], device=real.device)
    first = torch.where(real, pos, real.shape[1]).amin(1)
    last = torch.where(real, pos, -1).amax(1)
    holes = (last - first + 1 != real.sum(1)).nonzero()
    if holes.numel():
        raise ValueError(
            f"row {int(holes[0])} of attention_mask has padding between real tokens: a {config.family} model's "
            "relative position bias or local attention window counts the distance across it, which the packed path "
            "does not; keep each row's real tokens together (padding on the right or the left)"
        )


# HF's MPNet buckets distances up to 128 (a constant of its code, not a config field)
MPNET_MAX_DISTANCE = 128


def relative_position_buckets(distance: torch.Tensor, num_buckets: int, max_distance: int = MPNET_MAX_DISTANCE
                              ) -> torch.Tensor:
    """MPNet's (T5's bidirectional) bucket of each key-minus-query distance, int64, in its arithmetic: half the
    buckets per direction, the nearer half of each exact, the rest logarithmic up to max_distance."""
    half = num_buckets // 2
    n = -distance
    direction = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    far = exact + (torch.log(n.clamp_min(1).float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    return direction + torch.where(n < exact, n, far.clamp_max(half - 1))


def relative_bias_table(weight: torch.Tensor, max_seqlen: int, max_distance: int = MPNET_MAX_DISTANCE
                        ) -> torch.Tensor:
    """The relative_attention_bias weight [buckets, heads] as attention_varlen's rel_bias: fp32 [heads, 2R+1] over
    the distances -R..R, R = min(max_seqlen - 1, max_distance). Every distance of max_distance or more falls in its
    direction's last bucket, so the kernels' clamp to R is exact, and the GPU backward sums those pairs per tile."""
    r = min(max(max_seqlen - 1, 0), max_distance)
    distance = torch.arange(-r, r + 1, device=weight.device)
    return F.embedding(relative_position_buckets(distance, MPNET_BUCKETS), weight).t().float().contiguous()


def deberta_buckets(distance: torch.Tensor, bucket_size: int, max_position: int) -> torch.Tensor:
    """DeBERTa-v2's log bucket of each query-minus-key distance, int64, in its arithmetic: exact within
    bucket_size / 2, logarithmic beyond, up to max_position."""
    sign = torch.sign(distance)
    mid = bucket_size // 2
    near = (distance < mid) & (distance > -mid)
    magnitude = torch.where(near, torch.tensor(mid - 1).type_as(distance), distance.abs())
    log_pos = torch.ceil(torch.log(magnitude / mid) / torch.log(torch.tensor((max_position - 1) / mid))
                         * (mid - 1)) + mid
    return torch.where(magnitude <= mid, distance.type_as(log_pos), log_pos * sign).long()


class DisentangledWeights(NamedTuple):
    """DeBERTa's relative positions: the [2S, H] table, its LayerNorm (None without norm_rel_ebd), and per layer the
    projections of its rows into relative-position keys (for "c2p") and queries (for "p2c"): (key weight, key bias,
    query weight, query bias), None where the layer has no such term. With share_att_key they are the layer's own
    key and query weights."""

    table: torch.Tensor  # [2S, H]
    norm: tuple[torch.Tensor, torch.Tensor] | None
    layers: Sequence[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]


def disentangled_index(config: EncoderConfig, max_seqlen: int, device: torch.device) -> tuple[torch.Tensor, int, int]:
    """(pos_index int32 [2P+1], lo, hi): the table row of every key-minus-query distance -P..P (P = max_seqlen - 1),
    less lo, and the rows [lo, hi) the batch reaches. DeBERTa's row for query i, key j: clamp(bucket(i - j) + S, 0,
    2S - 1), S = config.attention_span."""
    p, span = max(max_seqlen - 1, 0), config.attention_span
    query_minus_key = -torch.arange(-p, p + 1)
    if config.position_buckets > 0:
        longest = config.max_relative_positions
        longest = longest if longest >= 1 else config.max_position_embeddings
        query_minus_key = deberta_buckets(query_minus_key, config.position_buckets, longest)
    rows = (query_minus_key + span).clamp(0, 2 * span - 1)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return (rows - lo).to(device=device, dtype=torch.int32), lo, hi


def packed_positions(
    config: EncoderConfig,
    input_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    packed: PackedBatch,
) -> torch.Tensor:
    """Position id of every packed token, int64 [T], numbered as the HF model numbers them. Ids that index a table
    must lie inside it; rotary positions (ModernBERT) have no table, so only negative ones are refused, and a sequence
    may run past max_position_embeddings as in HF."""
    b, l = packed.batch, packed.seqlen
    padding_idx = config.position_padding_idx
    limit = None if config.pre_norm else config.max_position_embeddings
    if position_ids is not None:
        positions = packed.rows(position_ids.expand(b, l).long())
    elif padding_idx is not None and input_ids is not None:
        # RoBERTa and MPNet count non-padding tokens from the padding id + 1 (fairseq's make_positions)
        real = input_ids.ne(padding_idx).long()
        numbered = torch.cumsum(real, dim=1) * real + padding_idx
        positions = packed.rows(numbered)
    else:
        positions = packed.indices % l
        if padding_idx is not None:
            positions = positions + padding_idx + 1
        # every position is at most the last slot's (the largest where every row is real)
        last = l - 1 + (padding_idx + 1 if padding_idx is not None else 0)
        if limit is None or last < limit:
            return positions
        if packed.all_real:
            raise ValueError(
                f"position id {last} is outside [0, {config.max_position_embeddings}): a sequence of {l} tokens "
                "is longer than the model's max_position_embeddings allows"
            )
    if positions.numel() and limit is None:
        if bool(positions.min() < 0):
            raise ValueError(f"position_ids hold negative values (down to {int(positions.min())}): rotary positions "
                             "are counted from 0")
    elif positions.numel():
        lo, hi = torch.aminmax(positions)
        if position_ids is not None and (lo < 0 or hi >= config.max_position_embeddings):
            raise ValueError(
                f"position_ids hold values in [{int(lo)}, {int(hi)}], outside [0, {config.max_position_embeddings})"
                " (the model's max_position_embeddings)"
            )
        if lo < 0 or hi >= config.max_position_embeddings:
            too_long = int(hi) - (padding_idx if padding_idx is not None else -1)
            raise ValueError(
                f"position id {int(hi) if hi >= 0 else int(lo)} is outside [0, {config.max_position_embeddings}): "
                f"a sequence of {too_long} tokens is longer than the model's max_position_embeddings allows"
            )
    return positions


def embed_packed(
    config: EncoderConfig,
    w: EmbeddingWeights,
    packed: PackedBatch,
    input_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    training: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(word + token_type + position embeddings) of the real tokens only, projected to H where the
    embedding width differs (ELECTRA) -> [T, H]."""
    if _one_call_embeddings(config, w, packed, input_ids, position_ids, inputs_embeds, training, backend):
        if token_type_ids is not None and token_type_ids.dtype != input_ids.dtype:
            token_type_ids = token_type_ids.to(input_ids.dtype)
        x = token_embeddings_op.kernel("cpu")(input_ids, None if packed.all_real else packed.indices, token_type_ids,
                                              w.word, w.position, w.token_type, w.norm_weight, w.norm_bias,
                                              config.layer_norm_eps)
    else:
        x = _embeddings_by_op(config, w, packed, input_ids, token_type_ids, position_ids, inputs_embeds)
        x = F.layer_norm(x, (x.shape[-1],), w.norm_weight, w.norm_bias, config.layer_norm_eps)
    p = config.hidden_dropout_prob if config.embedding_dropout_prob is None else config.embedding_dropout_prob
    x = F.dropout(x, p, training)
    if w.project_weight is None:
        return x
    project = (w.project_weight, w.project_bias)
    return _linear_for(x, project, backend, training)(x, *project)


def _one_call_embeddings(config: EncoderConfig, w: EmbeddingWeights, packed: PackedBatch,
                         input_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                         inputs_embeds: torch.Tensor | None, training: bool, backend: str | None) -> bool:
    """Whether the token_embeddings kernel computes exactly what _embeddings_by_op and the LayerNorm would: CPU
    inference (no autograd, autocast or tracing) from input_ids, each token's position its column (no position_ids,
    no RoBERTa numbering from the padding id) and every column within the position table (longer inputs take the
    other path, which names the position that is out of range)."""
    if (inputs_embeds is not None or position_ids is not None or config.position_padding_idx is not None
            or training or torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return False
    if w.position is not None and packed.seqlen > w.position.shape[0]:
        return False
    if (w.word.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or requested_backend(backend) not in ("auto", "cpu")):
        return False
    return packed.kernel_backend(token_embeddings_op.name, w.word, backend) == "cpu"


def _embeddings_by_op(config: EncoderConfig, w: EmbeddingWeights, packed: PackedBatch, input_ids: torch.Tensor | None,
                      token_type_ids: torch.Tensor | None, position_ids: torch.Tensor | None,
                      inputs_embeds: torch.Tensor | None) -> torch.Tensor:
    """word + token_type + position embeddings of the real tokens, before the LayerNorm, added as the HF modules
    add them (in the model's dtype); the rows HF's embeddings hold as padding_idx get no gradient, as there."""
    if inputs_embeds is not None:
        x = packed.rows(inputs_embeds)
    else:
        x = F.embedding(packed.rows(input_ids.long()), w.word, padding_idx=config.word_padding_idx)
    if token_type_ids is not None:
        x = x + F.embedding(packed.rows(token_type_ids.long()), w.token_type)
    elif w.token_type is not None:
        x = x + w.token_type[0]
    if w.position is not None:
        x = x + F.embedding(packed_positions(config, input_ids, position_ids, packed), w.position,
                            padding_idx=config.position_padding_idx)
    return x


def _residual_norm(a, bias, residual, weight, beta, eps, p, training, backend, packed: PackedBatch):
    """LayerNorm(dropout(a + bias) + residual); the bias folds into the fused kernel when there is no dropout.
    Under torch.autocast the LayerNorm runs where HF's does: in float32 on CUDA (autocast's LayerNorm), and on the
    CPU in the dtype of a + residual (a float32 residual stream stays float32); only the products run in autocast's
    dtype."""
    device = a.device.type
    if torch.is_autocast_enabled(device) and (device == "cuda" or residual.dtype == torch.float32):
        with torch.autocast(device, enabled=False):
            return _residual_norm(a.float(), bias.float(), residual.float(), weight.float(), beta.float(), eps, p,
                                  training, backend, packed)
    if training and p > 0.0:
        a = F.dropout(a + bias, p, True)
        bias = torch.zeros_like(bias)
    if not (training or torch.is_grad_enabled() or torch.is_autocast_enabled(a.device.type)):
        # a and residual are [T, H] rows the layer made, and the C++ kernels check every argument themselves (with
        # messages naming it): the wrapper's Python checks are skipped for them, and nothing is recorded
        chosen = packed.kernel_backend(bias_residual_layer_norm_op.name, a, backend)
        if chosen in ("cpu", "cuda"):
            return bias_residual_layer_norm_op.kernel(chosen)(a, bias, residual, weight, beta, eps)[0]
    return bias_residual_layer_norm(a, bias, residual, weight, beta, eps, backend=backend)


# oneDNN's linear: on CPUs where MKL's sgemm does not use AVX-512 it runs fp32 products ~2x faster, and it
# applies GELU to the fp32 accumulators before the single store. It has no autograd: it serves inference, and the
# forward of _PackedProduct.
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _packed_products_ok(x: torch.Tensor, w: Sequence[torch.Tensor | None], backend: str | None) -> bool:
    """Whether the products on packed weights (panel_linear, MKL's packed sgemm, oneDNN) compute what F.linear would
    for x and the weights w: CPU float tensors of one dtype, the auto or cpu backend, no autocast, no tracing."""
    w = [t for t in w if t is not None]
    if not _ONEDNN_LINEAR or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if requested_backend(backend) not in ("auto", "cpu"):
        return False
    # autocast does not reach oneDNN's op, and that op takes one dtype for activations and weights; inductor lowers
    # it only for weights frozen into the graph as constants, so compiled code takes F.linear
    return not (torch.is_autocast_enabled("cpu") or any(t.dtype != x.dtype for t in w)
                or torch.compiler.is_compiling())


def _records(x: torch.Tensor, w: Sequence[torch.Tensor | None]) -> bool:
    """Whether autograd records a product of x and w."""
    return torch.is_grad_enabled() and (x.requires_grad or any(t is not None and t.requires_grad for t in w))


def _onednn_ok(x: torch.Tensor, w: Sequence[torch.Tensor | None], backend: str | None) -> bool:
    """_packed_products_ok, with nothing for autograd to record."""
    return _packed_products_ok(x, w, backend) and not _records(x, w)


def _linear_for(x: torch.Tensor, w: Sequence[torch.Tensor | None], backend: str | None, training: bool) -> _Linear:
    """The products of x with the weights w: on packed weights in inference; where autograd records them outside
    training (a model in eval mode called without torch.no_grad), on packed weights through _PackedProduct for the
    weights that are settled (unchanged since the call before: no optimizer steps between calls); by F.linear
    otherwise (in training each optimizer step would make every pack anew)."""
    if not _packed_products_ok(x, w, backend):
        return _Linear(False, backend)
    if not _records(x, w):
        return _Linear(True, backend)
    return _Linear(False, backend, autograd=not training)


def _pack_source(w: torch.Tensor) -> torch.Tensor:
    """w, or the tensor w views where w is all of it: the packs are kept per tensor, and a swapped model's fused QKV
    weight reaches autograd as a new view of its kept concatenation at every call (see the HF integration)."""
    base = w._base
    if (base is not None and base.shape == w.shape and base.stride() == w.stride()
            and base.storage_offset() == w.storage_offset()):
        return base
    return w


class _PackedProduct(torch.autograd.Function):
    """x @ W.T (+ bias) computed on W's packed forms, differentiated as F.linear: the backward multiplies the
    gradient by the plain weight and by x."""

    @staticmethod
    def forward(x, weight, bias, linear):
        return linear._cpu(x, _pack_source(weight), bias, None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, _ = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_x = grad.matmul(weight) if need_x else None
        grad_weight = grad.t().matmul(x) if need_weight else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


class _Linear:
    """x @ W.T (+ bias) (GELU): on the CPU by panel_linear for inputs of few rows and by oneDNN for the others, or
    by MKL's packed sgemm up to the rows mkl_linear.encoder_rows() gives (weights pre-packed for each, see
    weight_pack), in inference (packed) and, through _PackedProduct, where autograd records them (autograd); by
    F.linear and the fused ops otherwise."""

    def __init__(self, onednn: bool, backend: str | None, autograd: bool = False):
        self.onednn, self.backend, self.autograd = onednn, backend, autograd

    def _cpu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str | None):
        """approximate: GELU's form, None for no GELU."""
        if x.shape[0] <= panel_rows(x.dtype, weight.shape[0], weight.shape[1], approximate is not None):
            panels = panel_weight(weight)
            if panels is not None:
                # the kernel is called directly: the encoder made its inputs, and the kernel checks them itself
                kernel = panel_linear_op.kernel("cpu")
                return kernel(x, panels, bias, weight.shape[0], approximate is not None, approximate or "none")
        if x.shape[0] <= mkl_rows(x.dtype, weight.shape[0], weight.shape[1]):
            pack = mkl_weight(weight)
            if pack is not None:
                kernel = mkl_linear_op.kernel("cpu")
                return kernel(x, pack, weight, bias, approximate is not None, approximate or "none")
        return self._onednn(x, weight, bias, approximate)

    @staticmethod
    def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, approximate: str | None):
        """_cpu's product on oneDNN's linear, on the packed weight (in blocks of rows where onednn_row_block says)."""
        attr = ("none", "") if approximate is None else ("gelu", approximate)
        packed = onednn_weight(weight)
        if packed.dtype == x.dtype:
            block = x.shape[0]
            if ONEDNN_AMX_BF16 and x.dtype == torch.bfloat16:  # as post_norm_layers blocks them
                block = torch.ops.mtbert_fast_C.onednn_row_block(x.shape[0], weight.shape[0], x.dtype)
            if block < x.shape[0]:
                return torch.cat([torch.ops.mkldnn._linear_pointwise(rows, packed, bias, attr[0], [], attr[1])
                                  for rows in x.split(block)])
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, attr[0], [], attr[1])
        # bf16 where oneDNN has no bf16 product: float32 products of the same exact terms, rounded once to bf16
        bias = None if bias is None else bias.float()
        return torch.ops.mkldnn._linear_pointwise(x.float(), packed, bias, attr[0], [], attr[1]).to(x.dtype)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.onednn:
            return self._cpu(x, weight, bias, None)
        if self.autograd and settled(_pack_source(weight)):
            return _PackedProduct.apply(x, weight, bias, self)
        return F.linear(x, weight, bias)

    def gelu(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str) -> torch.Tensor:
        if self.onednn:
            return self._cpu(x, weight, bias, approximate)
        return bias_gelu(self(x, weight), bias, approximate, backend=self.backend)


def _ignore(product: str, x: torch.Tensor) -> None:
    pass


def layer_forward(
    config: EncoderConfig,
    w: LayerWeights,
    x: torch.Tensor,
    packed: PackedBatch,
    training: bool,
    backend: str | None = None,
    observe: Callable[[str, torch.Tensor], None] | None = None,
    rel_bias: torch.Tensor | None = None,
    position_terms: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One encoder layer on packed tokens: x [T, H] -> [T, H]. observe(product, input), where given, sees the input
    of each of the four products ("qkv", "attn_out", "ffn_in", "ffn_out"): how int8 calibration reads the ranges.
    rel_bias: fp32 [heads, 2R+1], the relative position bias of every layer (MPNet), or None.
    position_terms: DeBERTa's (relative-position keys [W, heads, d] or None, relative-position queries [W, heads, d]
    or None, pos_index int32): the content-to-position term Q_i . K_pos and the position-to-content term
    K_j . Q_pos of every token, formed here as [heads, T, W] tables for attention_varlen."""
    t, h = x.shape
    eps, p = config.layer_norm_eps, config.hidden_dropout_prob
    scale = config.attention_scale
    linear = _linear_for(x, w, backend, training)
    observe = observe or _ignore
    observe("qkv", x)
    qkv = linear(x, w.qkv_weight, w.qkv_bias).view(t, 3, config.num_attention_heads, config.head_dim)
    pos_q = pos_k = pos_index = None
    if position_terms is not None:
        pos_key, pos_query, pos_index = position_terms
        if pos_key is not None:  # one product per head: [heads, T, d] @ [heads, d, W]
            pos_q = torch.matmul(qkv[:, 0].transpose(0, 1), pos_key.permute(1, 2, 0)).mul_(scale)
        if pos_query is not None:
            pos_k = torch.matmul(qkv[:, 1].transpose(0, 1), pos_query.permute(1, 2, 0)).mul_(scale)
    if training:
        ctx = attention_varlen(qkv, packed.cu_seqlens, packed.max_seqlen, scale,
                               dropout_p=config.attention_probs_dropout_prob, rel_bias=rel_bias, pos_q=pos_q,
                               pos_k=pos_k, pos_index=pos_index, backend=backend)
    else:  # qkv is the view above and packed was built by encode(): the wrapper's checks hold, so it is skipped
        args = (qkv, packed.cu_seqlens, packed.max_seqlen, scale, 0.0, None, rel_bias, -1, pos_q, pos_k, pos_index)
        kernel = packed.inference_kernel(attention_varlen_op, qkv, backend)
        # as the op itself runs it with nothing to record: its kernel, without a second dispatch
        ctx = attention_varlen_op(*args, backend=backend) if kernel is None else kernel(*args)[0]
    ctx = ctx.reshape(t, h)
    observe("attn_out", ctx)
    x = _residual_norm(linear(ctx, w.attn_out_weight), w.attn_out_bias, x, w.attn_norm_weight,
                       w.attn_norm_bias, eps, config.attn_out_dropout_prob, training, backend, packed)
    observe("ffn_in", x)
    inner = linear.gelu(x, w.ffn_in_weight, w.ffn_in_bias, config.gelu_approximate)
    observe("ffn_out", inner)
    return _residual_norm(linear(inner, w.ffn_out_weight), w.ffn_out_bias, x, w.ffn_norm_weight,
                          w.ffn_norm_bias, eps, p, training, backend, packed)


class Rotary(NamedTuple):
    """What a ModernBERT layer's attention reads besides its weights: each token's position, and the cos / sin
    tables of each layer type's theta (rotary_tables), [P, head_dim / 2] fp32."""

    positions: torch.Tensor  # int64 [T]
    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "full_attention" / "sliding_attention" -> (cos, sin)


def rotary_for(config: EncoderConfig, packed: PackedBatch, position_ids: torch.Tensor | None) -> Rotary:
    """Positions as HF numbers them (0.. over the padded row, or position_ids) and tables for them: rows 0..L-1 read
    at each token's position, or with position_ids, whose values may be anything (rotary positions index no table),
    a row per token read at the token's own index."""
    positions = packed_positions(config, None, position_ids, packed)
    device = positions.device
    thetas = {"full_attention": config.rope_theta, "sliding_attention": config.local_rope_theta}
    if position_ids is None:
        return Rotary(positions, {kind: rotary_tables(config.head_dim, packed.seqlen, thetas[kind], device)
                                  for kind in set(config.layer_types)})
    rows = torch.arange(positions.numel(), device=device)
    return Rotary(rows, {kind: rotary_tables(config.head_dim, positions, thetas[kind], device)
                         for kind in set(config.layer_types)})


def pre_norm_layer_forward(
    config: EncoderConfig,
    w: LayerWeights,
    x: torch.Tensor,
    packed: PackedBatch,
    layer_type: str,
    rotary: Rotary,
    training: bool,
    backend: str | None = None,
) -> torch.Tensor:
    """One ModernBERT layer on packed tokens, x [T, H] -> [T, H]:
    x + Wo(attention(rotary(Wqkv(LN(x))))), then + Wo(dropout(GeGLU(Wi(LN(x))))); a sliding layer attends within
    config.window of each token."""
    t, h = x.shape
    eps = config.layer_norm_eps
    linear = _linear_for(x, w, backend, training)
    a = x if w.attn_norm_weight is None else F.layer_norm(x, (h,), w.attn_norm_weight, w.attn_norm_bias, eps)
    qkv = linear(a, w.qkv_weight, w.qkv_bias).view(t, 3, config.num_attention_heads, config.head_dim)
    qkv = rotary_qk(qkv, *rotary.tables[layer_type], rotary.positions, backend=backend)
    window = config.window if layer_type == "sliding_attention" else -1
    p_attn = config.attention_probs_dropout_prob if training else 0.0
    ctx = attention_varlen(qkv, packed.cu_seqlens, packed.max_seqlen, dropout_p=p_attn, window=window,
                           backend=backend).reshape(t, h)
    x = x + F.dropout(linear(ctx, w.attn_out_weight, w.attn_out_bias), p_attn, training)
    m = F.layer_norm(x, (h,), w.ffn_norm_weight, w.ffn_norm_bias, eps)
    inner = geglu(linear(m, w.ffn_in_weight, w.ffn_in_bias), config.gelu_approximate, backend=backend)
    inner = F.dropout(inner, config.hidden_dropout_prob, training)
    return x + linear(inner, w.ffn_out_weight, w.ffn_out_bias)


def position_terms(config: EncoderConfig, w: DisentangledWeights, packed: PackedBatch, training: bool
                   ) -> list[tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]]:
    """Each layer's DeBERTa position terms (see layer_forward): the table's rows the batch reaches, LayerNorm-ed,
    dropped out per layer in training (as HF's pos_dropout), projected by the layer's relative-position key and
    query linears into [W, heads, head_dim]."""
    index, lo, hi = disentangled_index(config, packed.max_seqlen, w.table.device)
    rows = w.table
    if w.norm is not None:
        rows = F.layer_norm(rows, (rows.shape[-1],), *w.norm, config.layer_norm_eps)
    rows = rows[lo:hi]
    heads, d = config.num_attention_heads, config.head_dim
    terms = []
    for key_w, key_b, query_w, query_b in w.layers:
        r = F.dropout(rows, config.hidden_dropout_prob, training)
        pos_key = F.linear(r, key_w, key_b).view(-1, heads, d) if key_w is not None else None
        pos_query = F.linear(r, query_w, query_b).view(-1, heads, d) if query_w is not None else None
        terms.append((pos_key, pos_query, index))
    return terms


def _post_norm_stack(config: EncoderConfig, layers: Sequence, x: torch.Tensor, packed: PackedBatch,
                     backend: str | None, stacks: dict | None = None
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Every layer's tensors for one post_norm_layers call, and the MKL packs it takes, where that kernel runs
    exactly what layer_forward would: CPU inference (no autograd, autocast or tracing) of float post-norm layers with
    every bias and norm parameter, each weight packed for the product layer_forward runs at x's rows: in panels for
    panel_linear's few rows, else plain with its MKL pack for the rows mkl_linear.encoder_rows() takes, else
    in oneDNN's blocked layout where oneDNN multiplies x's dtype itself; else None. The caller has excluded DeBERTa's
    position terms, observers and per-layer outputs. stacks: where given, the tensors already gathered for these
    very layers, by route and dtype (Stacks), and the place to keep them."""
    if config.pre_norm or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    # a CPU tensor and a backend of auto or cpu first: asked for another backend, the dispatch would refuse this
    # CPU-only op rather than let the layers run there
    if not _onednn_ok(x, (), backend) or packed.kernel_backend(post_norm_layers_op.name, x, backend) != "cpu":
        return None
    if x.shape[0] <= panel_rows(x.dtype):
        return Stacks.kept(stacks, ("panels", x.dtype),
                           lambda: _post_norm_weights(layers, x.dtype, lambda w, gelu: panel_weight(w)))
    if x.shape[0] <= _mkl_limit(layers, x.dtype):
        # MKL's packs are planned for the thread count they were made under (weight_pack.mkl_weight makes them anew)
        return Stacks.kept(stacks, ("mkl", x.dtype), lambda: _mkl_stack(layers, x.dtype), torch.get_num_threads())
    if onednn_dtype(x.dtype) != x.dtype:  # layer_forward widens such x for each product: no stack
        return None
    limit = _panels_limit(layers, x.dtype, x.shape[0])
    if limit is not None:  # the weights whose products keep panel_linear for x's rows on it, the others on oneDNN
        return Stacks.kept(stacks, ("onednn, panels", x.dtype, limit),
                           lambda: _post_norm_weights(layers, x.dtype, functools.partial(_panels_pack, limit)))
    return Stacks.kept(stacks, ("onednn", x.dtype),
                       lambda: _post_norm_weights(layers, x.dtype, lambda w, gelu: _onednn_pack(w)))


def _panels_limit(layers: Sequence, dtype: torch.dtype, rows: int) -> int | None:
    """The least of the row limits that encoder_rows gives the layers' products (by weight shape and GELU) at or
    above `rows`, or None where rows exceed them all: the products on panel_linear are those whose limit reaches it,
    the same for any rows up to it, so that it names the stack."""
    limits = {panel_rows(dtype, t.shape[0], t.shape[1], gelu) for w in layers if isinstance(w, LayerWeights)
              for t, gelu in _products(w) if t is not None}
    reached = [limit for limit in limits if limit >= rows]
    return min(reached) if reached else None


def _mkl_limit(layers: Sequence, dtype: torch.dtype) -> int:
    """The least of the row limits that mkl_linear.encoder_rows gives the layers' products (by weight shape): the
    stack runs on MKL only where every product would. Asked once per distinct shape (a forward's hot path)."""
    shapes = {t.shape for w in layers if isinstance(w, LayerWeights) for t, _ in _products(w) if t is not None}
    return min((mkl_rows(dtype, *shape) for shape in shapes), default=0)


def _products(w: LayerWeights) -> tuple[tuple[torch.Tensor | None, bool], ...]:
    """A layer's four weights in post_norm_layers' order, each with whether its product applies GELU."""
    return (w.qkv_weight, False), (w.attn_out_weight, False), (w.ffn_in_weight, True), (w.ffn_out_weight, False)


def _onednn_pack(w: torch.Tensor) -> torch.Tensor | None:
    """w in oneDNN's blocked layout (an mkldnn tensor), or None where it is not packed (see weight_pack)."""
    packed = onednn_weight(w)
    return packed if packed.is_mkldnn else None


def _panels_pack(limit: int, w: torch.Tensor, gelu: bool) -> torch.Tensor | None:
    """w as panel_linear's panels where encoder_rows gives its product at least `limit` rows, else as
    _onednn_pack."""
    return panel_weight(w) if panel_rows(w.dtype, w.shape[0], w.shape[1], gelu) >= limit else _onednn_pack(w)


def _post_norm_weights(layers: Sequence, dtype: torch.dtype, pack: Callable
                       ) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """_post_norm_stack's tensors for layers whose every weight is `dtype` and is packed by pack(weight, gelu)
    (gelu: whether its product applies GELU), else None; no MKL packs."""
    weights = []
    for w in layers:
        if not isinstance(w, LayerWeights) or any(t is None or t.dtype != dtype for t in w):
            return None
        packs = [pack(t, gelu) for t, gelu in _products(w)]
        if any(p is None for p in packs):
            return None
        weights += layer_weights(packs[0], w.qkv_bias, packs[1], w.attn_out_bias, w.attn_norm_weight,
                                 w.attn_norm_bias, packs[2], w.ffn_in_bias, packs[3], w.ffn_out_bias,
                                 w.ffn_norm_weight, w.ffn_norm_bias)
    return (weights, []) if weights else None


def _mkl_stack(layers: Sequence, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """_post_norm_stack's tensors for `dtype` layers on MKL's packed sgemm: the plain weights, and their packs
    (mkl_weight) in the same order; None where a weight cannot be packed."""
    plain = _post_norm_weights(layers, dtype, lambda t, gelu: t)
    if plain is None:
        return None
    packs = [mkl_weight(t) for w in layers
             for t in (w.qkv_weight, w.attn_out_weight, w.ffn_in_weight, w.ffn_out_weight)]
    return None if any(p is None for p in packs) else (plain[0], packs)


class LayerCache:
    """A module tree's float layer weights for inference calls, gathered once and kept while the tree is unchanged,
    with the tensors of the single-call layer stack made from them (_post_norm_stack). Gathering them walks the
    modules and looks up every weight's packs: a few hundred microseconds a forward, much of a short input's time,
    and more where the layers' weights have just pushed the interpreter's own data out of the caches.
    The cache is used in inference only (no autograd, no tracing). It is rebuilt when a ParameterWatch sees the tree
    change (a parameter or submodule replaced, an in-place update, .to()) or after weight_pack.release_packs().
    The watch is taken before the gather, so a write that lands during it (from another thread) shows at the next
    call, and the cache is one tuple, replaced whole, so that threads calling at once each read one consistent
    state."""

    def __init__(self):
        # (watch, release count, layers, stacks) of the last gather, or None
        self.state: tuple[ParameterWatch, int, list, Stacks] | None = None

    def __reduce__(self):
        # a copied or pickled model starts with an empty cache: the packs are the weights' size again, and the watch
        # would look at the original's modules
        return LayerCache, ()

    def current(self, root: nn.Module, gather: Callable[[], list]) -> tuple[list, dict | None]:
        """(layers, stacks): gather()'s layer weights of `root`, from the cache where they are still current, and
        the stacks to hand to encode (None outside inference: gathered afresh, nothing kept)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return gather(), None
        state = self.state
        if state is None or state[1] != pack_releases() or not state[0].unchanged(root):
            self.state = None  # until the new layers are in place: a failed gather leaves nothing to reuse
            watch, releases = ParameterWatch(root), pack_releases()
            state = (watch, releases, gather(), Stacks())
            self.state = state
        return state[2], state[3]


def weights_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The one floating dtype of a state's tensors; several are refused by name."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        found = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes)) or "none"
        raise ValueError(f"the weights hold tensors of several dtypes ({found}): pass dtype= to choose the model's")
    return dtypes.pop()


def _checkpoint_config(path: str | os.PathLike) -> tuple[EncoderConfig, torch.dtype | None]:
    """(the EncoderConfig, the dtype it names or None) of an HF model directory's config.json. Its model_type is
    required, as HF's AutoConfig requires it; keys the file leaves out take the family's defaults from its HF config
    class where transformers is installed (a RoBERTa config without pad_token_id pads with 1, not BERT's 0), else the
    EncoderConfig defaults."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"{file} does not exist: from_pretrained reads a local model directory (config.json and safetensors "
            "weights); for a Hub id, download it first (huggingface_hub.snapshot_download) or load the HF model and "
            "call from_hf")
    with open(file) as f:
        d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{file} holds a JSON {type(d).__name__}, not an object of config fields")
    if "model_type" not in d:
        raise UnsupportedModelError(f"{file} names no model_type: the family it belongs to would be a guess")
    if d["model_type"] in MODEL_TYPES:
        try:
            from transformers import AutoConfig
        except ImportError:
            pass
        else:
            d = AutoConfig.for_model(**d).to_dict()
    saved = d.get("dtype", d.get("torch_dtype"))
    saved = getattr(torch, saved, None) if isinstance(saved, str) else None
    return EncoderConfig.from_dict(d), saved if isinstance(saved, torch.dtype) and saved.is_floating_point else None


def refuse_graph_capture() -> None:
    """torch.export and torch.jit.trace record one call as a graph, where which rows the encoder packs and how it splits
    them into sequences come from the attention mask's values: the graph would keep this call's (a traced model failed
    on any other count of real tokens). Refused by name; torch.compile guards on those values and runs the encoder."""
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        raise NotImplementedError(
            "torch.export and torch.jit.trace cannot capture mtbert_fast's encoder: the rows it packs depend on the "
            "attention mask's values, which a captured graph would fix to this call's. Run it with torch.compile, "
            "or export a swapped HF model after mtbert_fast.unswap(model)")


def encode(
    config: EncoderConfig,
    embeddings: EmbeddingWeights,
    layers: Sequence[LayerWeights],
    pooler: tuple[torch.Tensor, torch.Tensor] | None,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    output_hidden_states: bool = False,
    training: bool = False,
    backend: str | None = None,
    inputs_checked: bool = False,
    observe: Callable[[int], Callable[[str, torch.Tensor], None] | None] | None = None,
    relative_attention_bias: torch.Tensor | None = None,
    final_norm: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    disentangled: DisentangledWeights | None = None,
    stacks: dict | None = None,
) -> EncoderOutput:
    """The whole encoder: validate, unpad once, embed, run the layers, pool. The padded outputs are built when
    read (see EncoderOutput). inputs_checked: the caller has run validate_inputs on exactly these inputs, so it
    does not run again. layers: float LayerWeights, or Int8LayerWeights for int8 inference (no training).
    observe(layer index), where given, returns that layer's observer (see layer_forward), or None for none.
    relative_attention_bias: [buckets, heads], MPNet's one table for every layer; required exactly when the config
    has relative_attention_num_buckets. final_norm: (weight, bias) of the LayerNorm after the last layer of a
    pre-norm encoder (ModernBERT), which then holds its output in place of the last layer's in the hidden states.
    disentangled: DeBERTa's relative positions, required exactly when config.disentangled. stacks: the one-call
    stacks kept for these very layers (LayerCache's or Int8State's), where the caller keeps them."""
    refuse_graph_capture()
    device = embeddings.word.device
    if inputs_checked:
        batch, seqlen = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        packed_mask = _packed_mask(attention_mask, backend)
    else:
        batch, seqlen, packed_mask = _validate(
            config, device, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, backend,
            vocab_size=embeddings.word.shape[0],
        )
    _check_embeds_dtype(inputs_embeds, embeddings.word.dtype)
    packed = _pack(attention_mask, packed_mask, batch, seqlen, device)

    rel_bias = None
    if config.relative_attention_num_buckets is not None:
        expected = (config.relative_attention_num_buckets, config.num_attention_heads)
        if relative_attention_bias is None or tuple(relative_attention_bias.shape) != expected:
            got = "none" if relative_attention_bias is None else f"shape {tuple(relative_attention_bias.shape)}"
            raise ValueError(f"a {config.family} encoder needs its relative_attention_bias weight of shape "
                             f"{expected} (buckets, heads), got {got}")
        rel_bias = relative_bias_table(relative_attention_bias, packed.max_seqlen)
    elif relative_attention_bias is not None:
        raise ValueError(f"relative_attention_bias given, but a {config.family} encoder has no relative position bias")

    if (final_norm is not None) != config.pre_norm:
        raise ValueError(f"a {config.family} encoder {'needs' if config.pre_norm else 'has no'} final norm")
    rotary = rotary_for(config, packed, position_ids) if config.pre_norm else None
    if (disentangled is not None) != config.disentangled:
        raise ValueError(f"a {config.family} encoder {'needs' if config.disentangled else 'has no'} relative "
                         "position table (disentangled)")
    terms = position_terms(config, disentangled, packed, training) if disentangled is not None else None

    x = embed_packed(config, embeddings, packed, input_ids, token_type_ids, position_ids, inputs_embeds, training,
                     backend)
    states = [x] if output_hidden_states else None
    int8 = any(isinstance(w, Int8LayerWeights) for w in layers)
    if int8 and config.int8_reason is not None:
        raise UnsupportedModelError(config.int8_reason)
    # the int8 layers have no backward: their input leaves the graph here and rejoins it after them through
    # _Int8HasNoBackward, so that a backward stops with an error instead of reaching the embeddings through the
    # residual sums alone
    int8_source = None
    if int8 and torch.is_grad_enabled() and x.requires_grad:
        int8_source, x = x, x.detach()
    if int8 and rel_bias is not None:  # and MPNet's bias table, which only those layers read
        rel_bias = rel_bias.detach()
    stack = stack_op = None
    if not training and observe is None and states is None and terms is None:
        if layers and isinstance(layers[0], Int8LayerWeights):
            if not config.pre_norm:
                stack, stack_op = int8_stack(layers, x, x.shape[0], backend, stacks), int8_layers_op
        else:
            stack, stack_op = _post_norm_stack(config, layers, x, packed, backend, stacks), post_norm_layers_op
    if stack is not None:  # the layers below, kernel for kernel, called from C++
        # the float stack comes with the MKL packs of its plain weights (or none)
        weights, extra = (stack[0], (stack[1],)) if stack_op is post_norm_layers_op else (stack, ())
        x = stack_op.kernel("cpu")(x, packed.cu_seqlens, packed.max_seqlen, weights, config.num_attention_heads,
                                   config.attention_scale, config.layer_norm_eps, config.gelu_approximate, rel_bias,
                                   *extra)
    else:
        for i, w in enumerate(layers):
            if config.pre_norm:
                x = pre_norm_layer_forward(config, w, x, packed, config.layer_types[i], rotary, training, backend)
            elif isinstance(w, Int8LayerWeights):
                if training:
                    raise RuntimeError("an int8 model runs inference only: call model.eval() (train the float model, "
                                       "then quantize it)")
                # an int8 layer before another one hands it its output already quantized for the QKV product
                following = layers[i + 1] if i + 1 < len(layers) else None
                next_smooth = following.qkv.smooth if isinstance(following, Int8LayerWeights) else None
                x = int8_layer_forward(config, w, x, packed, backend, next_smooth, rel_bias)
            else:
                x = layer_forward(config, w, x, packed, training, backend, observe(i) if observe is not None else None,
                                  rel_bias, terms[i] if terms is not None else None)
            if states is not None:
                states.append(x[0] if isinstance(x, tuple) else x)
    if int8_source is not None:
        x = _Int8HasNoBackward.apply(int8_source, x)
    if final_norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), *final_norm, config.layer_norm_eps)
        if states is not None:  # as HF's ModernBertModel reports them
            states[-1] = x

    pooled = None
    if pooler is not None:
        linear = _linear_for(x, pooler, backend, training)
        pooled = torch.tanh(linear(packed.first_tokens(x), *pooler))
    return EncoderOutput(
        pooler_output=pooled,
        packed_hidden_state=x,
        packed=packed,
        packed_hidden_states=tuple(states) if states is not None else None,
    )


def quantize_encoder(
    config: EncoderConfig,
    embeddings: EmbeddingWeights,
    layers: Sequence[LayerWeights],
    calibration=None,
    smoothing: float = DEFAULT_SMOOTHING,
    backend: str | None = None,
    relative_attention_bias: torch.Tensor | None = None,
) -> list[Int8LayerWeights]:
    """int8 layers from float ones: calibrate on `calibration` (see int8.calibration_batches), then quantize. Given
    calibration text, the weights are rounded with error compensation on its X^T X, which takes one calibration
    pass per group of layers whose matrices fit int8.GRAM_BUDGET_BYTES; synthetic calibration takes one pass."""
    if config.int8_reason is not None:
        raise UnsupportedModelError(config.int8_reason)
    word = embeddings.word
    check_int8_device(word.device)
    check_int8_dtype(word.dtype)
    check_smoothing(smoothing)
    batches = calibration_batches(calibration, config, word.device)
    compensate = calibration is not None
    out: list[Int8LayerWeights] = []
    for group in gram_passes(layers) if compensate else [range(len(layers))]:
        stats = InputStats(len(layers), group, gram=compensate)
        with torch.inference_mode():
            for batch in batches:
                encode(config, embeddings, layers, None, **batch, backend=backend, observe=stats.observer,
                       relative_attention_bias=relative_attention_bias)
        out += quantize_layers(layers, stats, word.dtype, smoothing, group)
    return out


class _Int8HasNoBackward(torch.autograd.Function):
    """out, joined in autograd to the int8 layers' input `source`: a backward through the layers raises."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError("an int8 model has no backward: its int8 layers are made for inference. Run it under "
                           "torch.no_grad() or torch.inference_mode(); to train, train the float model and quantize "
                           "it after")


class Int8State:
    """The int8 layers of a quantized model and the float layers (a module tree) they were made from: if those change
    (an in-place update, .to(), loading a state dict, a replaced parameter or submodule) the int8 copies are stale,
    and using them is refused. The int8 layers themselves never change, so their int8_layers stacks are kept.
    quantize() makes the int8 layers from the float ones; the watch is taken before it runs, so that a write landing
    while it reads the float weights (from another thread) shows at the next call."""

    def __init__(self, source: nn.Module, quantize: Callable[[], list[Int8LayerWeights]]):
        self.source = ParameterWatch(source)
        if len(self.source.versioned) != len(self.source.params):
            # an inference tensor keeps no version counter: a write in place would leave the int8 copies stale unseen
            raise RuntimeError(
                "the layer weights are inference tensors (made under torch.inference_mode), whose in-place changes "
                "cannot be seen, so int8 copies of them could go stale without a word: create or load the model "
                "outside torch.inference_mode (calling it inside is fine), then quantize it")
        self.stacks = Stacks()
        self.releases = pack_releases()
        self.layers = quantize()

    def __getstate__(self) -> dict:
        # release_packs() calls are counted per process: a copy or a pickle keeps only whether one ran since the
        # quantization, and counts from the loading process's count
        state = dict(self.__dict__)
        state["releases"] = pack_releases() != self.releases
        return state

    def __setstate__(self, state: dict) -> None:
        released = state.pop("releases")
        self.__dict__.update(state)
        self.releases = -1 if released else pack_releases()  # -1: never a count, so the release is reported

    def current(self, source: nn.Module) -> list[Int8LayerWeights]:
        # release_packs() is how a write through weight.data, which nothing else sees, is announced
        if not self.source.unchanged(source):
            changed = "changed (written, replaced, or moved to another dtype or device)"
        else:
            changed = "may have changed (release_packs() ran)" if pack_releases() != self.releases else None
        if changed is not None:
            raise RuntimeError(f"the float weights {changed} after the model was quantized to int8, so its int8 "
                               "weights may be stale: quantize it again (a swapped HF model: unswap it and swap it "
                               "again with dtype=torch.qint8), or dequantize it to run the float weights")
        return self.layers


class FastEmbeddings(nn.Module):
    """Word, position (except ModernBERT) and token-type (where the family has them) tables, LayerNorm, and ELECTRA's
    projection to hidden_size where its embedding_size differs."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        e = config.embedding_width
        self.word_embeddings = nn.Embedding(config.vocab_size, e)
        absolute = not config.pre_norm and config.position_biased_input  # ModernBERT's are rotary, DeBERTa's may be none
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, e) if absolute else None
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, e) if config.type_vocab_size else None
        self.LayerNorm = nn.LayerNorm(e, eps=config.layer_norm_eps, bias=config.norm_bias)
        self.project = nn.Linear(e, config.hidden_size) if e != config.hidden_size else None

    def weights(self) -> EmbeddingWeights:
        for name, module in self._modules.items():
            if module is not None:
                check_plain_module(f"embeddings.{name}", module)
        types, project, positions = self.token_type_embeddings, self.project, self.position_embeddings
        return EmbeddingWeights(
            self.word_embeddings.weight,
            positions.weight if positions is not None else None,
            types.weight if types is not None else None,
            self.LayerNorm.weight,
            self.LayerNorm.bias,
            project.weight if project is not None else None,
            project.bias if project is not None else None,
        )


def disentangled_projections(config: EncoderConfig, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor,
                             pos_key: nn.Linear | None, pos_query: nn.Linear | None) -> tuple[torch.Tensor | None, ...]:
    """A DeBERTa layer's (key weight, key bias, query weight, query bias) for the relative-position rows: its own
    pos_key / pos_query linears, or with share_att_key its content key and query rows of the fused QKV weight."""
    h = config.hidden_size
    key = query = (None, None)
    if "c2p" in config.pos_att_type:
        key = (qkv_weight[h:2 * h], qkv_bias[h:2 * h]) if config.share_att_key else (pos_key.weight, pos_key.bias)
    if "p2c" in config.pos_att_type:
        query = (qkv_weight[:h], qkv_bias[:h]) if config.share_att_key else (pos_query.weight, pos_query.bias)
    return (*key, *query)


def _weight_and_bias(module: nn.Module | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(module.weight, module.bias) of a Linear or LayerNorm, (None, None) for a missing module."""
    if module is None:
        return None, None
    params = module._parameters
    return params["weight"], params.get("bias")


class FastBertLayer(nn.Module):
    """One layer's weights in the layout the kernels want: query, key and value in one [3H, H] matrix. A ModernBERT
    layer has a [2I, H] ffn_in (the GeGLU halves), biases only where its config asks, and no attn_norm in layer 0."""

    def __init__(self, config: EncoderConfig, index: int = 0):
        super().__init__()
        h, i, eps = config.hidden_size, config.intermediate_size, config.layer_norm_eps
        attn_bias, mlp_bias, norm_bias = config.attention_bias, config.mlp_bias, config.norm_bias
        self.qkv = nn.Linear(h, 3 * h, bias=attn_bias)
        self.attn_out = nn.Linear(h, h, bias=attn_bias)
        self.attn_norm = None if config.pre_norm and index == 0 else nn.LayerNorm(h, eps=eps, bias=norm_bias)
        self.ffn_in = nn.Linear(h, 2 * i if config.pre_norm else i, bias=mlp_bias)
        self.ffn_out = nn.Linear(i, h, bias=mlp_bias)
        self.ffn_norm = nn.LayerNorm(h, eps=eps, bias=norm_bias)
        # DeBERTa: the projections of the relative-position table into keys (c2p) and queries (p2c)
        own = config.relative_attention and not config.share_att_key
        self.pos_key = nn.Linear(h, h) if own and "c2p" in config.pos_att_type else None
        self.pos_query = nn.Linear(h, h) if own and "p2c" in config.pos_att_type else None

    def position_projections(self, config: EncoderConfig) -> tuple[torch.Tensor | None, ...]:
        """(key weight, key bias, query weight, query bias) of DisentangledWeights.layers for this layer."""
        return disentangled_projections(config, self.qkv.weight, self.qkv.bias, self.pos_key, self.pos_query)

    def weights(self, path: str = "layer") -> LayerWeights:
        """The layer's weights, its modules checked to be plain ones (models/plain_modules.py; `path` names them)."""
        # read from the module dictionaries: each nn.Module attribute read costs a Python __getattr__, and an
        # inference forward reads every layer's weights
        modules = self._modules
        names = ("qkv", "attn_out", "attn_norm", "ffn_in", "ffn_out", "ffn_norm", "pos_key", "pos_query")
        for name in names:
            if modules.get(name) is not None:
                check_plain_module(f"{path}.{name}", modules[name])
        return LayerWeights(*(t for name in names[:6] for t in _weight_and_bias(modules.get(name))))


class FastBertModel(nn.Module):
    """A BERT, RoBERTa, DistilBERT, ELECTRA, MPNet, ModernBERT or DeBERTa-v2/v3 encoder that runs on packed tokens
    with the fused mtbert_fast ops.

    Build it from a config (random weights), from a loaded HF model (`from_hf`) or from an HF model directory
    (`from_pretrained`). `forward` takes HF's inputs and returns an `EncoderOutput` whose last_hidden_state and
    pooler_output equal HF's at the real tokens (zeros at padding).

    dtype: parameters and compute dtype (float32, bfloat16, float16); backend: "auto" or a forced backend for
    every op (see mtbert_fast.ops.dispatch); add_pooling_layer: default, as the family's HF base model.
    """

    def __init__(
        self,
        config: EncoderConfig,
        add_pooling_layer: bool | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ):
        super().__init__()
        if add_pooling_layer is None:  # the family's HF base model has one (ModernBERT's has none)
            add_pooling_layer = not config.pre_norm
        self.config = config
        self.backend = backend
        self.embeddings = FastEmbeddings(config)
        self.layers = nn.ModuleList(FastBertLayer(config, i) for i in range(config.num_hidden_layers))
        if add_pooling_layer and config.pre_norm:
            raise ValueError(f"a {config.family} encoder has no pooler: pass add_pooling_layer=False")
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        # ModernBERT: the LayerNorm after the last layer
        self.final_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.norm_bias)
                           if config.pre_norm else None)
        buckets = config.relative_attention_num_buckets
        # MPNet: one [buckets, heads] table of attention-score biases shared by every layer
        self.relative_attention_bias = nn.Embedding(buckets, config.num_attention_heads) if buckets else None
        # DeBERTa: the relative-position table and its LayerNorm
        span = config.attention_span if config.relative_attention else 0
        self.rel_embeddings = nn.Embedding(2 * span, config.hidden_size) if span else None
        norm = config.relative_attention and config.norm_rel_ebd
        self.rel_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if norm else None
        self.int8: Int8State | None = None
        self._layer_cache = LayerCache()
        self._init_weights()
        self.to(device=device, dtype=dtype)
        # forward reads the submodules' weights and never calls them: a hook on one would never run
        refuse_hooks(self)

    def _init_weights(self, std: float = 0.02) -> None:
        """BERT's initialization: normal(0, 0.02) matrices and embeddings, zero biases, unit LayerNorm."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.word_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        *,
        inputs_checked: bool = False,
    ) -> EncoderOutput:
        """input_ids [B, L]; attention_mask [B, L] of 0/1 (default: all real). inputs_checked: `check_inputs`
        has passed these very inputs, so they are not checked again."""
        refuse_graph_capture()
        for name in ("pooler", "final_norm", "relative_attention_bias", "rel_embeddings", "rel_norm"):
            if self._modules.get(name) is not None:
                check_plain_module(name, self._modules[name])
        pooler = (self.pooler.weight, self.pooler.bias) if self.pooler is not None else None
        if self.int8 is not None:
            layers, stacks = self.int8.current(self.layers), self.int8.stacks
        else:
            layers, stacks = self._layer_cache.current(self.layers, self._layer_weights)
        return encode(
            self.config,
            self.embeddings.weights(),
            layers,
            pooler,
            input_ids,
            attention_mask,
            token_type_ids,
            position_ids,
            inputs_embeds,
            output_hidden_states=output_hidden_states,
            training=self.training,
            backend=self.backend,
            inputs_checked=inputs_checked,
            relative_attention_bias=self._relative_attention_bias(),
            final_norm=(self.final_norm.weight, self.final_norm.bias) if self.final_norm is not None else None,
            disentangled=self._disentangled(),
            stacks=stacks,
        )

    def _layer_weights(self) -> list[LayerWeights]:
        return [layer.weights(f"layers.{i}") for i, layer in enumerate(self.layers)]

    def _disentangled(self) -> DisentangledWeights | None:
        if not self.config.disentangled:
            return None
        norm = (self.rel_norm.weight, self.rel_norm.bias) if self.rel_norm is not None else None
        return DisentangledWeights(self.rel_embeddings.weight, norm,
                                   [layer.position_projections(self.config) for layer in self.layers])

    def _relative_attention_bias(self) -> torch.Tensor | None:
        table = self.relative_attention_bias
        return table.weight if table is not None else None

    def quantize(self, calibration=None, *, smoothing: float = DEFAULT_SMOOTHING) -> FastBertModel:
        """int8 inference, in place: the four products of every layer run on int8 weights (per output channel) and
        int8 activations (per token, smoothed); the rest stays in the model's dtype (float32 or bfloat16). Returns
        the model. The float weights stay, so state_dict is unchanged and `dequantize` undoes this.

        calibration: model inputs to read activation ranges from: a dict as a tokenizer returns it, or a list of
        them; a few hundred sentences of the text the model will see give the best accuracy, and with them the
        weights are rounded with GPTQ's error compensation. None: synthetic token ids, weights rounded to nearest.
        Input channels whose range still stands out after smoothing run in fp32 (models/int8.py). smoothing:
        SmoothQuant's alpha (0: none). Inference only: a quantized model refuses train mode.
        """
        def quantize() -> list[Int8LayerWeights]:
            with torch.no_grad():
                layers = self._layer_weights()
            return quantize_encoder(self.config, self.embeddings.weights(), layers, calibration, smoothing,
                                    self.backend, self._relative_attention_bias())

        self.int8 = Int8State(self.layers, quantize)
        return self

    def dequantize(self) -> FastBertModel:
        """Back to the float products (the float weights were kept)."""
        self.int8 = None
        return self

    def check_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> tuple[int, int]:
        """The checks `forward` runs on its inputs, without running it: (batch, seqlen), or an error naming the
        problem."""
        return validate_inputs(self.config, self.device, input_ids, attention_mask, token_type_ids, position_ids,
                               inputs_embeds, dtype=self.dtype,
                               vocab_size=self.embeddings.word_embeddings.num_embeddings)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, *, dtype=None, backend: str | None = None, calibration=None
                ) -> FastBertModel:
        """From a loaded HF BertModel / RobertaModel / DistilBertModel / ElectraModel / MPNetModel, or any of their
        task models (their encoder is taken).
        dtype=torch.qint8: int8 inference with activations in the HF model's float dtype (see `quantize`, which
        reads `calibration`)."""
        from mtbert_fast.models.hf_mapping import fast_state_dict_from_hf, hf_layer_norm_eps

        base = getattr(hf_model, "base_model", hf_model)
        config = EncoderConfig.from_hf(base.config)
        # the eps the modules hold, as HF's forward reads it (set on all of them by hand, it is not the config's)
        config = dataclasses.replace(config, layer_norm_eps=hf_layer_norm_eps(base, config))
        has_pooler = getattr(base, "pooler", None) is not None
        state = fast_state_dict_from_hf(base.state_dict(), config, has_pooler=has_pooler)
        # copies: the fast model owns its weights, so changing or training it leaves the HF model as it was
        state = {k: v.clone() for k, v in state.items()}
        return cls._from_state(config, state, has_pooler, dtype, backend, calibration=calibration)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, dtype=None, device=None, backend: str | None = None, calibration=None
    ) -> FastBertModel:
        """From an HF model directory: config.json and model.safetensors (or sharded safetensors); never unpickles.
        dtype=torch.qint8: int8 inference with float32 activations (see `quantize`, which reads `calibration`)."""
        from mtbert_fast.models.hf_mapping import LAYOUTS, fast_state_dict_from_hf, read_safetensors_dir

        config, saved_dtype = _checkpoint_config(path)
        hf_state = read_safetensors_dir(path)
        # a pooler only where the family's base model has one: DeBERTa's task models keep their own ContextPooler
        # under the same name, outside the encoder
        has_pooler = LAYOUTS[config.family].pooler and any(
            k.endswith(("pooler.dense.weight", "pooler.dense.bias")) for k in hf_state)
        state = fast_state_dict_from_hf(hf_state, config, has_pooler=has_pooler)
        if dtype == torch.qint8:  # float32 activations, whatever dtype the checkpoint was saved in
            state = {k: v.float() for k, v in state.items()}
        return cls._from_state(config, state, has_pooler, dtype, backend, device, calibration, saved_dtype)

    @classmethod
    def _from_state(cls, config, state, has_pooler, dtype, backend, device=None, calibration=None,
                    saved_dtype: torch.dtype | None = None) -> FastBertModel:
        """dtype None: the model's dtype is saved_dtype (the config's) where given, else that of the state's tensors,
        one for all of them (mixed dtypes are refused: pass dtype)."""
        int8 = dtype == torch.qint8
        check_model_dtype(dtype)
        if calibration is not None and not int8:
            raise ValueError("calibration is read by int8 models only: pass dtype=torch.qint8 with it")
        float_dtype = dtype
        if int8 or dtype is None:
            float_dtype = saved_dtype if saved_dtype is not None and not int8 else weights_dtype(state)
        with torch.device("meta"):
            model = cls(config, add_pooling_layer=has_pooler, backend=backend)
        model.load_state_dict(state, strict=True, assign=True)
        model = model.to(device=device, dtype=float_dtype).eval()
        return model.quantize(calibration) if int8 else model
