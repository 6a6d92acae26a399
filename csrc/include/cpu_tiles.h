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
  bool active() const { return lines_ > 0; }  // whether step() has lines left to fetch
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

// A tile's rows of a (T elements, row stride lda), read at reduction step kk: read<U>(r, kk) is the U at a[r, kk],
// next(n) moves on by n elements. One pointer per row with kk as the index leaves the compiler too few general
// registers for a tile of 12 rows: it kept two rows' pointers, the loop bound and b's stride on the stack and
// reloaded them at every step, and the tile ran 5-6 % under the rate of the same loop with every address in a
// register (one thread on a Zen 4, [132, 768] x [768, 768] fp32 from L2). Rows of taller tiles go in threes, each
// three read from one pointer at byte offsets 0, ld and 2 ld held in registers: a third of the pointers, advanced
// by next(). The offsets pass through an empty asm at every step so that the compiler cannot fold them back into
// a pointer per row. Tiles of up to 6 rows (AVX2's, attention's) index each row from a and kk.
template <int MR, typename T>
class TileRows {
  static constexpr bool kGrouped = MR > 6;
  static constexpr int kGroups = kGrouped ? (MR + 2) / 3 : 1;

 public:
  C10_ALWAYS_INLINE TileRows(const T* a, int64_t lda) : a_(a), lda_(lda) {
    if constexpr (kGrouped) {
      ld_ = lda * int64_t{sizeof(T)};
      ld2_ = 2 * ld_;
      MTBF_UNROLL for (int g = 0; g < kGroups; ++g) group_[g] = reinterpret_cast<const char*>(a + 3 * g * lda);
    }
  }
  template <typename U>
  C10_ALWAYS_INLINE U read(int r, int64_t kk) const {
    U v;
    if constexpr (kGrouped) {
      const int j = r % 3;
      std::memcpy(&v, group_[r / 3] + (j == 0 ? 0 : j == 1 ? ld_ : ld2_), sizeof(U));
    } else {
      std::memcpy(&v, a_ + r * lda_ + kk, sizeof(U));
    }
    return v;
  }
  C10_ALWAYS_INLINE void next(int64_t n) {
    if constexpr (kGrouped) {
      MTBF_UNROLL for (int g = 0; g < kGroups; ++g) group_[g] += n * int64_t{sizeof(T)};
      __asm__("" : "+r"(ld_), "+r"(ld2_));
    }
  }

 private:
  const T* a_;
  int64_t lda_;
  int64_t ld_ = 0, ld2_ = 0;
  const char* group_[kGroups] = {};
};

// BT: the type of b's elements, float or bf16 widened exactly to fp32 as it is loaded (half the bytes to read, for
// tiles bound by reading b); the products and sums are fp32.
template <int MR, int NV, typename Epilogue, typename BT = float>
void tile_f32(int64_t k, const float* a, int64_t lda, const BT* b, int64_t ldb, const Epilogue& epi) {
  Vec acc[MR][NV];
  epi.init(acc);
  FetchAhead<Epilogue> ahead(epi, k);
  TileRows<MR, float> rows(a, lda);
  // two copies of the loop: with nothing to fetch, the fetcher's state keeps no registers from the rows
  const auto run = [&](auto fetching) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int64_t kk = 0; kk < k; ++kk) {
      if constexpr (decltype(fetching)::value) ahead.step();
      Vec bv[NV];
      MTBF_UNROLL for (int v = 0; v < NV; ++v) bv[v] = load(b + kk * ldb + v * kLanes, Full{});
      MTBF_UNROLL for (int r = 0; r < MR; ++r) {
        const Vec av(rows.template read<float>(r, kk));
        MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(av, bv[v], acc[r][v]);
      }
      rows.next(1);
    }
  };
  if (ahead.active()) run(std::true_type{});
  else run(std::false_type{});
  epi.finish(acc);
}

#ifdef MTBF_BF16_DOT
template <int MR, int NV, typename Epilogue>
__attribute__((target("avx512bf16"))) void tile_bf16(int64_t k, const at::BFloat16* a, int64_t lda,
                                                     const at::BFloat16* b, int64_t ldb, const Epilogue& epi) {
  Vec acc[MR][NV];
  epi.init(acc);
  FetchAhead<Epilogue> ahead(epi, k / 2);
  TileRows<MR, at::BFloat16> rows(a, lda);
  const auto run = [&](auto fetching) __attribute__((target("avx512bf16"))) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int64_t kk = 0; kk < k; kk += 2) {
      if constexpr (decltype(fetching)::value) ahead.step();
      __m512bh bv[NV];
      MTBF_UNROLL for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kk * ldb + v * 32);
      MTBF_UNROLL for (int r = 0; r < MR; ++r) {
        // a[r, kk] and a[r, kk + 1], broadcast to every lane
        const __m512bh av = (__m512bh)_mm512_set1_epi32(rows.template read<int32_t>(r, kk));
        MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
      }
      rows.next(2);
    }
  };
  if (ahead.active()) run(std::true_type{});
  else run(std::false_type{});
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
