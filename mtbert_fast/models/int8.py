"""int8 inference for the encoder: int8 weights per output channel, activations quantized per token at run time.

What is int8: the four products of every layer (QKV, attention output, FFN in, FFN out). What stays in the model's
float dtype (float32 or bfloat16): embeddings, attention (scores, softmax, the weighted sum), LayerNorm, GELU,
residuals and the pooler.

Accuracy comes from three choices, each measured on real weights (trained BERTs carry a few activation channels
tens of times larger than the rest, which random weights do not have):
  - activations are quantized per token and asymmetrically (a zero point per row), not per tensor;
  - the products are smoothed (SmoothQuant): input channel k is divided by s_k = a_k^alpha / w_k^(1-alpha) and the
    weight's column k multiplied by it, where a_k is the largest |activation| seen on that channel during
    calibration and w_k the largest |weight| in that column; the division runs inside the quantization pass;
  - calibration runs the float model once on a few batches, real text from the user's domain where given, else
    synthetic token ids (random ids, lengths 3 to 64), which find the same outlier channels on the models tried;
  - the few input channels of a product whose smoothed calibration range still stands out (OUTLIER_RATIO times the
    median channel's, at most OUTLIER_CHANNELS) are left out of the int8 product and added back in fp32 by its
    epilogue (outlier_x @ outlier_w), so they no longer set every token's scale;
  - with real calibration text, each weight is rounded with error compensation (GPTQ, `gptq_round`): column by
    column, the rounding error of a column is spread over the columns not yet rounded, weighted by how the
    calibration inputs of those columns correlate, so that the product's output on such inputs moves least.
    Synthetic ids are not text, and compensating for their correlations made real sentences worse: there the
    weights are rounded to nearest.
On CPUs without VNNI, oneDNN's int8 product adds neighbouring columns in int16 and is exact only for weights whose
pairs of one sign sum to at most PAIR_LIMIT (128) in magnitude (mtbert_fast.ops.int8). There each row's scale is
also large enough for its largest such pair to round within the limit, and GPTQ clamps an odd column to what its
pair's even column leaves, so every weight runs on the int8 product (about twice the float32 rate there) with the
same exact sums.
"""

from __future__ import annotations

import functools
import operator
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from mtbert_fast.models.config import EncoderConfig
from mtbert_fast.ops import (
    attention_varlen, dispatch, int8_linear, int8_linear_gelu_quantize, int8_linear_residual_layer_norm,
    int8_linear_residual_layer_norm_quantize, int8_sums, pack_int8_weight, quantize_rows,
)
from mtbert_fast.ops.int8 import (
    INT8_LINEAR, INT8_LINEAR_GELU_QUANTIZE, INT8_LINEAR_RESIDUAL_LAYER_NORM, INT8_LINEAR_RESIDUAL_LAYER_NORM_QUANTIZE,
    PAIR_LIMIT, QUANTIZE_ROWS, PackedInt8Weight, int8_sums_unchecked, pair_sums, sums_panels, weight_pairs_limited,
)
import mtbert_fast.ops.int8 as int8_ops
from mtbert_fast.ops.int8_layers import OP as INT8_LAYERS
from mtbert_fast.ops.int8_layers import product_weights

DEFAULT_SMOOTHING = 0.5
# input channels per product computed in fp32 instead of int8: at most OUTLIER_CHANNELS, those whose smoothed
# calibration range is at least OUTLIER_RATIO times the median channel's
OUTLIER_CHANNELS = 4
OUTLIER_RATIO = 4.0
# GPTQ's damping: this fraction of the mean diagonal of X^T X added to the diagonal before it is inverted
GPTQ_DAMPING = 0.1
GPTQ_BLOCK = 128
# the most memory that calibration's X^T X matrices take at once (more layers than fit are calibrated in more passes)
GRAM_BUDGET_BYTES = 256 * 2**20
SYNTHETIC_ROWS = 64
SYNTHETIC_LENGTHS = (3, 64)
# The ids a tokenizer puts first and last in every sequence, as each family's released vocabularies number them:
# BERT's WordPiece [CLS] and [SEP] (DistilBERT and ELECTRA use that vocabulary), RoBERTa's and MPNet's <s> and </s>,
# DeBERTa-v3's [CLS] and [SEP], ModernBERT's. Synthetic calibration rows start and end with them: the activations at
# those two tokens set some channels' ranges, and rows without them calibrate those channels on random tokens.
FRAME_IDS = {"bert": (101, 102), "distilbert": (101, 102), "electra": (101, 102), "roberta": (0, 2), "mpnet": (0, 2),
             "deberta": (1, 2), "modernbert": (50281, 50282)}
# the four products of a layer, named by where their input comes from
PRODUCTS = ("qkv", "attn_out", "ffn_in", "ffn_out")
# Where a product's sums come from int8 panels (ops.int8.sums_panels), its epilogue op takes them itself, a block of
# rows at a time, so that they never go to memory (the ops' `panels`); False: int8_sums first, the epilogue on its
# result (for comparison: benchmarks/int8_panels.py).
EPILOGUE_SUMS = True
# Where every product's sums come from panels, inference runs the whole stack of int8 layers in one int8_layers call
# (int8_stack); False: one layer at a time from Python (for comparison: benchmarks/int8_panels.py).
LAYERS_IN_ONE_CALL = True


class Product(NamedTuple):
    """A product op's leading arguments (the integer sums, or with `panels` the quantized input q itself; the
    input's scale and zero; the weight's scale and sums; the bias) and the panels its sums come from (or None)."""

    args: tuple
    panels: torch.Tensor | None


class Int8Linear(NamedTuple):
    weight: torch.Tensor  # int8 [N, K]: the smoothed weight, per output channel
    packed: PackedInt8Weight | None  # the weight in oneDNN's layout (ops.pack_int8_weight), None where not packed
    weight_scale: torch.Tensor  # fp32 [N]
    weight_sum: torch.Tensor  # fp32 [N]: row sums of the int8 weight (the zero point's correction)
    bias: torch.Tensor  # [N] in the activation dtype
    smooth: torch.Tensor  # fp32 [K]: multiplies the input before it is quantized (1 / s; 0 at the outlier channels)
    outlier_index: torch.Tensor  # int64 [k]: the input channels left out of the int8 product
    outlier_weight: torch.Tensor  # fp32 [k, N]: the float weight's columns at those channels

    def sums(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, checked: bool = True) -> Product:
        """The epilogue ops' product (Product) for the quantized input (q, scale, zero): q and the weight's panels
        where its sums come from panels (EPILOGUE_SUMS), else the integer sums. checked=False: q comes from
        quantize_rows or an epilogue op of the layer, and int8_sums' checks are skipped."""
        rest = self.weight_scale, self.weight_sum, self.bias
        panels = sums_panels(self.packed, q.shape[0]) if EPILOGUE_SUMS else None
        if panels is not None:
            return Product((q, scale, zero, *rest), panels)
        acc, zero = (int8_sums if checked else int8_sums_unchecked)(q, zero, self.weight, self.packed)
        return Product((acc, scale, zero, *rest), None)

    def outliers(self, x: torch.Tensor | None = None, kept: torch.Tensor | None = None):
        """The epilogue ops' `outliers` for the float input x [T, K], or for its values at the outlier channels
        already gathered (kept [T, k] fp32); None where there are none."""
        if not self.outlier_index.numel():
            return None
        return (x.index_select(1, self.outlier_index).float() if kept is None else kept), self.outlier_weight


class Int8LayerWeights(NamedTuple):
    qkv: Int8Linear
    attn_out: Int8Linear
    ffn_in: Int8Linear
    ffn_out: Int8Linear
    attn_norm_weight: torch.Tensor
    attn_norm_bias: torch.Tensor
    ffn_norm_weight: torch.Tensor
    ffn_norm_bias: torch.Tensor


def clamp_pair_(odd: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
    """Clamps the rounded column 2i + 1 (in place) so that with the rounded column 2i beside it no two entries of
    one sign sum past PAIR_LIMIT in magnitude."""
    return odd.clamp_(torch.where(even < 0, -PAIR_LIMIT - even, -127), torch.where(even > 0, PAIR_LIMIT - even, 127))


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """weight [N, K] over its per-row scale [N], rounded to the nearest int8 in [-127, 127]; with `pairs`, each odd
    column then clamped against its even neighbour (clamp_pair_; after a scale from `weight_scale` it changes
    nothing, but for a pair that float rounding leaves a hair past the limit)."""
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127)
    if pairs:
        clamp_pair_(q[:, 1::2], q[:, 0:q.shape[1] // 2 * 2:2])
    return q.to(torch.int8)


def weight_scale(weight: torch.Tensor, pairs: bool = False) -> torch.Tensor:
    """The per-row scale [N] of weight [N, K]: its largest |entry| over 127, and with `pairs` at least its largest
    sum of neighbouring entries of one sign over PAIR_LIMIT (pair_sums), so that rounding to nearest keeps every such
    pair within the limit (two entries whose exact sum is at most 128 steps round to at most 128)."""
    scale = weight.abs().amax(1).clamp_min(1e-12) / 127
    return torch.maximum(scale, pair_sums(weight) / PAIR_LIMIT) if pairs else scale


def gptq_round(weight: torch.Tensor, scale: torch.Tensor, gram: torch.Tensor, damping: float = GPTQ_DAMPING,
               block: int = GPTQ_BLOCK, pairs: bool = False) -> torch.Tensor:
    """weight [N, K] rounded to int8 on the per-row scale [N] so that x @ weight^T moves least for inputs x whose
    X^T X is gram [K, K] (GPTQ: Frantar et al., 2022). With gram damped (`damping` times the mean of its diagonal
    added to the diagonal) and U the upper Cholesky factor of its inverse, the columns are rounded in order, each to
    the nearest step (clamped to [-127, 127], and with `pairs` an odd column to what clamp_pair_ leaves beside its
    even neighbour) of the column as the earlier ones left it, and its rounding error, divided by U's pivot, is
    taken from the later columns along U's row. Columns no input reached (a zero on gram's diagonal) are rounded to
    nearest and pass nothing on."""
    n, k = weight.shape
    if gram.shape != (k, k):
        raise ValueError(f"gptq_round: gram must be [{k}, {k}] (weight's columns), got {tuple(gram.shape)}")
    if scale.shape != (n,):
        raise ValueError(f"gptq_round: scale must be [{n}] (weight's rows), got {tuple(scale.shape)}")
    h = gram.float().clone()
    diag = h.diagonal()
    dead = diag <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    diag += damping * (diag[~dead].mean() if not dead.all() else 1.0)
    diag[dead] = 1
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    # row i of wt is column i of the weight: each step reads and updates contiguous rows
    wt = weight.float().t().contiguous()
    step = scale.float()
    qt = torch.empty_like(wt)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        ub = u[b0:b1, b0:b1]
        err = torch.empty(b1 - b0, n)
        for i in range(b1 - b0):
            torch.round(wt[b0 + i] / step, out=qt[b0 + i]).clamp_(-127, 127)
            if pairs and (b0 + i) % 2:
                clamp_pair_(qt[b0 + i], qt[b0 + i - 1])
            torch.div(wt[b0 + i] - qt[b0 + i] * step, ub[i, i], out=err[i])
            wt[b0 + i + 1:b1].addr_(ub[i, i + 1:], err[i], alpha=-1)
        wt[b1:].addmm_(u[b0:b1, b1:].t(), err, alpha=-1)
    return qt.t().to(torch.int8).contiguous()


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor, input_absmax: torch.Tensor,
                    smoothing: float = DEFAULT_SMOOTHING, gram: torch.Tensor | None = None,
                    pairs: bool | None = None) -> Int8Linear:
    """weight [N, K] and bias [N] of a float linear, input_absmax fp32 [K] from calibration -> Int8Linear.
    gram: X^T X [K, K] of the calibration inputs, for error-compensated rounding (gptq_round); None: to nearest.
    pairs: whether to quantize the weight pairs_safe, as the products without VNNI need it (True for int8 panels
    that multiply without it, as for ops.int8_layers there: not ops.int8.panels_vnni()); None: as this machine's
    products need (weight_pairs_limited)."""
    w = weight.detach().float()
    s = input_absmax.float().clamp_min(1e-5).pow(smoothing) / w.abs().amax(0).clamp_min(1e-5).pow(1 - smoothing)
    s = s.clamp(1e-4, 1e4)
    # the outlier channels: the input's smooth and the weight's columns are 0 there, so they add nothing to the
    # int8 product (a 0 quantizes to the zero point) and set neither its per-token nor its per-channel scales
    ranges = input_absmax.float() / s
    top = ranges.topk(min(OUTLIER_CHANNELS, w.shape[1]))
    outliers = top.indices[top.values >= OUTLIER_RATIO * ranges.median()].sort().values
    inliers = torch.ones_like(s, dtype=torch.bool)
    inliers[outliers] = False
    ws = w * s * inliers
    pairs = weight_pairs_limited() if pairs is None else pairs
    scale = weight_scale(ws, pairs)
    if gram is None:
        q = round_to_nearest(ws, scale, pairs)
    else:  # the smoothed inputs are x / s, 0 at the outlier channels: their X^T X is gram / (s s^T) there
        inv = inliers / s
        q = gptq_round(ws, scale, inv[:, None] * gram * inv[None, :], pairs=pairs)
    return Int8Linear(q, pack_int8_weight(q), scale, q.float().sum(1), bias.detach().clone(),
                      (inliers / s).contiguous(), outliers, w[:, outliers].t().contiguous())


class _Int8Ops(NamedTuple):
    """The int8 ops a layer calls, each on (product arguments, outliers, rest...)."""

    checked: bool
    quantize_rows: Callable
    linear: Callable
    gelu_quantize: Callable
    residual_layer_norm: Callable
    residual_layer_norm_quantize: Callable


def _kernel_call(op) -> Callable:
    kernel = op.kernel("cpu")
    return lambda product, outliers, *rest: kernel(*product.args, *(outliers or (None, None)), *rest, product.panels)


@functools.cache
def _direct_ops() -> _Int8Ops:
    return _Int8Ops(False, QUANTIZE_ROWS.kernel("cpu"), *map(_kernel_call, (
        INT8_LINEAR, INT8_LINEAR_GELU_QUANTIZE, INT8_LINEAR_RESIDUAL_LAYER_NORM,
        INT8_LINEAR_RESIDUAL_LAYER_NORM_QUANTIZE)))


def _wrapper_call(fn, backend: str | None) -> Callable:
    return lambda product, outliers, *rest: fn(*product.args, *rest, outliers=outliers, panels=product.panels,
                                               backend=backend)


def _int8_ops(x: torch.Tensor, backend: str | None) -> _Int8Ops:
    """In inference on the C++ kernels (the automatic choice, or backend "cpu"), the kernels themselves: they check
    every argument and name it, and the layer made all of them but x (checked by the encoder), so the wrappers'
    Python checks, which cost a short call more than some of its work, are skipped. Otherwise the checked
    wrappers."""
    if (not (torch.is_grad_enabled() or torch.compiler.is_compiling())
            and dispatch.choose(INT8_LINEAR.name, x, backend) == "cpu"):
        return _direct_ops()
    return _Int8Ops(
        True,
        lambda x, smooth: quantize_rows(x, smooth, backend=backend),
        _wrapper_call(int8_linear, backend),
        lambda product, outliers, approximate, smooth, keep: int8_linear_gelu_quantize(
            *product.args, approximate, smooth, outliers=outliers, keep=keep, panels=product.panels, backend=backend),
        _wrapper_call(int8_linear_residual_layer_norm, backend),
        _wrapper_call(int8_linear_residual_layer_norm_quantize, backend),
    )


def int8_layer_forward(config: EncoderConfig, w: Int8LayerWeights, x, packed, backend=None, next_smooth=None,
                       rel_bias=None):
    """One encoder layer with int8 products on packed tokens -> [T, H] in x's dtype. x: [T, H], or (x, q, scale,
    zero) with x already quantized for the QKV product (what the previous layer returns when given next_smooth, the
    next layer's qkv smooth; the layer then returns (y, y quantized) likewise). rel_bias: as for layer_forward."""
    x, *qx = x if isinstance(x, tuple) else (x,)
    t, h = x.shape
    eps = config.layer_norm_eps
    k = _int8_ops(x, backend)
    qkv = k.linear(w.qkv.sums(*(qx or k.quantize_rows(x, w.qkv.smooth)), k.checked), w.qkv.outliers(x))
    ctx = attention_varlen(
        qkv.view(t, 3, config.num_attention_heads, config.head_dim), packed.cu_seqlens, packed.max_seqlen,
        rel_bias=rel_bias, backend=backend,
    ).reshape(t, h)
    x, *qx = k.residual_layer_norm_quantize(
        w.attn_out.sums(*k.quantize_rows(ctx, w.attn_out.smooth), k.checked), w.attn_out.outliers(ctx), x,
        w.attn_norm_weight, w.attn_norm_bias, eps, w.ffn_in.smooth,
    )
    *inner, kept = k.gelu_quantize(w.ffn_in.sums(*qx, k.checked), w.ffn_in.outliers(x), config.gelu_approximate,
                                   w.ffn_out.smooth, w.ffn_out.outlier_index)
    product, outliers = w.ffn_out.sums(*inner, k.checked), w.ffn_out.outliers(kept=kept)
    norm = (x, w.ffn_norm_weight, w.ffn_norm_bias, eps)
    if next_smooth is None:
        return k.residual_layer_norm(product, outliers, *norm)
    return tuple(k.residual_layer_norm_quantize(product, outliers, *norm, next_smooth))


def int8_stack(layers: Sequence, x: torch.Tensor, rows: int, backend: str | None,
               stacks: dict | None = None) -> list[torch.Tensor] | None:
    """Every layer's tensors for one int8_layers call (ops.int8_layers), where that kernel runs exactly what
    int8_layer_forward would: inference on the C++ kernels (no autograd or tracing), every layer int8 with each
    product's sums on its panels for `rows` rows (EPILOGUE_SUMS) and its bias in x's dtype; else (or with
    LAYERS_IN_ONE_CALL off) None. stacks: where given, the lists already made for these very layers (an Int8State's,
    whose layers never change), and the place to keep them."""
    if (not (LAYERS_IN_ONE_CALL and EPILOGUE_SUMS) or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or dispatch.choose(INT8_LINEAR.name, x, backend) != "cpu"
            or dispatch.choose(INT8_LAYERS.name, x, backend) != "cpu"):
        return None
    key = ("int8", x.dtype, rows <= int8_ops.PANEL_ROWS, rows <= int8_ops.AMX_PANEL_ROWS)  # what sums_panels reads
    return Stacks.kept(stacks, key, lambda: _int8_weights(layers, x.dtype, rows))


def _int8_weights(layers: Sequence, dtype: torch.dtype, rows: int) -> list[torch.Tensor] | None:
    """int8_stack's tensors for int8 layers whose products take their sums from panels for `rows` rows and whose
    biases are `dtype`, else None."""
    weights = []
    for w in layers:
        if not isinstance(w, Int8LayerWeights):
            return None
        for lin in (w.qkv, w.attn_out, w.ffn_in, w.ffn_out):
            panels = sums_panels(lin.packed, rows)
            if panels is None or lin.bias.dtype != dtype:
                return None
            weights += product_weights(panels, lin.weight_scale, lin.weight_sum, lin.bias, lin.smooth,
                                       lin.outlier_index, lin.outlier_weight)
        weights += [w.attn_norm_weight, w.attn_norm_bias, w.ffn_norm_weight, w.ffn_norm_bias]
    return weights or None


# ---- calibration --------------------------------------------------------------------------------------------------


def frame_ids(config: EncoderConfig) -> tuple[int, int] | None:
    """(first, last): the ids that synthetic calibration rows start and end with: the config's bos_token_id and
    eos_token_id where it names both, else FRAME_IDS of the family; None where the vocabulary is too small to hold
    them or one of them is the padding id."""
    named = (config.bos_token_id, config.eos_token_id)
    frame = named if None not in named else FRAME_IDS.get(config.family)
    if frame is None or max(frame) >= config.vocab_size or config.pad_token_id in frame:
        return None
    return frame


def synthetic_batches(config: EncoderConfig, device: torch.device, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Calibration input when none is given: SYNTHETIC_ROWS rows of random token ids (never the padding id), lengths
    uniform in SYNTHETIC_LENGTHS (at most the model's maximum), right-padded; each row's first and last ids are
    frame_ids' where it gives them, as a tokenizer frames a sentence."""
    g = torch.Generator().manual_seed(seed)
    longest = min(SYNTHETIC_LENGTHS[1], config.max_position_embeddings - 2)
    shortest = min(SYNTHETIC_LENGTHS[0], longest)
    lengths = torch.randint(shortest, longest + 1, (SYNTHETIC_ROWS,), generator=g)
    ids = torch.randint(0, config.vocab_size, (SYNTHETIC_ROWS, longest), generator=g)
    if config.pad_token_id is not None and config.vocab_size > 1:
        ids = torch.where(ids == config.pad_token_id, (ids + 1) % config.vocab_size, ids)
    frame = frame_ids(config)
    if frame is not None and shortest >= 2:
        ids[:, 0] = frame[0]
        ids[torch.arange(SYNTHETIC_ROWS), lengths - 1] = frame[1]
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return [{"input_ids": ids.to(device), "attention_mask": mask.to(device)}]


# what tokenizers return besides model inputs: a calibration dict may hold them, and they are not read
_TOKENIZER_EXTRAS = {"special_tokens_mask", "offset_mapping", "overflow_to_sample_mapping", "length", "labels",
                     "label"}


def calibration_batches(calibration, config: EncoderConfig, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """`calibration` as a list of input dicts: None (synthetic), one dict of model inputs (as a tokenizer returns
    them) or an iterable of such dicts."""
    if calibration is None:
        return synthetic_batches(config, device)
    if not isinstance(calibration, (Mapping, Iterable)) or isinstance(calibration, (str, bytes, torch.Tensor)):
        raise TypeError(f"calibration must be a dict of model inputs (input_ids, attention_mask, ...) as a tokenizer "
                        f"returns them, a list of such dicts, or None for synthetic calibration; got "
                        f"{type(calibration).__name__}")
    batches = [calibration] if isinstance(calibration, Mapping) else list(calibration)
    if not batches:
        raise ValueError("calibration is empty: pass a dict of model inputs (input_ids, attention_mask, ...) as a "
                         "tokenizer returns them, a list of such dicts, or None for synthetic calibration")
    allowed = {"input_ids", "attention_mask", "token_type_ids", "position_ids"}
    out = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            raise TypeError(f"calibration batch {i} must be a dict of model inputs with input_ids, got "
                            f"{type(batch).__name__}")
        unknown = sorted(set(batch) - allowed - _TOKENIZER_EXTRAS)
        if unknown:  # a misspelt attention_mask would otherwise calibrate the padding as real tokens, unsaid
            raise ValueError(f"calibration batch {i} has keys {unknown} that no model input is called; the inputs "
                             f"read are {sorted(allowed)}")
        out.append({k: torch.as_tensor(v).to(device) for k, v in batch.items() if k in allowed})
    return out


class InputStats:
    """What calibration sees of each product's input in the layers at `layers`: the largest |value| per channel, and
    with `gram`, X^T X (fp32 [K, K], summed over the calibration tokens) for error-compensated rounding."""

    def __init__(self, num_layers: int, layers: Iterable[int], gram: bool):
        self.absmax: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]
        self.gram: dict[tuple[int, str], torch.Tensor] = {}
        self.layers, self.with_gram = set(layers), gram

    def observer(self, layer: int) -> Callable[[str, torch.Tensor], None] | None:
        """The layer's observer for encode (None for a layer outside `layers`: nothing to see there)."""
        def observe(product: str, x: torch.Tensor) -> None:
            x = x.detach().float()
            a = x.abs().amax(0)
            seen = self.absmax[layer]
            seen[product] = a if product not in seen else torch.maximum(seen[product], a)
            if self.with_gram:
                key = (layer, product)
                self.gram[key] = x.T @ x if key not in self.gram else self.gram[key].addmm_(x.T, x)

        return observe if layer in self.layers else None


def gram_passes(layers: Sequence, budget: int | None = None) -> list[list[int]]:
    """The layers in groups whose X^T X matrices (fp32, one per product input) fit `budget` bytes together
    (default GRAM_BUDGET_BYTES), at least one layer a group: calibration runs once per group."""
    budget = GRAM_BUDGET_BYTES if budget is None else budget
    groups: list[list[int]] = []
    used = budget
    for i, w in enumerate(layers):
        size = 4 * sum(weight.shape[1] ** 2 for weight in (w.qkv_weight, w.attn_out_weight, w.ffn_in_weight,
                                                            w.ffn_out_weight))
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def check_smoothing(smoothing: float) -> None:
    if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)):
        raise TypeError(f"smoothing must be a number in [0, 1] (SmoothQuant's alpha), got {smoothing!r}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1] (SmoothQuant's alpha), got {smoothing}")


def quantize_layers(
    layers: Sequence, stats: InputStats, dtype: torch.dtype, smoothing: float = DEFAULT_SMOOTHING,
    indices: Iterable[int] | None = None,
) -> list[Int8LayerWeights]:
    """Float LayerWeights and their calibrated input statistics -> Int8LayerWeights, activations in `dtype`, for
    the layers at `indices` (default: all). Products with X^T X in `stats` are rounded with error compensation."""
    check_smoothing(smoothing)
    out = []
    for i in range(len(layers)) if indices is None else indices:
        w, seen = layers[i], stats.absmax[i]
        missing = [p for p in PRODUCTS if p not in seen]
        if missing:
            raise RuntimeError(f"calibration saw no input for {', '.join(missing)}: it needs at least one real token")
        pairs = {"qkv": (w.qkv_weight, w.qkv_bias), "attn_out": (w.attn_out_weight, w.attn_out_bias),
                 "ffn_in": (w.ffn_in_weight, w.ffn_in_bias), "ffn_out": (w.ffn_out_weight, w.ffn_out_bias)}
        lin = {p: quantize_linear(weight, bias.to(dtype), seen[p], smoothing, stats.gram.get((i, p)))
               for p, (weight, bias) in pairs.items()}
        out.append(Int8LayerWeights(
            lin["qkv"], lin["attn_out"], lin["ffn_in"], lin["ffn_out"],
            w.attn_norm_weight.detach().clone(), w.attn_norm_bias.detach().clone(),
            w.ffn_norm_weight.detach().clone(), w.ffn_norm_bias.detach().clone(),
        ))  # fmt: skip
    return out


MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.qint8)


def check_model_dtype(dtype: torch.dtype | None) -> None:
    """The dtypes a model can be built or swapped in: float32, bfloat16, float16 (float64 for checks), or
    torch.qint8 for int8 inference. Checked before anything is cast."""
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in MODEL_DTYPES):
        raise TypeError(f"dtype {dtype!r} is not supported: pass torch.float32, torch.bfloat16 or torch.float16 "
                        "(torch.float64 also runs, for checks), or torch.qint8 for int8 inference (int8 products, "
                        "float activations)")


def check_int8_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"int8 inference keeps activations in float32 or bfloat16; the model is {dtype}: cast it to "
                        "one of those first")


def check_int8_device(device: torch.device) -> None:
    if device.type != "cpu":
        raise NotImplementedError(
            f"int8 inference runs on the CPU (VNNI int8 products); the model is on {device}. Move it to the CPU "
            "first, or use bfloat16 on the GPU"
        )


_VERSION = operator.attrgetter("_version")
# the address of a tensor's StorageImpl: while a StorageWeakRef holds it, no other storage can take that address (a
# freed one's data can come back at the same data_ptr, as after .half() then .float())
STORAGE_ADDRESS = getattr(torch._C, "_storage_address", lambda t: t.untyped_storage()._cdata)


class Stacks(dict):
    """A model's one-call layer stacks (the tensor lists of post_norm_layers and int8_layers) by dtype and route, kept
    for layers that have not changed. A copied or pickled model starts with none: they hold the weights' packs."""

    def __reduce__(self):
        return Stacks, ()

    @staticmethod
    def kept(stacks: Stacks | None, key, make: Callable[[], list[torch.Tensor] | None], made_for=None
             ) -> list[torch.Tensor] | None:
        """make()'s stack, kept in `stacks` under `key` and taken from there once made, while made_for (what the
        stack's packs were made for, beyond the layers themselves) is what it was; made afresh without stacks."""
        if stacks is None:
            return make()
        entry = stacks.get(key)
        if entry is None or entry[0] != made_for:
            stacks[key] = entry = (made_for, make())
        return entry[1]


class ParameterWatch:
    """A module tree's parameters as they were when watched, to tell on every forward whether any changed: a
    parameter or submodule put in another's place (set as an attribute, or in the module's own dictionaries), or a
    parameter's values (an in-place update, a loaded state dict) or storage (.to(), .data =) changed. The tree is
    walked once; each check then looks every parameter and submodule up where it was (`is`, never ==) and compares
    the storages, offsets into them and version counters (inference tensors, made under torch.inference_mode, keep no
    version counter: only their storage is compared), without nn.Module.parameters()' generators, which cost a
    forward of a few tokens several percent. The watch holds a weak reference to each storage it saw, so no new
    storage (after a change of dtype or device, even two in a row) can take a watched one's address. A deep copy or
    a pickle of the watch watches the copied modules, as unchanged as these were when copied."""

    def __init__(self, root: torch.nn.Module):
        self.root = root
        # (dictionary, key, value) of every parameter and every submodule
        dicts, keys, values = [], [], []
        stack = [root]
        while stack:
            module = stack.pop()
            for table in (module._parameters, module._modules):
                for name, value in table.items():
                    if value is not None:
                        dicts.append(table)
                        keys.append(name)
                        values.append(value)
            stack += [child for child in module._modules.values() if child is not None]
        self.dicts, self.keys, self.values = dicts, keys, values
        self.params = [v for v in values if isinstance(v, torch.Tensor)]
        self.versioned = [p for p in self.params if not p.is_inference()]
        self.storages = [StorageWeakRef(p.untyped_storage()) for p in self.params]
        self.snapshot = self._state()

    def __reduce__(self):
        # a copied or unpickled watch looks at the copy's modules, whose storages and version counters are their own:
        # watched afresh, and reporting a change if this one had seen one
        return _rewatched, (self.root, self.unchanged(self.root))

    def _state(self) -> tuple[list[int], list[int], list[int]]:
        # the storage and the offset into it, not the data pointer: share_memory_() (torch.multiprocessing hands a
        # model to a worker so) moves a storage's data, values and all, and would read as a change
        return (list(map(STORAGE_ADDRESS, self.params)), list(map(torch.Tensor.storage_offset, self.params)),
                list(map(_VERSION, self.versioned)))

    def unchanged(self, root: torch.nn.Module) -> bool:
        return (root is self.root and all(map(operator.is_, map(dict.get, self.dicts, self.keys), self.values))
                and self._state() == self.snapshot)


def _rewatched(root: torch.nn.Module, unchanged: bool) -> ParameterWatch:
    watch = ParameterWatch(root)
    if not unchanged:
        watch.snapshot = None  # never equal to a state: every check reports the change
    return watch
