// Bidirectional attention over packed variable-length sequences, CPU.
//
// The kernels read Q, K and V straight out of the packed qkv [T, 3, heads, head_dim] of the fused QKV GEMM and
// never build a padded [B, heads, L, L] tensor. The forward splits the work over (sequence, head, query block), the
// backward over (sequence, head); each piece runs small register-blocked GEMMs on operands packed into thread-local
// buffers. Softmax and every accumulation are
// fp32; the softmax is streamed over key blocks of kKeyBlock, so one block covers L <= 512. Buffers follow the
// real sequence lengths, so max_seqlen is not needed.
//
// Position terms: a relative position bias (rel_bias [heads, 2R+1], indexed by the clamped distance j - i) joins the
// scores before the softmax, and a local window (|j - i| <= window) masks them and skips the key tiles outside its
// band, forward and backward. The forward takes each as a compile-time flag: without them its inner loops test
// nothing. Per-token position tables (DeBERTa's disentangled attention: pos_q and pos_k [heads, T, W], read at the
// column pos_index gives the clamped distance) join the scores as the bias does; the forward gathers their terms,
// with rel_bias's, into the scores buffer before the Q K^T tile adds to them.
//
// Dropout (dropout_p > 0) multiplies the normalized probabilities by the Philox mask of philox.h, drawn as keep bits
// where they are used: in the forward per query row, in the backward per query block (regenerated, never stored).
//
// Precision of bf16 inputs: the products of two input tensors (Q K^T, dO V^T) use the AVX512-BF16 dot product
// (vdpbf16ps, exact products, fp32 sums) where the CPU has it. So does the forward's P V, on the unnormalized
// probabilities rounded to bf16 (their sum stays that of the fp32 ones), as PyTorch's own CPU attention and
// FlashAttention round them: the output's error is then PyTorch's (rms over random inputs; a P V in fp32 had 0.9x
// of it, at half the rate). The backward's products with probabilities or their gradients (P^T dO, dS K, dS^T Q)
// stay fp32 with the bf16 operand widened when packed. On CPUs with AMX-BF16 the forward without position terms or
// dropout runs its two products on AMX tiles instead (forward_blocks_amx): the same exact products and fp32 sums, in
// another order.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

#include "attention_dropout.h"
#include "checks.h"
#include "cpu_amx.h"
#include "cpu_tiles.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using cpu::kLanes;
using cpu::kPair;
using cpu::TileFn;
using cpu::tile_fn;
using cpu::Vec;
#ifdef MTBF_BF16_DOT
using cpu::cpu_has_bf16_dot;
#endif
// Register tile: kTileRows rows x up to kTileVecs vectors of accumulators (24 of the 32 AVX-512 registers).
constexpr int kTileRows = 6;
constexpr int kTileVecs = kLanes >= 16 ? 4 : 2;

constexpr int64_t kQueryBlock = 64;    // forward rows per work item
constexpr int64_t kKeyBlock = 512;     // forward keys per softmax step
constexpr int64_t kBackwardBlock = 128;  // backward query and key block
constexpr int64_t kRunsPerThread = 4;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// n elements set to zero, on a 64-byte boundary (tile loads and vectors of 64 bytes then read whole cache lines), for
// the packed operands: std::vector value-initialises bf16 elements one 2-byte store at a time, which took a twentieth
// of the forward on short sequences.
template <typename T>
class Zeroed {
 public:
  explicit Zeroed(int64_t n) {
    const size_t bytes = round_up(std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)), 64);
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p_ != nullptr, "attention_varlen: out of memory for a buffer of ", n, " elements");
    std::memset(p_.get(), 0, bytes);
  }
  T* data() { return p_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
};

// C10_ALWAYS_INLINE on pick_tile_vecs, pick_tile, pack_b and prefetch_share: GCC inlines them into the forward by
// itself while one instantiation calls them, not once each position term has its own, and out of line they slow the
// plain forward by 2 to 4% (fp32, L = 128).
template <typename CT, typename Epilogue, int MR>
C10_ALWAYS_INLINE TileFn<CT, Epilogue> pick_tile_vecs(int nv) {
  if constexpr (kTileVecs >= 4) {
    if (nv >= 4) return tile_fn<CT, MR, kTileVecs, Epilogue>();
    if (nv == 3) return tile_fn<CT, MR, 3, Epilogue>();
  }
  return nv >= 2 ? tile_fn<CT, MR, 2, Epilogue>() : tile_fn<CT, MR, 1, Epilogue>();
}

// The tile of mr rows (1..kTileRows) and nv vectors (1..kTileVecs).
template <typename CT, typename Epilogue>
C10_ALWAYS_INLINE TileFn<CT, Epilogue> pick_tile(int mr, int nv) {
  switch (mr) {
    case 1: return pick_tile_vecs<CT, Epilogue, 1>(nv);
    case 2: return pick_tile_vecs<CT, Epilogue, 2>(nv);
    case 3: return pick_tile_vecs<CT, Epilogue, 3>(nv);
    case 4: return pick_tile_vecs<CT, Epilogue, 4>(nv);
    case 5: return pick_tile_vecs<CT, Epilogue, 5>(nv);
    default: return pick_tile_vecs<CT, Epilogue, kTileRows>(nv);
  }
}

// The plain GEMM's epilogue: c [MR, NV vectors] (row stride ldc) = acc, or += acc with accumulate.
struct StoreC {
  float* c;
  int64_t ldc;
  bool accumulate;

  template <int MR, int NV>
  void init(Vec (&acc)[MR][NV]) const {
    MTBF_UNROLL for (int r = 0; r < MR; ++r)
      MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? Vec::loadu(c + r * ldc + v * kLanes) : Vec(0.f);
  }
  template <int MR, int NV>
  void finish(const Vec (&acc)[MR][NV]) const {
    MTBF_UNROLL for (int r = 0; r < MR; ++r)
      MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * kLanes);
  }
};

// c [m, n] (+)= a [m, k] @ b [k, n]; b packed as the tiles take it, n <= ldb.
template <typename CT>
void gemm(int64_t m, int64_t n, int64_t k,
          const CT* a, int64_t lda,  // [m, k]
          const CT* b, int64_t ldb,  // packed [k, n]
          float* c, int64_t ldc,     // [m, n]
          bool accumulate) {
  for (int64_t n0 = 0; n0 < n; n0 += kTileVecs * kLanes) {
    const int nv = static_cast<int>(std::min<int64_t>(kTileVecs, (n - n0) / kLanes));
    for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
      const int mr = static_cast<int>(std::min<int64_t>(kTileRows, m - m0));
      pick_tile<CT, StoreC>(mr, nv)(k, a + m0 * lda, lda, b + n0 * kPair<CT>, ldb,
                                    StoreC{c + m0 * ldc + n0, ldc, accumulate});
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Packing. ST is the tensor's dtype, CT the compute type of the GEMMs.

template <typename CT, typename ST>
CT to_compute(ST x) {
  if constexpr (std::is_same<CT, ST>::value) return x;
  else return static_cast<CT>(static_cast<float>(x));
}

// dst [rows, ld_dst] = src [rows, cols] (row stride ld_src, unit column stride), zero in columns cols..ld_dst.
template <typename CT, typename ST>
void pack_a(const ST* src, int64_t rows, int64_t cols, int64_t ld_src, CT* dst, int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const ST* s = src + r * ld_src;
    CT* d = dst + r * ld_dst;
    if constexpr (std::is_same<CT, ST>::value) std::memcpy(d, s, cols * sizeof(CT));
    else
      for (int64_t c = 0; c < cols; ++c) d[c] = to_compute<CT>(s[c]);
    std::fill(d + cols, d + ld_dst, CT(0));
  }
}

// The fp32 B operand of gemm from the [k, n] matrix whose rows are contiguous (element (i, j) at src[i * ld_src +
// j]): rows k..k_pad and columns n..ldb are zero, so that padded GEMMs add nothing.
template <typename ST>
C10_ALWAYS_INLINE void pack_b(const ST* src, int64_t k, int64_t n, int64_t ld_src, int64_t k_pad, int64_t ldb,
                              float* dst) {
  for (int64_t i = 0; i < k; ++i) {
    const ST* s = src + i * ld_src;
    float* d = dst + i * ldb;
    for (int64_t j = 0; j < n; ++j) d[j] = static_cast<float>(s[j]);
    std::fill(d + n, d + ldb, 0.f);
  }
  std::fill(dst + k * ldb, dst + k_pad * ldb, 0.f);
}

#ifdef MTBF_BF16_DOT
// The bf16 B operand of gemm from the [k, n] matrix whose rows are contiguous: pairs of rows interleaved
// ([k_pad / 2, ldb, 2]), zero in rows k..k_pad and columns n..ldb. Per pair of rows, 16 columns at a time: each row
// widened to 32-bit lanes, the second shifted into the high halves.
C10_ALWAYS_INLINE void pack_b(const at::BFloat16* src, int64_t k, int64_t n, int64_t ld_src, int64_t k_pad,
                              int64_t ldb, at::BFloat16* dst) {
  const auto row = [&](int64_t i, int64_t j) {
    if (i >= k || j >= n) return _mm512_setzero_si512();
    const __mmask16 lanes = j + kLanes <= n ? __mmask16(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, src + i * ld_src + j));
  };
  for (int64_t i = 0; i < k_pad; i += 2)
    for (int64_t j = 0; j < ldb; j += kLanes)
      _mm512_storeu_si512(dst + (i * ldb + 2 * j), _mm512_or_si512(row(i, j), _mm512_slli_epi32(row(i + 1, j), 16)));
}
#endif

// dst [n, m] (row stride ld_dst) = the transpose of src [m, n] (row stride ld_src). ATen's AVX-512 transpose_mxn
// runs in 16 x 16 register blocks; its AVX2 build has register blocks of 8 x 8 only, the runtime-sized form being a
// scalar loop, which made the packing of K^T a sixth of the fp32 attention forward's time at head_dim 32.
inline void transpose_words(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t m, int64_t n) {
#if defined(CPU_CAPABILITY_AVX2)
  const int64_t m8 = m / 8 * 8, n8 = n / 8 * 8;
  for (int64_t i = 0; i < m8; i += 8) {
    for (int64_t j = 0; j < n8; j += 8)
      at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    if (n8 < n)
      at::vec::transpose_mxn<float>(src + i * ld_src + n8, ld_src, dst + n8 * ld_dst + i, ld_dst, 8,
                                    static_cast<int>(n - n8));
  }
  if (m8 < m)
    at::vec::transpose_mxn<float>(src + m8 * ld_src, ld_src, dst + m8, ld_dst, static_cast<int>(m - m8),
                                  static_cast<int>(n));
#else
  at::vec::transpose_mxn<float>(src, ld_src, dst, ld_dst, static_cast<int>(m), static_cast<int>(n));
#endif
}

// The B operand of gemm from the transpose of src [n, k] (row stride ld_src): element (i, j) is src[j * ld_src + i].
// Zero past k (up to k_pad = round_up(k, kPair)) and past n (up to ldb).
template <typename CT, typename ST>
void pack_b_transposed(const ST* src, int64_t k, int64_t n, int64_t ld_src, int64_t k_pad, int64_t ldb, CT* dst) {
  constexpr int64_t P = kPair<CT>;
  if constexpr (std::is_same<CT, ST>::value) {
    // A packed row (for bf16 a pair of rows, adjacent in src) takes one 32-bit word from each row of src: a
    // transpose of words.
    if (k % P == 0 && ld_src % P == 0 && reinterpret_cast<uintptr_t>(src) % sizeof(float) == 0) {
      transpose_words(reinterpret_cast<const float*>(src), ld_src / P, reinterpret_cast<float*>(dst), ldb, n, k / P);
      for (int64_t w = 0; w < k / P; ++w) std::fill(dst + (w * ldb + n) * P, dst + (w + 1) * ldb * P, CT(0));
      return;
    }
  }
  std::fill(dst, dst + k_pad * ldb, CT(0));
  for (int64_t j = 0; j < n; ++j) {
    const ST* s = src + j * ld_src;
    for (int64_t i = 0; i < k; ++i) dst[(i / P) * P * ldb + j * P + i % P] = to_compute<CT>(s[i]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Row helpers on fp32 buffers.

constexpr float kLog2e = 1.44269504088896341f, kLn2 = 0.693147180559945309f;

// 2^x for x <= 0: the forward's softmax works in base 2, its scale multiplied by log2(e). 2^n 2^f with
// n = round(x), f in [-1/2, 1/2], 2^f a degree-5 polynomial fitted to relative error 2.2e-7 (about 2 ulp; ATen's
// exp_u20 allows 20), and 2^n applied by vscalefps, which also gives 0 for arguments too negative for a normal
// result: 8 vector operations, where exp_u20 takes 19. AVX2 has no scalef: x is raised to -127 at least, and 2^n
// is built in the exponent bits, whose field is then 0 for n = -127, so 2^x under 2^-126.5 comes out 0 (a
// probability 2^-126 below the row's largest, which the row sum of at least 1 never sees): 12 operations.
inline Vec exp2_nonpositive(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  const Vec n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = x - n;
#else
  const Vec xc = _mm256_max_ps(_mm256_set1_ps(-127.f), x);  // x where x is NaN: NaN goes on to the output
  const Vec n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec f = xc - n;
#endif
  Vec p = at::vec::fmadd(Vec(1.3266970636323094e-3f), f, Vec(9.675459936261177e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550742521882057e-2f));
  p = at::vec::fmadd(p, f, Vec(2.4022121727466583e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931469440460205e-1f));
  p = at::vec::fmadd(p, f, Vec(1.0000001192092896f));
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return p * Vec(_mm256_castsi256_ps(bits));
#endif
#else
  return (x * Vec(kLn2)).exp_u20();
#endif
}

// x * y rounded on its own, as the scores tile rounds it: GCC would otherwise fuse the product with the subtraction
// that follows into one multiply-add (it contracts vector arithmetic in C++), and the two would no longer agree. The
// product goes through memory behind a compiler barrier; this runs only for rows of scores past 2^24.
inline Vec product_rounded(const Vec& x, const Vec& y) {
  alignas(64) float p[kLanes];
  (x * y).store(p);
  asm volatile("" : "+m"(p));  // the compiler must take p as changed here, so it cannot forward the product
  return Vec::loadu(p);
}

// The shift is the largest *rounded* x * scale, the maximum the scores tile took, so the exact difference of the
// largest score is not 0 but off by up to half an ulp of the shift, either way: harmless below 2^24, where that is at
// most 1, but from 2^31 on enough to overflow that exp or make it 0 with every other. For a row group whose shift
// reaches 2^24 (see needs_rounded) the caller sets `rounded`: the difference is then taken of the rounded product,
// the very value the maximum was taken of, so the largest score's exp is exactly 1.
template <bool kRounded>
C10_ALWAYS_INLINE Vec exp2_shifted(const Vec& x, const Vec& scale, const Vec& minus_shift) {
  if constexpr (kRounded) return exp2_nonpositive(product_rounded(x, scale) + minus_shift);
  return exp2_nonpositive(at::vec::fmadd(x, scale, minus_shift));
}

// Whether a row group's shifts need exp2_shifted's rounded product (NaN shifts do not: the rows are NaN either way).
inline bool needs_rounded(const float* shift, int mr) {
  for (int r = 0; r < mr; ++r)
    if (std::fabs(shift[r]) >= 0x1p24f) return true;
  return false;
}

// For each row r < mr of x (row stride ld): x[r, j] = 2^(x[r, j] * scale - shift[r]) in place for j < n,
// x[r, j] * scale <= shift[r] (but see exp2_shifted), and sums[r] their sum. One rounding, of a result near 0 for the
// probabilities that count, where rounding x[j] * scale first would cost the rounding of a number as large as the
// scores. The rows' sums are reduced together at the end, so that no row waits on the reduction of the one before.
// kBf16: each x[r, j] is stored rounded to bf16 (still in fp32), the sums staying those of the unrounded values: the
// bf16 P V on float products, where the CPU has no bf16 dot products, takes the probabilities that the bf16 one does.
template <bool kRounded, bool kBf16>
void exp2_rows_as(float* x, int64_t ld, int mr, int64_t n, float scale, const float* shift, float* sums) {
  const Vec vscale(scale);
  const int64_t full = n / kLanes * kLanes, rest = n - full;
  const auto stored = [](const Vec& e) {
    if constexpr (kBf16) return cpu::round_to_bf16(e);
    else return e;
  };
  Vec sum[kTileRows];
  for (int r = 0; r < mr; ++r) {
    float* xr = x + r * ld;
    const Vec vshift(-shift[r]);
    Vec acc(0.f);
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec e = exp2_shifted<kRounded>(Vec::loadu(xr + j), vscale, vshift);
      stored(e).store(xr + j);
      acc = acc + e;
    }
    if (rest > 0) {
      const Vec e = exp2_shifted<kRounded>(Vec::loadu(xr + full, rest), vscale, vshift);
      stored(e).store(xr + full, rest);
      acc = acc + Vec::set(Vec(0.f), e, rest);
    }
    sum[r] = acc;
  }
  for (int r = 0; r < mr; ++r) sums[r] = cpu::lane_sum(sum[r]);
}

void exp2_rows(float* x, int64_t ld, int mr, int64_t n, float scale, const float* shift, float* sums, bool rounded,
               bool bf16 = false) {
  if (bf16) (rounded ? exp2_rows_as<true, true> : exp2_rows_as<false, true>)(x, ld, mr, n, scale, shift, sums);
  else (rounded ? exp2_rows_as<true, false> : exp2_rows_as<false, false>)(x, ld, mr, n, scale, shift, sums);
}

#ifdef MTBF_BF16_DOT
// exp2_rows and round_row in one pass, for the bf16 P V without dropout: dst[r, j] = 2^(x[r, j] * scale - shift[r])
// rounded to bf16 for j < n (and dst[r, n] = 0 for odd n), and sums[r] the sum of the unrounded values; x is only
// read. The rounding is AVX512-BF16's own instruction, which every CPU that runs the bf16 dot products has (ATen's
// portable rounding takes 8 operations per vector).
template <bool kRounded>
__attribute__((target("avx512bf16"))) void exp2_round_rows_as(const float* x, int64_t ld, int mr, int64_t n,
                                                              float scale, const float* shift, at::BFloat16* dst,
                                                              float* sums) {
  const Vec vscale(scale);
  const int64_t full = n / kLanes * kLanes, rest = n - full;
  const __mmask16 tail = static_cast<__mmask16>((1u << rest) - 1);
  const __mmask16 tail_pair = static_cast<__mmask16>((1u << (rest + rest % 2)) - 1);
  Vec sum[kTileRows];
  for (int r = 0; r < mr; ++r) {
    const float* xr = x + r * ld;
    at::BFloat16* dr = dst + r * ld;
    const Vec vshift(-shift[r]);
    Vec acc(0.f);
    for (int64_t j = 0; j < full; j += kLanes) {
      const Vec e = exp2_shifted<kRounded>(Vec::loadu(xr + j), vscale, vshift);
      acc = acc + e;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dr + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    if (rest > 0) {
      const Vec xt = _mm512_maskz_loadu_ps(tail, xr + full);
      const Vec e = _mm512_maskz_mov_ps(tail, exp2_shifted<kRounded>(xt, vscale, vshift));
      acc = acc + e;
      _mm256_mask_storeu_epi16(dr + full, tail_pair, (__m256i)_mm512_cvtneps_pbh(e));
    }
    sum[r] = acc;
  }
  for (int r = 0; r < mr; ++r) sums[r] = cpu::lane_sum(sum[r]);
}

__attribute__((target("avx512bf16"))) void exp2_round_rows(const float* x, int64_t ld, int mr, int64_t n,
                                                           float scale, const float* shift, at::BFloat16* dst,
                                                           float* sums, bool rounded) {
  (rounded ? exp2_round_rows_as<true> : exp2_round_rows_as<false>)(x, ld, mr, n, scale, shift, dst, sums);
}
#endif

// e^v as ATen's exp_u20, but NaN where v is NaN: exp_u20 clamps its argument first, which turns NaN into inf.
inline Vec exp_keeping_nan(const Vec& v) { return Vec::blendv(v.exp_u20(), v, v != v); }

// dst[0:n] = src[0:n] * factor, rounded once to the tensor dtype; src is overwritten.
template <typename ST>
void store_scaled(float* src, float factor, int64_t n, ST* dst) {
  at::vec::map([factor](Vec x) { return x * Vec(factor); }, src, src, n);
  at::vec::convert(src, dst, n);
}

// dst[0:n] = x[0:n] rounded to bf16, and dst[n] = 0 for odd n, completing the last pair of the bf16 dot products.
inline void round_row(const float* x, int64_t n, at::BFloat16* dst) {
  cpu::for_each_vec(n, [&](int64_t j, auto lanes) { cpu::store(dst + j, cpu::load(x + j, lanes), lanes); });
  if (n % 2) dst[n] = at::BFloat16(0.f);
}

// x[0:n] rounded to bf16 in place, for the bf16 P V on float products.
inline void round_row_in_place(float* x, int64_t n) {
  cpu::for_each_vec(n, [&](int64_t j, auto lanes) {
    cpu::store(x + j, cpu::round_to_bf16(cpu::load(x + j, lanes)), lanes);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// The dropout mask of philox.h as keep bits, never as a tensor. One Philox call gives the words of four
// consecutive keys. Scalar calls, even so, cost about as much as the whole forward at head_dim 64; with AVX-512
// sixteen calls run side by side in the lanes, and two such streams interleave to hide the latency of each round's
// multiplies.

#if defined(CPU_CAPABILITY_AVX512)
// The low and high 32 bits of a * b per lane: vpmuludq multiplies the even lanes, and the odd ones shifted down.
inline __m512i mul_lo_hi(__m512i a, __m512i b, __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(a, _mm512_srli_epi64(b, 32));  // a holds its constant in every lane
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  return _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// philox4x32_10 of philox.h on N streams of 16 counters: c[s] holds the counter of stream s, then its four words.
template <int N>
inline void philox16(__m512i (&c)[N][4], uint32_t k0, uint32_t k1) {
  const __m512i mul0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i mul1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  for (int r = 0; r < 10; ++r) {
    const __m512i key0 = _mm512_set1_epi32(static_cast<int>(k0)), key1 = _mm512_set1_epi32(static_cast<int>(k1));
    for (int s = 0; s < N; ++s) {
      __m512i hi0, hi1;
      const __m512i lo0 = mul_lo_hi(mul0, c[s][0], &hi0);
      const __m512i lo1 = mul_lo_hi(mul1, c[s][2], &hi1);
      c[s][0] = _mm512_ternarylogic_epi32(hi1, c[s][1], key0, 0x96);  // three-way xor
      c[s][1] = lo1;
      c[s][2] = _mm512_ternarylogic_epi32(hi0, c[s][3], key1, 0x96);
      c[s][3] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline __m512i lane_index() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
inline __m512i splat(int64_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }

// N calls of keep_bits_row: lane l of stream s draws group g + 16s + l, for keys 4g + 64s .. 4g + 64s + 63, whose
// bits go to bits[4s .. 4s + 3]. A 4 x 16 transpose puts the words in key order before the compare.
template <int N>
void row_groups(const DropoutParams& d, uint32_t h, uint32_t i, int64_t g, uint16_t* bits) {  // [4 N]
  __m512i c[N][4];
  for (int s = 0; s < N; ++s) {
    c[s][0] = _mm512_add_epi32(splat(g + 16 * s), lane_index());
    c[s][1] = splat(i);
    c[s][2] = splat(h);
    c[s][3] = splat(d.offset);
  }
  philox16<N>(c, d.k0, d.k1);
  const __m512i thr = splat(d.threshold);
  for (int s = 0; s < N; ++s) {
    const __m512i* w = c[s];
    // Per 128-bit chunk q: the four words of group 4q + 0, 1, 2, 3.
    const __m512i w01lo = _mm512_unpacklo_epi32(w[0], w[1]), w01hi = _mm512_unpackhi_epi32(w[0], w[1]);
    const __m512i w23lo = _mm512_unpacklo_epi32(w[2], w[3]), w23hi = _mm512_unpackhi_epi32(w[2], w[3]);
    const __m512i g0 = _mm512_unpacklo_epi64(w01lo, w23lo), g1 = _mm512_unpackhi_epi64(w01lo, w23lo);
    const __m512i g2 = _mm512_unpacklo_epi64(w01hi, w23hi), g3 = _mm512_unpackhi_epi64(w01hi, w23hi);
    // Then chunk q of each, in order: keys 16q .. 16q + 15.
    const __m512i x0 = _mm512_shuffle_i32x4(g0, g1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x1 = _mm512_shuffle_i32x4(g2, g3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x2 = _mm512_shuffle_i32x4(g0, g1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i x3 = _mm512_shuffle_i32x4(g2, g3, _MM_SHUFFLE(3, 2, 3, 2));
    uint16_t* b = bits + 4 * s;
    b[0] = _mm512_cmpge_epu32_mask(_mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)), thr);
    b[1] = _mm512_cmpge_epu32_mask(_mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)), thr);
    b[2] = _mm512_cmpge_epu32_mask(_mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)), thr);
    b[3] = _mm512_cmpge_epu32_mask(_mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)), thr);
  }
}

// N calls of keep_bits_block: lane l of stream s draws query row i + 16s + l against group g; word k is key 4g + k
// across those queries (bits[4s + k]), the layout of the transposed blocks of the backward.
template <int N>
void query_groups(const DropoutParams& d, uint32_t h, int64_t i, int64_t g, __mmask16* bits) {  // [4 N]
  __m512i c[N][4];
  for (int s = 0; s < N; ++s) {
    c[s][0] = splat(g);
    c[s][1] = _mm512_add_epi32(splat(i + 16 * s), lane_index());
    c[s][2] = splat(h);
    c[s][3] = splat(d.offset);
  }
  philox16<N>(c, d.k0, d.k1);
  const __m512i thr = splat(d.threshold);
  for (int s = 0; s < N; ++s)
    for (int k = 0; k < 4; ++k) bits[4 * s + k] = _mm512_cmpge_epu32_mask(c[s][k], thr);
}
#endif

// uint16 words that keep_bits_row writes for n keys.
constexpr int64_t row_bits_size(int64_t n) { return (n + 3 + 63) / 64 * 4 + 1; }

// Keep bits of query row i against key rows ja .. ja+n (packed) of head h: bit b of bits[q] for key ja + 16q + b.
void keep_bits_row(const DropoutParams& d, uint32_t h, uint32_t i, int64_t ja, int64_t n,
                   uint16_t* bits) {  // [row_bits_size(n)]
  const int64_t g0 = ja >> 2, shift = ja & 3;  // the first group starts `shift` keys before ja
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t calls = (shift + n + 63) / 64;
  int64_t v = 0;
  for (; v + 2 <= calls; v += 2) row_groups<2>(d, h, i, g0 + 16 * v, bits + 4 * v);
  if (v < calls) row_groups<1>(d, h, i, g0 + 16 * v, bits + 4 * v);
  bits[4 * calls] = 0;
#else
  std::fill(bits, bits + (shift + n + 15) / 16 + 1, uint16_t{0});
  for (int64_t g = g0; 4 * g < ja + n; ++g) {
    const Philox4 r = dropout_words(d, static_cast<uint32_t>(g), i, h);
    for (int k = 0; k < 4; ++k)
      if (r.w[k] >= d.threshold) bits[(4 * (g - g0) + k) / 16] |= uint16_t(1u << ((4 * (g - g0) + k) % 16));
  }
#endif
  // Drop the `shift` keys before ja.
  for (int64_t q = 0; q < (n + 15) / 16; ++q)
    bits[q] = static_cast<uint16_t>((bits[q] | static_cast<uint32_t>(bits[q + 1]) << 16) >> shift);
}

// Keep bits of query rows i0 .. i0+m against key rows ja .. ja+n (packed) of head h, transposed: bit l of
// bits[(j - ja) * ld + v] for query i0 + 16v + l and key j.
void keep_bits_block(const DropoutParams& d, uint32_t h, int64_t i0, int64_t m, int64_t ja, int64_t n,
                     uint16_t* bits, int64_t ld) {  // [n, ld], ld >= ceil(m / 16)
  for (int64_t g = ja >> 2; 4 * g < ja + n; ++g) {
    const int64_t j_lo = std::max(4 * g, ja), j_hi = std::min(4 * g + 4, ja + n);  // the group's keys in range
#if defined(CPU_CAPABILITY_AVX512)
    for (int64_t v = 0; 16 * v < m; v += 2) {
      const bool two = 16 * (v + 1) < m;
      __mmask16 words[8];
      if (two) query_groups<2>(d, h, i0 + 16 * v, g, words);
      else query_groups<1>(d, h, i0 + 16 * v, g, words);
      for (int64_t j = j_lo; j < j_hi; ++j) {
        bits[(j - ja) * ld + v] = words[j & 3];
        if (two) bits[(j - ja) * ld + v + 1] = words[4 + (j & 3)];
      }
    }
#else
    for (int64_t j = j_lo; j < j_hi; ++j)
      std::fill(bits + (j - ja) * ld, bits + (j - ja) * ld + (m + 15) / 16, uint16_t{0});
    for (int64_t l = 0; l < m; ++l) {
      const Philox4 r = dropout_words(d, static_cast<uint32_t>(g), static_cast<uint32_t>(i0 + l), h);
      for (int64_t j = j_lo; j < j_hi; ++j)
        if (r.w[j & 3] >= d.threshold) bits[(j - ja) * ld + l / 16] |= uint16_t(1u << (l % 16));
    }
#endif
  }
}

// x[t] *= scale where bit t (bit t % 16 of bits[t / 16]) is set, else 0, for t < n.
void apply_keep_bits(float* x, const uint16_t* bits, int64_t n, float scale) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 vscale = _mm512_set1_ps(scale);
  int64_t t = 0;
  for (; t + 16 <= n; t += 16)
    _mm512_storeu_ps(x + t, _mm512_maskz_mul_ps(bits[t / 16], _mm512_loadu_ps(x + t), vscale));
  if (t < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - t)) - 1);
    _mm512_mask_storeu_ps(x + t, tail, _mm512_maskz_mul_ps(bits[t / 16], _mm512_maskz_loadu_ps(tail, x + t), vscale));
  }
#else
  for (int64_t t = 0; t < n; ++t) x[t] = (bits[t / 16] >> (t % 16)) & 1 ? x[t] * scale : 0.f;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Work split.

// Strides of the packed qkv [T, 3, heads, head_dim] (unit stride in the last dim).
struct Geometry {
  int64_t tokens, heads, head_dim;
  int64_t tok_stride, part_stride, head_stride;
  float scale;
};

// The position terms: rel_bias [heads, 2R+1] (nullptr without one), the local window (-1: none) and the per-token
// tables, a TokenTables of qkv's dtype (nullptr without them). Untyped here so that the kernels keep the plain path's
// signatures: a parameter more changed GCC's register allocation all through the plain forward, 3% slower in fp32.
struct PositionArgs {
  const float* rel_bias;  // [heads, 2R+1]
  int64_t radius;         // R
  int64_t window;
  const void* tables;
};

// rel_bias's row of one head spread along the diagonals of a sequence of len rows, times factor: diag[u] = factor *
// rel_bias[head, clamp(sign * (u - (len - 1)), -R, R) + R] for u < n. With sign 1 the biases of query i against
// consecutive keys j lie at diag[len - 1 - i + j], consecutive; with sign -1 those of key j against consecutive
// queries i at diag[len - 1 - j + i].
void spread_bias(const PositionArgs& pos, int64_t head, int64_t len, float factor, int64_t sign,
                 float* diag, int64_t n) {  // [n]
  const float* row = pos.rel_bias + head * (2 * pos.radius + 1);
  for (int64_t u = 0; u < n; ++u)
    diag[u] = factor * row[std::clamp(sign * (u - (len - 1)), -pos.radius, pos.radius) + pos.radius];
}

// The per-token position tables (DeBERTa's disentangled attention): the score of query i and key j gains
// pos_q[head, i, c] + pos_k[head, j, c], c = index[clamp(j - i, -P, P) + P]. index is nullptr without tables; either
// table may be nullptr.
template <typename ST>
struct TokenTables {
  const ST* pos_q;       // [heads, T, W]
  const ST* pos_k;       // [heads, T, W]
  const int32_t* index;  // [2P+1], columns in [0, W)
  int64_t radius, width;  // P, W
  int64_t rows;           // T
};

// The tables' column of each distance in a sequence of len rows: cols[u] = index[clamp(u - (len - 1), -P, P) + P]
// for u < n, so that query i against key j reads cols[len - 1 - i + j].
template <typename ST>
void spread_columns(const TokenTables<ST>& tt, int64_t len, int32_t* cols, int64_t n) {  // [n]
  for (int64_t u = 0; u < n; ++u) cols[u] = tt.index[std::clamp(u - (len - 1), -tt.radius, tt.radius) + tt.radius];
}

// The rows of one head from packed row `start` on in a table [heads, T, W] (pos_q, pos_k or their gradients), or
// nullptr without that table.
template <typename ST, typename T>
T* table_rows(const TokenTables<ST>& tt, T* table, int64_t head, int64_t start) {
  return table == nullptr ? nullptr : table + (head * tt.rows + start) * tt.width;
}

// Calls fn(std::bool_constant<pos_q given>{}, std::bool_constant<pos_k given>{}): the loops over the tables test
// nothing per pair.
template <typename ST, typename Fn>
void dispatch_tables(const TokenTables<ST>& tt, const Fn& fn) {
  if (tt.pos_q != nullptr && tt.pos_k != nullptr) return fn(std::true_type{}, std::true_type{});
  if (tt.pos_q != nullptr) return fn(std::true_type{}, std::false_type{});
  fn(std::false_type{}, std::true_type{});
}

// Splits items into `parts` contiguous runs of about equal cost; returns parts + 1 bounds.
std::vector<int64_t> split_by_cost(const std::vector<double>& cost, int64_t parts) {
  double total = 0;
  for (double c : cost) total += c;
  std::vector<int64_t> bounds{0};
  double seen = 0;
  for (size_t i = 0; i < cost.size(); ++i) {
    seen += cost[i];
    while (static_cast<int64_t>(bounds.size()) < parts && seen >= total * bounds.size() / parts)
      bounds.push_back(static_cast<int64_t>(i) + 1);
  }
  while (static_cast<int64_t>(bounds.size()) <= parts) bounds.push_back(static_cast<int64_t>(cost.size()));
  return bounds;
}

// Runs fn(first, count) over the items in contiguous runs of about equal cost. Each thread gets several runs, handed
// out on request, so that a thread slowed by other load on the machine does not hold up the others.
template <typename Fn>
void run_balanced(const std::vector<double>& cost, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(cost.size());
  if (n == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t runs = std::min<int64_t>(n, threads * kRunsPerThread);
  const std::vector<int64_t> bounds = split_by_cost(cost, runs);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t r = next++; r < runs; r = next++)
      if (bounds[r + 1] > bounds[r]) fn(bounds[r], bounds[r + 1] - bounds[r]);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Forward.

struct QueryBlock {
  int64_t start, len, head, q0, qn;  // sequence rows start..start+len, its query rows q0..q0+qn, one head
};

// Rows of qkv lie a whole token apart (kilobytes: a page or more), too far for the hardware prefetchers, so each
// row a work item reads first is a cache miss. While one item computes, its row groups prefetch, share by share,
// the rows the next item reads: its query rows, and the key and value rows if it packs them. They go to L2, not L1:
// at L=128 they are 20-80 KiB (head sizes 32-64, bf16 or fp32), as much as L1 holds or more, and fetched into L1 they
// would push out the packed K^T and V that the current item's tiles read for every row group.
inline void prefetch(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  // GCC deletes a loop of __builtin_prefetch as a loop without side effects (C++ assumes loops finish).
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

template <typename ST>
C10_ALWAYS_INLINE void prefetch_share(const Geometry& g, const ST* qkv, const QueryBlock& next, bool packs,
                                      int64_t share, int64_t shares) {
  constexpr int64_t kLine = 64;
  const int64_t bytes = g.head_dim * static_cast<int64_t>(sizeof(ST));
  const auto rows = [&](int64_t first, int64_t count, int64_t part) {
    for (int64_t i = first + count * share / shares; i < first + count * (share + 1) / shares; ++i) {
      const char* row = reinterpret_cast<const char*>(qkv + (next.start + i) * g.tok_stride + part * g.part_stride +
                                                      next.head * g.head_stride);
      for (int64_t b = 0; b < bytes; b += kLine) prefetch(row + b);
    }
  };
  rows(next.q0, next.qn, 0);
  if (packs) {
    rows(0, next.len, 1);
    rows(0, next.len, 2);
  }
}

// The score of a key outside the window: exp2_rows makes it 0 against any finite row maximum, where -inf would
// give NaN (exp2_nonpositive's fraction of -inf is -inf - -inf).
constexpr float kMasked = std::numeric_limits<float>::lowest();

// x with kMasked in the lanes whose key lies more than `window` from its query; lane l's key minus query position
// is d + l.
inline Vec mask_window(const Vec& x, int64_t d, int64_t window) {
  if (d >= -window && d + kLanes - 1 <= window) return x;
  const Vec dist = Vec::arange(static_cast<float>(d), 1.f).abs();
  return Vec::blendv(x, Vec(kMasked), dist > Vec(static_cast<float>(window)));
}

// Epilogue of the scores tile: s [MR, NV vectors] = acc, and row_max [MR] raised to scale * acc (the forward passes
// scale * log2(e)) but for the columns from `cols` on (K^T's zero padding must not raise a row maximum). With a
// position term (kBias, kWindow, kTokens), s and the maxima take the whole score, scale * acc + bias (the bias in the
// same log2 units), kMasked outside the window: exp2_rows then takes s with scale 1. With kTokens, s holds the
// position terms on entry (query_terms, rel_bias among them), and the tile adds its products to them.
template <bool kBias, bool kWindow, bool kTokens = false>
struct StoreScores {
  float* s;
  int64_t lds;
  float scale;
  int64_t cols;
  Vec* row_max;
  const float* bias;       // kBias: row r's biases at bias - r + column (spread_bias)
  int64_t offset, window;  // kWindow: key minus query position of the tile's first row and column, and the window

  template <int MR, int NV>
  void init(Vec (&acc)[MR][NV]) const {
    MTBF_UNROLL for (int r = 0; r < MR; ++r)
      MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  }
  template <int MR, int NV>
  void finish(const Vec (&acc)[MR][NV]) const {
    const Vec vscale(scale), minus_inf(-std::numeric_limits<float>::infinity());
    // Most tiles of a band lie inside it: they mask nothing.
    const bool edge = kWindow && (offset - (MR - 1) < -window || offset + NV * kLanes - 1 > window);
    MTBF_UNROLL for (int r = 0; r < MR; ++r) {
      Vec m = row_max[r];  // in a register: s may alias row_max for all the compiler knows
      MTBF_UNROLL for (int v = 0; v < NV; ++v) {
        Vec x;
        if constexpr (kBias || kWindow || kTokens) {
          if constexpr (kTokens) x = at::vec::fmadd(acc[r][v], vscale, Vec::loadu(s + r * lds + v * kLanes));
          else if constexpr (kBias) x = at::vec::fmadd(acc[r][v], vscale, Vec::loadu(bias - r + v * kLanes));
          else x = acc[r][v] * vscale;
          if (edge) x = mask_window(x, offset - r + v * kLanes, window);
          x.store(s + r * lds + v * kLanes);
        } else {
          acc[r][v].store(s + r * lds + v * kLanes);
          x = acc[r][v] * vscale;
        }
        if ((v + 1) * kLanes > cols) x = Vec::set(minus_inf, x, std::max<int64_t>(0, cols - v * kLanes));
        m = cpu::max_ignoring_nan(m, x);  // a NaN score gives a NaN output anyway
      }
      row_max[r] = m;
    }
  }
};

// Epilogue of the P V tile. acc starts at zero for the first key block, else at o * alpha[r] (the output so far,
// rescaled to the new row maximum); it goes back to o, or after the last key block, times inv_sum[r] and rounded
// once, to the output rows (row stride ld_out, columns up to `cols`).
template <typename ST>
struct StoreOut {
  float* o;
  int64_t ldo;
  bool first, last;
  const float* alpha;
  const float* inv_sum;
  ST* out;
  int64_t ld_out, cols;

  template <int MR, int NV>
  void init(Vec (&acc)[MR][NV]) const {
    MTBF_UNROLL for (int r = 0; r < MR; ++r)
      MTBF_UNROLL for (int v = 0; v < NV; ++v)
        acc[r][v] = first ? Vec(0.f) : Vec::loadu(o + r * ldo + v * kLanes) * Vec(alpha[r]);
  }
  template <int MR, int NV>
  void finish(const Vec (&acc)[MR][NV]) const {
    MTBF_UNROLL for (int r = 0; r < MR; ++r)
      MTBF_UNROLL for (int v = 0; v < NV; ++v) {
        if (!last) {
          acc[r][v].store(o + r * ldo + v * kLanes);
          continue;
        }
        const Vec x = acc[r][v] * Vec(inv_sum[r]);
        const int64_t n = cols - v * kLanes;
        if (n >= kLanes) cpu::store(out + r * ld_out + v * kLanes, x, cpu::Full{});
        else if (n > 0) cpu::store(out + r * ld_out + v * kLanes, x, n);
      }
  }
};

// The position terms of query rows i0 .. i0+m against keys j0 .. j0+n of one sequence, in log2 units, which the
// scores tile adds its products to: dst[r, j - j0] = bias[len - 1 - i + j] + log2(e) (pos_q[i, c] + pos_k[j, c]),
// i = i0 + r, c = cols[len - 1 - i + j]; zero from n to n_pad (K^T's padding).
template <bool kQ, bool kK, typename ST>
void query_terms(const ST* pq,        // [len, W]: the sequence's rows of pos_q for the head (kQ)
                 const ST* pk,        // [len, W]: of pos_k (kK)
                 int64_t width,       // W
                 const int32_t* cols,  // [2 len - 1], spread_columns
                 const float* bias,   // [2 len - 1]: rel_bias spread in log2 units, zeros without one
                 int64_t len, int64_t i0, int64_t m, int64_t j0, int64_t n, int64_t n_pad,
                 float* dst, int64_t ld) {  // [m, ld]
  for (int64_t r = 0; r < m; ++r) {
    const int64_t u0 = len - 1 - (i0 + r);
    float* d = dst + r * ld - j0;
    for (int64_t j = j0; j < j0 + n; ++j) {
      const int64_t c = cols[u0 + j];
      float t = 0.f;
      if constexpr (kQ) t = static_cast<float>(pq[(i0 + r) * width + c]);
      if constexpr (kK) t += static_cast<float>(pk[j * width + c]);
      d[j] = std::fma(t, kLog2e, bias[u0 + j]);
    }
    std::fill(d + j0 + n, d + j0 + n_pad, 0.f);
  }
}

// Each query block runs in groups of kTileRows rows, so that a group's scores (at most kTileRows x kKeyBlock) stay
// in the L1 cache between the three passes over them: the scores tiles, which also take the row maxima; exp and
// the row sums; the P V tiles, which write the normalized output straight to `out`. K^T and V are packed once per
// (sequence, head) and serve every query block of it that this thread runs, as does rel_bias's row spread along the
// diagonals. A window limits each group to the keys of its band. kBias, kWindow: rel_bias, a window is given.
// kTokens: the tables are given; their terms, rel_bias's with them (kBias is then false), go into the scores buffer
// before each scores tile, a group's rows against a key block at a time.
// A query block's lse [heads, T] from its rows' maxima (log2 units) and sums, in one vector pass (a scalar log per
// row took 3 % of the kernel at head_dim 32).
inline void store_lse(const Geometry& g, const QueryBlock& qb, const float* row_max, const float* row_sum,
                      float* lse) {
  float* lse_rows = lse + qb.head * g.tokens + qb.start + qb.q0;
  for (int64_t i = 0; i < qb.qn; i += kLanes) {
    const int64_t m = std::min(kLanes, qb.qn - i);
    const Vec x = at::vec::fmadd(Vec::loadu(row_max + i, m), Vec(kLn2), Vec::loadu(row_sum + i, m).log());
    x.store(lse_rows + i, m);
  }
}

template <typename ST, typename CT, bool kBias, bool kWindow, bool kTokens = false>
void forward_blocks(const Geometry& g,
                    const DropoutParams& drop,
                    const PositionArgs& pos,
                    const ST* qkv,              // [T, 3, heads, head_dim], strided
                    const QueryBlock* blocks,   // [n]
                    int64_t n,
                    ST* out,                    // [T, heads, head_dim]
                    float* lse) {               // [heads, T]
  constexpr int64_t P = kPair<CT>;
  constexpr int64_t R = kTileRows;
  const int64_t dim = g.head_dim, kdim = round_up(dim, P), vdim = round_up(dim, kLanes);
  const int64_t ld_out = g.heads * dim;
  int64_t max_len = 0;
  for (int64_t t = 0; t < n; ++t) max_len = std::max(max_len, blocks[t].len);
  const int64_t max_pad = round_up(max_len, kLanes);
  const int64_t ld_s = round_up(std::min(max_len, kKeyBlock), kLanes);

  Zeroed<CT> k_t(kdim * max_pad), q_a(kQueryBlock * kdim), v_b(max_pad * vdim);
  cpu::LineVector<float> s(R * ld_s), o(R * vdim);
  // P V takes the probabilities in the compute type: bf16 copies of a group's rows, zero past the keys up to a pair.
  // In bf16 on float products it takes them rounded to bf16 all the same, so that every CPU gives the same outputs.
  constexpr bool kBf16Probs = std::is_same<ST, at::BFloat16>::value && std::is_same<CT, float>::value;
  Zeroed<CT> p_c(std::is_same<CT, float>::value ? 0 : R * ld_s);
  const CT* p;
  if constexpr (std::is_same<CT, float>::value) p = s.data();
  else p = p_c.data();
  float row_max[R], row_sum[R], alpha[R], inv_sum[R];
  float lse_max[kQueryBlock], lse_sum[kQueryBlock];  // each query row's maximum and sum, for its lse
  Vec vmax[R];
  std::vector<uint16_t> keep(drop.enabled ? row_bits_size(kKeyBlock) : 0);
  // Query i's biases against the keys up to len_pad, in log2 units: [2 len_pad]. With kTokens zeros but for rel_bias.
  cpu::LineVector<float> bias_diag(kBias || kTokens ? 2 * max_pad : 0);
  const bool spread = kBias || (kTokens && pos.rel_bias != nullptr);
  std::vector<int32_t> cols(kTokens ? 2 * max_pad : 0);  // spread_columns of the sequence
  const TokenTables<ST> tables = kTokens ? *static_cast<const TokenTables<ST>*>(pos.tables) : TokenTables<ST>{};
  const bool direct_q = std::is_same<CT, ST>::value && dim % P == 0;
  int64_t packed_start = -1, packed_head = -1;

  for (int64_t t = 0; t < n; ++t) {
    const QueryBlock& qb = blocks[t];
    const int64_t len_pad = round_up(qb.len, kLanes);
    const ST* q = qkv + qb.start * g.tok_stride + qb.head * g.head_stride;
    if (qb.start != packed_start || qb.head != packed_head) {
      pack_b_transposed(q + g.part_stride, dim, qb.len, g.tok_stride, kdim, len_pad, k_t.data());  // K^T
      pack_b(q + 2 * g.part_stride, qb.len, dim, g.tok_stride, len_pad, vdim, v_b.data());         // V
      if (spread) spread_bias(pos, qb.head, qb.len, kLog2e, 1, bias_diag.data(), 2 * len_pad);
      if constexpr (kTokens) spread_columns(tables, qb.len, cols.data(), 2 * qb.len - 1);
      packed_start = qb.start;
      packed_head = qb.head;
    }
    const CT* a = q_a.data();
    int64_t lda = kdim;
    if (direct_q) {
      a = reinterpret_cast<const CT*>(q + qb.q0 * g.tok_stride);
      lda = g.tok_stride;
    } else {
      pack_a(q + qb.q0 * g.tok_stride, qb.qn, dim, g.tok_stride, q_a.data(), kdim);
    }

    const QueryBlock* next = t + 1 < n ? &blocks[t + 1] : nullptr;
    const bool next_packs = next != nullptr && (next->start != qb.start || next->head != qb.head);
    const int64_t groups = (qb.qn + R - 1) / R;
    for (int64_t r0 = 0; r0 < qb.qn; r0 += R) {
      const int mr = static_cast<int>(std::min(R, qb.qn - r0));
      if (next != nullptr) prefetch_share(g, qkv, *next, next_packs, r0 / R, groups);
      const int64_t row0 = qb.start + qb.q0 + r0;  // packed row of the group's first query
      const int64_t qpos = qb.q0 + r0;             // its position in the sequence
      const float* bias = kBias ? bias_diag.data() + (qb.len - 1 - qpos) : nullptr;
      // The keys of the group's band, from a vector boundary (K^T's padding ends at one). The first key of each
      // row's window lies under kLanes + kTileRows keys from jlo, in the first key block: every row's first maximum
      // is that of a key it sees.
      int64_t jlo = 0, jhi = qb.len;
      if (kWindow) {
        jlo = std::max<int64_t>(0, qpos - pos.window) / kLanes * kLanes;
        jhi = std::min(qb.len, qpos + mr + pos.window);
      }
      using Scores = StoreScores<kBias, kWindow, kTokens>;
      const auto scores_tile = pick_tile<CT, Scores>(mr, kTileVecs);
      const auto out_tile = pick_tile<CT, StoreOut<ST>>(mr, kTileVecs);
      for (int64_t j0 = jlo; j0 < jhi; j0 += kKeyBlock) {
        const bool first = j0 == jlo;
        const int64_t bn = std::min(kKeyBlock, jhi - j0);
        std::fill(vmax, vmax + mr, Vec(-std::numeric_limits<float>::infinity()));
        if constexpr (kTokens) {
          dispatch_tables(tables, [&](auto has_q, auto has_k) {
            query_terms<decltype(has_q)::value, decltype(has_k)::value>(
                table_rows(tables, tables.pos_q, qb.head, qb.start),
                table_rows(tables, tables.pos_k, qb.head, qb.start), tables.width, cols.data(), bias_diag.data(),
                qb.len, qpos, mr, j0, bn, round_up(bn, kLanes), s.data(), ld_s);
          });
        }
        for (int64_t c0 = 0; c0 < bn; c0 += kTileVecs * kLanes) {
          const int64_t cols = std::min(kTileVecs * kLanes, bn - c0);
          const int nv = static_cast<int>((cols + kLanes - 1) / kLanes);
          (nv == kTileVecs ? scores_tile : pick_tile<CT, Scores>(mr, nv))(
              kdim, a + r0 * lda, lda, k_t.data() + (j0 + c0) * P, len_pad,
              Scores{s.data() + c0, ld_s, g.scale * kLog2e, cols, vmax, kBias ? bias + j0 + c0 : nullptr,
                     j0 + c0 - qpos, pos.window});
        }
        const float exp_scale = kBias || kWindow || kTokens ? 1.f : g.scale * kLog2e;
        float new_max[R], block_sum[R];
        for (int r = 0; r < mr; ++r) {
          const float block_max = cpu::lane_max(vmax[r]);
          new_max[r] = first ? block_max : std::max(row_max[r], block_max);
        }
        const bool rounded = exp_scale != 1.f && needs_rounded(new_max, mr);
        if constexpr (!std::is_same<CT, float>::value) {
          if (drop.enabled) exp2_rows(s.data(), ld_s, mr, bn, exp_scale, new_max, block_sum, rounded);
          else exp2_round_rows(s.data(), ld_s, mr, bn, exp_scale, new_max, p_c.data(), block_sum, rounded);
        } else {
          exp2_rows(s.data(), ld_s, mr, bn, exp_scale, new_max, block_sum, rounded, kBf16Probs && !drop.enabled);
        }
        for (int r = 0; r < mr; ++r) {
          float* srow = s.data() + r * ld_s;
          // Rescale what earlier key blocks accumulated to the new running maximum.
          if (first) {
            alpha[r] = 1.f;
            row_sum[r] = block_sum[r];
          } else {
            alpha[r] = std::exp2(row_max[r] - new_max[r]);
            row_sum[r] = row_sum[r] * alpha[r] + block_sum[r];
          }
          row_max[r] = new_max[r];
          inv_sum[r] = 1.f / row_sum[r];
          // Dropout acts on the normalized probabilities, so the sum above and lse stay those of the undropped ones.
          if (drop.enabled) {
            keep_bits_row(drop, static_cast<uint32_t>(qb.head), static_cast<uint32_t>(row0 + r), qb.start + j0, bn,
                          keep.data());
            apply_keep_bits(srow, keep.data(), bn, drop.scale);
            if constexpr (!std::is_same<CT, float>::value) round_row(srow, bn, p_c.data() + r * ld_s);
            else if constexpr (kBf16Probs) round_row_in_place(srow, bn);
          }
        }
        const bool last = j0 + bn == jhi;
        for (int64_t c0 = 0; c0 < vdim; c0 += kTileVecs * kLanes) {
          const int nv = static_cast<int>(std::min<int64_t>(kTileVecs, (vdim - c0) / kLanes));
          (nv == kTileVecs ? out_tile : pick_tile<CT, StoreOut<ST>>(mr, nv))(
              round_up(bn, P), p, ld_s, v_b.data() + j0 * vdim + c0 * P, vdim,
              StoreOut<ST>{o.data() + c0, vdim, first, last, alpha, inv_sum,
                           out + row0 * ld_out + qb.head * dim + c0, ld_out, dim - c0});
        }
      }
      std::copy(row_max, row_max + mr, lse_max + r0);
      std::copy(row_sum, row_sum + mr, lse_sum + r0);
    }
    store_lse(g, qb, lse_max, lse_sum, lse);
  }
}

#ifdef MTBF_AMX
// ---------------------------------------------------------------------------------------------------------------
// The bf16 forward on AMX tiles, for attention without position terms or dropout (inference), on CPUs with AMX-BF16.
// The vdpbf16ps tiles above spend about 2 cycles a score on the two products at head_dim 32-64, four times the
// softmax's share; TDPBF16PS does a tile's 8192 multiply-adds in 16 cycles. Per row group of 32 queries:
// S = Q K^T into fp32 tiles of 16 x 16 (2 x 2 at a time), the softmax as forward_blocks takes it (row maxima of the
// rounded scale * S, 2^(scale * S - max) rounded to bf16 by exp2_round_rows, fp32 sums), then O = P V into fp32
// tiles over key steps of 32. The operands are packed as forward_blocks packs them (K^T and V in pairs, Q and P
// row-major), their reduction dimensions (head_dim in Q K^T, keys in P V) zero-padded to the tile's step of 32. Rows
// of a group past the block's queries run on stale operands and are never stored: a row of a product reads only its
// own row of the left operand.

using cpu::amx::product_2x2;
constexpr int64_t kAmxRows = cpu::amx::kRows;
constexpr int64_t kAmxStep = cpu::amx::kStep;
constexpr int64_t kAmxCols = cpu::amx::kCols;
static_assert(kQueryBlock % (2 * kAmxRows) == 0, "a query block is whole row groups");

// The largest scale * x[r, j] (rounded product, NaN left out) of each row r < mr over the columns j < n.
void scaled_row_max(const float* x, int64_t ld, int64_t mr, int64_t n, float scale, float* max) {
  const Vec vscale(scale), minus_inf(-std::numeric_limits<float>::infinity());
  for (int64_t r = 0; r < mr; ++r) {
    const float* xr = x + r * ld;
    Vec m = minus_inf;
    cpu::for_each_vec(n, [&](int64_t j, auto lanes) {
      Vec v = cpu::load(xr + j, lanes) * vscale;
      if constexpr (!std::is_same<decltype(lanes), cpu::Full>::value) v = Vec::set(minus_inf, v, lanes);
      m = cpu::max_ignoring_nan(m, v);
    });
    max[r] = cpu::lane_max(m);
  }
}

void forward_blocks_amx(const Geometry& g, const at::BFloat16* qkv, const QueryBlock* blocks, int64_t n,
                        at::BFloat16* out, float* lse) {
  using BF = at::BFloat16;
  constexpr int64_t R = 2 * kAmxRows;
  const int64_t dim = g.head_dim, kdim = round_up(dim, kAmxStep), vdim = round_up(dim, kAmxCols);
  const int64_t ld_out = g.heads * dim;
  int64_t max_len = 0;
  for (int64_t t = 0; t < n; ++t) max_len = std::max(max_len, blocks[t].len);
  const int64_t ld_s = round_up(std::min(max_len, kKeyBlock), kAmxStep);
  const int64_t key_rows = round_up(max_len, kAmxStep);
  Zeroed<BF> k_t(kdim * key_rows), q_a(R * kdim), v_b(key_rows * vdim), p(R * ld_s);
  cpu::LineVector<float> s(R * ld_s), o(R * vdim), o_block(R * vdim);
  float row_max[R], row_sum[R], alpha[R], inv_sum[R], new_max[R], block_sum[R];
  float lse_max[kQueryBlock], lse_sum[kQueryBlock];
  const float scale = g.scale * kLog2e;
  int64_t packed_start = -1, packed_head = -1, keys = 0;

  const cpu::amx::TileConfig held;
  for (int64_t t = 0; t < n; ++t) {
    const QueryBlock& qb = blocks[t];
    const BF* q = qkv + qb.start * g.tok_stride + qb.head * g.head_stride;
    if (qb.start != packed_start || qb.head != packed_head) {
      keys = round_up(qb.len, kAmxCols);  // K^T's columns: whole result tiles
      pack_b_transposed(q + g.part_stride, dim, qb.len, g.tok_stride, kdim, keys, k_t.data());
      // pack_b_transposed leaves the pair rows past head_dim as they were (for another sequence's length)
      std::fill(k_t.data() + round_up(dim, 2) * keys, k_t.data() + kdim * keys, BF(0.f));
      pack_b(q + 2 * g.part_stride, qb.len, dim, g.tok_stride, round_up(qb.len, kAmxStep), vdim, v_b.data());
      packed_start = qb.start;
      packed_head = qb.head;
    }
    for (int64_t r0 = 0; r0 < qb.qn; r0 += R) {
      const int64_t mr = std::min(R, qb.qn - r0);
      const int64_t row0 = qb.start + qb.q0 + r0;
      const bool two_rows = mr > kAmxRows;
      // The tiles read Q's rows in place where they hold whole tile rows and the group's rows all lie in the block
      const BF* a = q + (qb.q0 + r0) * g.tok_stride;
      int64_t lda = g.tok_stride;
      if (dim != kdim || mr < R) {
        pack_a(a, mr, dim, g.tok_stride, q_a.data(), kdim);
        a = q_a.data();
        lda = kdim;
      }
      for (int64_t j0 = 0; j0 < qb.len; j0 += kKeyBlock) {
        const bool first = j0 == 0, last = j0 + kKeyBlock >= qb.len;
        const int64_t bn = std::min(kKeyBlock, qb.len - j0), bn_cols = round_up(bn, kAmxCols);
        for (int64_t c0 = 0; c0 < bn_cols; c0 += 2 * kAmxCols)
          product_2x2(two_rows, bn_cols - c0 > kAmxCols, kdim, a, lda, k_t.data() + 2 * (j0 + c0), keys,
                      s.data() + c0, ld_s);
        scaled_row_max(s.data(), ld_s, mr, bn, scale, new_max);
        for (int64_t r = 0; r < mr; ++r)
          if (!first) new_max[r] = std::max(row_max[r], new_max[r]);
        const bool rounded = scale != 1.f && needs_rounded(new_max, static_cast<int>(mr));
        for (int64_t r = 0; r < mr; r += kTileRows)
          exp2_round_rows(s.data() + r * ld_s, ld_s, static_cast<int>(std::min<int64_t>(kTileRows, mr - r)), bn,
                          scale, new_max + r, p.data() + r * ld_s, block_sum + r, rounded);
        const int64_t bn_steps = round_up(bn, kAmxStep);
        for (int64_t r = 0; r < mr; ++r) {
          std::fill(p.data() + r * ld_s + round_up(bn, 2), p.data() + r * ld_s + bn_steps, BF(0.f));
          alpha[r] = first ? 1.f : std::exp2(row_max[r] - new_max[r]);
          row_sum[r] = first ? block_sum[r] : row_sum[r] * alpha[r] + block_sum[r];
          row_max[r] = new_max[r];
          inv_sum[r] = 1.f / row_sum[r];
        }
        for (int64_t c0 = 0; c0 < vdim; c0 += 2 * kAmxCols)
          product_2x2(two_rows, vdim - c0 > kAmxCols, bn_steps, p.data(), ld_s, v_b.data() + j0 * vdim + 2 * c0,
                      vdim, o_block.data() + c0, vdim);
        // The rows' outputs: this key block's, or added to those of the blocks before it, rescaled to the new
        // maximum; after the last, times 1 / sum and rounded once.
        for (int64_t r = 0; r < mr; ++r) {
          const float* ob = o_block.data() + r * vdim;
          float* acc = o.data() + r * vdim;
          BF* dst = out + (row0 + r) * ld_out + qb.head * dim;
          cpu::for_each_vec(dim, [&](int64_t c, auto lanes) {
            Vec x = cpu::load(ob + c, lanes);
            if (!first) x = at::vec::fmadd(cpu::load(acc + c, lanes), Vec(alpha[r]), x);
            if (last) cpu::store(dst + c, x * Vec(inv_sum[r]), lanes);
            else cpu::store(acc + c, x, lanes);
          });
        }
      }
      std::copy(row_max, row_max + mr, lse_max + r0);
      std::copy(row_sum, row_sum + mr, lse_sum + r0);
    }
    store_lse(g, qb, lse_max, lse_sum, lse);
  }
}
#endif

// cpu_amx(allow): sets whether the CPU kernels may run on AMX tiles (None leaves it), and returns whether they now
// do: attention's bf16 forward here, and panel_linear's products on bf16 pair panels.
bool cpu_amx(std::optional<bool> allow) {
  if (allow.has_value()) cpu::amx::allowed.store(*allow, std::memory_order_relaxed);
  return cpu::amx::enabled();
}

// ---------------------------------------------------------------------------------------------------------------
// Backward, per (sequence, head): P = exp(scale * Q K^T - lse), M the dropout multipliers (all 1 without dropout),
// dV = (P * M)^T dO, dP = (dO V^T) * M, dS = P * (dP - D), dQ = scale * dS K, dK = scale * dS^T Q, with
// D_i = sum_j P_ij dP_ij. That equals rowsum(dO_i * O_i) but does not read the saved out, whose rounding to bf16
// would move D by more than dP - D is worth where the softmax is peaked.
// Each query block first takes P^T and dP^T against every key (keys as rows, so that P^T and dS^T come straight out
// of the GEMMs and only dS needs a transpose), sums D, then forms dS and the three gradients. The keep bits of the
// block are drawn once, with dP, and kept for P * M.
// Position terms: the bias joins the scores before the exp, P is 0 outside the window, and a window limits each
// query block to the keys of its band. rel_bias's gradient is dS summed over the pairs of each clamped distance:
// along the diagonals of the sequence first, then folded into the table's width, one row per item, which the
// caller sums per head (no thread writes another's row, and the sum's order is fixed). The tables' terms join the
// scores as the bias does; their gradients sum dS into the rows of grad_pos_q (query i's) and grad_pos_k (key j's)
// of the item's sequence and head, which no other item writes.

struct SeqHead {
  int64_t start, len, head;
};

// The queries lo .. hi of the block i0 .. i0 + bm that see key `key`: all of them without a window.
inline std::pair<int64_t, int64_t> window_queries(int64_t window, int64_t key, int64_t i0, int64_t bm) {
  if (window < 0) return {0, bm};
  const int64_t lo = std::clamp<int64_t>(key - window - i0, 0, bm);
  return {lo, std::clamp<int64_t>(key + window + 1 - i0, lo, bm)};
}

// The position terms of key j against queries i0+lo .. i0+hi of one sequence, less their lse, in natural units:
// dst[i - i0] = bias[len - 1 - j + i] + pos_q[i, c] + pos_k[j, c] - lse[i], c = cols[len - 1 + j - i]. Summed in
// fp64 and rounded once: the terms and lse may be large where the score less lse, what the exp takes, is small, and
// rounding each sum in fp32 would move the probabilities by several fp32 ulps of the terms.
template <bool kQ, bool kK, typename ST>
void key_terms(const ST* pq,         // [len, W]: the sequence's rows of pos_q for the head (kQ)
               const ST* pk,         // [len, W]: of pos_k (kK)
               int64_t width,        // W
               const int32_t* cols,  // [2 len - 1], spread_columns
               const float* bias,    // [2 len - 1]: rel_bias spread with sign -1, zeros without one
               const float* lse,     // [len]: the sequence's lse of the head
               int64_t len, int64_t j, int64_t i0, int64_t lo, int64_t hi,
               float* dst) {  // [hi]
  for (int64_t x = lo; x < hi; ++x) {
    const int64_t i = i0 + x, c = cols[len - 1 + j - i];
    double t = static_cast<double>(bias[len - 1 - j + i]) - lse[i];
    if constexpr (kQ) t += static_cast<float>(pq[i * width + c]);
    if constexpr (kK) t += static_cast<float>(pk[j * width + c]);
    dst[x] = static_cast<float>(t);
  }
}

// The tables' gradients from dS of key j against queries i0+lo .. i0+hi: gq[i, c] and gk[j, c] += dS_ij,
// c = cols[len - 1 + j - i].
template <bool kQ, bool kK>
void add_table_grads(float* gq,            // [len, W]: the sequence's rows of grad_pos_q for the head (kQ)
                     float* gk,            // [len, W]: of grad_pos_k (kK)
                     int64_t width,        // W
                     const int32_t* cols,  // [2 len - 1], spread_columns
                     int64_t len, int64_t j, int64_t i0, int64_t lo, int64_t hi,
                     const float* ds) {  // [hi]: dS^T's row of key j
  for (int64_t x = lo; x < hi; ++x) {
    const int64_t i = i0 + x, c = cols[len - 1 + j - i];
    if constexpr (kQ) gq[i * width + c] += ds[x];
    if constexpr (kK) gk[j * width + c] += ds[x];
  }
}

template <typename ST, typename CT>
void backward_seqs(const Geometry& g,
                   const DropoutParams& drop,
                   const PositionArgs& pos,
                   const ST* qkv,          // [T, 3, heads, head_dim], strided
                   const ST* grad_out,     // [T, heads, head_dim]
                   const float* lse,       // [heads, T]
                   const SeqHead* seqs,    // [n]
                   int64_t n,
                   ST* grad_qkv,           // [T, 3, heads, head_dim]
                   float* grad_bias,       // [n, 2R+1] with rel_bias
                   float* grad_pos_q,      // [heads, T, W], zeroed, with pos_q
                   float* grad_pos_k) {    // [heads, T, W], zeroed, with pos_k
  constexpr int64_t P = kPair<CT>;
  constexpr int64_t blk = kBackwardBlock;
  const int64_t dim = g.head_dim, kdim = round_up(dim, P), vdim = round_up(dim, kLanes);
  const int64_t row_stride = g.heads * dim;  // of grad_out
  int64_t max_len = 0;
  for (int64_t t = 0; t < n; ++t) max_len = std::max(max_len, seqs[t].len);
  const int64_t max_pad = round_up(max_len, kLanes);
  const bool direct_kv = std::is_same<CT, ST>::value && dim % P == 0;

  Zeroed<CT> q_t(kdim * max_pad), do_t(kdim * max_pad);                               // [head_dim, rows]
  Zeroed<CT> k_a(direct_kv ? 0 : max_pad * kdim), v_a(direct_kv ? 0 : max_pad * kdim);  // [rows, head_dim]
  cpu::LineVector<float> q_b(max_pad * vdim), k_b(max_pad * vdim), do_b(max_pad * vdim);  // [rows, head_dim]
  cpu::LineVector<float> dq(max_pad * vdim), dk(max_pad * vdim), dv(max_pad * vdim);
  // P^T and dP^T (then dS^T) of one query block against every key [keys, blk]; dS of one block pair; D.
  cpu::LineVector<float> pt(max_pad * blk), dpt(max_pad * blk), ds(blk * blk), d_sum(blk);
  // Keep bits of one query block against every key [keys, blk / 16]: bit l of word v for query 16v + l.
  constexpr int64_t keep_ld = blk / 16;
  std::vector<uint16_t> keep(drop.enabled ? max_pad * keep_ld : 0);
  // Key j's biases against the queries, and dS summed along the diagonals (spread_bias with sign -1): [2 len - 1].
  const bool has_bias = pos.rel_bias != nullptr, has_tables = pos.tables != nullptr;
  const TokenTables<ST> tables = has_tables ? *static_cast<const TokenTables<ST>*>(pos.tables) : TokenTables<ST>{};
  cpu::LineVector<float> bias_diag(has_bias || has_tables ? 2 * max_len : 0), ds_diag(has_bias ? 2 * max_len : 0);
  // With the tables: the columns of the sequence's distances (spread_columns) and one key's terms (key_terms).
  std::vector<int32_t> cols(has_tables ? 2 * max_len : 0);
  cpu::LineVector<float> terms(has_tables ? blk : 0), p_sum(has_tables ? blk : 0);

  for (int64_t t = 0; t < n; ++t) {
    const SeqHead& sh = seqs[t];
    const int64_t len = sh.len, len_pad = round_up(len, kLanes);
    const ST* q = qkv + sh.start * g.tok_stride + sh.head * g.head_stride;
    const ST* k = q + g.part_stride;
    const ST* v = k + g.part_stride;
    const ST* go = grad_out + sh.start * row_stride + sh.head * dim;
    const float* lse_row = lse + sh.head * g.tokens + sh.start;

    pack_b_transposed(q, dim, len, g.tok_stride, kdim, len_pad, q_t.data());
    pack_b_transposed(go, dim, len, row_stride, kdim, len_pad, do_t.data());
    pack_b(q, len, dim, g.tok_stride, len_pad, vdim, q_b.data());
    pack_b(k, len, dim, g.tok_stride, len_pad, vdim, k_b.data());
    pack_b(go, len, dim, row_stride, len_pad, vdim, do_b.data());
    const CT* ka = reinterpret_cast<const CT*>(k);
    const CT* va = reinterpret_cast<const CT*>(v);
    int64_t lda = g.tok_stride;
    if (!direct_kv) {
      pack_a(k, len, dim, g.tok_stride, k_a.data(), kdim);
      pack_a(v, len, dim, g.tok_stride, v_a.data(), kdim);
      ka = k_a.data();
      va = v_a.data();
      lda = kdim;
    }
    std::fill(dk.begin(), dk.begin() + len * vdim, 0.f);
    std::fill(dv.begin(), dv.begin() + len * vdim, 0.f);
    if (has_bias) {
      spread_bias(pos, sh.head, len, 1.f, -1, bias_diag.data(), 2 * len - 1);
      std::fill(ds_diag.begin(), ds_diag.begin() + 2 * len - 1, 0.f);
    }
    if (has_tables) spread_columns(tables, len, cols.data(), 2 * len - 1);
    // The rows of this sequence and head in the tables and their gradients: no other item writes them.
    const ST* pq = table_rows(tables, tables.pos_q, sh.head, sh.start);
    const ST* pk = table_rows(tables, tables.pos_k, sh.head, sh.start);
    float* gq = table_rows(tables, grad_pos_q, sh.head, sh.start);
    float* gk = table_rows(tables, grad_pos_k, sh.head, sh.start);

    for (int64_t i0 = 0; i0 < len; i0 += blk) {
      const int64_t bm = std::min(blk, len - i0), bm_vec = round_up(bm, kLanes);
      int64_t jlo = 0, jhi = len;  // the keys of the block's band
      if (pos.window >= 0) {
        jlo = std::max<int64_t>(0, i0 - pos.window);
        jhi = std::min(len, i0 + bm + pos.window);
      }
      for (int64_t j0 = jlo; j0 < jhi; j0 += blk) {
        const int64_t bn = std::min(blk, jhi - j0);
        float* pt_blk = pt.data() + j0 * blk;
        gemm<CT>(bn, bm_vec, kdim, ka + j0 * lda, lda, q_t.data() + i0 * P, len_pad, pt_blk, blk, false);
        gemm<CT>(bn, bm_vec, kdim, va + j0 * lda, lda, do_t.data() + i0 * P, len_pad, dpt.data() + j0 * blk, blk,
                 false);
        for (int64_t j = 0; j < bn; ++j) {
          float* row = pt_blk + j * blk;
          const auto [lo, hi] = window_queries(pos.window, j0 + j, i0, bm);
          std::fill(row, row + lo, 0.f);
          std::fill(row + hi, row + bm, 0.f);
          if (has_tables) {
            dispatch_tables(tables, [&](auto has_q, auto has_k) {
              key_terms<decltype(has_q)::value, decltype(has_k)::value>(pq, pk, tables.width, cols.data(),
                                                                        bias_diag.data(), lse_row, len, j0 + j, i0,
                                                                        lo, hi, terms.data());
            });
            at::vec::map2([scale = g.scale](Vec x, Vec t) { return exp_keeping_nan(at::vec::fmadd(x, Vec(scale), t)); },
                          row + lo, row + lo, terms.data() + lo, hi - lo);
          } else if (has_bias)
            at::vec::map3(
                [scale = g.scale](Vec x, Vec l, Vec b) {
                  return exp_keeping_nan(at::vec::fmadd(x, Vec(scale), b) - l);
                },
                row + lo, row + lo, lse_row + i0 + lo, bias_diag.data() + (len - 1 - (j0 + j) + i0 + lo), hi - lo);
          else
            at::vec::map2([scale = g.scale](Vec x, Vec l) { return exp_keeping_nan(at::vec::fmsub(x, Vec(scale), l)); },
                          row + lo, row + lo, lse_row + i0 + lo, hi - lo);
        }
        if (drop.enabled) {
          keep_bits_block(drop, static_cast<uint32_t>(sh.head), sh.start + i0, bm, sh.start + j0, bn,
                          keep.data() + j0 * keep_ld, keep_ld);
          for (int64_t j = j0; j < j0 + bn; ++j)
            apply_keep_bits(dpt.data() + j * blk, keep.data() + j * keep_ld, bm, drop.scale);
        }
      }
      std::fill(d_sum.begin(), d_sum.end(), 0.f);
      for (int64_t j = jlo; j < jhi; ++j)
        at::vec::map3([](Vec acc, Vec p, Vec dp) { return at::vec::fmadd(p, dp, acc); }, d_sum.data(), d_sum.data(),
                      pt.data() + j * blk, dpt.data() + j * blk, bm);
      if (has_tables) {
        // The tables make scores and lse large (tens): lse's rounding then scales a row of P by 1 + several 1e-7,
        // and D = sum_j P_ij dP_ij with it, and where P is peaked, dP - D cancels to far less than D. Dividing D by
        // the row sums of this P takes that factor out of D.
        std::fill(p_sum.begin(), p_sum.end(), 0.f);
        for (int64_t j = jlo; j < jhi; ++j)
          at::vec::map2([](Vec acc, Vec p) { return acc + p; }, p_sum.data(), p_sum.data(), pt.data() + j * blk, bm);
        at::vec::map2([](Vec d, Vec sum) { return d / sum; }, d_sum.data(), d_sum.data(), p_sum.data(), bm);
      }

      float* dq_blk = dq.data() + i0 * vdim;
      std::fill(dq_blk, dq_blk + bm * vdim, 0.f);
      for (int64_t j0 = jlo; j0 < jhi; j0 += blk) {
        const int64_t bn = std::min(blk, jhi - j0);
        float* pt_blk = pt.data() + j0 * blk;   // P^T, becomes (P * M)^T once dS is formed
        float* dst_blk = dpt.data() + j0 * blk;  // dP^T, becomes dS^T
        for (int64_t j = 0; j < bn; ++j) {
          float* row = dst_blk + j * blk;
          at::vec::map3([](Vec dp, Vec p, Vec d) { return p * (dp - d); }, row, row, pt_blk + j * blk, d_sum.data(),
                        bm);
        }
        if (has_bias)
          for (int64_t j = 0; j < bn; ++j) {
            const auto [lo, hi] = window_queries(pos.window, j0 + j, i0, bm);
            float* diag = ds_diag.data() + (len - 1 - (j0 + j) + i0);
            at::vec::map2([](Vec acc, Vec ds) { return acc + ds; }, diag + lo, diag + lo, dst_blk + j * blk + lo,
                          hi - lo);
          }
        if (has_tables)
          for (int64_t j = 0; j < bn; ++j) {
            const auto [lo, hi] = window_queries(pos.window, j0 + j, i0, bm);
            dispatch_tables(tables, [&](auto has_q, auto has_k) {
              add_table_grads<decltype(has_q)::value, decltype(has_k)::value>(
                  gq, gk, tables.width, cols.data(), len, j0 + j, i0, lo, hi, dst_blk + j * blk);
            });
          }
        if (drop.enabled)
          for (int64_t j = 0; j < bn; ++j)
            apply_keep_bits(pt_blk + j * blk, keep.data() + (j0 + j) * keep_ld, bm, drop.scale);
        gemm<float>(bn, vdim, bm, pt_blk, blk, do_b.data() + i0 * vdim, vdim, dv.data() + j0 * vdim, vdim, true);
        gemm<float>(bn, vdim, bm, dst_blk, blk, q_b.data() + i0 * vdim, vdim, dk.data() + j0 * vdim, vdim, true);
        transpose_words(dst_blk, blk, ds.data(), blk, bn, bm);
        gemm<float>(bm, vdim, bn, ds.data(), blk, k_b.data() + j0 * vdim, vdim, dq_blk, vdim, true);
      }
    }

    for (int64_t i = 0; i < len; ++i) {
      ST* gq = grad_qkv + ((sh.start + i) * 3 * g.heads + sh.head) * dim;
      store_scaled(dq.data() + i * vdim, g.scale, dim, gq);
      store_scaled(dk.data() + i * vdim, g.scale, dim, gq + row_stride);
      store_scaled(dv.data() + i * vdim, 1.f, dim, gq + 2 * row_stride);
    }
    if (has_bias) {
      float* gb = grad_bias + t * (2 * pos.radius + 1);
      std::fill(gb, gb + 2 * pos.radius + 1, 0.f);
      for (int64_t u = 0; u < 2 * len - 1; ++u)
        gb[std::clamp(len - 1 - u, -pos.radius, pos.radius) + pos.radius] += ds_diag[u];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points.

void check_qkv(const char* op, const at::Tensor& qkv) {
  TORCH_CHECK(qkv.device().is_cpu(), op, ": qkv must be on cpu, got ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3, op, ": qkv must have shape [T, 3, heads, head_dim], got ",
              qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16, op,
              ": qkv must be Float or BFloat16, got ", qkv.scalar_type());
}

// Checks the position terms against qkv (checked before) and points at them.
PositionArgs position_args(const char* op, const at::Tensor& qkv, const std::optional<at::Tensor>& rel_bias,
                           int64_t window) {
  check_position_args(op, qkv, rel_bias, window);
  if (!rel_bias.has_value()) return {nullptr, 0, window, nullptr};
  return {rel_bias->data_ptr<float>(), (rel_bias->size(1) - 1) / 2, window, nullptr};
}

// Checks the tables against qkv (checked before), and pos_index's values, which the kernels read as columns
// unchecked; returns pos_index contiguous, undefined without tables.
at::Tensor checked_pos_index(const char* op, const at::Tensor& qkv, const std::optional<at::Tensor>& pos_q,
                             const std::optional<at::Tensor>& pos_k, const std::optional<at::Tensor>& pos_index) {
  check_token_position_args(op, qkv, pos_q, pos_k, pos_index);
  if (!pos_index.has_value()) return {};
  const int64_t width = (pos_q.has_value() ? *pos_q : *pos_k).size(2);
  at::Tensor index = pos_index->contiguous();
  const int32_t* c = index.data_ptr<int32_t>();
  for (int64_t k = 0; k < index.numel(); ++k)
    TORCH_CHECK_VALUE(c[k] >= 0 && c[k] < width, op, ": pos_index holds ", c[k],
                      ", outside the tables' columns [0, ", width, ")");
  return index;
}

template <typename ST>
TokenTables<ST> token_tables(const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k,
                             const at::Tensor& index) {
  if (!index.defined()) return {nullptr, nullptr, nullptr, 0, 0, 0};
  const at::Tensor& first = pos_q.has_value() ? *pos_q : *pos_k;
  return {pos_q.has_value() ? pos_q->data_ptr<ST>() : nullptr, pos_k.has_value() ? pos_k->data_ptr<ST>() : nullptr,
          index.data_ptr<int32_t>(), (index.numel() - 1) / 2, first.size(2), first.size(1)};
}

// Keys a query sees in a sequence of len: all of them, or its window's.
int64_t keys_seen(int64_t len, int64_t window) { return window < 0 ? len : std::min(len, 2 * window + 1); }

Geometry geometry(const at::Tensor& qkv, double scale) {
  return Geometry{qkv.size(0), qkv.size(2), qkv.size(3), qkv.stride(0), qkv.stride(1), qkv.stride(2),
                  static_cast<float>(scale)};
}

// Calls fn(ST{}, CT{}) with the tensor dtype and the GEMM compute type.
template <typename Fn>
void dispatch_types(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kFloat) return fn(float{}, float{});
#ifdef MTBF_BF16_DOT
  if (cpu_has_bf16_dot()) return fn(at::BFloat16{}, at::BFloat16{});
#endif
  fn(at::BFloat16{}, float{});
}

// Calls fn(std::bool_constant<a>{}, std::bool_constant<b>{}).
template <typename Fn>
void dispatch_flags(bool a, bool b, const Fn& fn) {
  if (a && b) return fn(std::true_type{}, std::true_type{});
  if (a) return fn(std::true_type{}, std::false_type{});
  if (b) return fn(std::false_type{}, std::true_type{});
  fn(std::false_type{}, std::false_type{});
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_cpu(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens,
                                                        int64_t max_seqlen, double scale, double dropout_p,
                                                        const std::optional<at::Tensor>& rng_state,
                                                        const std::optional<at::Tensor>& rel_bias, int64_t window,
                                                        const std::optional<at::Tensor>& pos_q,
                                                        const std::optional<at::Tensor>& pos_k,
                                                        const std::optional<at::Tensor>& pos_index) {
  constexpr const char* op = "attention_varlen";
  check_qkv(op, qkv_in);
  const PositionArgs pos = position_args(op, qkv_in, rel_bias, window);
  const at::Tensor index = checked_pos_index(op, qkv_in, pos_q, pos_k, pos_index);
  const DropoutParams drop = make_dropout_params(op, dropout_p, rng_state);
  const at::Tensor qkv = qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const auto seqs = read_cu_seqlens(op, cu_seqlens, qkv.size(0), max_seqlen);
  const Geometry g = geometry(qkv, scale);
  at::Tensor out = at::empty({g.tokens, g.heads, g.head_dim}, qkv.options());
  at::Tensor lse = at::empty({g.heads, g.tokens}, qkv.options().dtype(at::kFloat));

  std::vector<QueryBlock> blocks;
  std::vector<double> cost;
  for (const auto& [start, len] : seqs)
    for (int64_t h = 0; h < g.heads; ++h)
      for (int64_t q0 = 0; q0 < len; q0 += kQueryBlock) {
        const int64_t qn = std::min(kQueryBlock, len - q0);
        blocks.push_back({start, len, h, q0, qn});
        cost.push_back(static_cast<double>(qn + 8) * (std::min(len, keys_seen(len, window) + qn) + 8));
      }
  // AMX tiles take the bf16 forward without position terms or dropout
  const bool tiles = !index.defined() && pos.rel_bias == nullptr && pos.window < 0 && !drop.enabled && cpu::amx::enabled();
  dispatch_types(qkv.scalar_type(), [&](auto st, auto ct) {
    using ST = decltype(st);
    using CT = decltype(ct);
    const ST* qkv_p = qkv.data_ptr<ST>();
    ST* out_p = out.data_ptr<ST>();
    float* lse_p = lse.data_ptr<float>();
    const TokenTables<ST> tables = token_tables<ST>(pos_q, pos_k, index);
    PositionArgs with_tables = pos;
    with_tables.tables = &tables;
    run_balanced(cost, [&](int64_t first, int64_t count) {
#ifdef MTBF_AMX
      if constexpr (std::is_same<CT, at::BFloat16>::value) {
        if (tiles) {
          forward_blocks_amx(g, qkv_p, blocks.data() + first, count, out_p, lse_p);
          return;
        }
      }
#endif
      // With the tables rel_bias joins their terms: kBias stays false, which saves instantiations.
      if (index.defined()) {
        if (pos.window >= 0)
          forward_blocks<ST, CT, false, true, true>(g, drop, with_tables, qkv_p, blocks.data() + first, count, out_p,
                                                    lse_p);
        else
          forward_blocks<ST, CT, false, false, true>(g, drop, with_tables, qkv_p, blocks.data() + first, count,
                                                     out_p, lse_p);
        return;
      }
      dispatch_flags(pos.rel_bias != nullptr, pos.window >= 0, [&](auto bias, auto window) {
        forward_blocks<ST, CT, decltype(bias)::value, decltype(window)::value>(g, drop, pos, qkv_p,
                                                                               blocks.data() + first, count, out_p,
                                                                               lse_p);
      });
    });
  });
  return {out, lse};
}

// out is part of the op's contract (other backends read it) and is checked, but this kernel takes D from P and dP.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& out, const at::Tensor& lse_in,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& rel_bias, int64_t window,
    const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k,
    const std::optional<at::Tensor>& pos_index) {
  constexpr const char* op = "attention_varlen_backward";
  check_qkv(op, qkv_in);
  const PositionArgs pos = position_args(op, qkv_in, rel_bias, window);
  const at::Tensor index = checked_pos_index(op, qkv_in, pos_q, pos_k, pos_index);
  const DropoutParams drop = make_dropout_params(op, dropout_p, rng_state);
  const at::Tensor qkv = qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const Geometry g = geometry(qkv, scale);
  for (const at::Tensor* t : {&grad_out_in, &out}) {
    const char* name = t == &grad_out_in ? "grad_out" : "out";
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be on cpu, got ", t->device());
    TORCH_CHECK(t->sizes() == at::IntArrayRef({g.tokens, g.heads, g.head_dim}), op, ": ", name,
                " must have shape [T, heads, head_dim] = [", g.tokens, ", ", g.heads, ", ", g.head_dim, "], got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == qkv.scalar_type(), op, ": ", name, " has dtype ", t->scalar_type(),
                " but qkv has ", qkv.scalar_type());
  }
  MTBF_CHECK_DEVICE_TYPE("attention_varlen_backward", lse_in, at::kCPU);
  MTBF_CHECK_DTYPE("attention_varlen_backward", lse_in, at::kFloat);
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({g.heads, g.tokens}), op, ": lse must have shape [heads, T] = [",
              g.heads, ", ", g.tokens, "], got ", lse_in.sizes());
  const auto seqs = read_cu_seqlens(op, cu_seqlens, qkv.size(0), max_seqlen);
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor grad_qkv = at::empty({g.tokens, 3, g.heads, g.head_dim}, qkv.options());

  std::vector<SeqHead> items;
  std::vector<double> cost;
  for (const auto& [start, len] : seqs)
    for (int64_t h = 0; h < g.heads; ++h) {
      if (len == 0) continue;
      items.push_back({start, len, h});
      cost.push_back(static_cast<double>(len + 16) * (std::min(len, keys_seen(len, window) + kBackwardBlock) + 16));
    }
  // rel_bias's gradient per item (sequence, head), summed per head below.
  const int64_t width = rel_bias.has_value() ? rel_bias->size(1) : 0;
  at::Tensor grad_bias_items = at::empty({static_cast<int64_t>(items.size()), width}, lse.options());
  // The tables' gradients in fp32, added into by the items that own their rows (zeros where no pair lands).
  const auto table_grad = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? at::zeros(t->sizes(), lse.options()) : at::Tensor();
  };
  const at::Tensor grad_pos_q32 = table_grad(pos_q), grad_pos_k32 = table_grad(pos_k);
  dispatch_types(qkv.scalar_type(), [&](auto st, auto ct) {
    using ST = decltype(st);
    using CT = decltype(ct);
    const ST* qkv_p = qkv.data_ptr<ST>();
    const ST* go_p = grad_out.data_ptr<ST>();
    const float* lse_p = lse.data_ptr<float>();
    ST* grad_p = grad_qkv.data_ptr<ST>();
    float* grad_bias_p = grad_bias_items.data_ptr<float>();
    const TokenTables<ST> tables = token_tables<ST>(pos_q, pos_k, index);
    PositionArgs with_tables = pos;
    with_tables.tables = index.defined() ? &tables : nullptr;
    float* grad_pos_q_p = grad_pos_q32.defined() ? grad_pos_q32.data_ptr<float>() : nullptr;
    float* grad_pos_k_p = grad_pos_k32.defined() ? grad_pos_k32.data_ptr<float>() : nullptr;
    run_balanced(cost, [&](int64_t first, int64_t count) {
      backward_seqs<ST, CT>(g, drop, with_tables, qkv_p, go_p, lse_p, items.data() + first, count, grad_p,
                            grad_bias_p + first * width, grad_pos_q_p, grad_pos_k_p);
    });
  });
  const auto table_result = [&](const at::Tensor& t) {
    return t.defined() ? t.to(qkv.scalar_type()) : at::empty({0}, qkv.options());
  };
  if (!rel_bias.has_value())
    return {grad_qkv, at::empty({0}, qkv.options().dtype(at::kFloat)), table_result(grad_pos_q32),
            table_result(grad_pos_k32)};
  // Items run sequence by sequence, head by head.
  at::Tensor grad_rel_bias = items.empty() ? at::zeros({g.heads, width}, lse.options())
                                           : grad_bias_items.view({-1, g.heads, width}).sum(0);
  return {grad_qkv, grad_rel_bias, table_result(grad_pos_q32), table_result(grad_pos_k32)};
}

}  // namespace

// A tensor-less query of this CPU build, in the kernels' namespace.
TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) { m.def("cpu_amx(bool? allow=None) -> bool", &cpu_amx); }

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("attention_varlen", &attention_varlen_cpu);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cpu);
}

}  // namespace mtbert_fast
