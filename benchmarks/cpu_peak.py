"""The CPU's multiply-add peaks by instruction, and oneDNN's float32 GEMM as a fraction of the float32 one.

    python benchmarks/cpu_peak.py [--threads 2] [--rounds 7]

Each kernel runs 12 independent accumulator chains of one instruction mix in registers (no memory traffic), so its
rate is what the core's vector units can issue: the ceiling of any product built on that mix. The mixes:
  - fp32 fma: vfmadd231ps, 8 (AVX2) or 16 (AVX-512) multiply-adds an instruction;
  - int8 via int16: vpmaddwd + vpaddd on uint8 and int8 values widened to int16, 16 an instruction pair; the exact
    uint8 x int8 product on a CPU without VNNI;
  - int8 via maddubs: vpmaddubsw + vpmaddwd + vpaddd, 32 a triple; the pairs of 8-bit products saturate in int16,
    so it is exact only for activations of 7 bits (0..127) or weights whose neighbouring entries of one sign sum to
    at most 128 in magnitude (what mtbert_fast's int8 weights keep to on such CPUs);
  - AVX-512 only, where the CPU has them: vpdpbusd (VNNI, 64 a instruction) and vdpbf16ps (AVX512-BF16, 32).
Rates are giga multiply-adds a second (GMAC/s; fp32 GFLOP/s are twice that) on one thread and on --threads threads
(each thread its own chains), the median of --rounds rounds, and each mix's rate over fp32 fma's in the same round.
Last, oneDNN's linear [1024, 768] x [768, 3072] in float32 with its weight packed, as the benchmark measures its
GEMM rate, and mtbert_fast's panel_linear at [128, 768] x [768, 3072] (the FFN input product of bert-base on one
sequence of 128 tokens, the products a batch-1 forward runs), each as a fraction of the fp32 fma peak on the same
threads.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

SOURCE = r"""
#include <immintrin.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <chrono>
#include <cstdint>

namespace {

constexpr int kChains = 12;

// Keeps the compiler from hoisting a loop-invariant operand out of the loop, or from computing one product for every
// chain: each use sees a value it cannot prove equal to another. Emits no instruction (at most a register copy).
#define OPAQUE(x) asm volatile("" : "+x"(x))

__attribute__((target("avx2,fma"))) double fma_ymm(int64_t iters) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(0.001f * i);
  __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-6f);
  for (int64_t n = 0; n < iters; ++n) {
    OPAQUE(b);
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_ps(s, acc[i]);
  return _mm256_cvtss_f32(s) * 1e-30 + double(iters) * kChains * 8;
}

__attribute__((target("avx2"))) double madd_ymm(int64_t iters) {
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i x = _mm256_set1_epi16(200), w = _mm256_set1_epi16(-100);
  for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) {
      __m256i xi = x;
      OPAQUE(xi);
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(xi, w));
    }
  }
  __m256i s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_epi32(s, acc[i]);
  return (_mm256_cvtsi256_si32(s) & 1) * 1e-30 + double(iters) * kChains * 16;
}

__attribute__((target("avx2"))) double maddubs_ymm(int64_t iters) {
  __m256i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_epi32(i);
  __m256i x = _mm256_set1_epi8(100), w = _mm256_set1_epi8(-100), ones = _mm256_set1_epi16(1);
  for (int64_t n = 0; n < iters; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) {
      __m256i xi = x;
      OPAQUE(xi);
      acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(_mm256_maddubs_epi16(xi, w), ones));
    }
  }
  __m256i s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm256_add_epi32(s, acc[i]);
  return (_mm256_cvtsi256_si32(s) & 1) * 1e-30 + double(iters) * kChains * 32;
}

__attribute__((target("avx512f"))) double fma_zmm(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-6f);
  for (int64_t n = 0; n < iters; ++n) {
    OPAQUE(b);
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], b, c);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s) * 1e-30 + double(iters) * kChains * 16;
}

__attribute__((target("avx512f,avx512vnni"))) double vnni_zmm(int64_t iters) {
  __m512i acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
  __m512i x = _mm512_set1_epi8(100), w = _mm512_set1_epi8(-100);
  for (int64_t n = 0; n < iters; ++n) {
    OPAQUE(x);
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], x, w);
  }
  __m512i s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_epi32(s, acc[i]);
  return (_mm512_reduce_add_epi32(s) & 1) * 1e-30 + double(iters) * kChains * 64;
}

__attribute__((target("avx512f,avx512bf16"))) double bf16_zmm(int64_t iters) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(0.001f * i);
  __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), w = (__m512bh)_mm512_set1_epi32(0x3f003f00);
  for (int64_t n = 0; n < iters; ++n) {
    OPAQUE(x);
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, w);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kChains; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s) * 1e-30 + double(iters) * kChains * 32;
}

using Kernel = double (*)(int64_t);

Kernel kernel_of(const std::string& name) {
  if (name == "fp32 fma" && __builtin_cpu_supports("avx512f")) return fma_zmm;
  if (name == "fp32 fma") return fma_ymm;
  if (name == "int8 via int16") return madd_ymm;
  if (name == "int8 via maddubs") return maddubs_ymm;
  if (name == "int8 vnni") return vnni_zmm;
  if (name == "bf16 dot") return bf16_zmm;
  TORCH_CHECK(false, "cpu_peak: unknown kernel ", name);
}

}  // namespace

bool supported(const std::string& name) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return false;
  if (name == "int8 vnni") return __builtin_cpu_supports("avx512vnni");
  if (name == "bf16 dot") return __builtin_cpu_supports("avx512bf16");
  return true;
}

// Multiply-adds a second, summed over `threads` threads that each run `iters` iterations of the kernel.
double rate(const std::string& name, int64_t iters, int64_t threads) {
  const Kernel k = kernel_of(name);
  std::vector<double> macs(threads, 0.0);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) macs[t] = k(iters);
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (double m : macs) total += m;
  return total / s;
}
"""

MIXES = ("fp32 fma", "int8 via int16", "int8 via maddubs", "int8 vnni", "bf16 dot")
ITERS = 20_000_000  # about 0.1-0.2 s a kernel on one core


def _product_rate(call, rows: int) -> float:
    """GFLOP/s of call(), a [rows, 768] x [768, 3072] product: the median of 15 calls after 3 untimed ones."""
    times = []
    for i in range(18):
        t = time.perf_counter()
        call()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 2 * rows * 768 * 3072 / statistics.median(times) / 1e9


def gemm_rate() -> float:
    """oneDNN's float32 linear [1024, 768] x [768, 3072] with a packed weight, in GFLOP/s (median of 15)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1024, 768, generator=g), torch.randn(3072, 768, generator=g)
    packed = torch.ops.mkldnn._reorder_linear_weight(w)
    return _product_rate(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""), 1024)


def panel_rate(rows: int = 128) -> float | None:
    """mtbert_fast's panel_linear [rows, 768] x [768, 3072] in float32 with its weight in panels, in GFLOP/s (median
    of 15); None where the package's CPU kernels are not loaded."""
    try:
        from mtbert_fast import _ext
        from mtbert_fast.ops import pack_panels, panel_linear
    except ImportError:
        return None
    if not _ext.has_kernel("panel_linear", "CPU"):
        return None
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 768, generator=g), torch.randn(3072, 768, generator=g)
    panels = pack_panels(w)
    return _product_rate(lambda: panel_linear(x, panels, None, 3072), rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ext = load_inline("mtbert_fast_cpu_peak", cpp_sources=SOURCE, functions=["supported", "rate"],
                      extra_cflags=["-O2", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    torch.set_num_threads(args.threads)
    mixes = [m for m in MIXES if ext.supported(m)]
    print(f"cpu: {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; "
          f"not on this CPU: {', '.join(m for m in MIXES if m not in mixes) or 'none'}")
    rows = {(m, t): [] for m in mixes for t in (1, args.threads)}
    for _ in range(args.rounds):
        for threads in (1, args.threads):
            for m in mixes:
                rows[m, threads].append(ext.rate(m, ITERS, threads) / 1e9)
    print(f"    {'mix':18s} {'GMAC/s, 1 thread':>17s} {f'{args.threads} threads':>11s}   over fp32 fma")
    for m in mixes:
        one, all_ = (statistics.median(rows[m, t]) for t in (1, args.threads))
        ratio = statistics.median(a / b for a, b in zip(rows[m, args.threads], rows["fp32 fma", args.threads]))
        print(f"    {m:18s} {one:17.1f} {all_:11.1f}   {ratio:.2f}x")
    peak = 2 * statistics.median(rows["fp32 fma", args.threads])
    rate = gemm_rate()
    print(f"oneDNN fp32 GEMM [1024, 768] x [768, 3072]: {rate:.1f} GFLOP/s, {rate / peak:.2f} of the fp32 fma peak "
          f"({peak:.1f} GFLOP/s on {args.threads} threads)")
    panels = panel_rate()
    if panels is None:
        print("mtbert_fast panel_linear: not measured (the package's CPU kernels are not loaded)")
    else:
        print(f"mtbert_fast panel_linear fp32 [128, 768] x [768, 3072]: {panels:.1f} GFLOP/s, {panels / peak:.2f} of the"
              f" peak, {panels / rate:.2f} of the GEMM")


if __name__ == "__main__":
    main()
