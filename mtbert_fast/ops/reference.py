"""Pure-PyTorch references for every op: the oracle of the tests and the fallback that runs anywhere.

Each function computes in fp32 (fp64 for fp64 inputs) and returns the input dtype, as the kernels do; autograd gives the
backward. Shapes: T packed tokens, B sequences, H hidden size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mtbert_fast.ops import dropout


def _acc(t: torch.Tensor) -> torch.Tensor:
    """The compute dtype: fp32, or fp64 for fp64 inputs."""
    return t if t.dtype == torch.float64 else t.float()


def _gelu(x: torch.Tensor, approximate: str) -> torch.Tensor:
    return F.gelu(x, approximate=approximate)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(x + bias).  x [N, D], bias [D] -> [N, D]."""
    return _gelu(_acc(x) + _acc(bias), approximate).to(x.dtype)


def unpack_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The weight [out_features, K] of panel_linear's panels (fp32 [P, K, 32], or bf16 [P, K / 2, 32, 2] of
    interleaved row pairs, where K then counts the zero row that pads an odd K)."""
    if panels.dim() == 4:
        p, half, width, _ = panels.shape
        w = panels.permute(0, 2, 1, 3).reshape(p * width, 2 * half)
    else:
        w = panels.transpose(1, 2).reshape(-1, panels.shape[1])
    return w[:out_features]


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, gelu: bool,
                 approximate: str) -> torch.Tensor:
    """x [M, K] @ W^T + bias (then GELU) -> [M, out_features], W = unpack_panels(panels)."""
    return _linear(x, unpack_panels(panels, out_features)[:, : x.shape[1]], bias, gelu, approximate)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, gelu: bool, approximate: str) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T + bias (then GELU) -> [M, N] in x's dtype, accumulated in _acc's dtype."""
    y = _acc(x) @ _acc(w).t()
    if bias is not None:
        y = y + _acc(bias)
    return (_gelu(y, approximate) if gelu else y).to(x.dtype)


def mkl_linear(x: torch.Tensor, pack: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool,
               approximate: str) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T + bias (then GELU) in float32; pack (MKL's copy of weight) is not read."""
    return _linear(x, weight, bias, gelu, approximate)


def bias_residual_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm(x + bias + residual) * weight + beta.  x, residual [N, D]; bias, weight, beta [D].
    weight and beta may be fp32 while x is not; their gradients are then fp32 too."""
    s = _acc(x) + _acc(bias) + _acc(residual)
    return F.layer_norm(s, (s.shape[-1],), weight.to(s.dtype), beta.to(s.dtype), eps).to(x.dtype)


def bias_gelu_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    approximate: str = "none",
) -> torch.Tensor:
    """LayerNorm(GELU(x + bias)) * weight + beta: the masked-LM head transform.  x [N, D] -> [N, D].
    weight and beta may be fp32 while x is not; their gradients are then fp32 too."""
    g = _gelu(_acc(x) + _acc(bias), approximate)
    return F.layer_norm(g, (g.shape[-1],), weight.to(g.dtype), beta.to(g.dtype), eps).to(x.dtype)


def attention_varlen(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    rng_state: torch.Tensor | None = None,
    rel_bias: torch.Tensor | None = None,
    window: int = -1,
    pos_q: torch.Tensor | None = None,
    pos_k: torch.Tensor | None = None,
    pos_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional softmax attention over packed sequences, softmax in fp32. For fp16 and bf16 inputs the product
    with V takes the unnormalized probabilities rounded to the input dtype, as the kernels (and FlashAttention, and
    PyTorch's own CPU attention) do, and divides by the sum of the unrounded ones.

    qkv [T, 3, heads, head_dim]; cu_seqlens int32 [B+1] (sequence b owns rows cu_seqlens[b]:cu_seqlens[b+1]);
    -> [T, heads, head_dim].  out_i = sum_j softmax_j(scale * q_i . k_j + bias_ij) v_j over j in i's sequence, with
    i, j positions within the sequence.
    rel_bias fp32 [heads, 2R+1]: bias_ij = rel_bias[h, clamp(j - i, -R, R) + R] (a relative position bias, as MPNet's
    and T5's); none when None.
    window: where >= 0, query i sees only the keys with |j - i| <= window (local attention, as ModernBERT's).
    pos_q, pos_k [heads, T, W], pos_index int32 [2P+1]: per-token position terms (DeBERTa's disentangled attention):
    the score of query i and key j gains pos_q[h, i, c] + pos_k[h, j, c], c = pos_index[clamp(j - i, -P, P) + P];
    either table may be None.
    max_seqlen is not needed here (every sequence is computed in full, as by the kernels).
    dropout_p, rng_state: dropout on the probabilities with the Philox mask of mtbert_fast.ops.dropout, the mask
    every kernel draws from the same rng_state (int64 [2] on the CPU); kept probabilities are scaled by 1 / (1 - p).
    """
    if scale is None:
        scale = 1.0 / math.sqrt(qkv.shape[-1])
    heads = qkv.shape[2]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        q, k, v = _acc(qkv[start:end]).unbind(1)  # each [L, heads, head_dim]
        scores = torch.einsum("ihd,jhd->hij", q, k) * scale
        pos = torch.arange(end - start, device=qkv.device)
        rel = pos[None, :] - pos[:, None]  # [L, L]: j - i
        if rel_bias is not None:
            r = (rel_bias.shape[1] - 1) // 2
            scores = scores + rel_bias.to(scores.dtype)[:, rel.clamp(-r, r) + r]
        if pos_index is not None:
            p = (pos_index.shape[0] - 1) // 2
            column = pos_index.long()[rel.clamp(-p, p) + p]  # [L, L]: the column c(i, j)
            if pos_q is not None:  # query i's row at c(i, j)
                scores = scores + torch.gather(_acc(pos_q[:, start:end]), 2, column.expand(heads, -1, -1))
            if pos_k is not None:  # key j's row at c(i, j)
                t = _acc(pos_k[:, start:end])
                scores = scores + torch.gather(t, 2, column.t().expand(heads, -1, -1)).transpose(1, 2)
        if window >= 0:
            scores = scores.masked_fill(rel.abs() > window, float("-inf"))
        half = qkv.dtype in (torch.float16, torch.bfloat16)
        if half:
            probs = torch.exp(scores - scores.amax(-1, keepdim=True))
            total = probs.sum(-1, keepdim=True).permute(1, 0, 2)  # [L, heads, 1]
        else:
            probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            rows = torch.arange(start, end, dtype=torch.int64)
            keep = dropout.keep_mask(rng_state, dropout_p, heads, rows, rows).to(probs.device)
            probs = probs * keep / (1.0 - dropout_p)
        if half:
            outs.append(torch.einsum("hij,jhd->ihd", probs.to(qkv.dtype).to(probs.dtype), v) / total)
        else:
            outs.append(torch.einsum("hij,jhd->ihd", probs, v))
    out = torch.cat(outs, 0) if outs else qkv[:0, 0]  # no tokens: still a function of qkv, for autograd
    return out.to(qkv.dtype)


def post_norm_layers(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, weights: list[torch.Tensor],
                     heads: int, scale: float, eps: float, approximate: str,
                     rel_bias: torch.Tensor | None = None, packs: list[torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Post-norm (BERT) encoder layers on packed tokens.  x [T, H]; weights: 12 per layer (QKV weight, its bias
    [3H], the attention output's weight and bias [H], that norm's weight and bias [H], the intermediate weight and
    bias [I], the output's weight and bias [H], that norm's weight and bias [H]), each weight as panels, in
    oneDNN's blocked layout or plain (packs, MKL's copies of the plain ones, are not read) -> [T, H]. Each layer:
    x = LN(attention(x Wqkv^T + bqkv) Wo^T + bo + x), x = LN(GELU(x Wi^T + bi) Wf^T + bf + x), in x's dtype
    between the steps, as the kernels store them."""
    t, h = x.shape

    def product(a, w, b, n, gelu=False):
        if w.is_mkldnn:  # a weight in oneDNN's blocked layout
            return _linear(a, w.to_dense(), b, gelu, approximate)
        if w.dim() == 2:  # a plain weight
            return _linear(a, w, b, gelu, approximate)
        return panel_linear(a, w, b, n, gelu, approximate if gelu else "none")

    for i in range(0, len(weights), 12):
        wqkv, bqkv, wo, bo, g1, b1, wi, bi, wf, bf, g2, b2 = weights[i:i + 12]
        qkv = product(x, wqkv, bqkv, 3 * h).view(t, 3, heads, h // heads)
        ctx = attention_varlen(qkv, cu_seqlens, max_seqlen, scale, rel_bias=rel_bias).reshape(t, h)
        x = bias_residual_layer_norm(product(ctx, wo, None, h), bo, x, g1, b1, eps)
        inner = product(x, wi, bi, bi.shape[0], gelu=True)
        x = bias_residual_layer_norm(product(inner, wf, None, h), bf, x, g2, b2, eps)
    return x


def mlm_gather_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of hidden @ weight.T + bias against labels, only over rows whose label != ignore_index.

    hidden [N, H], weight [V, H], bias [V], labels int64 [N] -> scalar fp32 ("mean" over counted rows, or "sum").
    """
    keep = labels != ignore_index
    kept = labels[keep]
    bad = _first_outside(kept, weight.shape[0])
    if bad is not None:  # F.cross_entropy would drop a -100 left in (its own default), in the sum but not the mean
        row = int(keep.nonzero()[bad[0]])
        raise ValueError(f"mlm_gather_loss: label {bad[1]} at row {row} is outside [0, {weight.shape[0]}) and is not "
                         f"ignore_index ({ignore_index})")
    logits = F.linear(_acc(hidden[keep]), _acc(weight), _acc(bias))
    return F.cross_entropy(logits, kept, reduction=reduction)


def _first_outside(indices: torch.Tensor, n: int) -> tuple[int, int] | None:
    """(position, value) of the first index outside [0, n), or None: Python's indexing would wrap a negative one
    around where the kernels refuse it."""
    bad = ((indices < 0) | (indices >= n)).nonzero()
    return None if not bad.numel() else (int(bad[0]), int(indices[bad[0]]))


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """x [R, ...], indices int64 [N] in [0, R) -> x[indices] [N, ...]."""
    bad = _first_outside(indices, x.shape[0])
    if bad is not None:
        raise ValueError(f"gather_rows: indices[{bad[0]}] = {bad[1]} is out of range for x with {x.shape[0]} rows")
    return x[indices]


def scatter_rows(x: torch.Tensor, indices: torch.Tensor, num_rows: int) -> torch.Tensor:
    """x [N, ...], indices int64 [N] distinct, in [0, num_rows) -> out [num_rows, ...] with out[indices] = x, zeros
    elsewhere."""
    bad = _first_outside(indices, num_rows)
    if bad is not None:
        raise ValueError(f"scatter_rows: indices[{bad[0]}] = {bad[1]} is out of range for num_rows = {num_rows}")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError("scatter_rows: indices must be distinct (their rows would race for one output row)")
    out = x.new_zeros((num_rows,) + tuple(x.shape[1:]))
    return out.index_put((indices,), x)


def pack_mask(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_mask [B, L] (nonzero = real token) -> slots int64 [B * L] (the real tokens' slots of the flattened
    mask in order, then the padding's), cu_seqlens int32 [B + 1], stats int64 [5]: the real tokens T, the longest
    row's count, the slot of the first real entry other than 1 (-1: none), the first row without a real token (-1:
    none), and 1 where some row's first column is padding (else 0)."""
    b, l = attention_mask.shape
    flat = attention_mask.reshape(-1)
    real = flat != 0
    slots = torch.cat([real.nonzero().flatten(), (~real).nonzero().flatten()])
    counts = real.reshape(b, l).sum(1)
    cu_seqlens = F.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)
    other, empty = (real & (flat != 1)).nonzero(), (counts == 0).nonzero()
    stats = [int(counts.sum()), int(counts.max()) if b else 0, int(other[0]) if other.numel() else -1,
             int(empty[0]) if empty.numel() else -1, int(bool((attention_mask[:, 0] == 0).any())) if l else 0]
    return slots, cu_seqlens, torch.tensor(stats, dtype=torch.int64, device=attention_mask.device)


def token_embeddings(input_ids: torch.Tensor, indices: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                     word: torch.Tensor, position: torch.Tensor | None, token_type: torch.Tensor | None,
                     weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm(word[id] + token_type[type] + position[column]) of the tokens at `indices` (slots of the flattened
    input_ids [B, L]; None: every slot) -> [T, E] in word's dtype. A token's type is 0 without token_type_ids, its
    position its column in input_ids."""
    slots = indices if indices is not None else torch.arange(input_ids.numel(), device=input_ids.device)
    bad = _first_outside(slots, input_ids.numel())
    if bad is not None:
        raise ValueError(f"token_embeddings: indices[{bad[0]}] = {bad[1]} is out of range for input_ids of "
                         f"{input_ids.numel()} slots")
    for name, ids, table in (("input_ids", input_ids, word), ("token_type_ids", token_type_ids, token_type)):
        if ids is not None and table is not None and _first_outside(ids.reshape(-1)[slots], table.shape[0]):
            raise ValueError(f"token_embeddings: {name} hold values outside [0, {table.shape[0]})")
    x = _acc(word)[input_ids.reshape(-1)[slots].long()]
    if token_type is not None:
        types = token_type_ids.reshape(-1)[slots].long() if token_type_ids is not None else torch.zeros_like(slots)
        x = x + _acc(token_type)[types]
    if position is not None:
        x = x + _acc(position)[slots % input_ids.shape[1]]
    return F.layer_norm(x, (x.shape[-1],), _acc(weight), _acc(bias) if bias is not None else None, eps).to(word.dtype)


# ---- int8 products ----------------------------------------------------------------------------------------------


def quantize_rows(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row of x * smooth as uint8 with an fp32 scale and an integer zero in [0, 255]: x * smooth ~= scale *
    (q - zero), asymmetric over [min(row, 0), max(row, 0)], ties rounded to even; a row holding NaN or an infinity
    gets a NaN scale (it dequantizes to NaN).  x [N, K], smooth fp32 [K] -> q uint8 [N, K], scale, zero fp32 [N]."""
    v = x.float() * smooth
    lo = v.amin(1).clamp(max=0)
    hi = v.amax(1).clamp(min=0)
    scale = torch.where(v.isfinite().all(1), (hi - lo) / 255, torch.nan)
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    zero = torch.round(-lo * inv)
    q = (torch.round(v * inv[:, None]) + zero[:, None]).clamp(0, 255).to(torch.uint8)
    return q, scale, zero


def int8_sums(q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] @ weight int8 [M, K]^T, exact in int64 -> [N, M]."""
    return q.long() @ weight.long().T


def unpack_int8_panels(panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """The int8 weight [out_features, 4 * K4] of int8_panel_sums' panels int8 [P, K4, 32, 4] (K padded with zeros to
    a multiple of 4)."""
    p, k4, width, group = panels.shape
    return panels.permute(0, 2, 1, 3).reshape(p * width, k4 * group)[:out_features]


def int8_panel_sums(q: torch.Tensor, panels: torch.Tensor, out_features: int) -> torch.Tensor:
    """q uint8 [N, K] @ W^T exact -> int32 [N, out_features], W = unpack_int8_panels(panels)."""
    w = unpack_int8_panels(panels, out_features)[:, : q.shape[1]]
    return int8_sums(q, w).to(torch.int32)


def _sums(acc, panels, weight_scale):
    """The integer sums for the product ops: acc itself, or with panels the sums of q = acc on them."""
    return acc if panels is None else int8_panel_sums(acc, panels, weight_scale.shape[0])


def _int8_product(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w) -> torch.Tensor:
    """scale * weight_scale * (acc - zero * weight_sum) + bias in fp32, the centred integer sums exact in fp64, plus
    outlier_x @ outlier_w where given."""
    centred = (acc.double() - zero.double()[:, None] * weight_sum.double()).float()
    out = centred * (scale[:, None] * weight_scale) + bias.float()
    return out if outlier_x is None else out + outlier_x @ outlier_w


def int8_linear(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels=None) -> torch.Tensor:
    """The dequantized product plus bias.  acc [N, M]: the integer sums q @ weight^T (int8_sums) of q uint8 [N, K]
    with scale, zero [N] (from quantize_rows) and an int8 weight [M, K] with weight_scale fp32 [M] and weight_sum
    fp32 [M] (its row sums); bias [M]; outlier_x fp32 [N, k] and outlier_w fp32 [k, M] or None: the fp32 part of the
    product over input channels left out of q -> [N, M] in bias's dtype. With panels (pack_int8_panels of the
    weight), acc is q itself and the sums are int8_panel_sums(q, panels, M); the same on the other product ops."""
    return _int8_product(_sums(acc, panels, weight_scale), scale, zero, weight_scale, weight_sum, bias, outlier_x,
                         outlier_w).to(bias.dtype)


def int8_linear_gelu_quantize(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, approximate,
                              smooth, keep, panels=None):
    """GELU of int8_linear, kept in fp32 and quantized again with the next product's smooth [M]: (q, scale, zero,
    kept), kept fp32 [N, len(keep)] the GELU output at the channels keep (int64 [k], or None: none)."""
    h = _gelu(_int8_product(_sums(acc, panels, weight_scale), scale, zero, weight_scale, weight_sum, bias, outlier_x,
                            outlier_w), approximate)
    kept = h[:, keep] if keep is not None else h.new_empty((h.shape[0], 0))
    return (*quantize_rows(h, smooth), kept)


def int8_linear_residual_layer_norm(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, residual,
                                    norm_weight, norm_bias, eps, panels=None):
    """LayerNorm(int8_linear in fp32 + residual) * norm_weight + norm_bias -> [N, M] in bias's dtype."""
    s = _int8_product(_sums(acc, panels, weight_scale), scale, zero, weight_scale, weight_sum, bias, outlier_x,
                      outlier_w) + residual.float()
    out = F.layer_norm(s, (s.shape[-1],), norm_weight.float(), norm_bias.float(), eps)
    return out.to(bias.dtype)


def int8_linear_residual_layer_norm_quantize(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w,
                                             residual, norm_weight, norm_bias, eps, smooth, panels=None):
    """int8_linear_residual_layer_norm's output y and quantize_rows(y, smooth): (y, q, scale, zero)."""
    y = int8_linear_residual_layer_norm(acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w,
                                        residual, norm_weight, norm_bias, eps, panels)
    return (y, *quantize_rows(y, smooth))


def int8_layers(x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, weights: list[torch.Tensor], heads: int,
                scale: float, eps: float, approximate: str, rel_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Post-norm (BERT) encoder layers with int8 products on packed tokens.  x [T, H]; weights: 32 per layer, for
    each of the QKV, attention output, intermediate and output products (panels, weight_scale, weight_sum, bias,
    smooth, outlier_index, outlier_weight), then the attention norm's and the output norm's weight and bias -> [T, H].
    Each product quantizes its input with its smooth (the LayerNorm and GELU epilogues quantize their outputs for the
    next product), takes the int8 sums on its panels and adds back, in fp32, its input at its outlier channels times
    outlier_weight."""
    t, h = x.shape
    per_layer = 32
    layers = [weights[i:i + per_layer] for i in range(0, len(weights), per_layer)]

    def product(w, q, outlier_x):
        panels, weight_scale, weight_sum, bias, _, index, outlier_weight = w
        outliers = (outlier_x, outlier_weight) if index.numel() else (None, None)
        return (*q, weight_scale, weight_sum, bias, *outliers), panels

    def gathered(x, w):
        return x.index_select(1, w[5]).float()

    q = quantize_rows(x, layers[0][4])
    for i, w in enumerate(layers):
        qkv_w, out_w, inner_w, ffn_w = (w[j:j + 7] for j in range(0, 28, 7))
        g1, b1, g2, b2 = w[28:]
        args, panels = product(qkv_w, q, gathered(x, qkv_w))
        qkv = int8_linear(*args, panels).view(t, 3, heads, h // heads)
        ctx = attention_varlen(qkv, cu_seqlens, max_seqlen, scale, rel_bias=rel_bias).reshape(t, h)
        args, panels = product(out_w, quantize_rows(ctx, out_w[4]), gathered(ctx, out_w))
        x, *q = int8_linear_residual_layer_norm_quantize(*args, x, g1, b1, eps, inner_w[4], panels)
        args, panels = product(inner_w, q, gathered(x, inner_w))
        *q, kept = int8_linear_gelu_quantize(*args, approximate, ffn_w[4], ffn_w[5], panels)
        args, panels = product(ffn_w, q, kept)
        if i + 1 == len(layers):
            x = int8_linear_residual_layer_norm(*args, x, g2, b2, eps, panels)
        else:
            x, *q = int8_linear_residual_layer_norm_quantize(*args, x, g2, b2, eps, layers[i + 1][4], panels)
    return x


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
              inverse: bool = False) -> torch.Tensor:
    """qkv [T, 3, heads, D] with its query and key heads rotated by the angles of each token's position (RoFormer,
    the half-split form of GPT-NeoX and HF's rotate_half); the value heads unchanged. cos, sin [P, D/2] fp32 of the
    angles; positions [T] ints < P. For i < D/2: out[i] = x[i] c - x[i + D/2] s, out[i + D/2] = x[i + D/2] c + x[i] s;
    inverse rotates by the negative angles (the backward)."""
    half = qkv.shape[-1] // 2
    qk = _acc(qkv[:, :2])
    c = cos[positions.long()].to(qk.dtype)[:, None, None, :]
    s = sin[positions.long()].to(qk.dtype)[:, None, None, :]
    if inverse:
        s = -s
    x1, x2 = qk[..., :half], qk[..., half:]
    rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(qkv.dtype)
    return torch.cat([rotated, qkv[:, 2:]], dim=1)


def geglu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU(a) * g for x = [a | g] split in halves along the last dim (Shazeer, "GLU Variants Improve Transformer",
    2020; ModernBERT's MLP).  x [..., 2I] -> [..., I]."""
    half = x.shape[-1] // 2
    a = _acc(x)
    return (_gelu(a[..., :half], approximate) * a[..., half:]).to(x.dtype)
