"""mkl_linear, the float32 and bfloat16 inference linear on MKL's packed sgemm, on every backend that runs here against
the reference (op_testing.py states the backends and tolerances): one pack for every row count, its GELU and bias,
bf16 as float32 products rounded once, its errors, and where the encoder takes it."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F

from mtbert_fast import _ext, ops
from mtbert_fast.ops import reference
from op_testing import assert_close, rand

OP_NAME = "mkl_linear"
# the module (mtbert_fast.ops.mkl_linear is the wrapper function)
mkl_module = importlib.import_module("mtbert_fast.ops.mkl_linear")
ACTIVATIONS = [(False, "none"), (True, "none"), (True, "tanh")]

pytestmark = pytest.mark.skipif(not mkl_module.available(), reason="this PyTorch has no MKL")


def _native(x, w, bias, gelu, approximate):
    y = F.linear(x, w, bias)
    return F.gelu(y, approximate=approximate) if gelu else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gelu,approximate", ACTIVATIONS)
@pytest.mark.parametrize("K,N", [(1, 1), (7, 33), (96, 40), (384, 1152), (301, 70)])
def test_one_pack_serves_every_row_count(backend, K, N, gelu, approximate, dtype):
    """One pack, multiplied by x of 1 to 1,500 rows (MKL's small- and large-row kernels, one or several blocks of
    rows), with and without a bias: the reference's product each time, in x's dtype."""
    w, bias = rand(N, K, seed=1, scale=K**-0.5).to(dtype), rand(N, seed=2).to(dtype)
    pack = ops.pack_mkl(w)
    for M in (1, 5, 40, 300, 1500):
        x = rand(M, K, seed=M).to(dtype)
        for b in (bias, None):
            out = backend.forward(x, pack, w, b, gelu, approximate)
            assert out.dtype == dtype and out.shape == (M, N)
            ref = reference.mkl_linear(x.double(), pack, w.double(), None if b is None else b.double(), gelu,
                                       approximate)
            assert_close(out, ref, _native(x, w, b, gelu, approximate), dtype, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gelu,approximate", ACTIVATIONS)
def test_bf16_is_the_float32_product_rounded_once(gelu, approximate):
    """bf16 x, weight and bias: the float32 kernel's result on the same values widened, rounded once to bf16, bit for
    bit, over several blocks of rows (the bf16 pack is the widened weight's)."""
    w, bias = rand(200, 96, seed=1, scale=0.1).bfloat16(), rand(200, seed=2).bfloat16()
    x = rand(600, 96, seed=3).bfloat16()
    wide = w.float()
    out = ops.mkl_linear(x, ops.pack_mkl(w), w, bias, gelu=gelu, approximate=approximate)
    want = ops.mkl_linear(x.float(), ops.pack_mkl(wide), wide, bias.float(), gelu=gelu, approximate=approximate)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())


def test_x_of_any_row_stride():
    """Rows of x a slice of wider rows, or x transposed (copied for the product): the product of its values."""
    w, bias = rand(40, 24, seed=1, scale=0.2), rand(40, seed=2)
    pack = ops.pack_mkl(w)
    wide = rand(30, 64, seed=3)
    for x in (wide[:, 8:32], rand(24, 30, seed=4).t(), wide[::2, :24]):
        torch.testing.assert_close(ops.mkl_linear(x, pack, w, bias), F.linear(x, w, bias), atol=1e-5, rtol=1e-5)


def test_no_rows():
    w = rand(40, 24, seed=1)
    assert ops.mkl_linear(torch.empty(0, 24), ops.pack_mkl(w), w).shape == (0, 40)


def test_pack_is_a_header_and_mkl_buffer():
    w = rand(40, 24, seed=1)
    pack = ops.pack_mkl(w)
    assert pack.dtype == torch.uint8 and pack.dim() == 1 and pack.numel() > 64 + w.numel() * 4


@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_errors_name_the_problem(call):
    """A pack of another weight, bytes that are no pack, and x, weight and bias of the wrong dtype or shape: each
    refused with its reason."""
    w, bias = rand(40, 24, seed=1), rand(40, seed=2)
    x, pack = rand(5, 24, seed=3), ops.pack_mkl(w)
    kernel = mkl_module.OP.kernel("cpu")
    run = (lambda x, p, w, b=None: ops.mkl_linear(x, p, w, b)) if call == "wrapper" else (
        lambda x, p, w, b=None: kernel(x, p, w, b, False, "none"))
    with pytest.raises(RuntimeError, match=r"pack holds a \[40, 24\] weight, but the weight is \[24, 24\]"):
        run(x, pack, rand(24, 24))
    with pytest.raises(RuntimeError, match="not made by mkl_pack"):
        run(x, torch.zeros(4096, dtype=torch.uint8), w)
    with pytest.raises((TypeError, RuntimeError), match="both float32 or both bfloat16|weight must have x's dtype"):
        run(x.bfloat16(), pack, w)
    with pytest.raises((TypeError, RuntimeError), match="float32 or (both )?bfloat16"):
        run(x.half(), pack, w.half())
    with pytest.raises((ValueError, RuntimeError), match="bias must be torch.bfloat16|bias must have x's dtype"):
        run(x.bfloat16(), pack, w.bfloat16(), bias)
    with pytest.raises((ValueError, RuntimeError), match=r"weight must be \[N, 24\]"):
        run(rand(5, 24), pack, rand(40, 23))
    with pytest.raises((ValueError, RuntimeError), match=r"bias must .*shape.*40"):
        run(x, pack, w, bias[:-1])
    with pytest.raises((TypeError, RuntimeError), match="pack"):
        run(x, pack.view(torch.int8) if call == "wrapper" else pack[None], w)


@pytest.mark.parametrize("call", ["wrapper", "kernel"])
def test_a_moved_pack_is_refused(call):
    """MKL's buffer holds addresses into itself: a copy of a pack (clone(), a deep copy) is refused, never multiplied,
    even at a row count it would serve."""
    w = rand(40, 24, seed=1, scale=0.2)
    pack = ops.pack_mkl(w)
    moved = pack.clone()
    kernel = mkl_module.OP.kernel("cpu")
    for x in (rand(5, 24, seed=3), rand(300, 24, seed=4)):
        with pytest.raises(RuntimeError, match="pack has moved since mkl_pack made it"):
            ops.mkl_linear(x, moved, w) if call == "wrapper" else kernel(x, moved, w, None, False, "none")


def test_wrapper_refuses_a_gelu_it_does_not_know():
    w = rand(40, 24, seed=1)
    with pytest.raises(ValueError, match="approximate"):
        ops.mkl_linear(rand(5, 24), ops.pack_mkl(w), w, gelu=True, approximate="sigmoid")


def test_pack_mkl_takes_float32_and_bfloat16_cpu_weights_only():
    with pytest.raises(TypeError, match="pack_mkl: weight must be a 2-D float32 or bfloat16 CPU tensor"):
        ops.pack_mkl(rand(40, 24).half())
    with pytest.raises(TypeError, match="pack_mkl"):
        ops.pack_mkl(rand(40))


@pytest.mark.parametrize("vendor,isa,want", [("GenuineIntel", "avx512", True), ("AuthenticAMD", "avx512", False),
                                             ("GenuineIntel", "avx2", False)])
def test_the_encoder_takes_it_on_intel_avx512_only(vendor, isa, want, monkeypatch):
    """Measured faster than oneDNN's linear on an Intel CPU with AVX-512; elsewhere not measured, so not taken."""
    monkeypatch.setattr(_ext, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(_ext, "cpu_isa", lambda: isa)
    mkl_module.route.cache_clear()
    try:
        assert mkl_module.route() is want
    finally:
        mkl_module.route.cache_clear()


@pytest.mark.parametrize("flags,bf16", [({"avx512f", "avx512_vnni"}, True), ({"avx512f", "avx512_bf16"}, False),
                                       ({"avx512f", "avx512_bf16", "amx_bf16"}, False)])
def test_encoder_rows_bound_the_route(flags, bf16, monkeypatch):
    """The encoder hands mkl_linear inputs where the route is taken: float32 of up to 1,536 rows (768 by a weight of
    at most 512 features on either side, on more than one thread), and bf16 of any count, by any weight, where the CPU
    has no bf16 arithmetic (its bf16 products are float32 ones anyway); nothing else."""
    monkeypatch.setattr(_ext, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(mkl_module, "route", lambda: True)
    mkl_module.bf16_on_float32.cache_clear()
    threads = torch.get_num_threads()
    try:
        narrow = [(1152, 384), (384, 1536), (512, 4096), (4096, 512), (32, 32)]
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert mkl_module.encoder_rows(torch.float32) == 1536
            for out_features, in_features in [(2304, 768), (768, 3072), (513, 4096)]:
                assert mkl_module.encoder_rows(torch.float32, out_features, in_features) == 1536
            for out_features, in_features in narrow:
                assert mkl_module.encoder_rows(torch.float32, out_features, in_features) == (1536 if n == 1 else 768)
        assert mkl_module.encoder_rows(torch.bfloat16) == (sys.maxsize if bf16 else 0)
        assert mkl_module.encoder_rows(torch.bfloat16, 384, 384) == (sys.maxsize if bf16 else 0)
        assert mkl_module.encoder_rows(torch.float16) == 0
        monkeypatch.setattr(mkl_module, "route", lambda: False)
        assert mkl_module.encoder_rows(torch.float32) == mkl_module.encoder_rows(torch.bfloat16) == 0
    finally:
        torch.set_num_threads(threads)
        mkl_module.bf16_on_float32.cache_clear()
