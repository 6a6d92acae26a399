"""int8 products for inference: per-token quantization of activations and int8 linears with fused epilogues.

An activation row x is stored as uint8 q with an fp32 scale and an integer zero in [0, 255], after multiplying it
by a per-channel smoothing vector: x * smooth ~= scale * (q - zero) (asymmetric, so rows that are mostly positive
keep all 256 levels). A weight is int8 [M, K] per output channel: weight_scale [M] and its row sums weight_sum [M].
A product is `int8_sums(q, zero, weight)`, the exact integer sums acc of q @ weight^T (or of (q - 128) @ weight^T)
with the zero point that goes with them, and an epilogue op that takes acc: scale * weight_scale * (acc - zero *
weight_sum) + bias, then GELU, LayerNorm, ... The products have no autograd: this is the inference path (see
mtbert_fast.models.int8 for how weights are quantized).

Where the CPU has AVX512-VNNI (and the AVX-512 kernels are loaded) every product's sums come from int8 panels of the
weight, packed once (`pack_int8_weight`, `pack_int8_panels`, `int8_panel_sums`: our kernel, whose vpdpbusd adds four
uint8 x int8 products into an int32 sum exactly, for any weight), which ran faster than oneDNN's int8 product at
every row count measured there (`panels_vnni`); where it also has AMX-INT8, the same panels multiply on its tiles
(`panels_on_tiles`). Elsewhere the sums run on oneDNN's int8 linear with the weight
packed once (`pack_int8_weight`), uint8 activations with zero point 0, scales 1 and fp32 output: the int32 sums,
converted to fp32 once. Each sum of a row of q (0..255) with weight row n lies in [255 * (sum of w[n]'s negative
entries), 255 * (sum of its positive ones)]; where every such bound is below 2^24 in magnitude, fp32 holds every sum
exactly. A weight past that bound (all-MiniLM-L6-v2's largest is 2^22.7, a random bert-base's 2^23.6:
docs/cpu-int8.md) is not packed, and its sums come from `torch._int_mm` in int32. oneDNN's uint8 x int8 product is
checked once against an exact one on inputs that overflow an int16 pair (CPUs without VNNI multiply through int16
and saturate). Where it fails, its sums are still exact for a weight whose neighbouring entries (columns 2i and
2i + 1, the pair the int16 step adds) of the same sign sum to at most PAIR_LIMIT (128) in magnitude, since 255 *
128 fits an int16: a second check confirms that oneDNN pairs the columns so here (`onednn_int8_pairs`), and
mtbert_fast.models.int8 then quantizes the weights to keep every pair within the limit (`pairs_safe`), and products
of at most PANEL_ROWS rows take their sums from int8 panels of the weight (`pack_int8_panels`, `int8_panel_sums`:
our kernel, which reads each weight once a call where oneDNN's, blocked for many rows, is slow at few). Any other
weight is packed for oneDNN's float32 product instead, which multiplies q and the weight widened to fp32: every
product and every partial sum is an integer below the same 2^24 bound, so those sums are exact too. That runs at the
float32 rate, where torch._int_mm on such a CPU (an AVX2 one) runs 20-30x slower, and the int8 product on pair-safe
weights at about twice it.
"""

from __future__ import annotations

import functools

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.registry import CACHE_LINE, CPU_DTYPES, Backend, Op, tile_rows_alias

_FLOATS = (torch.float32, torch.bfloat16)
_SUMS = (torch.int32, torch.float32)
# integers of magnitude up to 2^24 are exact in fp32
FP32_EXACT = 2**24
# the longest rows whose sums (up to 255 * 127 per entry) fit int32
MAX_K = (2**31 - 1) // (255 * 127)


def _check_vector(op: str, name: str, t: torch.Tensor, n: int, like: torch.Tensor, dtypes=(torch.float32,)) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but acc is on {like.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if t.shape != (n,):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected ({n},)")


def _check_outliers(op: str, acc: torch.Tensor, shape: tuple[int, int], outliers
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """outliers: None, or (outlier_x fp32 [rows, k], outlier_w fp32 [k, out]) for a product of `shape` (rows,
    out) -> the two op arguments."""
    if outliers is None:
        return None, None
    x, w = outliers
    for name, t in (("outlier_x", x), ("outlier_w", w)):
        if t.device != acc.device:
            raise ValueError(f"{op}: {name} is on {t.device} but acc is on {acc.device}")
        if t.dtype != torch.float32:
            raise TypeError(f"{op}: {name} must be torch.float32, got {t.dtype}")
    if x.dim() != 2 or x.shape[0] != shape[0]:
        raise ValueError(f"{op}: outlier_x must be [{shape[0]}, k] (acc's rows), got {tuple(x.shape)}")
    if w.shape != (x.shape[1], shape[1]):
        raise ValueError(f"{op}: outlier_w must be [{x.shape[1]}, {shape[1]}] (outlier_x's k, the product's "
                         f"columns), got {tuple(w.shape)}")
    return x, w


def _check_product(op, acc, scale, zero, weight_scale, weight_sum, bias, panels) -> tuple[int, int]:
    """Checks a product op's leading arguments -> its output's shape (rows, out): acc's, or with panels q's rows and
    weight_scale's length."""
    if panels is None:
        if acc.dtype not in _SUMS:
            raise TypeError(f"{op}: acc (the integer sums) must be torch.int32 or torch.float32, got {acc.dtype}")
        if acc.dim() != 2:
            raise ValueError(f"{op}: acc must be 2-D [rows, out], got shape {tuple(acc.shape)}")
        rows, out = acc.shape
    else:
        if weight_scale.dim() != 1 or weight_scale.shape[0] == 0:
            raise ValueError(f"{op}: weight_scale must be [out] with out > 0, got shape {tuple(weight_scale.shape)}")
        _check_panels(op, acc, panels, weight_scale.shape[0], "acc (with panels, the quantized input q)")
        rows, out = acc.shape[0], weight_scale.shape[0]
    _check_vector(op, "scale", scale, rows, acc)
    _check_vector(op, "zero", zero, rows, acc)
    _check_vector(op, "weight_scale", weight_scale, out, acc)
    _check_vector(op, "weight_sum", weight_sum, out, acc)
    _check_vector(op, "bias", bias, out, acc, _FLOATS)
    return rows, out


# ---- the integer sums -----------------------------------------------------------------------------------------


def sums_bound(weight: torch.Tensor) -> int:
    """The largest |sum| that uint8 rows (0..255) can make with the int8 weight [M, K]."""
    w = weight.to(torch.int64)
    return 255 * max(w.clamp(min=0).sum(1).max().item(), (-w).clamp(min=0).sum(1).max().item(), 0)


def _onednn_exact_at_255(w: torch.Tensor, rows: tuple[int, ...]) -> bool:
    """Whether oneDNN's int8 linear runs here and returns the exact sums of uint8 rows of 255 with the int8 weight w,
    for each count of rows in `rows`."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and hasattr(torch.ops.onednn, "qlinear_prepack")):
        return False
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, None)
        for m in rows:
            q = torch.full((m, w.shape[1]), 255, dtype=torch.uint8)
            if not torch.equal(_onednn_sums(q, packed, w.shape[0]), (q.to(torch.int64) @ w.to(torch.int64).T).float()):
                return False
    except (RuntimeError, TypeError):
        return False
    return True


@functools.cache
def onednn_int8_exact() -> bool:
    """Whether this torch's oneDNN int8 linear runs here and returns exact uint8 x int8 sums on values (255 x 127)
    whose pairs overflow int16."""
    w = torch.full((32, 64), 127, dtype=torch.int8)
    w[1::2] = -128 + 1
    return _onednn_exact_at_255(w, (5,))


# the largest |w[2i] + w[2i + 1]| of two entries of one sign for which 255 * it fits an int16 (255 * 128 = 32,640)
PAIR_LIMIT = 128


def pair_sums(weight: torch.Tensor) -> torch.Tensor:
    """Per row of weight [M, K] (int8 or float), the largest magnitude of a sum of two neighbouring entries (columns
    2i and 2i + 1) of the same sign: [M], in weight's dtype widened (int64 or fp32). An odd K's last column pairs
    with nothing."""
    w = weight if weight.is_floating_point() else weight.to(torch.int64)
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    even, odd = w[:, 0::2], w[:, 1::2]
    pos = even.clamp(min=0) + odd.clamp(min=0)
    neg = even.clamp(max=0) + odd.clamp(max=0)
    return torch.maximum(pos, -neg).amax(1) if w.shape[1] else w.new_zeros(w.shape[0])


def pairs_safe(weight: torch.Tensor) -> bool:
    """Whether every pair of neighbouring entries (columns 2i and 2i + 1) of one sign in the int8 weight sums to at
    most PAIR_LIMIT in magnitude: the weights whose uint8 products through int16 pairs cannot saturate."""
    return bool((pair_sums(weight) <= PAIR_LIMIT).all())


@functools.cache
def onednn_int8_pairs() -> bool:
    """Whether oneDNN's int8 linear runs here and returns exact sums for 255 x weights that are pairs_safe, at widths
    of one, a few and many rows, where some pairs sum to PAIR_LIMIT and the misaligned pairs (2i + 1, 2i + 2)
    would overflow: it adds columns 2i and 2i + 1 in int16, and nothing else there. True wherever
    onednn_int8_exact() is."""
    k = 70
    rows = [[127, 1, 0, 127], [64, 64, -64, -64], [-127, 0, 0, -127], [1, 127, 127, 1]]
    w = torch.tensor([(r * (k // 4 + 1))[:k] for r in rows] * 3, dtype=torch.int8)
    return _onednn_exact_at_255(w, (1, 5, 130))


def weight_pairs_limited() -> bool:
    """Whether the int8 weights should be quantized pairs_safe: where oneDNN's int8 product is exact only for such
    weights (CPUs without VNNI). Elsewhere any int8 weight runs on it."""
    return not onednn_int8_exact() and onednn_int8_pairs()


@functools.lru_cache(maxsize=64)
def _unit_weight_quantization(out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """oneDNN's per-channel weight scales (1) and zero points (0): made once per width, not on every product."""
    with torch.inference_mode(False):
        return torch.ones(out_features), torch.zeros(out_features, dtype=torch.int64)


def _onednn_sums(q: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    ones, zeros = _unit_weight_quantization(out_features)
    return torch.ops.onednn.qlinear_pointwise(q, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [],
                                              "")  # fmt: skip


@functools.cache
def _onednn_float32() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and \
        hasattr(torch.ops.mkldnn, "_linear_pointwise")


# ---- few rows: int8 panels ------------------------------------------------------------------------------------

PANEL = 32  # columns per panel (csrc/cpu/int8_panels.cpp's kPanel)
PANEL_GROUP = 4  # reduction entries of a column next to each other in a panel
# The most rows whose sums run on int8 panels (int8_panel_sums) rather than oneDNN's int8 product, where that is
# exact only for pairs_safe weights (CPUs without VNNI). benchmarks/int8_panels.py on a 2-core AVX2 EPYC (2 threads,
# all-MiniLM-L6-v2's and bert-base's shapes), the products alone, oneDNN's time over the panels': 2.9-4.3x at 1 row,
# 1.6-2.6x at 16, 1.1-1.6x at 64, 0.96-1.34x at 128, 0.80-1.16x at 1,024; whole forwards lost with a limit past 128.
PANEL_ROWS = 128


def _panel_kernel() -> bool:
    return _ext.has_kernel("int8_panel_sums", "CPU")


# Read once at import, so that torch.compile traces panels_vnni() as plain Python.
_PANELS_VNNI = _panel_kernel() and _ext.cpu_isa() == "avx512" and "avx512_vnni" in (_ext._cpu_flags() or set())


def panels_vnni() -> bool:
    """Whether int8_panel_sums multiplies with AVX512-VNNI here (the AVX-512 CPU kernels loaded on a CPU with it):
    there its sums are exact for any int8 weight, and the encoder takes the sums of every product from the panels
    (on AMX-INT8 tiles where panels_on_tiles; else of at most AMX_PANEL_ROWS rows where oneDNN's int8 product runs on
    AMX tiles: onednn_amx), which ran faster than oneDNN's int8 product at every shape and row count measured on a CPU
    without AMX (benchmarks/int8_panels.py, 2-core AMD EPYC with AVX512-VNNI, all-MiniLM-L6-v2's and bert-base's
    shapes, oneDNN's time over the panels': 1.3-2.8x at 16 rows, 1.1-1.7x at 128, 1.00-1.11x at 1,024; whole int8
    forwards 1.05x at B=8 L=128, 1.10-1.46x at B=1)."""
    return _PANELS_VNNI


# The most rows whose sums come from VNNI panels where oneDNN's int8 product runs on AMX tiles (onednn_amx) and the
# panels do not (panels_on_tiles); more go to oneDNN. benchmarks/int8_panels.py on a 2-core Intel Xeon with AMX (family
# 6 model 207), 2 threads, all-MiniLM-L6-v2's and bert-base's shapes on VNNI panels, the products alone, oneDNN's time
# over the panels': 1.6-3.3x at 16 rows, 0.76-2.0x at 64, 0.75-1.6x at 128, 0.63-1.08x at 256, 0.54-0.78x at 1,024.
AMX_PANEL_ROWS = 128


_AMX_INT8 = "amx_int8" in (_ext._cpu_flags() or set())


def onednn_amx() -> bool:
    """Whether products of many rows of a weight whose panels do not run on AMX tiles (panels_on_tiles) run on oneDNN's
    int8 product rather than the VNNI panels (panels_vnni): the CPU has AMX-INT8, whose tiles oneDNN multiplies on, and
    that product is exact here (onednn_int8_exact)."""
    return panels_vnni() and _AMX_INT8 and onednn_int8_exact()


def panels_on_tiles(k: int) -> bool:
    """Whether the int8 panels of a weight of k input features multiply on AMX-INT8 tiles here (TDPBUSD: the same
    exact int32 sums): the CPU has AMX-INT8 and VNNI (panels_vnni), the process may use the tiles (`ops.cpu_amx()`),
    and the panels' groups of four entries come in whole steps of 16 (ceil(k / 4) a multiple of 16). Every product of
    such a weight runs on its panels, whatever its rows: those of 16 rows and more on the tiles, fewer on VNNI (which
    ran 1-4 rows up to 2x faster). benchmarks/int8_panels.py on a 2-core Intel Xeon with AMX (family 6 model 207), 2
    threads, all-MiniLM-L6-v2's and bert-base's shapes, the products alone, oneDNN's int8 product's time over the
    tiles': 1.5-2.4x at 16 rows, 1.3-2.0x at 64, 1.1-1.7x at 128, 1.0-1.5x at 256, 0.74-1.68x at 1,024 (bert-base's
    QKV and FFN input, each block of 128 rows reading the whole weight from L3, the slowest); whole int8 forwards at
    16-1,024 tokens, every product on the VNNI panels over the tiles: MiniLM 1.07-1.59x, bert-base 1.68-2.08x; on
    oneDNN's int8 product 0.97-1.04x. Decided when a weight is packed: `cpu_amx(False)` afterwards runs its panels on
    VNNI."""
    return panels_vnni() and _AMX_INT8 and -(-k // PANEL_GROUP) % 16 == 0 and _ext.cpu_amx()


def pack_int8_panels(weight: torch.Tensor) -> torch.Tensor:
    """The int8 weight [N, K] as int8_panel_sums' panels: int8 [P, K4, PANEL, PANEL_GROUP], P = ceil(N / PANEL) and
    K4 = ceil(K / PANEL_GROUP), with the PANEL_GROUP entries k = 4j..4j+3 of each column next to each other; columns
    past N and entries past K are zero. Without VNNI (panels_vnni) the weight must be pairs_safe: the kernel then
    adds neighbouring pairs in int16."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or 0 in weight.shape:
        raise TypeError(f"pack_int8_panels: weight must be a non-empty 2-D torch.int8 tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)}")
    if not panels_vnni() and not pairs_safe(weight):
        raise ValueError(f"pack_int8_panels: the weight has neighbouring entries (columns 2i, 2i + 1) of one sign "
                         f"summing to {int(pair_sums(weight).max())} in magnitude, past PAIR_LIMIT ({PAIR_LIMIT}), "
                         "where int16 pair sums would saturate; quantize it with pairs (mtbert_fast.models.int8's "
                         "quantize_linear(..., pairs=True)) or take its sums from int8_sums")
    n, k = weight.shape
    p, k4 = -(-n // PANEL), -(-k // PANEL_GROUP)
    w = torch.nn.functional.pad(weight.detach(), (0, k4 * PANEL_GROUP - k, 0, p * PANEL - n))
    return w.view(p, PANEL, k4, PANEL_GROUP).permute(0, 2, 1, 3).contiguous()


def _check_panels(op: str, q: torch.Tensor, panels: torch.Tensor, out_features: int, what: str = "q") -> None:
    """Checks q uint8 [N, K] and the panels of an [out_features, K] weight; without VNNI, that the panels hold a
    pairs_safe weight (a pass over them: the encoder calls the kernels directly on panels it packed)."""
    if q.dtype != torch.uint8 or q.dim() != 2:
        raise TypeError(f"{op}: {what} must be a 2-D torch.uint8 tensor (from quantize_rows), got {q.dtype} "
                        f"{tuple(q.shape)}")
    if panels.device != q.device:
        raise ValueError(f"{op}: panels are on {panels.device} but q is on {q.device}")
    want = (-(-out_features // PANEL), -(-q.shape[1] // PANEL_GROUP), PANEL, PANEL_GROUP)
    if panels.dtype != torch.int8 or tuple(panels.shape) != want:
        raise ValueError(f"{op}: panels must be torch.int8 of shape {want} for q of {q.shape[1]} columns and "
                         f"{out_features} out_features (pack_int8_panels of an [{out_features}, {q.shape[1]}] "
                         f"weight), got {panels.dtype} {tuple(panels.shape)}")
    if q.shape[1] > MAX_K:
        raise ValueError(f"{op}: rows of {q.shape[1]} entries can sum past int32; at most {MAX_K} are taken")
    if not panels_vnni():  # VNNI's sums are exact for any weight
        safe = (pair_sums(reference.unpack_int8_panels(panels, out_features)) <= PAIR_LIMIT).all()
        message = (f"{op}: the panels hold neighbouring entries of one sign summing past PAIR_LIMIT ({PAIR_LIMIT}) "
                   "in magnitude, whose int16 pair sums would saturate (pack_int8_panels refuses such weights)")
        if torch.compiler.is_compiling():
            torch._assert_async(safe, message)  # a check on the data that a compiled graph keeps
        elif not safe:
            raise ValueError(message)


def int8_panel_sums(q: torch.Tensor, panels: torch.Tensor, out_features: int, *, backend: str | None = None
                    ) -> torch.Tensor:
    """The exact integer sums q @ W^T of q uint8 [N, K] with W int8 [out_features, K], panels = pack_int8_panels(W):
    int32 [N, out_features], for int8_linear and the other epilogues as acc (with quantize_rows' zero). For few rows,
    where oneDNN's int8 product, blocked for many, reads the weights slowly, and for any number of rows with VNNI
    (panels_vnni). Without VNNI, checks that the panels hold a pairs_safe weight (a pass over them: the encoder calls
    the kernel directly on panels it packed)."""
    op = "int8_panel_sums"
    if out_features <= 0:
        raise ValueError(f"{op}: out_features must be positive, got {out_features}")
    _check_panels(op, q, panels, out_features)
    return INT8_PANEL_SUMS(q, panels, out_features, backend=backend)


class PackedInt8Weight:
    """An int8 weight [M, K] packed for its products. With VNNI (panels_vnni): its int8 panels (`panels`), on which
    every product runs (`all_rows`; on AMX-INT8 tiles where panels_on_tiles), and nothing of oneDNN's; or, where oneDNN
    multiplies on AMX tiles (onednn_amx), the panels do not (panels_on_tiles false) and oneDNN's float32 sums of this
    weight are exact (sums_bound below FP32_EXACT: `amx`), those panels for products of
    at most AMX_PANEL_ROWS rows and oneDNN's int8 product for the others. Else oneDNN's packed copy (`tensor`, an
    opaque tensor, which has no storage to copy or save): for its int8 product where that is exact here for this
    weight (on any weight, or on pairs_safe ones), else (`float_sums`) the weight widened to fp32 for its float32
    product; where oneDNN's int8 product is exact only for pairs_safe weights and the weight is one, also its int8
    panels, on which products of at most PANEL_ROWS rows run. It is never written, so copies of a model share it;
    pickling stores the plain weight and packs it again on loading (on the route of that machine)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.amx = onednn_amx() and not panels_on_tiles(weight.shape[1]) and sums_bound(weight) < FP32_EXACT
        self.all_rows = panels_vnni() and not self.amx
        pairs = not panels_vnni() and not onednn_int8_exact() and onednn_int8_pairs() and pairs_safe(weight)
        self.float_sums = not (panels_vnni() or onednn_int8_exact() or pairs)
        if self.all_rows:
            self.tensor = None
        elif self.float_sums:
            self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.float())
        else:
            self.tensor = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
        self.panels = pack_int8_panels(weight) if panels_vnni() or (pairs and _panel_kernel()) else None

    def __deepcopy__(self, memo) -> PackedInt8Weight:
        return self

    def __reduce__(self):
        return PackedInt8Weight, (self.weight,)


def pack_int8_weight(weight: torch.Tensor) -> PackedInt8Weight | None:
    """The int8 weight [M, K] packed for `int8_sums` (PackedInt8Weight): as VNNI panels, whose int32 sums are exact
    for any weight, or in oneDNN's layout; None for oneDNN where its sums would not be exact in fp32 or neither its
    int8 product (exact) nor its float32 one runs here."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise TypeError(f"pack_int8_weight: weight must be a 2-D torch.int8 tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)}")
    if weight.device.type != "cpu":
        return None
    if not panels_vnni() and (sums_bound(weight) >= FP32_EXACT or not (onednn_int8_exact() or _onednn_float32())):
        return None
    return PackedInt8Weight(weight)


def int8_sums(q: torch.Tensor, zero: torch.Tensor, weight: torch.Tensor, packed: PackedInt8Weight | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer sums of the product of q uint8 [N, K] (zero fp32 [N], from quantize_rows) with weight int8 [M, K],
    exact, and the zero point they go with: (acc [N, M], zero' [N]) with acc - zero' * weight_sum = (q - zero) @
    weight^T. On `packed` (pack_int8_weight of weight): oneDNN's fp32 sums of q (its int8 product, or its float32
    one on q widened), or the int32 sums of its int8 panels where sums_panels takes them, and zero itself. Else
    torch._int_mm's int32 sums of q - 128 (int8), and zero - 128."""
    if q.dtype != torch.uint8 or q.dim() != 2:
        raise TypeError(f"int8_sums: q must be a 2-D torch.uint8 tensor (from quantize_rows), got {q.dtype} "
                        f"{tuple(q.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] != q.shape[1]:
        raise ValueError(f"int8_sums: weight must be torch.int8 [out, {q.shape[1]}] (q's last dim), got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if q.shape[1] > MAX_K:
        raise ValueError(f"int8_sums: rows of {q.shape[1]} entries can sum past int32; at most {MAX_K} are taken")
    return int8_sums_unchecked(q, zero, weight, packed)


def sums_panels(packed: PackedInt8Weight | None, rows: int) -> torch.Tensor | None:
    """The int8 panels that the sums of a product of `rows` rows on `packed` come from (every row count with VNNI, at
    most AMX_PANEL_ROWS where oneDNN's product takes more, else at most PANEL_ROWS where the weight has panels), or
    None where they come from elsewhere."""
    if packed is None or packed.panels is None:
        return None
    if packed.all_rows or rows <= (AMX_PANEL_ROWS if packed.amx else PANEL_ROWS):
        return packed.panels
    return None


def int8_sums_unchecked(q, zero, weight, packed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8_sums without its argument checks, for callers that made q and the weight themselves (the int8 layer)."""
    if packed is not None:
        if sums_panels(packed, q.shape[0]) is not None:
            # the kernel directly in eager (it checks its arguments itself), the op with its fake under torch.compile
            if torch.compiler.is_compiling():
                return INT8_PANEL_SUMS(q, packed.panels, weight.shape[0], backend="cpu"), zero
            return INT8_PANEL_SUMS.kernel("cpu")(q, packed.panels, weight.shape[0]), zero
        if packed.float_sums:
            return torch.ops.mkldnn._linear_pointwise(q.float(), packed.tensor, None, "none", [], ""), zero
        return _onednn_sums(q, packed.tensor, weight.shape[0]), zero
    # _int_mm multiplies int8 by int8: q - 128 as int8 is q with its top bit flipped
    return torch._int_mm(torch.bitwise_xor(q.view(torch.int8), -128), weight.t()), zero - 128


def quantize_rows(x: torch.Tensor, smooth: torch.Tensor, *, backend: str | None = None):
    """x [N, K] (float32 / bfloat16), smooth fp32 [K] -> (q uint8 [N, K], scale fp32 [N], zero fp32 [N]) with
    x * smooth ~= scale * (q - zero). On the CPU q's rows stand quantized_row_stride(N, K) apart, which is more than K
    (q not contiguous) where rows of K bytes would alias in the int8 panels' cache; so do the quantizing epilogues'."""
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


def int8_linear(acc, scale, zero, weight_scale, weight_sum, bias, *, outliers=None, panels=None,
                backend: str | None = None):
    """The dequantized product plus bias: acc [N, M] (int8_sums), scale, zero [N] (quantize_rows), weight_scale,
    weight_sum fp32 [M] -> [N, M] in bias's dtype (float32 / bfloat16). outliers: (outlier_x fp32 [N, k],
    outlier_w fp32 [k, M]), the fp32 part of the product over input channels left out of q, added to every output:
    + outlier_x @ outlier_w. panels: the weight's int8 panels (pack_int8_panels); acc is then the quantized input q
    uint8 [N, K] itself and the op takes its sums, int8_panel_sums(q, panels, M), a block of rows at a time, each
    block's sums handed to the epilogue while they are in cache instead of stored. The same keywords on the other
    product ops."""
    op = "int8_linear"
    shape = _check_product(op, acc, scale, zero, weight_scale, weight_sum, bias, panels)
    ox, ow = _check_outliers(op, acc, shape, outliers)
    return INT8_LINEAR(acc, scale, zero, weight_scale, weight_sum, bias, ox, ow, panels, backend=backend)


def int8_linear_gelu_quantize(acc, scale, zero, weight_scale, weight_sum, bias, approximate: str,
                              smooth: torch.Tensor, *, outliers=None, keep: torch.Tensor | None = None,
                              panels=None, backend: str | None = None):
    """GELU(product + bias) in fp32, quantized again for the next product with its smooth [M]:
    (q uint8 [N, M], scale, zero fp32 [N], kept fp32 [N, len(keep)]). The float activation is never stored, except
    at the channels `keep` (int64 [k]; none where None), returned in `kept` for the next product's outliers (the
    kernel refuses a channel outside [0, M))."""
    op = "int8_linear_gelu_quantize"
    check_gelu(op, approximate)
    shape = _check_product(op, acc, scale, zero, weight_scale, weight_sum, bias, panels)
    _check_vector(op, "smooth", smooth, shape[1], acc)
    ox, ow = _check_outliers(op, acc, shape, outliers)
    if keep is not None:
        if keep.dtype != torch.int64 or keep.dim() != 1 or keep.device != acc.device:
            raise TypeError(f"{op}: keep must be a 1-D torch.int64 tensor on {acc.device}, got {keep.dtype} "
                            f"{tuple(keep.shape)} on {keep.device}")
    return INT8_LINEAR_GELU_QUANTIZE(acc, scale, zero, weight_scale, weight_sum, bias, ox, ow, approximate, smooth,
                                     keep, panels, backend=backend)


def _check_residual_layer_norm(op, acc, shape, bias, residual, norm_weight, norm_bias) -> None:
    if tuple(residual.shape) != shape:
        raise ValueError(f"{op}: residual has shape {tuple(residual.shape)}, expected {shape} (the product's)")
    if residual.device != acc.device or residual.dtype != bias.dtype:
        raise TypeError(f"{op}: residual must be {bias.dtype} (bias's dtype) on {acc.device}, got {residual.dtype} "
                        f"on {residual.device}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vector(op, name, t, shape[1], acc, (bias.dtype, torch.float32))


def int8_linear_residual_layer_norm(acc, scale, zero, weight_scale, weight_sum, bias, residual, norm_weight,
                                    norm_bias, eps: float, *, outliers=None, panels=None, backend: str | None = None):
    """LayerNorm(product + bias + residual) * norm_weight + norm_bias, in fp32 -> [N, M] in bias's dtype.
    residual [N, M] in bias's dtype; norm_weight, norm_bias [M] in bias's dtype or float32."""
    op = "int8_linear_residual_layer_norm"
    shape = _check_product(op, acc, scale, zero, weight_scale, weight_sum, bias, panels)
    _check_residual_layer_norm(op, acc, shape, bias, residual, norm_weight, norm_bias)
    ox, ow = _check_outliers(op, acc, shape, outliers)
    return INT8_LINEAR_RESIDUAL_LAYER_NORM(acc, scale, zero, weight_scale, weight_sum, bias, ox, ow, residual,
                                           norm_weight, norm_bias, eps, panels, backend=backend)


def int8_linear_residual_layer_norm_quantize(acc, scale, zero, weight_scale, weight_sum, bias, residual, norm_weight,
                                             norm_bias, eps: float, smooth: torch.Tensor, *, outliers=None,
                                             panels=None, backend: str | None = None):
    """int8_linear_residual_layer_norm's output y, and y quantized for the next product with its smooth [M], in the
    same pass: (y [N, M] in bias's dtype, q uint8 [N, M], scale, zero fp32 [N]), q as quantize_rows(y, smooth)."""
    op = "int8_linear_residual_layer_norm_quantize"
    shape = _check_product(op, acc, scale, zero, weight_scale, weight_sum, bias, panels)
    _check_residual_layer_norm(op, acc, shape, bias, residual, norm_weight, norm_bias)
    _check_vector(op, "smooth", smooth, shape[1], acc)
    ox, ow = _check_outliers(op, acc, shape, outliers)
    return INT8_LINEAR_RESIDUAL_LAYER_NORM_QUANTIZE(acc, scale, zero, weight_scale, weight_sum, bias, ox, ow,
                                                    residual, norm_weight, norm_bias, eps, smooth, panels,
                                                    backend=backend)


def quantized_row_stride(rows: int, k: int, device: torch.device) -> int:
    """The row stride of the quantized rows [rows, k] that the CPU kernels write (quantize_rows and the quantizing
    epilogues): k, or k + 64 where k bytes span a multiple of 4 KiB and a VNNI tile takes more than 8 rows. A tile
    reads its rows side by side, and rows 4 KiB apart fall into one set of an 8-way L1 cache: the next product reads
    rows one cache line further apart without a copy (at K=4096 the aliased rows ran at 0.72-0.77x the sums' rate)."""
    apart = device.type == "cpu" and panels_vnni() and tile_rows_alias(min(rows, 12), k)  # a VNNI tile: 12 rows
    return k + CACHE_LINE if apart else k


def _fake_quantized(x):
    n, k = x.shape
    q = x.new_empty_strided((n, k), (quantized_row_stride(n, k, x.device), 1), dtype=torch.uint8)
    return q, x.new_empty((n,), dtype=torch.float32), x.new_empty((n,), dtype=torch.float32)


def _product_shape(acc, weight_scale, panels):
    """A product op's output shape: acc's, or with panels q's rows and weight_scale's length."""
    return (acc.shape[0], weight_scale.shape[0]) if panels is not None else acc.shape


def _fake_product(acc, weight_scale, bias, panels):
    return acc.new_empty(_product_shape(acc, weight_scale, panels), dtype=bias.dtype)


def _fake_quantized_product(acc, weight_scale, panels):
    return _fake_quantized(acc.new_empty(_product_shape(acc, weight_scale, panels), dtype=torch.uint8))


_PRODUCT = ("Tensor acc, Tensor scale, Tensor zero, Tensor weight_scale, Tensor weight_sum, Tensor bias, "
            "Tensor? outlier_x, Tensor? outlier_w")
_RESIDUAL_LAYER_NORM = "Tensor residual, Tensor norm_weight, Tensor norm_bias, float eps"
# last, so that the products' other arguments keep their places: with panels, acc is the quantized input q
_PANELS = "Tensor? panels"
# the products' main input is acc (integer sums): their kernels take any activation dtype the checks above let through
_PRODUCT_BACKENDS = {"cpu": Backend(dtypes=None)}

QUANTIZE_ROWS = Op(
    name="quantize_rows",
    schema="(Tensor x, Tensor smooth) -> (Tensor, Tensor, Tensor)",
    reference=reference.quantize_rows,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=lambda x, smooth: _fake_quantized(x),
    result_outputs=3,
)

INT8_PANEL_SUMS = Op(
    name="int8_panel_sums",
    schema="(Tensor q, Tensor panels, int out_features) -> Tensor",
    reference=reference.int8_panel_sums,
    backends={"cpu": Backend(dtypes=None)},
    fake=lambda q, panels, out_features: q.new_empty((q.shape[0], out_features), dtype=torch.int32),
)

INT8_LINEAR = Op(
    name="int8_linear",
    schema=f"({_PRODUCT}, {_PANELS}) -> Tensor",
    reference=reference.int8_linear,
    backends=_PRODUCT_BACKENDS,
    fake=lambda acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels: _fake_product(
        acc, weight_scale, bias, panels),
)

INT8_LINEAR_GELU_QUANTIZE = Op(
    name="int8_linear_gelu_quantize",
    schema=f"({_PRODUCT}, str approximate, Tensor smooth, Tensor? keep, {_PANELS}) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=reference.int8_linear_gelu_quantize,
    backends=_PRODUCT_BACKENDS,
    fake=lambda acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, approximate, smooth, keep,
    panels: (*_fake_quantized_product(acc, weight_scale, panels),
                  acc.new_empty((acc.shape[0], 0 if keep is None else keep.shape[0]), dtype=torch.float32)),
    result_outputs=4,
)

INT8_LINEAR_RESIDUAL_LAYER_NORM = Op(
    name="int8_linear_residual_layer_norm",
    schema=f"({_PRODUCT}, {_RESIDUAL_LAYER_NORM}, {_PANELS}) -> Tensor",
    reference=reference.int8_linear_residual_layer_norm,
    backends=_PRODUCT_BACKENDS,
    fake=lambda acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, residual, norm_weight,
    norm_bias, eps, panels: _fake_product(acc, weight_scale, bias, panels),
)

INT8_LINEAR_RESIDUAL_LAYER_NORM_QUANTIZE = Op(
    name="int8_linear_residual_layer_norm_quantize",
    schema=f"({_PRODUCT}, {_RESIDUAL_LAYER_NORM}, Tensor smooth, {_PANELS}) -> (Tensor, Tensor, Tensor, Tensor)",
    reference=reference.int8_linear_residual_layer_norm_quantize,
    backends=_PRODUCT_BACKENDS,
    fake=lambda acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, residual, norm_weight,
    norm_bias, eps, smooth, panels: (_fake_product(acc, weight_scale, bias, panels),
                                          *_fake_quantized_product(acc, weight_scale, panels)),
    result_outputs=4,
)
