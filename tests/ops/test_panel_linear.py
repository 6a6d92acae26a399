"""panel_linear, the inference linear of few rows, on every backend that runs here against the reference
(op_testing.py states the backends and tolerances); its panels and its errors."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from mtbert_fast import _ext, ops
from mtbert_fast.ops import reference
from op_testing import assert_close, rand

OP_NAME = "panel_linear"
# the module (mtbert_fast.ops.panel_linear is the wrapper function)
panel_module = importlib.import_module("mtbert_fast.ops.panel_linear")
ACTIVATIONS = [(False, "none"), (True, "none"), (True, "tanh")]


def _native(x, w, bias, gelu, approximate):
    """PyTorch in x's dtype."""
    y = F.linear(x, w, bias)
    return F.gelu(y, approximate=approximate) if gelu else y


@pytest.mark.parametrize("gelu,approximate", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (1, 384, 1152), (3, 7, 33), (13, 31, 64), (16, 64, 40),
                                   (40, 33, 95), (25, 768, 96), (7, 201, 33), (50, 301, 70), (301, 96, 70),
                                   (130, 700, 40), (24, 1024, 40), (20, 2047, 33)])
def test_kernel_against_the_reference(backend, dtype, M, K, N, gelu, approximate):
    """Every row count against the tiles (1..12 rows, blocks split evenly), odd K (bf16 pairs pad it), a tail
    panel, the fp32 and bf16 panels, and K walked in chunks of 64 or 128 (the AVX2 kernels, x of up to 96 rows) or
    512 (97-384 rows) with a shorter last one; rows of 4 KiB (fp32 K=1024, bf16 K=2047 padded to pairs) that the
    kernel copies apart for tiles of more than 8 rows."""
    x, w, bias = backend.to(rand(M, K, dtype=dtype), rand(N, K, seed=1, scale=K**-0.5, dtype=dtype),
                            rand(N, seed=2, dtype=dtype))
    panels = ops.pack_panels(w.cpu()).to(backend.device)
    out = backend.forward(x, panels, bias, N, gelu, approximate)
    assert out.dtype == dtype and out.shape == (M, N)
    ref = reference.panel_linear(x.float(), ops.pack_panels(w.float().cpu()).to(backend.device), bias.float(), N,
                                 gelu, approximate)
    assert_close(out, ref, _native(x, w, bias, gelu, approximate), dtype, atol=1e-5, rtol=1e-5)
    without_bias = backend.forward(x, panels, None, N, gelu, approximate)
    assert_close(without_bias, _native(x.float(), w.float(), None, gelu, approximate),
                 _native(x, w, None, gelu, approximate), dtype, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [5, 37, 50, 64])
def test_rows_past_the_input_read_in_place_or_from_a_copy(M):
    """On AMX tiles a tile reads 16 rows: x whose storage holds rows past M is read in place, x that ends at row M has
    its last row group read from a copy of those rows. Both give the same bits (and so do the CPUs without tiles)."""
    big, w, bias = rand(80, 128, dtype=torch.bfloat16), rand(96, 128, seed=1, scale=0.1, dtype=torch.bfloat16), rand(
        96, seed=2, dtype=torch.bfloat16)
    panels = ops.pack_panels(w)
    in_place = ops.panel_linear(big[:M], panels, bias, 96, gelu=True, backend="cpu")
    ends_at_m = ops.panel_linear(big[:M].clone(), panels, bias, 96, gelu=True, backend="cpu")
    assert torch.equal(in_place, ends_at_m)
    assert_close(ends_at_m, _native(big[:M].float(), w.float(), bias.float(), True, "none"),
                 _native(big[:M], w, bias, True, "none"), torch.bfloat16, atol=1e-5, rtol=1e-5)


def test_bf16_rows_on_fp32_panels(backend):
    """A bf16 x on fp32 panels (what a CPU without AVX512-BF16 packs): widened, products in fp32."""
    x, w, bias = rand(5, 70, dtype=torch.bfloat16), rand(50, 70, seed=1, scale=0.1), rand(50, seed=2)
    panels = ops.pack_panels(w)
    assert panels.dtype == torch.float32
    out = backend.forward(x, panels, bias, 50, True, "none")
    want = F.gelu(F.linear(x.float(), w, bias))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.0, rtol=2**-8)


@pytest.mark.parametrize("gelu,approximate", ACTIVATIONS)
@pytest.mark.parametrize("M,K,N", [(1, 70, 50), (16, 201, 33), (50, 301, 70), (120, 40, 64), (24, 1024, 40)])
def test_bf16_panels_of_rows_equal_fp32_panels(backend, M, K, N, gelu, approximate, monkeypatch):
    """bf16 panels of rows (what a CPU without AVX512-BF16 packs a bf16 weight into), widened as they are loaded:
    bit for bit what fp32 panels of the same weight give, in half their bytes; also where x's widened rows span 4 KiB
    (K=1024) and are written apart for tiles of 12 rows."""
    monkeypatch.setattr(panel_module, "bf16_pairs", lambda: False)
    x, w, bias = (rand(M, K, dtype=torch.bfloat16), rand(N, K, seed=1, scale=K**-0.5, dtype=torch.bfloat16),
                  rand(N, seed=2, dtype=torch.bfloat16))
    rows = ops.pack_panels(w)
    assert rows.dtype == torch.bfloat16 and rows.shape == (-(-N // 32), K, 32)
    out = backend.forward(x, rows, bias, N, gelu, approximate)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, backend.forward(x, ops.pack_panels(w.float()), bias, N, gelu, approximate))


@pytest.mark.parametrize("K", [1024, 2048, 3072])
def test_rows_copied_apart_give_the_same_bits(K):
    """x's rows 4 KiB apart (fp32 K=1024 and 3072; bf16 K=2048) run on a copy with longer rows when a tile takes more
    than 8 of them; each output row is the same sum in the same order either way, so the 24 rows of two 12-row
    tiles equal those of three calls of 8 rows (tiles of 8, x used in place) bit for bit."""
    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
        pytest.skip("pure-Python install requested: no compiled kernels")
    assert _ext.has_kernel(OP_NAME, "CPU"), _ext.load_error
    for dtype in (torch.float32, torch.bfloat16):
        x, w, bias = rand(24, K, dtype=dtype), rand(40, K, seed=1, scale=K**-0.5, dtype=dtype), rand(40, seed=2)
        panels = ops.pack_panels(w)
        whole = torch.ops.mtbert_fast_C.panel_linear(x, panels, bias.to(dtype), 40, True, "none")
        parts = [torch.ops.mtbert_fast_C.panel_linear(x[i:i + 8], panels, bias.to(dtype), 40, True, "none")
                 for i in (0, 8, 16)]
        assert torch.equal(whole, torch.cat(parts))


@pytest.mark.parametrize("bias_dtype", [torch.float32, torch.bfloat16])
def test_bias_read_in_any_layout(bias_dtype):
    """The kernel reads an fp32 bias where it lies and widens a bf16 one itself: a strided bias gives the bits of its
    contiguous copy, and a bf16 bias those of its fp32 widening."""
    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
        pytest.skip("pure-Python install requested: no compiled kernels")
    assert _ext.has_kernel(OP_NAME, "CPU"), _ext.load_error
    x, w = rand(5, 70, dtype=torch.bfloat16), rand(50, 70, seed=1, scale=0.1, dtype=torch.bfloat16)
    every_other = rand(100, seed=2, dtype=bias_dtype)[::2]
    panels = ops.pack_panels(w)
    kernel = torch.ops.mtbert_fast_C.panel_linear
    out = kernel(x, panels, every_other, 50, True, "none")
    assert torch.equal(out, kernel(x, panels, every_other.contiguous(), 50, True, "none"))
    assert torch.equal(out, kernel(x, panels, every_other.float(), 50, True, "none"))


@pytest.mark.parametrize("dtype,N", [(torch.float32, 1024), (torch.float32, 3072), (torch.bfloat16, 2048)])
def test_gelu_rows_of_4_kib_stand_apart_for_the_next_product(dtype, N):
    """With GELU (an FFN's inner activation) an output whose rows span a multiple of 4 KiB comes back with its rows one
    cache line apart wherever the next product's tiles would take them aliased, so that product reads them without a
    copy; the fake gives every row count the kernel's strides. The values are those of calls of at most 8 rows (whose
    outputs are contiguous), and the next product on them equals that on their contiguous copy, bit for bit."""
    if os.environ.get("MTBERT_FAST_SKIP_BUILD") == "1":
        pytest.skip("pure-Python install requested: no compiled kernels")
    assert _ext.has_kernel(OP_NAME, "CPU"), _ext.load_error
    kernel = torch.ops.mtbert_fast_C.panel_linear
    inner = ops.pack_panels(rand(N, 16, seed=1, scale=0.25, dtype=dtype))
    out = ops.pack_panels(rand(40, N, seed=3, scale=N**-0.5, dtype=dtype))
    apart = []
    for M in range(1, 41):
        x = rand(M, 16, seed=M, dtype=dtype)
        h = kernel(x, inner, None, N, True, "none")
        with FakeTensorMode() as mode:  # the dispatcher op torch.compile plans with
            fake = panel_module.OP.op(mode.from_tensor(x), mode.from_tensor(inner), None, N, True, "none", "cpu")
        assert h.shape == fake.shape == (M, N) and h.stride() == fake.stride(), M
        assert h.stride() == (panel_module.output_row_stride(M, N, dtype, True), 1)
        assert kernel(x, inner, None, N, False, "none").is_contiguous()
        apart += [M] if h.stride(0) > N else []
        if M in (8, 12, 16, 17, 24, 40):
            parts = [kernel(x[i:i + 8], inner, None, N, True, "none") for i in range(0, M, 8)]
            assert torch.equal(h, torch.cat(parts)), M
            assert torch.equal(kernel(h, out, None, 40, False, "none"), kernel(h.contiguous(), out, None, 40, False,
                                                                                   "none")), M
    tiles_of_12 = _ext.cpu_isa() == "avx512"
    assert apart == ([m for m in range(9, 41) if m not in (13, 14, 15, 16)] if tiles_of_12 else [])


@pytest.mark.parametrize("isa,pairs,amx,vendor,mkl,want", [
    ("avx512", True, False, "AuthenticAMD", False, {torch.float32: 1024, torch.bfloat16: 256}),
    ("avx512", True, True, "AuthenticAMD", False, {torch.float32: 1024, torch.bfloat16: 128}),  # bf16 on AMX tiles there
    # bf16 panels widened where the CPU has no AVX512-BF16: oneDNN's bf16 product there is far slower
    ("avx512", False, False, "AuthenticAMD", False, {torch.float32: 1024, torch.bfloat16: 1024}),
    # Intel's: oneDNN's float32 product is as fast or faster from a hundred-odd rows on (from 64-80 where it has AMX)
    ("avx512", True, True, "GenuineIntel", False, {torch.float32: 64, torch.bfloat16: 128}),
    ("avx512", False, False, "GenuineIntel", False, {torch.float32: 128, torch.bfloat16: 1024}),
    # and where MKL's packed sgemm takes bf16 as float32 products, it is faster from about a hundred rows
    ("avx512", False, False, "GenuineIntel", True, {torch.float32: 128, torch.bfloat16: 96}),
    ("avx512", False, False, None, False, {torch.float32: 1024, torch.bfloat16: 1024}),
    ("avx2", False, False, "GenuineIntel", False, {torch.float32: 2048, torch.bfloat16: 2048}),
    ("default", False, False, "AuthenticAMD", False, {torch.float32: 0, torch.bfloat16: 0}),
    (None, False, False, "AuthenticAMD", False, {torch.float32: 0, torch.bfloat16: 0}),  # no CPU kernels loaded
])
def test_encoder_rows_follow_the_loaded_kernels(isa, pairs, amx, vendor, mkl, want, monkeypatch):
    """How many rows the encoder hands panel_linear, by the instruction set of the CPU kernels loaded, the CPU,
    whether MKL's packed sgemm takes the encoder's bf16 products of more rows, and for bf16 on AMX tiles the width of
    the weight."""
    flags = {"avx512f", "avx512_bf16"} | ({"amx_bf16", "amx_tile"} if amx else set())
    monkeypatch.setattr(panel_module._ext, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(panel_module._ext, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(panel_module._ext, "cpu_isa", lambda: isa)
    monkeypatch.setattr(panel_module._ext, "has_kernel", lambda op, device: isa is not None)
    monkeypatch.setattr(panel_module._ext, "cpu_amx", lambda allow=None: amx)  # the CPU kernels use the tiles
    monkeypatch.setattr(panel_module, "bf16_pairs", lambda: pairs)
    monkeypatch.setattr(panel_module, "mkl_rows", lambda dtype: 1024 if mkl and dtype == torch.bfloat16 else 0)
    panel_module.encoder_rows.cache_clear()
    try:
        assert {dtype: panel_module.encoder_rows(dtype) for dtype in want} == want
        # a weight of any width gets the same rows, but for bf16 on AMX tiles one of at most NARROW_FEATURES features
        narrow = panel_module.NARROW_FEATURES
        assert {dtype: panel_module.encoder_rows(dtype, narrow + 1) for dtype in want} == want
        amx_bf16 = isa == "avx512" and pairs and amx
        assert {dtype: panel_module.encoder_rows(dtype, narrow) for dtype in want} == (
            {**want, torch.bfloat16: panel_module.AMX_BF16_NARROW_ROWS} if amx_bf16 else want)
        assert panel_module.encoder_rows(torch.bfloat16, 1) == panel_module.encoder_rows(torch.bfloat16, narrow)
        # and more again for a wider weight of no more output features than input features, and for a product with
        # GELU (the most of the limits that apply); float32 and every other CPU keep one limit for every product
        wide = narrow + 1
        shapes = {(wide + 1, wide, False): panel_module.AMX_BF16_ROWS,
                  (wide, wide, False): panel_module.AMX_BF16_CONTRACTING_ROWS,
                  (wide, panel_module.AMX_BF16_CONTRACTING_MAX_IN + 1, False): panel_module.AMX_BF16_ROWS,
                  (narrow, narrow, False): panel_module.AMX_BF16_NARROW_ROWS,
                  (narrow, narrow - 1, False): panel_module.AMX_BF16_NARROW_ROWS,
                  (4 * wide, wide, True): panel_module.AMX_BF16_GELU_ROWS,
                  (wide, 4 * wide, True): panel_module.AMX_BF16_GELU_ROWS}
        for (n, k, gelu), amx_rows in shapes.items():
            assert panel_module.encoder_rows(torch.bfloat16, n, k, gelu) == (
                amx_rows if amx_bf16 else want[torch.bfloat16])
            if torch.float32 in want:
                assert panel_module.encoder_rows(torch.float32, n, k, gelu) == want[torch.float32]
    finally:
        panel_module.encoder_rows.cache_clear()


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_encoder_rows_off_the_tiles(vendor, monkeypatch):
    """bf16 on a CPU with AMX-BF16 whose tiles the CPU kernels keep off (cpu_amx() False): panel_linear multiplies on
    the dot products there, ahead of oneDNN's tiles for a few rows of any weight only; float32 keeps its limit."""
    monkeypatch.setattr(panel_module._ext, "_cpu_flags", lambda: {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(panel_module._ext, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(panel_module._ext, "cpu_isa", lambda: "avx512")
    monkeypatch.setattr(panel_module._ext, "has_kernel", lambda op, device: True)
    monkeypatch.setattr(panel_module._ext, "cpu_amx", lambda allow=None: False)
    monkeypatch.setattr(panel_module, "bf16_pairs", lambda: True)
    monkeypatch.setattr(panel_module, "mkl_rows", lambda dtype: 0)
    panel_module.encoder_rows.cache_clear()
    try:
        widths = [None, 1, panel_module.NARROW_FEATURES, panel_module.NARROW_FEATURES + 1, 3072]
        assert {panel_module.encoder_rows(torch.bfloat16, n) for n in widths} == {panel_module.AMX_BF16_DOT_ROWS}
        assert {panel_module.encoder_rows(torch.bfloat16, 768, k, gelu) for k in (384, 768, 3072)
                for gelu in (False, True)} == {panel_module.AMX_BF16_DOT_ROWS}
        assert panel_module.encoder_rows(torch.float32) == (64 if vendor == "GenuineIntel" else 1024)
    finally:
        panel_module.encoder_rows.cache_clear()


def test_cpu_amx_switch_forgets_the_encoder_rows():
    """Switching the tiles, even to what they were, clears the row limits kept, so that the next call asks cpu_amx()
    again; asking without a switch keeps them."""
    try:
        panel_module.encoder_rows(torch.bfloat16)
        ops.cpu_amx()
        assert panel_module.encoder_rows.cache_info().currsize > 0
        ops.cpu_amx(ops.cpu_amx())
        assert panel_module.encoder_rows.cache_info().currsize == 0
    finally:
        ops.cpu_amx(True)


@pytest.mark.parametrize("pairs", [False, True])
def test_panels_unpack_to_the_weight(pairs, monkeypatch):
    monkeypatch.setattr(panel_module, "bf16_pairs", lambda: pairs)
    for dtype in (torch.float32, torch.bfloat16):
        w = rand(45, 9, dtype=dtype)
        panels = ops.pack_panels(w)
        bf16_layout = pairs and dtype == torch.bfloat16
        assert panels.shape == ((2, 5, 32, 2) if bf16_layout else (2, 9, 32))
        assert panels.dtype == dtype
        unpacked = reference.unpack_panels(panels, 45)
        assert torch.equal(unpacked[:, :9], w.to(panels.dtype))
        assert not unpacked[:, 9:].any()


def test_errors_name_the_argument():
    x, w = rand(4, 10), rand(40, 10)
    panels = ops.pack_panels(w)
    with pytest.raises(ValueError, match="panels must have shape"):
        ops.panel_linear(x, panels, None, 70)
    with pytest.raises(ValueError, match="panels must have shape"):
        ops.panel_linear(rand(4, 11), panels, None, 40)
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        ops.panel_linear(x, panels, rand(39), 40)
    with pytest.raises(ValueError, match="x must be"):
        ops.panel_linear(rand(2, 4, 10), panels, None, 40)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.panel_linear(x.double(), panels, None, 40)
    with pytest.raises(ValueError, match="approximate"):
        ops.panel_linear(x, panels, None, 40, gelu=True, approximate="fast")
    with pytest.raises(ValueError, match="out_features must be positive"):
        ops.panel_linear(x, panels, None, 0)
    with pytest.raises(TypeError, match="2-D float32 or bfloat16"):
        ops.pack_panels(rand(3, 4, 5))
    bf16_panels = torch.zeros(2, 5, 32, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 panels multiply a bfloat16 x only"):
        ops.panel_linear(x, bf16_panels, None, 40)


def test_kernel_checks_its_arguments():
    """The C++ kernel, which the encoder calls without the wrapper, names a bad argument itself."""
    kernel = panel_module.OP.kernel("cpu")
    x, panels = rand(4, 10), ops.pack_panels(rand(40, 10))
    with pytest.raises(RuntimeError, match="panel_linear: panels must have shape"):
        kernel(x, panels, None, 70, False, "none")
    with pytest.raises(RuntimeError, match=r"panel_linear: bias must have shape \[40\]"):
        kernel(x, panels, rand(7), 40, False, "none")
    with pytest.raises(RuntimeError, match="panel_linear: x must have 2 dims"):
        kernel(rand(4), panels, None, 40, False, "none")
    with pytest.raises(RuntimeError, match="bfloat16 panels multiply a bfloat16 x only"):
        kernel(x, torch.zeros(2, 5, 32, 2, dtype=torch.bfloat16), None, 40, False, "none")


def _tiles_and_dots(x, panels, bias, n, gelu=False):
    """panel_linear's float output on the AMX tiles and on the AVX512-BF16 dot products (cpu_amx on, then off)."""
    outs = []
    try:
        for allow in (True, False):
            ops.cpu_amx(allow)
            outs.append(ops.panel_linear(x, panels, bias, n, gelu=gelu).float())
    finally:
        ops.cpu_amx(True)
    return outs


@pytest.mark.parametrize("rows", [1, 2, 5, 16, 17, 40])
@pytest.mark.parametrize("k, n", [(64, 40), (384, 1152), (3072, 96), (40, 64)])
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_pairs_on_amx_tiles_are_the_dot_products(rows, k, n, gelu):
    """Where the CPU has AMX-BF16, bf16 pair panels whose reduction length is a multiple of 32 run on the tiles from 2
    rows on (up to 16 rows two panels at a time, more in groups of 32; a last panel part-filled): the dot products'
    outputs but for the order of their fp32 sums, nearly all bit for bit and the rest an ulp of bf16 apart, and
    within the bound of the reference. Elsewhere (and at k = 40, or one row) both calls take the dot products."""
    if not ops.cpu_amx():
        pytest.skip("no AMX-BF16 tiles on this CPU")
    x = rand(rows, k, seed=rows + k, dtype=torch.bfloat16)
    w = rand(n, k, seed=n, scale=k**-0.5, dtype=torch.bfloat16)
    bias = rand(n, seed=3, dtype=torch.bfloat16)
    tiles, dots = _tiles_and_dots(x, ops.pack_panels(w), bias, n, gelu)
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(dots.abs().clamp_min(1e-30))))
    assert ((tiles - dots).abs() <= ulp).all()
    assert (tiles == dots).float().mean() >= 0.95
    ref = F.linear(x.float(), w.float(), bias.float())
    ref = F.gelu(ref) if gelu else ref
    native = F.linear(x, w, bias)
    assert_close(tiles, ref, F.gelu(native) if gelu else native, torch.bfloat16)


def _bf16_tile_case(rows: int, k: int, n: int):
    """x [rows, k], a weight [n, k], a bias and the weight's panels, all bf16, for the AMX tile path (skips where the
    CPU has no AMX-BF16 tiles)."""
    if not ops.cpu_amx():
        pytest.skip("no AMX-BF16 tiles on this CPU")
    x = rand(rows, k, seed=rows + k, dtype=torch.bfloat16)
    w = rand(n, k, seed=n, scale=k**-0.5, dtype=torch.bfloat16)
    bias = rand(n, seed=3, dtype=torch.bfloat16)
    return x, w, bias, ops.pack_panels(w)


def _assert_bf16_product(out, x, w, bias, gelu: bool) -> None:
    """out, a bf16 panel_linear of x by w and bias (with GELU where gelu), within the bound of the fp32 reference."""
    ref = F.linear(x.float(), w.float(), bias.float())
    native = F.linear(x, w, bias)
    assert_close(out.float(), F.gelu(ref) if gelu else ref, F.gelu(native) if gelu else native, torch.bfloat16)


@pytest.mark.parametrize("rows", [48, 200])
@pytest.mark.parametrize("k, n", [(384, 1152), (768, 96), (800, 40), (3072, 96)])
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_tiles_in_blocks_and_chunks_keep_the_bits_of_few_rows(rows, k, n, gelu):
    """More than 16 rows on the tiles run in blocks of rows (200 rows of 3,072: blocks of 128 and 72, the last group
    part-filled), each panel in chunks of the reduction (k = 768: 2, 800: 288 + 288 + 224, 3,072: 8) whose sums wait
    in fp32 between them, and each group's epilogue interleaved with the next group's tile steps. Every output's sum
    still runs over the reduction in one order, as with 16 rows or fewer (two panels at a time, no blocks or chunks):
    the same bits as those rows 16 at a time, and within the bound of the reference."""
    x, w, bias, panels = _bf16_tile_case(rows, k, n)
    out = ops.panel_linear(x, panels, bias, n, gelu=gelu)
    few = torch.cat([ops.panel_linear(x[i:i + 16], panels, bias, n, gelu=gelu) for i in range(0, rows, 16)])
    assert torch.equal(out, few)
    _assert_bf16_product(out, x, w, bias, gelu)


@pytest.mark.parametrize("rows, k, n", [(320, 384, 384), (1000, 800, 1152), (300, 3072, 96)])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("gelu", [False, True])
def test_bf16_tiles_shared_by_rows_keep_the_bits_of_one_thread(rows, k, n, threads, gelu):
    """Products of many rows whose activations are large against the weight share the work among threads by rows
    (each thread every panel over its own whole row groups) rather than by panels. Each output's sum runs over the
    reduction in the same order either way (1,000 rows: a part-filled last group in the last thread's share; k = 800
    and 3,072: several chunks), so every split, uneven ones too (three threads on ten groups: 4, 4 and 2), gives the
    bits of one thread, which runs every panel over every row."""
    x, w, bias, panels = _bf16_tile_case(rows, k, n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.panel_linear(x, panels, bias, n, gelu=gelu)
        torch.set_num_threads(threads)
        shared = ops.panel_linear(x, panels, bias, n, gelu=gelu)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(shared, one)
    _assert_bf16_product(shared, x, w, bias, gelu)


@pytest.mark.parametrize("rows", [4, 20])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_bf16_tiles_pad_an_odd_reduction_with_zeros(rows, layout):
    """With an odd reduction length (767) the pair panels end in a half-padding row and the tiles read 768 entries
    of each row of x: they read them from a copy padded with zeros, so an infinity at the start of one row never
    meets the padding of the row before it (0 * inf), in a row-major x and in a strided one; each other row is the
    dot products' within an ulp."""
    if not ops.cpu_amx():
        pytest.skip("no AMX-BF16 tiles on this CPU")
    k, n = 767, 64
    x = rand(rows, k, seed=rows, dtype=torch.bfloat16)
    x[1, 0] = float("inf")
    x = x if layout == "contiguous" else x.t().contiguous().t()
    w = rand(n, k, seed=n, scale=k**-0.5, dtype=torch.bfloat16)
    bias = rand(n, seed=3, dtype=torch.bfloat16)
    tiles, dots = (o[torch.arange(rows) != 1] for o in _tiles_and_dots(x, ops.pack_panels(w), bias, n))
    assert torch.isfinite(tiles).all()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(dots.abs().clamp_min(1e-30))))
    assert ((tiles - dots).abs() <= ulp).all()


def test_panel_fetch_switch(panel_fetch_kept):
    """Chunks fetched ahead by default with the AVX2 kernels and with the AVX-512 ones on Intel CPUs, whole panels
    with the AVX-512 ones elsewhere; a switch for the process, read back as set."""
    if not _ext.has_kernel("panel_linear", "CPU"):
        assert ops.panel_fetch() is False
        return
    assert ops.panel_fetch() is (_ext.cpu_isa() != "avx512" or _ext._cpu_vendor() == "GenuineIntel")
    assert ops.panel_fetch(False) is False and ops.panel_fetch() is False
    assert ops.panel_fetch(True) is True and ops.panel_fetch() is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, k, n", [(1, 768, 64), (13, 700, 40), (40, 3072, 70), (130, 800, 33),
                                        (384, 3072, 40)])
@pytest.mark.parametrize("gelu", [False, True])
def test_panels_walked_whole_or_in_chunks_keep_the_bits(dtype, rows, k, n, gelu, panel_fetch_kept):
    """Whole panels and panels in chunks fetched ahead (ops.panel_fetch) sum each output over the reduction in the
    same order, the chunks' partial sums waiting in fp32: the same bits, for one row, for 13-40 rows (chunks of 64
    or 128 reduction rows, 700 ending in a shorter one), for 130 and 384 (chunks of 768 on AVX-512, 512 on AVX2;
    3,072 in four or six), with a part-filled last panel; within the reference's bound. bf16 runs off the AMX tiles,
    which do not walk the panels this way."""
    if not _ext.has_kernel("panel_linear", "CPU"):
        pytest.skip("the CPU kernels are not loaded")
    x = rand(rows, k, seed=rows, dtype=dtype)
    w = rand(n, k, seed=n, scale=k**-0.5, dtype=dtype)
    bias = rand(n, seed=3, dtype=dtype)
    panels = ops.pack_panels(w)

    def walked(fetch: bool) -> torch.Tensor:
        ops.panel_fetch(fetch)
        return ops.panel_linear(x, panels, bias, n, gelu=gelu)

    try:
        ops.cpu_amx(False)
        whole, chunks = walked(False), walked(True)
    finally:
        ops.cpu_amx(True)
    assert torch.equal(whole, chunks)
    ref = F.linear(x.float(), w.float(), bias.float())
    native = _native(x, w, bias, gelu, "none")
    assert_close(whole, F.gelu(ref) if gelu else ref, native, dtype, atol=1e-5, rtol=1e-5)
