"""mkl_linear: x @ W^T + bias (then GELU) in float32 by MKL's packed sgemm, on a weight packed once (`pack_mkl`).

PyTorch's x86 builds carry MKL. Its packed sgemm keeps the weight in the layout its kernels read, so a product
copies nothing but x's blocks; on a Xeon with AVX-512 it ran the products of bert-base and all-MiniLM-L6-v2 of
160-256 rows 1.1-1.3x faster than oneDNN's linear on a weight in oneDNN's blocked layout, and whole forwards of
256-1,024 tokens 1.00-1.21x (docs/cpu-full-batch.md).
The encoder uses it for float32 inputs of more rows than panel_linear takes and up to MAX_ROWS (NARROW_ROWS for
the products by narrow weights, such as all-MiniLM-L6-v2's, on more than one thread), on Intel CPUs with AVX-512
(`route`, `encoder_rows`), and there for bf16 inputs of every count above panel_linear's where the CPU has no bf16
arithmetic; elsewhere (more rows, AMD's CPUs, where MKL's speed was not measured, or a
PyTorch without MKL) it keeps oneDNN's linear.

bfloat16 x and weights run the same float32 products of the same exact terms, with float32 sums rounded once to
bf16: the pack holds the weight widened, and the kernel widens x a block of rows at a time. That is how the encoder
runs bf16 on such CPUs where they have no bf16 arithmetic (no AVX512-BF16 or AMX), where oneDNN's own bf16 product
runs at a quarter of its float32 rate.

A pack (`pack_mkl`) is a uint8 vector: a 64-byte header (the address it was packed at, N, K), then MKL's buffer, about
2.2x the weight's float32 bytes (4.4x a bf16 weight's). MKL sizes that buffer alike for every row count, so one pack
serves every input, and `route()` checks that once per process on a small product at several row counts. MKL's buffer
holds addresses into itself, so a pack copied elsewhere (`clone()`, a deep copy) is refused with an error, never
multiplied: make packs where they are used (weight_pack keeps one per weight). The pack must be `pack_mkl(weight)` of
the very weight given with it. Inference only (no autograd); float32 and bfloat16.
"""

from __future__ import annotations

import functools
import sys

import torch

from mtbert_fast import _ext
from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op


def available() -> bool:
    """Whether MKL's packed sgemm can run here: the CPU kernels are loaded and this PyTorch carries MKL."""
    return _ext.has_kernel("mkl_linear", "CPU") and torch.ops.mtbert_fast_C.mkl_sgemm_available()


def pack_mkl(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] float32 or bfloat16 -> its MKL pack (see the module docstring) for mkl_linear. MKL plans the
    pack's work for torch's thread count now: products on more threads run correctly, but those of a few hundred rows
    on as many threads as the pack was made under, so pack again after torch.set_num_threads (weight_pack.mkl_weight
    does)."""
    if weight.dim() != 2 or weight.dtype not in CPU_DTYPES or weight.device.type != "cpu":
        raise TypeError(f"pack_mkl: weight must be a 2-D float32 or bfloat16 CPU tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)} on {weight.device}")
    if not available():
        raise RuntimeError("pack_mkl: MKL's packed sgemm is not available here (a PyTorch without MKL, or the CPU "
                           "kernels are not built)")
    return torch.ops.mtbert_fast_C.mkl_pack(weight)


# The most rows of each dtype the encoder hands mkl_linear (sys.maxsize: every count). Whole forwards of B sequences of
# 128 tokens on 2-core Xeons with AVX-512, oneDNN's time over MKL's (benchmarks/mkl_rows.py, of medians / per round):
# - float32, family 6 model 207 (AVX-512 and VNNI shown, no BF16 or AMX): bert-base 1.21x / 1.17x at B=2, 1.14x /
#   1.11x at B=4, 1.06-1.07x at B=8, 0.97-1.04x at B=16 and 0.98-0.99x at B=32; MiniLM 1.02-1.07x at B=2, 1.09-1.21x
#   at B=4, 1.00-1.03x at B=8, 0.94-0.97x at B=16 and 0.87-0.94x at B=32;
# - float32, family 6 model 167 (with AMX), two runs: bert-base 1.07-1.08x at B=4, 1.05-1.09x at B=8, 1.02-1.03x at
#   B=12, 1.01-1.02x at B=16; MiniLM (see NARROW_ROWS) 1.02-1.03x at B=4, 1.00-1.05x at B=5, 1.00-1.01x at B=6,
#   0.98-0.99x at B=7, 0.97-0.98x at B=8, 0.96-0.97x at B=12;
# - bfloat16 where the CPU has no bf16 arithmetic (against oneDNN's float32 product on x widened for each product):
#   bert-base 1.11-1.15x at B=2-4, 1.20-1.24x at B=8, 1.14-1.16x at B=16, 1.25-1.26x at B=32; MiniLM 1.11-1.20x at
#   B=2-8, 1.15-1.16x at B=16 and B=32.
MAX_ROWS = {torch.float32: 1536, torch.bfloat16: sys.maxsize}
# Fewer float32 rows for a weight with at most NARROW_FEATURES features on either side (all-MiniLM-L6-v2's, of hidden
# size 384) where torch runs more than one thread: past about 768 rows oneDNN's product by such a weight ran as fast
# as MKL's or faster on two threads (the MiniLM figures above; its products alone at 896-1,536 rows, GFLOP/s oneDNN /
# MKL: QKV 331-395 / 345-393, attention output 325-388 / 332-370, FFN input with GELU 314-362 / 308-342), but not on
# one (same Xeon, one thread: MiniLM 1.03-1.05x at B=6, 1.02-1.03x at B=8, 0.99-1.00x at B=12).
NARROW_FEATURES = 512
NARROW_ROWS = {torch.float32: 768}


@functools.cache
def route() -> bool:
    """Whether the encoder multiplies inputs of many rows by mkl_linear here (see encoder_rows): on an Intel CPU with
    the AVX-512 kernels loaded, where MKL is available and one pack gives x @ W^T at 1, 5, 40 and 300 rows."""
    if _ext.cpu_isa() != "avx512" or _ext._cpu_vendor() != "GenuineIntel" or not available():
        return False
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 72, generator=g)
    pack = pack_mkl(w)
    kernel = OP.kernel("cpu")
    for rows in (1, 5, 40, 300):
        x = torch.randn(rows, 72, generator=g)
        if not torch.allclose(kernel(x, pack, w, None, False, "none"), x @ w.t(), rtol=1e-5, atol=1e-5):
            return False
    return True


@functools.cache
def bf16_on_float32() -> bool:
    """Whether this CPU multiplies bf16 only by widening it to float32: no AVX512-BF16 or AMX among its features
    (read from /proc/cpuinfo once: the encoder asks on every bf16 product)."""
    return not {"avx512_bf16", "amx_bf16"} & (_ext._cpu_flags() or set())


def encoder_rows(dtype: torch.dtype, out_features: int | None = None, in_features: int | None = None) -> int:
    """The most rows of `dtype` the encoder hands mkl_linear here (0: never) for a weight [out_features, in_features]
    (None: any weight): where route(), for float32, MAX_ROWS, or NARROW_ROWS for a weight of at most NARROW_FEATURES
    features on either side on more than one thread, and for bfloat16 MAX_ROWS where the CPU has no bf16 arithmetic
    (bf16_on_float32)."""
    if not route() or (dtype == torch.bfloat16 and not bf16_on_float32()):
        return 0
    rows = MAX_ROWS.get(dtype, 0)
    if (out_features is not None and in_features is not None and min(out_features, in_features) <= NARROW_FEATURES
            and torch.get_num_threads() > 1):
        rows = min(rows, NARROW_ROWS.get(dtype, rows))
    return rows


def mkl_linear(x: torch.Tensor, pack: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               gelu: bool = False, approximate: str = "none", backend: str | None = None) -> torch.Tensor:
    """x [M, K] @ weight^T + bias -> [M, N] in x's dtype (float32 or bfloat16, float32 products and sums), with
    GELU (approximate "none" or "tanh") when gelu; pack = pack_mkl(weight) for weight [N, K], weight and bias of x's
    dtype. x may have any row stride."""
    check_gelu("mkl_linear", approximate)
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"mkl_linear: x and weight must be 2-D, got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if x.dtype not in CPU_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"mkl_linear: x and weight must be both float32 or both bfloat16, got {x.dtype} and "
                        f"{weight.dtype}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"mkl_linear: weight must be [N, {x.shape[1]}] for x of {x.shape[1]} columns, got "
                         f"{tuple(weight.shape)}")
    if pack.dtype != torch.uint8 or pack.dim() != 1:
        raise TypeError(f"mkl_linear: pack must be the uint8 vector of pack_mkl(weight), got {pack.dtype} "
                        f"{tuple(pack.shape)}")
    for name, t in (("pack", pack), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"mkl_linear: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"mkl_linear: bias must be {x.dtype} of shape ({weight.shape[0]},) (out_features), got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    return OP(x, pack, weight, bias, gelu, approximate, backend=backend)


def _fake(x, pack, weight, bias, gelu, approximate):
    return x.new_empty((x.shape[0], weight.shape[0]))


OP = Op(
    name="mkl_linear",
    schema="(Tensor x, Tensor pack, Tensor weight, Tensor? bias, bool gelu, str approximate) -> Tensor",
    reference=reference.mkl_linear,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=_fake,
)
