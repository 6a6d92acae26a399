"""panel_linear: x @ W^T + bias (then GELU) for a few rows of x, on a weight packed once into column panels.

A forward over a short input (one query, a small batch) multiplies few rows by every weight of the model, so it is
bound by reading the weights; oneDNN's linear, blocked for many rows, reads them at about half the memory rate at
16 rows (docs/cpu-latency.md). The CPU kernel streams each panel of PANEL columns once per call and runs all the rows
over it. Inference only (no autograd): the encoder calls it where it calls oneDNN's linear, for inputs of few rows.

Panels (`pack_panels`): [P, K, PANEL] in the weight's dtype; bf16 weights, where the CPU multiplies bf16 pairs
(AVX512-BF16), as bf16 [P, ceil(K / 2), PANEL, 2] with each pair of reduction rows interleaved. Elsewhere the kernel
widens bf16 panels to fp32 as it loads them, which reads half the bytes of fp32 panels for the same products, and a
bf16 x is widened once per call. Columns past N and the odd row past K are zero.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from mtbert_fast import _ext
from mtbert_fast.ops import reference
from mtbert_fast.ops._checks import check_gelu
from mtbert_fast.ops.mkl_linear import encoder_rows as mkl_rows
from mtbert_fast.ops.registry import CACHE_LINE, CPU_DTYPES, Backend, Op, tile_rows_alias

PANEL = 32  # columns per panel (csrc/cpu/panel_linear.cpp's kPanel)


@functools.cache
def bf16_pairs() -> bool:
    """Whether bf16 weights pack as bf16 pairs: the AVX-512 CPU kernels are loaded and the CPU has AVX512-BF16."""
    flags = _ext._cpu_flags() or set()
    return _ext.cpu_isa() == "avx512" and "avx512_bf16" in flags


# The most rows for which the encoder's inference linears run panel_linear rather than oneDNN's linear, by the
# instruction set of the CPU kernels loaded. Whole forwards at B=1, oneDNN's time over panel_linear's (all-MiniLM-L6-v2
# / bert-base, 2 threads, interleaved in one process):
# - avx512 (2-core AMD EPYC with AVX-512 and BF16, no AMX): fp32 1.44x / 1.37x at 16 tokens, 1.19x / 1.05x at 48,
#   1.12-1.26x / 1.02-1.10x at 64-128, 1.02-1.08x / 1.01-1.05x at 160-256, 1.06-1.10x / 0.98-1.00x at 384-512;
#   bf16 1.37x / 1.15x at 16, 1.08x / 1.03x at 120, 1.03-1.07x / 1.03-1.05x at 192-256. With the 12-row tiles
#   keeping their rows' addresses in registers (cpu_tiles.h, TileRows), a layer's fp32 products at 256-1,024 rows ran
#   1.03-1.06x oneDNN's speed (MiniLM) and 1.00-1.05x (bert-base) in benchmarks/panel_rows.py, and full batches of 8
#   sequences of 128 tokens (1,024 rows) 1.02-1.08x / 1.00-1.02x on the panels in two runs (benchmarks/panel_rows.py
#   --dtypes fp32 --rows 128 --batch 8 --limits 256 1024), 4 sequences 0.99-1.01x / 1.02x, 16 (2,048 rows) 0.99x /
#   1.00x: fp32 up to 1,024 rows. bf16 read 0.97-1.03x at 512-2,048 rows and keeps its limit.
# - avx2 (2-core AMD EPYC with AVX2, no AVX-512, where oneDNN's kernels are AVX2 ones too): fp32 1.33x / 1.23x at 16,
#   1.15x / 1.16x at 48, 1.11x / 1.05x at 128, 1.03x / 1.08x at 1,024, MiniLM 1.03x at 2,048 and 0.93x at 4,096;
#   bf16 (float32 products on such a CPU) MiniLM 1.39x at 16, 1.17x at 128, 1.10x at 1,024, 1.05x at 2,048.
# - avx512 widened (bf16 on an AVX-512 CPU without AVX512-BF16: the panels widened to fp32 as they load, against
#   oneDNN's float32 product on x widened, as weight_pack runs it there; oneDNN's own bf16 product runs at a quarter of
#   its float32 rate on such a CPU), 2-core Xeon with AVX-512 and VNNI: 1.60x / 1.42x at 16 tokens, 1.19x / 1.05x at
#   128, 1.09x / 1.03x at 512, 1.00x / 1.03x at B=8 L=128, 1.07x / 0.96x at B=16 L=128.
# - avx512 intel (fp32 on an Intel CPU with AVX-512, where oneDNN's float32 product wins from fewer rows than on the
#   EPYC above), 2-core Xeon with AVX-512 and VNNI, with each row block's tile fetching the next panel or chunk as it
#   runs (csrc/cpu/panel_linear.cpp): 1.41x / 1.31x at 16 tokens, 1.20x / 1.19x at 64, 1.02-1.13x / 1.09-1.14x at
#   128, then about even with oneDNN, run to run: 0.94-1.03x / 0.96-1.02x at 256, 0.92-1.06x / 0.96-1.07x at 384,
#   1.01x / 0.96x at 512. Without those fetches oneDNN won from about 96 tokens.
# - avx512 intel amx (fp32 on an Intel CPU with AMX, Sapphire Rapids on: float32 has no AMX products, but the route
#   above the limit wins from fewer rows there), 2-core Xeon with AMX (family 6 model 207), benchmarks/panel_rows.py
#   --dtypes fp32: 1.19x / 1.16x at 48 tokens, 1.09x / 1.05x at 64, 1.00-1.02x / 0.98x at 80, 0.99x / 0.95-0.97x at
#   96, 0.96x / 0.93x at 112, 0.94-0.96x / 0.89-0.93x at 128.
# - avx512 widened, mkl (as avx512 widened, where MKL's packed sgemm multiplies bf16 inputs of more rows as float32,
#   mkl_linear.encoder_rows), same Xeon, whole forwards at B=1, the panels' time over MKL's (benchmarks/mkl_rows.py):
#   0.66-0.75x at 16 tokens, 0.75-0.93x at 32, 0.79-0.81x at 40, 0.88-1.00x at 48, 0.91-1.14x at 64 (two runs),
#   0.94-1.03x at 80, 0.91-1.30x at 96 (two runs), 1.15-1.26x at 112, 1.12-1.44x at 128; B=2-8 sequences of 128
#   tokens 1.06-1.28x. In float32 the two ran even from 64 to 128 tokens there (0.96-1.05x): float32 keeps its limit.
MAX_ROWS = {
    "avx512": {torch.float32: 1024, torch.bfloat16: 256},
    "avx512 intel": {torch.float32: 128},
    "avx512 intel amx": {torch.float32: 64},
    "avx512 widened": {torch.bfloat16: 1024},
    "avx512 widened, mkl": {torch.bfloat16: 96},
    "avx2": {torch.float32: 2048, torch.bfloat16: 2048},
}
# bf16 where the CPU has AMX: oneDNN's bf16 products run on its tiles, several times the rate of the dot products
# panel_linear used before (2-core Intel Xeon with AMX, family 6 model 207, 2 threads, whole forwards of one sequence,
# oneDNN's time over the dot products', MiniLM / bert-base: 1.52x / 1.56x at 4 tokens, 0.39x / 0.22x at 128).
# panel_linear runs its own bf16 products on the tiles too from 2 rows on (its pair panels are the tiles' layout,
# `cpu_amx`). benchmarks/panel_rows.py --dtypes bf16 --rows 16 32 64 128 256 --limits 8 16 32
# 64 128 256, same Xeon, whole forwards of one sequence, oneDNN's time over panel_linear's (per round): bert-base
# 1.33x at 16 tokens, 1.23x at 32, 1.13x at 64, 1.02x at 128, 0.96x at 256; MiniLM 1.31x, 1.06x, 1.06x, 1.09x, 1.10x.
# With the weights evicted before each call (as when other work runs between calls), one process per route: bert-base
# 16 tokens 8.0-8.3 ms on the panels against 10.7-11.1 on oneDNN, 64 tokens 13.6 against 15.4.
AMX_BF16_ROWS = 128
# Narrow weights keep the tile panels for more rows there: oneDNN's bf16 linear on AMX runs products of a few hundred
# rows by weights of at most 512 output features well below its rate on wider ones, where panel_linear's tiles keep
# theirs. benchmarks/tile_rows.py, same Xeon, oneDNN's time (as the encoder calls it) over panel_linear's, median of 21
# interleaved rounds, two runs: [384, 384] (all-MiniLM-L6-v2's attention output) 1.13-2.15x at 160-640 rows,
# 0.95-1.00x at 768-896, 0.64-0.92x from 1,024; [384, 1536] (its FFN output) 1.63-2.00x at 160-640, 1.27-1.54x at
# 768-896, 0.63-0.78x from 1,024. Wider weights (bert-base's, bert-large's) read 0.7-1.3x from 256 rows, and every
# shape 0.5-0.85x from 1,536. Whole MiniLM forwards of 1-5 sequences of 128-256 tokens 1.04-1.11x faster.
NARROW_FEATURES = 512
AMX_BF16_NARROW_ROWS = 640
# Since the tiles run a panel's rows in blocks that stay in L2 and its reduction in chunks that stay in L1, with each
# group's epilogue interleaved with the next group's tile steps, two more kinds of product keep them for more rows.
# Those with GELU (an FFN's input), whose epilogue the tiles' work now hides, and whose GELU oneDNN's post-op applies
# after its product (benchmarks/tile_rows.py, same Xeon, oneDNN's time over the panels', two runs): MiniLM's [1536, 384]
# 1.04-1.73x at 192-3,072 rows, bert-base's [3072, 768] 1.05-3.24x, bert-large's [4096, 1024] 1.05-3.80x but 0.81x at
# 768. And weights of no more output features than input features (an attention output's, an FFN output's) wider than
# NARROW_FEATURES and of at most AMX_BF16_CONTRACTING_MAX_IN input features, where oneDNN runs in the row blocks of
# onednn_row_block: bert-base's [768, 768] 1.09-1.59x at 192-1,024 rows, its [768, 3072] 1.22-1.51x, bert-large's [1024,
# 1024] 1.06-1.45x, all 0.86-0.98x from 1,536. bert-large's [1024, 4096] read 0.82-0.89x at 384-1,024 rows and stays on
# oneDNN; MiniLM's narrow ones, either side of even at 768-1,024 rows (0.86-1.11x over several runs; whole forwards of 8
# sequences of 128 tokens 0.98x with them on the panels), keep AMX_BF16_NARROW_ROWS.
AMX_BF16_GELU_ROWS = 2048
AMX_BF16_CONTRACTING_ROWS = 1024
AMX_BF16_CONTRACTING_MAX_IN = 3072
# bf16 on a CPU with AMX-BF16 whose tiles the CPU kernels do not use (`cpu_amx(False)`): panel_linear multiplies on
# the AVX512-BF16 dot products while oneDNN's linear keeps its tiles, which it takes from a few rows on. Same Xeon,
# benchmarks/panel_rows.py --dtypes bf16 under cpu_amx(False), whole forwards of one sequence, oneDNN's time over the
# dot products' (per round): bert-base 1.25x at 1 token, 1.11-1.14x at 2, 1.03-1.06x at 4, 0.86-0.87x at 8, 0.67-0.69x
# at 16, 0.44x at 32; MiniLM 1.13x at 4, 1.07x at 8, 1.02x at 16, 0.65x at 32. With the limits of the tiles (128
# rows, 640 for narrow weights) a bert-base forward of 128 tokens took 111.9 ms under cpu_amx(False), 23.6 with this.
AMX_BF16_DOT_ROWS = 4


def limit_key(dtype: torch.dtype) -> str:
    """The entry of MAX_ROWS that holds the encoder's row limit for `dtype` here: the CPU kernels loaded, and on
    AVX-512 for bf16 whether they multiply bf16 pairs ("avx512") or widen the panels ("avx512 widened", or "avx512
    widened, mkl" where MKL's packed sgemm takes the rows above), for fp32 whether the CPU is Intel's ("avx512
    intel", or "avx512 intel amx" where it has AMX)."""
    isa = _ext.cpu_isa()
    if isa == "avx512" and dtype == torch.bfloat16 and not bf16_pairs():
        return "avx512 widened, mkl" if mkl_rows(dtype) else "avx512 widened"
    if isa == "avx512" and dtype == torch.float32 and _ext._cpu_vendor() == "GenuineIntel":
        return "avx512 intel amx" if "amx_tile" in (_ext._cpu_flags() or set()) else "avx512 intel"
    return isa


@functools.cache
def encoder_rows(dtype: torch.dtype, out_features: int | None = None, in_features: int | None = None,
                 gelu: bool = False) -> int:
    """The most rows of `dtype` the encoder hands panel_linear (0: never) for a weight [out_features, in_features]
    (None: any weight), with GELU or not: where the AVX-512 or AVX2 kernels are loaded, as MAX_ROWS has it for them;
    for bf16 where the CPU has AMX, fewer, but AMX_BF16_NARROW_ROWS for a weight of at most NARROW_FEATURES features,
    AMX_BF16_CONTRACTING_ROWS for a wider one of no more output features than input features (at most
    AMX_BF16_CONTRACTING_MAX_IN of them), AMX_BF16_GELU_ROWS for a product with GELU (the most of those that apply),
    and AMX_BF16_DOT_ROWS for any product where the CPU kernels keep off the tiles (`cpu_amx()` False: switched off,
    or not granted to the process, where oneDNN is taken to be on the tiles still). Cached; `cpu_amx(allow)` clears
    it."""
    key = limit_key(dtype)
    if not _ext.has_kernel("panel_linear", "CPU") or key not in MAX_ROWS:
        return 0
    if key == "avx512" and dtype == torch.bfloat16 and "amx_bf16" in (_ext._cpu_flags() or set()):
        if not _ext.cpu_amx():
            return AMX_BF16_DOT_ROWS
        rows = min(AMX_BF16_ROWS, MAX_ROWS[key][dtype])
        if out_features is not None and out_features <= NARROW_FEATURES:
            rows = max(rows, AMX_BF16_NARROW_ROWS)
        if out_features is not None and in_features is not None and (
                NARROW_FEATURES < out_features <= in_features <= AMX_BF16_CONTRACTING_MAX_IN):
            rows = max(rows, AMX_BF16_CONTRACTING_ROWS)
        if gelu:
            rows = max(rows, AMX_BF16_GELU_ROWS)
        return rows
    return MAX_ROWS[key].get(dtype, 0)


_ext.on_cpu_amx_switch(encoder_rows.cache_clear)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] (float32 or bfloat16) -> its panels for panel_linear (see the module docstring)."""
    if weight.dim() != 2 or weight.dtype not in CPU_DTYPES:
        raise TypeError(f"pack_panels: weight must be a 2-D float32 or bfloat16 tensor, got {weight.dtype} "
                        f"{tuple(weight.shape)}")
    n, k = weight.shape
    p = -(-n // PANEL)
    w = weight.detach()
    if weight.dtype == torch.bfloat16 and bf16_pairs():
        w = F.pad(w, (0, k % 2, 0, p * PANEL - n))  # [P * PANEL, Kp]
        return w.view(p, PANEL, -1, 2).permute(0, 2, 1, 3).contiguous()
    w = F.pad(w, (0, 0, 0, p * PANEL - n))
    return w.view(p, PANEL, k).transpose(1, 2).contiguous()


def check_product(op: str, x, panels, bias, out_features) -> None:
    """Raises, with `op` leading the message, where x, panels and bias cannot make a panel_linear product of
    out_features columns."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [rows, K], got shape {tuple(x.shape)}")
    if x.dtype not in CPU_DTYPES or panels.dtype not in CPU_DTYPES:
        raise TypeError(f"{op}: x and panels must be float32 or bfloat16, got {x.dtype} and {panels.dtype}")
    if panels.device != x.device:
        raise ValueError(f"{op}: panels are on {panels.device} but x is on {x.device}")
    if out_features <= 0:
        raise ValueError(f"{op}: out_features must be positive, got {out_features}")
    k, p = x.shape[1], -(-out_features // PANEL)
    if panels.dtype == torch.bfloat16 and x.dtype != torch.bfloat16:
        raise TypeError(f"{op}: bfloat16 panels multiply a bfloat16 x only, got x of dtype {x.dtype}")
    want = (p, -(-k // 2), PANEL, 2) if panels.dtype == torch.bfloat16 and panels.dim() == 4 else (p, k, PANEL)
    if tuple(panels.shape) != want:
        raise ValueError(f"{op}: panels must have shape {want} for x of {k} columns and {out_features} out_features "
                         f"(pack_panels of an [{out_features}, {k}] weight), got {tuple(panels.shape)}")
    if bias is not None:
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")
        if bias.shape != (out_features,):
            raise ValueError(f"{op}: bias must have shape ({out_features},) (out_features), got {tuple(bias.shape)}")


def panel_linear(x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, *,
                 gelu: bool = False, approximate: str = "none", backend: str | None = None) -> torch.Tensor:
    """x [M, K] @ W^T + bias -> [M, out_features] in x's dtype, with GELU (approximate "none" or "tanh") when gelu;
    panels = pack_panels(W) for W [out_features, K]. Accumulates in fp32. x may have any row stride; with GELU on the
    CPU the output's rows stand output_row_stride(M, out_features, x.dtype, True) apart, more than out_features where
    rows of 4 KiB would alias in the next product's tiles."""
    check_gelu("panel_linear", approximate)
    check_product("panel_linear", x, panels, bias, out_features)
    return OP(x, panels, bias, out_features, gelu, approximate, backend=backend)


def panel_fetch(allow: bool | None = None) -> bool:
    """Whether the CPU kernel walks each panel in chunks, with the next chunk or panel fetched into L1 while the rows
    run over the current one, for x of up to 384 rows; otherwise it walks whole panels and leaves their fetching to
    the hardware's prefetcher. The same sums in the same order either way (the same bits); only the speed differs.
    On by default with the AVX2 kernels and with the AVX-512 kernels on Intel CPUs, where the chunks ran faster; off
    with the AVX-512 kernels on other CPUs (measured on an AMD EPYC, Zen 4: docs/cpu-latency.md, "Later: the
    panels' walk on an AMD EPYC"). `allow` sets it for this process (None leaves it); False where the CPU kernels
    are not loaded."""
    if not _ext.has_kernel("panel_linear", "CPU"):
        return False
    return bool(torch.ops.mtbert_fast_C.panel_fetch(allow))


def rows_alias(rows: int, row_bytes: int) -> bool:
    """Whether `rows` rows of x, `row_bytes` apart, evict each other in the CPU kernel's tiles (tile_rows_alias, with
    the rows of its largest tile: up to 12 on AVX-512, split evenly). The kernel then multiplies from a copy with rows
    one cache line further apart."""
    if rows <= 0:
        return False
    tile = 12 if _ext.cpu_isa() == "avx512" else 3  # csrc/cpu/panel_linear.cpp's kMaxRows
    blocks = -(-rows // tile)
    return tile_rows_alias(-(-rows // blocks), row_bytes)


def output_row_stride(rows: int, out_features: int, dtype: torch.dtype, gelu: bool) -> int:
    """The row stride of the CPU kernel's output [rows, out_features]: out_features, or one cache line more with GELU
    (an FFN's inner activation, which its output product reads next) where that product's tiles would take the rows
    aliased (rows_alias), so that it reads them without a copy (the output is then not contiguous)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return out_features + CACHE_LINE // elem if gelu and rows_alias(rows, out_features * elem) else out_features


def _fake(x, panels, bias, out_features, gelu, approximate):
    stride = output_row_stride(x.shape[0], out_features, x.dtype, gelu)
    return x.new_empty_strided((x.shape[0], out_features), (stride, 1))


OP = Op(
    name="panel_linear",
    schema="(Tensor x, Tensor panels, Tensor? bias, int out_features, bool gelu, str approximate) -> Tensor",
    reference=reference.panel_linear,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=_fake,
)
