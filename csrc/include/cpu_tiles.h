// Register-blocked GEMM tiles for the CPU kernels: acc [MR rows, NV vectors] = a @ b with b packed in rows of
// vectors (bf16: pairs of rows interleaved, the layout vdpbf16ps multiplies), and an epilogue that sets the
// accumulators up and takes them away. attention_varlen and panel_linear run on them.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cpu_utils.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define MTBF_BF16_DOT 1
#endif

// Fully unrolls a loop over a tile's rows or vectors, so that its accumulators stay in registers.
#define MTBF_UNROLL _Pragma("GCC unroll 32")

namespace mtbert_fast::cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

// Rows of the GEMM reduction dimension that the compute type consumes at once: bf16 dot products take pairs.
template <typename CT>
constexpr int64_t kPair = std::is_same<CT, float>::value ? 1 : 2;

// GEMM tiles: acc [MR, NV vectors] = a [MR, k] @ b [k, NV * kLanes], handed to an epilogue that sets the accumulators
// up (init) and takes them away (finish). a is row-major with leading dimension lda. b is packed: rows of ldb
// columns (a multiple of kLanes), and for bf16 each pair of rows interleaved ([k / 2, ldb, 2]), the layout vdpbf16ps
// multiplies. k must be a multiple of kPair<CT>.
//
// An epilogue may also hand its tile memory to fetch into L1 while it runs: fetch_lines cache lines from fetch on,
// the data its caller reads next. The tile spreads them evenly over its reduction steps, at most one line a step, so
// that they arrive while it computes and never queue up ahead of its own loads, as a burst of prefetches before the
// tile would. Lines beyond one a step are left to the hardware's prefetcher.

template <typename E, typename = void>
struct FetchesAhead : std::false_type {};
template <typename E>
struct FetchesAhead<E, std::void_t<decltype(std::declval<const E&>().fetch_lines)>> : std::true_type {};

// The fetches of one tile's epilogue over `steps` reduction steps: step() once per step.
template <typename Epilogue>
class FetchAhead {
 public:
  FetchAhead(const Epilogue& epi, int64_t steps) {
    if constexpr (FetchesAhead<Epilogue>::value) {
      next_ = static_cast<const char*>(epi.fetch);
      lines_ = epi.fetch_lines;
      every_ = lines_ > 0 ? std::max<int64_t>(1, steps / lines_) : 0;
      left_ = every_;
    }
  }
  C10_ALWAYS_INLINE void step() {
    if constexpr (FetchesAhead<Epilogue>::value) {
      if (lines_ > 0 && --left_ == 0) {
        __builtin_prefetch(next_, 0, 3);
        next_ += 64;
        --lines_;
        left_ = every_;
      }
    }
  }

 private:
  const char* next_ = nullptr;
  int64_t lines_ = 0, every_ = 0, left_ = 0;
};

// BT: the type of b's elements, float or bf16 widened exactly to fp32 as it is loaded (half the bytes to read, for
// tiles bound by reading b); the products and sums are fp32.
template <int MR, int NV, typename Epilogue, typename BT = float>
void tile_f32(int64_t k, const float* a, int64_t lda, const BT* b, int64_t ldb, const Epilogue& epi) {
  Vec acc[MR][NV];
  epi.init(acc);
  FetchAhead<Epilogue> ahead(epi, k);
  for (int64_t kk = 0; kk < k; ++kk) {
    ahead.step();
    Vec bv[NV];
    MTBF_UNROLL for (int v = 0; v < NV; ++v) bv[v] = load(b + kk * ldb + v * kLanes, Full{});
    MTBF_UNROLL for (int r = 0; r < MR; ++r) {
      const Vec av(a[r * lda + kk]);
      MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
    }
  }
  epi.finish(acc);
}

#ifdef MTBF_BF16_DOT
template <int MR, int NV, typename Epilogue>
__attribute__((target("avx512bf16"))) void tile_bf16(int64_t k, const at::BFloat16* a, int64_t lda,
                                                     const at::BFloat16* b, int64_t ldb, const Epilogue& epi) {
  Vec acc[MR][NV];
  epi.init(acc);
  FetchAhead<Epilogue> ahead(epi, k / 2);
  for (int64_t kk = 0; kk < k; kk += 2) {
    ahead.step();
    __m512bh bv[NV];
    MTBF_UNROLL for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kk * ldb + v * 32);
    MTBF_UNROLL for (int r = 0; r < MR; ++r) {
      int32_t pair;  // a[r, kk] and a[r, kk + 1], broadcast to every lane
      std::memcpy(&pair, a + r * lda + kk, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  epi.finish(acc);
}

inline bool cpu_has_bf16_dot() { return kCpuHasAvx512Bf16; }
#endif

template <typename CT, typename Epilogue>
using TileFn = void (*)(int64_t, const CT*, int64_t, const CT*, int64_t, const Epilogue&);

template <typename CT, int MR, int NV, typename Epilogue>
constexpr TileFn<CT, Epilogue> tile_fn() {
#ifdef MTBF_BF16_DOT
  if constexpr (std::is_same<CT, at::BFloat16>::value) return &tile_bf16<MR, NV, Epilogue>;
  else
#endif
    return &tile_f32<MR, NV, Epilogue>;
}

}  // namespace mtbert_fast::cpu
