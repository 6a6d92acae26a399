"""The int8 ops on every backend that runs here, against the reference: quantize_rows, the integer sums of a product
(int8_sums, on oneDNN's packed weight and on torch._int_mm) and the four epilogues that read them (int8_linear,
int8_linear_gelu_quantize, int8_linear_residual_layer_norm and its _quantize form). All have the same backends (a
C++ kernel on the CPU), so the `backend` fixture of quantize_rows serves them all.

The integer sums are exact on every route; what may differ is the fp32 epilogue's rounding order (1e-6 relative)
and, in a requantized output, a level where the kernel's GELU or LayerNorm and PyTorch's differ in the last bits
right at a rounding boundary."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from mtbert_fast import ops
from mtbert_fast.ops import int8 as int8_ops
from mtbert_fast.ops import reference
from mtbert_fast.ops.int8 import (
    FP32_EXACT, MAX_K, PAIR_LIMIT, onednn_int8_exact, onednn_int8_pairs, pairs_safe, sums_bound,
)
from op_testing import num_threads, rand

OP_NAME = "quantize_rows"
SHAPES = [(0, 8), (1, 1), (5, 7), (37, 31), (19, 768), (3, 1000)]
# the epilogues take the sums as int32 (torch._int_mm) or as fp32 holding them exactly (oneDNN)
SUM_DTYPES = [torch.int32, torch.float32]


def _rows(n, k, dtype, seed=0):
    """Rows of every kind the quantization meets: mixed signs, all positive, all negative, all zero, one outlier."""
    x = rand(n, k, seed=seed, scale=2.0)
    if n >= 5:
        x[1] = x[1].abs()
        x[2] = -x[2].abs()
        x[3] = 0.0
        x[4, k // 2] = 60.0
    return x.to(dtype)


def _weights(m, k, seed=3):
    w = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed))
    scale = rand(m, seed=seed + 1).abs() * 0.01 + 1e-3
    return w, scale, w.float().sum(1)


def _product_args(n, k, m, dtype, sums=torch.int32):
    """(acc, scale, zero, weight_scale, weight_sum, bias): the sums of n quantized rows of k with a weight of m
    outputs, in `sums`."""
    q, scale, zero = reference.quantize_rows(_rows(n, k, torch.float32), torch.ones(k))
    w, ws, wsum = _weights(m, k)
    return (reference.int8_sums(q, w).to(sums), scale, zero, ws, wsum, rand(m, seed=7, dtype=dtype))


def _outliers(n, m, on, seed=13):
    """(outlier_x [n, 3], outlier_w [3, m]) in fp32 where `on`, else (None, None): the fp32 part of a product over
    three input channels left out of the int8 one (large, as outliers are)."""
    if not on:
        return None, None
    return rand(n, 3, seed=seed, scale=20.0), rand(3, m, seed=seed + 1, scale=0.05)


def _with_outliers(args, outliers):
    """The reference's positional arguments: the six product arguments, outlier_x, outlier_w, then the rest."""
    return (*args[:6], *outliers, *args[6:])


def _op_outliers(backend, outliers):
    return None if outliers[0] is None else backend.to(*outliers)


def _assert_quantized_close(got, want, max_level_diff=0, what="q"):
    q, scale, zero = got
    rq, rscale, rzero = want
    torch.testing.assert_close(scale, rscale, rtol=1e-6, atol=0, msg=lambda m: f"{what} scale: {m}")
    assert (zero - rzero).abs().max().item() <= max_level_diff if zero.numel() else True, f"{what} zero"
    diff = (q.int() - rq.int()).abs()
    assert diff.numel() == 0 or diff.max().item() <= max_level_diff, f"{what}: levels differ by {diff.max().item()}"


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows(backend, dtype, shape):
    n, k = shape
    x = _rows(n, k, dtype)
    smooth = rand(k, seed=5).abs() + 0.5
    got = backend.forward(*backend.to(x, smooth))
    want = reference.quantize_rows(x, smooth)
    assert got[0].dtype == torch.uint8 and got[1].dtype == got[2].dtype == torch.float32
    _assert_quantized_close(got, want)
    q, scale, zero = got
    if n:
        # dequantized within half a level of the input; a row of zeros comes back as zeros
        back = scale[:, None] * (q.float() - zero[:, None])
        assert ((back - x.float() * smooth).abs() <= scale[:, None] * 0.5 + 1e-6).all()
    if n >= 5:
        assert scale[3] == 0 and (scale[3] * (q[3].float() - zero[3]) == 0).all()
        # an all-positive row spends every level on [0, max]; an all-negative one on [min, 0]
        assert zero[1] == 0 and q[1].max() == 255
        assert zero[2] == 255 and q[2].min() == 0


def test_quantize_rows_rounds_ties_to_even_and_clamps(backend):
    # scale 1 and zero 0 (range [0, 255]): every x.5 is a tie, rounded to the even neighbour; scale 2 and zero 128
    # (range [-256, 254]): the ends land on 0 and 255 exactly
    halves = torch.tensor([0.5, 1.5, 2.5, 3.5, 126.5, 127.5, 253.5, 254.5])
    x = torch.zeros(2, 12)
    x[0, :8], x[0, 8:] = halves, torch.tensor([0.0, 255.0, 254.49998, 0.50001])
    x[1, :4] = torch.tensor([-256.0, 254.0, -1.0, 1.0])
    x[1, 4:] = torch.tensor([-255.0, -3.0, 3.0, 5.0, 7.0, 251.0, 253.0, -253.0])
    q, scale, zero = backend.forward(*backend.to(x, torch.ones(12)))
    want = reference.quantize_rows(x, torch.ones(12))
    _assert_quantized_close((q.cpu(), scale.cpu(), zero.cpu()), want)
    assert scale.tolist() == [1.0, 2.0] and zero.tolist() == [0.0, 128.0]
    assert q[0].tolist() == [0, 2, 2, 4, 126, 128, 254, 254, 0, 255, 254, 1]
    assert q[1, :4].tolist() == [0, 255, 128, 128]  # -0.5 and 0.5 round to 0, both sides of the zero point
    assert q[1, 4:].tolist() == [0, 126, 130, 130, 132, 254, 254, 2]


# ---- the integer sums ------------------------------------------------------------------------------------------


# the most entries of 255 x 127 whose sum stays below 2^24 (255 * 127 * 518 = 16,775,130)
_MOST_EXACT = 518


def _extreme(n, k, m, seed=0):
    """q and a weight at the ends of their ranges (0 / 255 against -127 / 127), the rest random: q's row 0 is all
    255, weight rows 0 and 1 are 127 and -127 on their first _MOST_EXACT entries, so that their sums reach the
    largest that fp32 holds exactly where k >= _MOST_EXACT."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    w = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    q[0] = 255
    for row, value in ((0, 127), (1, -127))[:m]:
        w[row] = 0
        w[row, :_MOST_EXACT] = value
    return q, w


def _pairs_safe_extreme(n, k, m, seed=0):
    """_extreme's q with a pairs_safe weight at the ends of its range: rows 0 and 1 alternate 127 and 1 (-127 and -1)
    on their first _MOST_EXACT entries, so that every pair of them sums to PAIR_LIMIT, the rest random in pairs that
    stay within it."""
    q, _ = _extreme(n, k, m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randint(-64, 65, (m, k), dtype=torch.int8, generator=g)
    for row, value in ((0, 1), (1, -1))[:m]:
        w[row] = 0
        w[row, :_MOST_EXACT] = value
        w[row, :_MOST_EXACT:2] = 127 * value
    assert pairs_safe(w)
    return q, w


@pytest.mark.parametrize("route", ["vnni-panels", "vnni-amx", "onednn-int8", "onednn-int8-pairs", "int8-panels",
                                   "onednn-float32"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (37, 64, 96), (2, _MOST_EXACT, 4), (1, 768, 2304),
                                   (130, 96, 40), (9, 300, 7)])
def test_int8_sums_are_exact(shape, route, monkeypatch):
    """Every route of int8_sums equals the int64 product, on values at the ends of both ranges: oneDNN's int8
    product on the packed weight, on any weight where it is exact on this CPU (VNNI) and on pairs_safe weights where
    it is exact for those (onednn_int8_pairs: CPUs without VNNI); the int8 panels that take the few rows of such
    weights there (taken here for every count of rows, on any CPU); oneDNN's float32 product on the weight packed
    widened (taken here too when told that neither int8 route is exact); and torch._int_mm. With AVX512-VNNI every
    product runs on the int8 panels, exact for any weight, or with AMX those of at most AMX_PANEL_ROWS rows, the
    others on oneDNN's int8 product (told so here on any VNNI CPU; the other routes are taken there by turning
    VNNI off)."""
    if route.startswith("vnni") and not int8_ops.panels_vnni():
        pytest.skip("the int8 panels multiply with VNNI only on an AVX-512 CPU with it")
    if route == "vnni-amx" and not onednn_int8_exact():
        pytest.skip("oneDNN's int8 product is not exact here")
    if route.startswith("vnni"):
        monkeypatch.setattr(int8_ops, "onednn_amx", lambda: route == "vnni-amx")
        monkeypatch.setattr(int8_ops, "panels_on_tiles", lambda k: False)  # where they are, oneDNN takes no rows
    else:
        monkeypatch.setattr(int8_ops, "panels_vnni", lambda: False)
    if route == "onednn-int8" and not onednn_int8_exact():
        pytest.skip("oneDNN's int8 product saturates on this CPU (no VNNI)")
    if route == "onednn-int8-pairs" and not onednn_int8_pairs():
        pytest.skip("oneDNN's int8 product is not exact on pairs_safe weights here")
    if route == "onednn-int8-pairs":
        monkeypatch.setattr(int8_ops, "PANEL_ROWS", 0)
    if route == "int8-panels":
        monkeypatch.setattr(int8_ops, "onednn_int8_exact", lambda: False)
        monkeypatch.setattr(int8_ops, "onednn_int8_pairs", lambda: True)
        monkeypatch.setattr(int8_ops, "PANEL_ROWS", 1 << 30)
    if route == "onednn-float32":
        monkeypatch.setattr(int8_ops, "onednn_int8_exact", lambda: False)
        monkeypatch.setattr(int8_ops, "onednn_int8_pairs", lambda: False)
    n, k, m = shape
    q, w = (_pairs_safe_extreme if route in ("onednn-int8-pairs", "int8-panels") else _extreme)(n, k, m)
    want = reference.int8_sums(q, w)
    assert sums_bound(w) < FP32_EXACT
    packed = ops.pack_int8_weight(w)
    assert packed is not None and packed.float_sums == (route == "onednn-float32")
    # panels with VNNI, and where oneDNN's int8 product is exact only for pairs_safe weights (told so, or on this CPU)
    pairs_only = route == "int8-panels" or (route == "onednn-int8-pairs" and int8_ops.weight_pairs_limited())
    assert (packed.panels is not None) == (pairs_only or route.startswith("vnni"))
    assert packed.all_rows == (route == "vnni-panels") and (packed.tensor is None) == packed.all_rows
    assert packed.amx == (route == "vnni-amx")
    zero = torch.randint(0, 256, (n,)).float()
    # with AMX, n rows on each side of the panels' limit
    for limit in (n, n - 1) if route == "vnni-amx" else (int8_ops.AMX_PANEL_ROWS,):
        monkeypatch.setattr(int8_ops, "AMX_PANEL_ROWS", limit)
        for packing in (packed, None):
            acc, zero_of_acc = ops.int8_sums(q, zero, w, packing)
            integer = packing is None or route in ("int8-panels", "vnni-panels") or (route == "vnni-amx" and limit == n)
            assert acc.dtype == (torch.int32 if integer else torch.float32) and acc.shape == (n, m)
            centred = acc.long() - zero_of_acc.long()[:, None] * w.long().sum(1)
            assert torch.equal(centred, want - zero.long()[:, None] * w.long().sum(1)), packing
            if packing is not None:
                assert torch.equal(acc.long(), want) and torch.equal(zero_of_acc, zero)


def test_weights_past_the_pair_limit_take_the_float32_product_where_int8_pairs_saturate(monkeypatch):
    """Where only pairs_safe weights run on the int8 product, one pair past PAIR_LIMIT sends the weight to the
    float32 product, and its sums stay exact."""
    monkeypatch.setattr(int8_ops, "panels_vnni", lambda: False)
    monkeypatch.setattr(int8_ops, "onednn_int8_exact", lambda: False)
    q, w = _pairs_safe_extreme(4, 64, 6)
    assert not ops.pack_int8_weight(w).float_sums or not onednn_int8_pairs()
    w[3, 10], w[3, 11] = 100, 29
    assert int8_ops.pair_sums(w)[3].item() == PAIR_LIMIT + 1 and not pairs_safe(w)
    packed = ops.pack_int8_weight(w)
    assert packed.float_sums
    acc, _ = ops.int8_sums(q, torch.zeros(4), w, packed)
    assert torch.equal(acc.long(), reference.int8_sums(q, w))


def test_pair_sums_and_the_pairs_probe():
    w = torch.tensor([[127, 1, -3, -125, 5], [0, 0, 0, 0, -128], [-64, 64, 64, -64, 0]], dtype=torch.int8)
    assert int8_ops.pair_sums(w).tolist() == [128, 128, 64]
    assert int8_ops.pair_sums(torch.tensor([[0.5, 0.25, -1.0, -0.5]])).tolist() == [1.5]
    assert int8_ops.pair_sums(torch.zeros(3, 0, dtype=torch.int8)).tolist() == [0, 0, 0]
    assert pairs_safe(w[:1]) and not pairs_safe(torch.tensor([[100, 29]], dtype=torch.int8))
    # the probe holds wherever the int8 product is exact on any weight
    assert onednn_int8_pairs() or not onednn_int8_exact()
    assert int8_ops.weight_pairs_limited() == (onednn_int8_pairs() and not onednn_int8_exact())


@pytest.mark.parametrize("shape", [(0, 8, 3), (1, 1, 1), (2, 3, 32), (3, 4, 33), (4, 13, 65), (7, 64, 96),
                                   (130, 96, 40), (2, 1030, 7)])
def test_int8_panel_sums(backend, shape):
    """The panels' sums equal the int64 product for every count of rows (tiles of 1, 2 and 3 rows), columns past a
    whole panel and reductions past a whole group of four, at the ends of the ranges: rows of 255 against pairs that
    sum to PAIR_LIMIT."""
    n, k, m = shape
    q, w = _pairs_safe_extreme(max(n, 1), k, m)
    q = q[:n]
    panels = ops.pack_int8_panels(w)
    assert panels.shape == (-(-m // 32), -(-k // 4), 32, 4) and panels.dtype == torch.int8
    assert torch.equal(reference.unpack_int8_panels(panels, m)[:, :k], w)
    got = ops.int8_panel_sums(*backend.to(q, panels), m, backend=backend.name)
    assert got.dtype == torch.int32 and got.shape == (n, m)
    assert torch.equal(got.cpu().long(), reference.int8_sums(q, w))


@pytest.mark.parametrize("shape", [(1, 4, 32), (12, 64, 31), (13, 7, 33), (25, 300, 96), (30, 1030, 17),
                                   (1024, 384, 40)])
def test_vnni_panel_sums_are_exact_for_any_weight(shape, monkeypatch):
    """With AVX512-VNNI the panels' sums equal the int64 product on weights that are not pairs_safe (127 next to 127,
    -128 next to -128) against rows of 255: every tile height (1 to 12 rows, then more tiles), panels cut short at
    the last columns, reductions past a whole group of four. No pair check refuses such weights there."""
    if not int8_ops.panels_vnni():
        pytest.skip("the int8 panels multiply with VNNI only on an AVX-512 CPU with it")
    monkeypatch.setattr(int8_ops, "onednn_amx", lambda: False)
    n, k, m = shape
    q, w = _extreme(n, k, m)
    w[0, : min(k, 4)] = 127
    w[-1, : min(k, 4)] = -128
    assert not pairs_safe(w) or k == 1
    panels = ops.pack_int8_panels(w)
    for rows in {1, 2, min(n, 11), min(n, 12), n}:
        got = ops.int8_panel_sums(q[:rows], panels, m)
        assert got.dtype == torch.int32 and torch.equal(got.long(), reference.int8_sums(q[:rows], w)), rows
    packed = ops.pack_int8_weight(w)
    assert packed.all_rows and packed.panels is not None and packed.tensor is None
    zero = torch.randint(0, 256, (n,)).float()
    acc, zero_of_acc = ops.int8_sums(q, zero, w, packed)
    assert torch.equal(acc.long(), reference.int8_sums(q, w)) and torch.equal(zero_of_acc, zero)


@pytest.mark.parametrize("k", [(FP32_EXACT - 1) // (255 * 127), (FP32_EXACT - 1) // (255 * 127) + 1])
def test_amx_route_keeps_weights_whose_float_sums_are_not_exact_on_the_panels(k, monkeypatch):
    """Where oneDNN's int8 product takes products of many rows (onednn_amx), a weight whose sums can reach 2^24,
    past what oneDNN's float32 output holds exactly, keeps every product on its panels; one just below goes to oneDNN
    past AMX_PANEL_ROWS rows. Either way the sums of rows of 255 are exact."""
    if not (int8_ops.panels_vnni() and onednn_int8_exact()):
        pytest.skip("the AMX route needs the VNNI panels and oneDNN's exact int8 product")
    monkeypatch.setattr(int8_ops, "onednn_amx", lambda: True)
    monkeypatch.setattr(int8_ops, "panels_on_tiles", lambda k: False)
    monkeypatch.setattr(int8_ops, "AMX_PANEL_ROWS", 2)
    n, m = 3, 5
    q, w = _extreme(n, k, m)
    w[0] = 127
    exact_in_float = sums_bound(w) < FP32_EXACT
    assert exact_in_float == (k * 255 * 127 < FP32_EXACT)
    packed = ops.pack_int8_weight(w)
    assert packed.amx == exact_in_float and packed.all_rows == (not exact_in_float)
    assert (packed.tensor is None) == packed.all_rows and packed.panels is not None
    acc, _ = ops.int8_sums(q, torch.zeros(n), w, packed)
    assert acc.dtype == (torch.float32 if exact_in_float else torch.int32)
    assert torch.equal(acc.long(), reference.int8_sums(q, w))


@pytest.mark.parametrize("rows", [9, 12, 24, 97])
def test_panel_sums_of_rows_4_kib_long(rows):
    """Rows of 4096 entries (4 KiB) alias in the L1 cache where a VNNI tile reads more than 8 of them side by side:
    the panels take such q from a copy whose rows stand one cache line further apart, or as it is where its rows already
    do (a view into wider rows, as quantize_rows and the quantizing epilogues write them). Every layout gives the int64
    product's sums: contiguous, one line apart, 8 KiB apart (copied), columns not contiguous (copied)."""
    k, m = 4096, 40
    q, w = _pairs_safe_extreme(rows, k, m)
    panels = ops.pack_int8_panels(w)
    want = reference.int8_sums(q, w)
    apart, far = torch.zeros(rows, k + 64, dtype=torch.uint8), torch.zeros(rows, 2 * k, dtype=torch.uint8)
    apart[:, :k], far[:, :k] = q, q
    for name, view in {"contiguous": q, "one line apart": apart[:, :k], "8 KiB apart": far[:, :k],
                       "column-major": q.t().contiguous().t()}.items():
        assert torch.equal(ops.int8_panel_sums(view, panels, m).long(), want), name


def test_quantized_rows_of_4_kib_stand_apart_for_the_panels():
    """quantize_rows and the quantizing epilogues write rows of 4096 entries one cache line apart more where a VNNI
    tile takes more than 8 rows (so that the next product reads them uncopied), with the reference's levels; the
    panels' sums of such q equal those of its contiguous copy."""
    n, k = 24, 4096
    apart = k + 64 if int8_ops.panels_vnni() else k
    x, smooth = _rows(n, k, torch.float32), rand(k, seed=5).abs() + 0.5
    got = ops.quantize_rows(x, smooth)
    assert got[0].shape == (n, k) and got[0].stride() == (apart, 1)
    _assert_quantized_close(got, reference.quantize_rows(x, smooth))
    w = torch.randint(-64, 65, (40, k), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    panels = ops.pack_int8_panels(w)
    assert torch.equal(ops.int8_panel_sums(got[0], panels, 40), ops.int8_panel_sums(got[0].contiguous(), panels, 40))
    assert ops.quantize_rows(x[:8], smooth)[0].is_contiguous()  # tiles of at most 8 rows: no gap
    with FakeTensorMode() as mode:  # what torch.compile plans with
        fake = ops.quantize_rows(mode.from_tensor(x), mode.from_tensor(smooth))
    assert [f.stride() for f in fake] == [g.stride() for g in got]
    args, w_panels, _, _ = _panel_product(n, 64, k, torch.float32, False)
    gelu_quantize = _product_ops(torch.float32, k)["gelu_quantize"]
    reference_gelu_quantize = _product_ops(torch.float32, k, "reference")["gelu_quantize"]
    *got, _ = gelu_quantize(args, None, w_panels)
    assert got[0].shape == (n, k) and got[0].stride() == (apart, 1)
    torch.library.opcheck(int8_ops.INT8_LINEAR_GELU_QUANTIZE.op,
                          (*args, None, None, "none", smooth, None, w_panels, "cpu"))
    _assert_quantized_close(got, reference_gelu_quantize(args, None, w_panels)[:3], max_level_diff=1)


def test_int8_sums_on_panels_compile(monkeypatch, fresh_inductor):
    """Under torch.compile the panels' sums go through the op (its fake), not the bare kernel, and equal eager's."""
    monkeypatch.setattr(int8_ops, "panels_vnni", lambda: False)
    monkeypatch.setattr(int8_ops, "onednn_int8_exact", lambda: False)
    monkeypatch.setattr(int8_ops, "onednn_int8_pairs", lambda: True)
    q, w = _pairs_safe_extreme(5, 40, 36)
    packed = ops.pack_int8_weight(w)
    assert packed.panels is not None

    def sums(q, zero):
        return ops.int8_sums(q, zero, w, packed)

    zero = torch.zeros(5)
    acc, _ = torch.compile(sums, fullgraph=True)(q, zero)
    assert acc.dtype == torch.int32 and torch.equal(acc.long(), reference.int8_sums(q, w))


def test_int8_panel_sums_errors_name_the_problem(monkeypatch):
    monkeypatch.setattr(int8_ops, "panels_vnni", lambda: False)  # the pair checks, which VNNI's exact sums skip
    q, w = _pairs_safe_extreme(3, 10, 5)
    panels = ops.pack_int8_panels(w)
    with pytest.raises(ValueError, match=r"summing to 129 in magnitude, past PAIR_LIMIT \(128\)"):
        ops.pack_int8_panels(torch.tensor([[100, 29]], dtype=torch.int8))
    with pytest.raises(TypeError, match="weight must be a non-empty 2-D torch.int8"):
        ops.pack_int8_panels(w.float())
    with pytest.raises(TypeError, match="q must be a 2-D torch.uint8"):
        ops.int8_panel_sums(q.to(torch.int8), panels, 5)
    with pytest.raises(ValueError, match=r"panels must be torch.int8 of shape \(1, 3, 32, 4\) for q of 10 columns"):
        ops.int8_panel_sums(q, panels[:, :2], 5)
    with pytest.raises(ValueError, match="out_features must be positive"):
        ops.int8_panel_sums(q, panels, 0)
    saturating = panels.clone()
    saturating[0, 0, 1, :2] = torch.tensor([100, 29], dtype=torch.int8)
    with pytest.raises(ValueError, match="panels hold neighbouring entries of one sign summing past PAIR_LIMIT"):
        ops.int8_panel_sums(q, saturating, 5)
    # the kernel's own checks, for callers that skip the wrapper's
    kernel = int8_ops.INT8_PANEL_SUMS.kernel("cpu")
    with pytest.raises(RuntimeError, match=r"panels must have shape \[1, 3, 32, 4\] for q of 10 columns"):
        kernel(q, panels[:, :2], 5)
    with pytest.raises(RuntimeError, match="out_features must be positive"):
        kernel(q, panels, 0)


def test_int8_sums_past_fp32_are_not_packed_for_onednn(monkeypatch):
    """A weight whose sums could pass 2^24 is left unpacked for oneDNN's fp32 sums, and its sums come back exact in
    int32 (from torch._int_mm); VNNI panels, whose sums are int32, pack it."""
    k = FP32_EXACT // (255 * 127) + 1
    q, w = torch.full((3, k), 255, dtype=torch.uint8), torch.full((4, k), 127, dtype=torch.int8)
    assert sums_bound(w) >= FP32_EXACT > sums_bound(w[:, :-1])
    if int8_ops.panels_vnni():
        acc, _ = ops.int8_sums(q, torch.zeros(3), w, ops.pack_int8_weight(w))
        assert acc.dtype == torch.int32 and torch.equal(acc.long(), reference.int8_sums(q, w))
    monkeypatch.setattr(int8_ops, "panels_vnni", lambda: False)
    assert ops.pack_int8_weight(w) is None
    zero = torch.zeros(3)
    acc, zero_of_acc = ops.int8_sums(q, zero, w, ops.pack_int8_weight(w))
    assert acc.dtype == torch.int32 and torch.equal(zero_of_acc, zero - 128)
    want = reference.int8_sums(q, w)
    assert torch.equal(acc.long() + 128 * w.long().sum(1), want) and want.max().item() >= FP32_EXACT


def test_int8_sums_errors_name_the_problem():
    q, w = _extreme(3, 8, 4)
    with pytest.raises(TypeError, match="q must be a 2-D torch.uint8"):
        ops.int8_sums(q.to(torch.int8), torch.zeros(3), w)
    with pytest.raises(ValueError, match=r"weight must be torch.int8 \[out, 8\]"):
        ops.int8_sums(q, torch.zeros(3), w[:, :5])
    with pytest.raises(TypeError, match="weight must be a 2-D torch.int8"):
        ops.pack_int8_weight(w.float())
    k = MAX_K + 1
    with pytest.raises(ValueError, match=f"rows of {k} entries can sum past int32"):
        ops.int8_sums(torch.zeros(1, k, dtype=torch.uint8), torch.zeros(1), torch.zeros(1, k, dtype=torch.int8))



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_row_holding_nan_or_inf_dequantizes_to_nan(backend, dtype, bad):
    """Such a row gets a NaN scale, so every product that reads it comes out NaN in that row (never finite values
    made from a broken range); the other rows are quantized as without it, and a GELU or LayerNorm epilogue that
    quantizes its output again hands the NaN on."""
    x = _rows(6, 40, torch.float32)
    x[2, 7] = bad
    smooth = rand(40, seed=5).abs() + 0.5
    q, scale, zero = backend.forward(*backend.to(x.to(dtype), smooth))
    assert scale[2].isnan() and scale[torch.arange(6) != 2].isfinite().all()
    keep = torch.arange(6) != 2
    want = reference.quantize_rows(x.to(dtype)[keep], smooth)
    _assert_quantized_close((q[keep], scale[keep], zero[keep]), want)
    w, ws, wsum = _weights(24, 40)
    acc = reference.int8_sums(q.cpu(), w).to(torch.int32)
    args = (acc, scale.cpu(), zero.cpu(), ws, wsum, rand(24, seed=7, dtype=dtype))
    y = ops.int8_linear(*backend.to(*args), backend=backend.name).cpu()
    assert y[2].isnan().all() and y[keep].isfinite().all()
    *h, _ = ops.int8_linear_gelu_quantize(*backend.to(*args), "none", backend.to(rand(24, seed=8).abs() + 0.5)[0],
                                          backend=backend.name)
    assert h[1][2].isnan() and h[1][keep].isfinite().all()


# ---- the epilogues -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("sums", SUM_DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 7, 3), (37, 64, 96), (130, 96, 40), (1030, 16, 24)])
def test_int8_linear(backend, dtype, shape, sums, outliers):
    n, k, m = shape
    args, extra = _product_args(n, k, m, dtype, sums), _outliers(n, m, outliers)
    got = ops.int8_linear(*backend.to(*args), outliers=_op_outliers(backend, extra), backend=backend.name)
    want = reference.int8_linear(*args, *extra)
    assert got.dtype == dtype and got.shape == (n, m)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
    torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("sums", SUM_DTYPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(1, 8, 1), (6, 7, 33), (37, 64, 300), (130, 48, 96), (1030, 16, 24)])
def test_int8_linear_gelu_quantize(backend, dtype, shape, approximate, sums, outliers):
    """The requantized GELU output against the reference's, and, where asked (`keep`), the GELU output itself at a
    few channels (the next product's outliers), in fp32."""
    n, k, m = shape
    args, extra = _product_args(n, k, m, dtype, sums), _outliers(n, m, outliers)
    smooth = rand(m, seed=8).abs() + 0.5
    keep = torch.tensor([m - 1, 0, m // 2]) if outliers else None
    *got, kept = ops.int8_linear_gelu_quantize(*backend.to(*args), approximate, backend.to(smooth)[0],
                                               outliers=_op_outliers(backend, extra), keep=keep,
                                               backend=backend.name)
    *want, want_kept = reference.int8_linear_gelu_quantize(*args, *extra, approximate, smooth, keep)
    _assert_quantized_close(got, want, max_level_diff=1, what="gelu output")
    levels = (got[0].int() != want[0].int()).float().mean().item()
    assert levels < 0.01, f"{levels:.2%} of the levels differ from the reference's"
    assert kept.dtype == torch.float32 and kept.shape == (n, 0 if keep is None else 3)
    torch.testing.assert_close(kept, want_kept, atol=1e-4, rtol=1e-5)


def _residual_layer_norm_args(n, k, m, dtype, param_dtype, sums):
    pdtype = dtype if param_dtype == "activation" else torch.float32
    return (*_product_args(n, k, m, dtype, sums), rand(n, m, seed=9, dtype=dtype),
            1 + rand(m, seed=10, scale=0.1, dtype=pdtype), rand(m, seed=11, dtype=pdtype), 1e-12)


def _assert_layer_norm_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    tol = {"atol": 2e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 1e-2}
    torch.testing.assert_close(got.float(), want.float(), **tol)


RESIDUAL_SHAPES = [(1, 8, 1), (6, 7, 33), (37, 64, 300), (130, 48, 96), (1030, 16, 24)]


@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("sums", SUM_DTYPES)
@pytest.mark.parametrize("param_dtype", ["activation", "float32"])
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES)
def test_int8_linear_residual_layer_norm(backend, dtype, shape, param_dtype, sums, outliers):
    args, extra = _residual_layer_norm_args(*shape, dtype, param_dtype, sums), _outliers(shape[0], shape[2], outliers)
    got = ops.int8_linear_residual_layer_norm(*backend.to(*args), outliers=_op_outliers(backend, extra),
                                              backend=backend.name)
    _assert_layer_norm_close(got, reference.int8_linear_residual_layer_norm(*_with_outliers(args, extra)), dtype)


@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("sums", SUM_DTYPES)
@pytest.mark.parametrize("param_dtype", ["activation", "float32"])
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES)
def test_int8_linear_residual_layer_norm_quantize(backend, dtype, shape, param_dtype, sums, outliers):
    """The LayerNorm output equals the unfused op's, and its quantization is exactly quantize_rows of that output;
    against the reference, within the LayerNorm's tolerance and a level."""
    args, extra = _residual_layer_norm_args(*shape, dtype, param_dtype, sums), _outliers(shape[0], shape[2], outliers)
    smooth = rand(shape[2], seed=12).abs() + 0.5
    kw = {"outliers": _op_outliers(backend, extra), "backend": backend.name}
    y, *quantized = ops.int8_linear_residual_layer_norm_quantize(*backend.to(*args, smooth), **kw)
    assert torch.equal(y, ops.int8_linear_residual_layer_norm(*backend.to(*args), **kw))
    _assert_quantized_close(quantized, ops.quantize_rows(y, smooth, backend=backend.name), what="fused quantize")
    want_y, *want_q = reference.int8_linear_residual_layer_norm_quantize(*_with_outliers(args, extra), smooth)
    _assert_layer_norm_close(y, want_y, dtype)
    if dtype == torch.float32:
        _assert_quantized_close(quantized, want_q, max_level_diff=1, what="layer norm output")


def test_product_approximates_the_float_linear(backend):
    """quantize_rows, int8_sums then int8_linear, with weights quantized per output channel, is the float product
    within the quantization error."""
    x, weight, bias = rand(64, 96, seed=1), rand(48, 96, seed=2) * 0.05, rand(48, seed=3)
    wscale = weight.abs().amax(1) / 127
    w = torch.round(weight / wscale[:, None]).to(torch.int8)
    q, scale, zero = ops.quantize_rows(x, torch.ones(96), backend=backend.name)
    acc, zero = ops.int8_sums(q, zero, w, ops.pack_int8_weight(w))
    got = ops.int8_linear(acc, scale, zero, wscale, w.float().sum(1), bias, backend=backend.name)
    want = x @ weight.T + bias
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.02, rel


def test_outliers_and_keep_errors_name_the_problem():
    acc, scale, zero, ws, wsum, bias = args = _product_args(4, 8, 3, torch.float32)
    ox, ow = _outliers(4, 3, True)
    for bad, match in [((ox.double(), ow), "outlier_x must be torch.float32"),
                       ((ox[:2], ow), r"outlier_x must be \[4, k\]"),
                       ((ox, ow[:, :2]), r"outlier_w must be \[3, 3\]")]:
        with pytest.raises((TypeError, ValueError), match=match):
            ops.int8_linear(*args, outliers=bad)
    smooth = torch.ones(3)
    with pytest.raises(TypeError, match="keep must be a 1-D torch.int64"):
        ops.int8_linear_gelu_quantize(*args, "none", smooth, keep=torch.tensor([0], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"keep holds channel 3, outside \[0, 3\)"):
        ops.int8_linear_gelu_quantize(*args, "none", smooth, keep=torch.tensor([3]))


def _panel_product(n, k, m, dtype, outliers, seed=0):
    """The product arguments with the quantized input q in acc's place, the pair-safe weight's int8 panels (every
    route packs them), the outliers, and the same arguments with the sums acc = int8_panel_sums(q, panels, m)."""
    q, scale, zero = reference.quantize_rows(_rows(n, k, torch.float32, seed), torch.ones(k))
    w = torch.randint(-64, 65, (m, k), dtype=torch.int8, generator=torch.Generator().manual_seed(seed + 3))
    panels = ops.pack_int8_panels(w)
    rest = (scale, zero, rand(m, seed=seed + 4).abs() * 0.01 + 1e-3, w.float().sum(1), rand(m, seed=7, dtype=dtype))
    return (q, *rest), panels, _outliers(n, m, outliers), (ops.int8_panel_sums(q, panels, m), *rest)


def _product_ops(dtype, m, backend=None, seed=0):
    """Each product op as a call on (product arguments, outliers as the keyword takes them, panels) on `backend`."""
    smooth = rand(m, seed=seed + 20).abs() + 0.5
    keep = torch.tensor([0, m - 1])
    residual = rand(1, m, seed=seed + 21, dtype=dtype)  # broadcast to the rows below
    norm = (rand(m, seed=seed + 22, dtype=dtype) + 1, rand(m, seed=seed + 23, dtype=dtype), 1e-5)

    def rows_of(args):
        return residual.expand(args[0].shape[0], m).contiguous()

    return {
        "linear": lambda a, o, p: ops.int8_linear(*a, outliers=o, panels=p, backend=backend),
        "gelu_quantize": lambda a, o, p: ops.int8_linear_gelu_quantize(*a, "none", smooth, outliers=o, keep=keep,
                                                                        panels=p, backend=backend),
        "residual_layer_norm": lambda a, o, p: ops.int8_linear_residual_layer_norm(
            *a, rows_of(a), *norm, outliers=o, panels=p, backend=backend),
        "residual_layer_norm_quantize": lambda a, o, p: ops.int8_linear_residual_layer_norm_quantize(
            *a, rows_of(a), *norm, smooth, outliers=o, panels=p, backend=backend),
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["linear", "gelu_quantize", "residual_layer_norm", "residual_layer_norm_quantize"])
@pytest.mark.parametrize("shape", [(1, 5, 3), (23, 30, 70), (47, 64, 33), (48, 8, 32), (97, 30, 70), (301, 96, 40),
                                   (97, 4096, 40)])
def test_product_ops_take_the_sums_from_panels(shape, op, dtype, outliers, threads):
    """With panels, a product op takes the sums of q on them itself (a block of rows at a time once there are two
    blocks of rows for every thread, else with the panels split over the threads: int8_linear's and the GELU's
    epilogues on each thread's columns, the LayerNorms' after all of them): the same bits as the op on
    int8_panel_sums' result, at
    row counts on either side of those thresholds, K not a multiple of 4 and a last panel not full, rows of 4 KiB; the
    reference agrees likewise."""
    n, k, m = shape
    args, panels, extra, summed = _panel_product(n, k, m, dtype, outliers)
    extra = None if extra[0] is None else extra
    call, ref = _product_ops(dtype, m, "cpu")[op], _product_ops(dtype, m, "reference")[op]
    with num_threads(threads):
        got, want = _as_tuple(call(args, extra, panels)), _as_tuple(call(summed, extra, None))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype and torch.equal(g, w)
    for g, w in zip(_as_tuple(ref(args, extra, panels)), _as_tuple(ref(summed, extra, None)), strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("op", ["linear", "gelu_quantize", "residual_layer_norm", "residual_layer_norm_quantize"])
@pytest.mark.parametrize("k", [512, 516])
def test_panel_sums_at_their_largest_dequantize_as_the_summed_ones(k, op):
    """The panels' epilogues centre int32 sums of reductions of up to 514 in fp32 (acc and zero * wsum each exact
    there, their difference rounded once), the longer ones in int32: at the largest sums either way (q of 255 or 0,
    zero points of 0 and 255, weight rows of -128 but one -127, whose sums past 2^24 are odd, or of 127) the same bits
    as the ops on int8_panel_sums' result. Centred in fp32 at 516, the rows of q and zero 255 would read a rounding
    of acc instead of 0."""
    n, m = 32, 64
    q = torch.full((n, k), 255, dtype=torch.uint8)
    q[n // 2:] = 0
    w = torch.full((m, k), -128, dtype=torch.int8)
    w[:, 0] = -127
    w[1::2] = 127
    zero = torch.tensor([0.0, 255.0]).repeat(n // 2)
    args = (q, rand(n, seed=1).abs() * 1e-3, zero, rand(m, seed=2).abs() * 1e-2, w.float().sum(1), rand(m, seed=3))
    summed = (ops.int8_panel_sums(q, ops.pack_int8_panels(w), m), *args[1:])
    call = _product_ops(torch.float32, m, "cpu")[op]
    got, want = _as_tuple(call(args, None, ops.pack_int8_panels(w))), _as_tuple(call(summed, None, None))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("threads", [3, 5])
@pytest.mark.parametrize("outliers", [False, True], ids=["int8", "outliers"])
@pytest.mark.parametrize("op", ["linear", "gelu_quantize"])
@pytest.mark.parametrize("shape", [(5, 30, 33), (16, 64, 40), (40, 64, 200), (90, 30, 70)])
def test_column_epilogues_split_over_any_thread_count(shape, op, outliers, threads):
    """With few rows int8_linear and the GELU op split the panels over the threads and each thread takes its own
    columns (the GELU's rows quantized from every thread's part of their range, a row holding NaN among them): with
    more threads than panels (a thread without columns), pairs of panels (16 rows on AMX tiles) and uneven splits, the
    op on panels gives the bits of the op on int8_panel_sums' result."""
    n, k, m = shape
    args, panels, extra, summed = _panel_product(n, k, m, torch.bfloat16, outliers)
    extra = None if extra[0] is None else extra
    args[1][1] = summed[1][1] = float("nan")  # row 1's scale
    call = _product_ops(torch.bfloat16, m, "cpu")[op]
    with num_threads(threads):
        got, want = _as_tuple(call(args, extra, panels)), _as_tuple(call(summed, extra, None))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)
    assert got[0][1].isnan().all() if op == "linear" else got[1][1].isnan()


@pytest.fixture
def int8_tiles():
    """The int8 panels on AMX-INT8 tiles (ops.cpu_amx switches them), switched back on after the test. Skips where the
    CPU has no AMX-INT8 (or Linux does not grant the tiles): the panel tests above then run on the VNNI panels."""
    if not int8_ops.panels_on_tiles(64):
        pytest.skip("no AMX-INT8 tiles for the int8 panels on this CPU")
    yield
    ops.cpu_amx(True)


@pytest.mark.parametrize("k, m", [(64, 32), (62, 40), (128, 96), (192, 33), (1024, 70), (100, 40)])
def test_panel_sums_on_amx_tiles(int8_tiles, k, m):
    """On AMX-INT8 tiles the panels' sums equal the int64 product and the VNNI panels' sums, on a weight that is not
    pairs_safe: 16 rows (two panels at a time), more in groups of 32, cut short in rows and in columns (the last
    panel), a reduction padded to a whole step of 64 (k = 62) and one that is not whole steps (k = 100), which stays on
    VNNI as fewer than 16 rows do; q as it is, with room in its storage for a tile's rows past its last, and without
    (the end of a tensor, a view of narrower rows)."""
    q, w = _extreme(300, k, m)
    w[0, : min(k, 4)] = 127
    w[-1, : min(k, 4)] = -128
    panels = ops.pack_int8_panels(w)
    wide = torch.cat([q, q[:, :7]], 1)
    inputs = [x for rows in (1, 2, 15, 16, 17, 31, 32, 33, 48, 64, 100, 130, 300)
              for x in (q[:rows], q[-rows:], wide[-rows:, :k])]
    got = [ops.int8_panel_sums(x, panels, m) for x in inputs]
    ops.cpu_amx(False)  # the fixture switches the tiles back on
    vnni = [ops.int8_panel_sums(x, panels, m) for x in inputs]
    for x, g, v in zip(inputs, got, vnni, strict=True):
        assert torch.equal(g.long(), reference.int8_sums(x, w)) and torch.equal(g, v), x.shape


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("op", ["linear", "gelu_quantize", "residual_layer_norm", "residual_layer_norm_quantize"])
@pytest.mark.parametrize("shape", [(16, 64, 40), (100, 128, 70), (300, 64, 33), (300, 1024, 1056), (520, 1024, 1056)])
def test_product_ops_on_amx_tiles(int8_tiles, shape, op, threads):
    """The product ops on the tiles give the VNNI panels' bits: the panels split over the threads (int8_linear's and
    the GELU's columns taken in chunks of at most 256 rows), or blocks of 32 rows (a weight of at most 1 MiB) or of up
    to 128 ([1056, 1024]) each run with its epilogue, blocks cut short; q from the reference quantization, which
    leaves no room past its rows."""
    n, k, m = shape
    args, panels, _, summed = _panel_product(n, k, m, torch.bfloat16, False)
    call = _product_ops(torch.bfloat16, m, "cpu")[op]
    with num_threads(threads):
        got = _as_tuple(call(args, None, panels))
        ops.cpu_amx(False)  # the fixture switches the tiles back on
        vnni = _as_tuple(call(args, None, panels))
    for g, v, s in zip(got, vnni, _as_tuple(call(summed, None, None)), strict=True):
        assert torch.equal(g, v) and torch.equal(g, s)


@pytest.mark.parametrize("op", ["linear", "gelu_quantize", "residual_layer_norm_quantize"])
def test_product_ops_on_panels_compile(op, fresh_inductor):
    """Under torch.compile a product op on panels goes through its fake (the output's columns from weight_scale, not
    from q) and gives eager's bits."""
    args, panels, extra, _ = _panel_product(100, 30, 70, torch.float32, True)
    call = _product_ops(torch.float32, 70)[op]
    want = _as_tuple(call(args, extra, panels))
    got = _as_tuple(torch.compile(lambda a, o, p: call(a, o, p), fullgraph=True)(args, extra, panels))
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.equal(g, w)


@pytest.mark.parametrize("name", ["int8_linear", "int8_linear_gelu_quantize", "int8_linear_residual_layer_norm",
                                  "int8_linear_residual_layer_norm_quantize"])
def test_product_ops_on_panels_opcheck(name):
    """torch.library.opcheck of each product op's dispatcher op with panels (its fake's shapes from weight_scale
    against the kernel's), at a row count where the sums are taken a block of rows at a time."""
    (q, scale, zero, ws, wsum, bias), panels, (ox, ow), _ = _panel_product(100, 30, 70, torch.float32, True)
    norm = (rand(100, 70, seed=30), torch.ones(70), torch.zeros(70), 1e-5)
    smooth = rand(70, seed=31).abs() + 0.5
    rest = {"int8_linear": (), "int8_linear_gelu_quantize": ("none", smooth, torch.tensor([0, 69])),
            "int8_linear_residual_layer_norm": norm, "int8_linear_residual_layer_norm_quantize": (*norm, smooth)}
    op = getattr(int8_ops, name.upper())
    torch.library.opcheck(op.op, (q, scale, zero, ws, wsum, bias, ox, ow, *rest[name], panels, "cpu"))


@pytest.mark.parametrize("case, error, match", [
    ("q int32", TypeError, "acc \\(with panels, the quantized input q\\) must be a 2-D torch.uint8 tensor"),
    ("panels of another weight", ValueError, "panels must be torch.int8 of shape \\(3, 8, 32, 4\\)"),
    ("weight_scale 2-D", ValueError, "weight_scale must be \\[out\\] with out > 0"),
    ("bias short", ValueError, "bias has shape \\(69,\\), expected \\(70,\\)"),
    ("residual short", ValueError, "residual has shape \\(5, 69\\), expected \\(5, 70\\)"),
])
def test_product_ops_on_panels_errors_name_the_problem(case, error, match):
    """The wrappers' checks with panels, and the kernels' own (called directly, as the int8 layer does)."""
    args, panels, _, _ = _panel_product(5, 30, 70, torch.float32, False)
    q, scale, zero, ws, wsum, bias = args
    residual = rand(5, 70)
    if case == "q int32":
        q = q.int()
    elif case == "panels of another weight":
        panels = ops.pack_int8_panels(torch.zeros(70, 40, dtype=torch.int8))
    elif case == "weight_scale 2-D":
        ws = ws[None]
    elif case == "bias short":
        bias = bias[:-1]
    elif case == "residual short":
        residual = residual[:, :-1]
    norm = (torch.ones(70), torch.zeros(70), 1e-5)
    with pytest.raises(error, match=match):
        ops.int8_linear_residual_layer_norm(q, scale, zero, ws, wsum, bias, residual, *norm, panels=panels)
    kernel = int8_ops.INT8_LINEAR_RESIDUAL_LAYER_NORM.kernel("cpu")
    with pytest.raises(RuntimeError, match="int8_linear_residual_layer_norm: "):
        kernel(q, scale, zero, ws, wsum, bias, None, None, residual, *norm, panels)


@pytest.mark.parametrize("case, error, match", [
    ("acc int8", TypeError, "acc \\(the integer sums\\) must be torch.int32 or torch.float32"),
    ("acc 1-D", ValueError, "acc must be 2-D"),
    ("scale shape", ValueError, "scale has shape"),
    ("scale dtype", TypeError, "weight_scale must be torch.float32"),
    ("bias int", TypeError, "bias must be"),
])
def test_product_errors_name_the_problem(case, error, match):
    acc, scale, zero, ws, wsum, bias = _product_args(4, 8, 3, torch.float32)
    if case == "acc int8":
        acc = acc.to(torch.int8)
    elif case == "acc 1-D":
        acc = acc[0]
    elif case == "scale shape":
        scale = scale[:2]
    elif case == "scale dtype":
        ws = ws.double()
    elif case == "bias int":
        bias = bias.long()
    with pytest.raises(error, match=match):
        ops.int8_linear(acc, scale, zero, ws, wsum, bias)


def test_quantize_rows_errors_name_the_problem():
    with pytest.raises(TypeError, match="x must be float32 or bfloat16"):
        ops.quantize_rows(rand(2, 4).double(), torch.ones(4))
    with pytest.raises(ValueError, match=r"smooth must be float32 of shape \(4,\)"):
        ops.quantize_rows(rand(2, 4), torch.ones(3))
    with pytest.raises(ValueError, match="K > 0"):
        ops.quantize_rows(rand(2, 0), torch.ones(0))
