// int8 inference on the CPU: activations quantized per token, the products on uint8 x int8 (VNNI), and the
// dequantization fused with what follows each product.
//
// A row of activations x (float or bfloat16), multiplied by a per-channel smoothing vector m, is stored as uint8 q
// with an fp32 scale and an integer zero in [0, 255] (asymmetric, so a row that is mostly positive, like GELU's
// output, keeps all 256 levels):  x * m ~= scale * (q - zero).  A weight row n holds int8 w[n, :] with scale ws[n]
// (per output channel) and wsum[n] = sum_k w[n, k], so that
//   (x * m) . (w[n] * ws[n]) ~= scale * ws[n] * (acc[n] - zero * wsum[n]),   acc = q @ w^T, integer sums.
// The weights carry 1 / m (folded in when they were quantized), so the products equal x @ W^T.
//
// Outlier channels: a few input channels whose activations are far larger than the rest are left out of the
// quantized input (their smooth is 0, so they quantize to the zero point and add nothing to the sums) and added back
// in fp32 by the epilogue: y[t, n] += sum_j outlier_x[t, j] * outlier_w[j, n], outlier_x [T, k] the float inputs at
// those channels and outlier_w [k, N] the float weight's columns there. Where given, the GELU op also returns its
// outputs at the next product's outlier channels (`keep`), which that product's epilogue adds back.
//
// The products' integer sums reach these kernels in one of two ways. As acc, int32 or fp32 holding them exactly,
// from a product run before (oneDNN's int8 linear on a pre-packed weight, or int8_panel_sums; see
// mtbert_fast/ops/int8.py). Or as the quantized input q itself with the weight's int8 panels (int8_tiles.h): the
// kernel then takes the sums of a block of rows at a time on one thread and hands the block to the epilogue while
// it is in cache, so that the int32 sums never go to memory (with few rows, too few blocks to share among the
// threads, the panels are split over the threads instead: int8_linear's and the GELU's epilogues then take each
// thread's columns from its own cache, the LayerNorms' the sums stored once, as int8_panel_sums does).
//
// Ops: quantize_rows; int8_linear (+ bias, float out); int8_linear_gelu_quantize (+ bias, GELU, and the result
// quantized again for the next product, so the [T, I] activation never goes to memory in float);
// int8_linear_residual_layer_norm (+ bias + residual, LayerNorm).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu_utils.h"
#include "int8_tiles.h"

namespace mtbert_fast {
namespace {

using namespace cpu;
using iVec = at::vec::Vectorized<int32_t>;

inline iVec load_int(const int32_t* p, Full) { return iVec::loadu(p); }
inline iVec load_int(const int32_t* p, int64_t n) { return iVec::loadu(p, n); }

// round(v) + zero, saturated to [0, 255] (v and zero hold integers after the rounding; ties go to even, as
// torch.round).
inline void store_uint8(uint8_t* p, const fVec& v, const fVec& zero, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  // the same in int32: the conversion rounds to nearest even as round() does, adding the zero and the clamp at 0 are
  // exact there, and the narrowing saturates at 255. v is capped at 2^30 first, so that +inf gives 255 as the float
  // clamp does; NaN passes the cap (vminps returns its second operand) and converts to a negative value: 0, as there
  const __m512 capped = _mm512_min_ps(_mm512_set1_ps(1073741824.f), v);
  const __m512i r = _mm512_max_epi32(
      _mm512_add_epi32(_mm512_cvt_roundps_epi32(capped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                       _mm512_cvtps_epi32(zero)),
      _mm512_setzero_si512());
  const __m128i u8 = _mm512_cvtusepi32_epi8(r);
  if (n == kVec) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), u8);  // every lane written: no mask to apply
  } else {
    _mm_mask_storeu_epi8(p, static_cast<__mmask16>((1u << n) - 1), u8);
  }
#else
  const fVec r = at::vec::clamp(v.round() + zero, fVec(0.f), fVec(255.f));
#if defined(CPU_CAPABILITY_AVX2)
  // r holds integers in [0, 255]: converted exactly, then narrowed by two saturating packs that change nothing
  const __m256i i32 = _mm256_cvtps_epi32(r);
  const __m128i u16 = _mm_packus_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  const __m128i u8 = _mm_packus_epi16(u16, u16);
  if (n == kVec) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), u8);
  } else {
    uint8_t buf[16];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(buf), u8);
    std::memcpy(p, buf, n);
  }
#else
  float buf[kVec];
  r.store(buf);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(buf[i]);
#endif
#endif
}
inline void store_uint8(uint8_t* p, const fVec& v, const fVec& zero, Full) { store_uint8(p, v, zero, kVec); }

// The range of a row's values as it is read, lane by lane: lo = min(v, 0), hi = max(v, 0); and `bad`, the sum of
// v * 0, which turns NaN once any value is NaN or infinite (the range then reads NaN, see quantize_row_in).
struct RowRange {
  fVec lo{0.f}, hi{0.f}, bad{0.f};

  template <typename Lanes>
  void add(const fVec& v, Lanes n) {
    const fVec k = keep_lanes(v, n);
    lo = min_ignoring_nan(lo, k);
    hi = max_ignoring_nan(hi, k);
    bad = at::vec::fmadd(k, fVec(0.f), bad);
  }
};

// The range of a row whose columns were taken apart: the lane-wise min, max and sum of the parts' (exact as one pass's:
// the min and max are, and `bad` turns NaN as it would).
inline RowRange merged(const RowRange* parts, int64_t count) {
  RowRange range;
  for (int64_t i = 0; i < count; ++i) {
    range.lo = min_ignoring_nan(range.lo, parts[i].lo);
    range.hi = max_ignoring_nan(range.hi, parts[i].hi);
    range.bad = range.bad + parts[i].bad;
  }
  return range;
}

// A row's quantization from the range of its fp32 values v (already smoothed):
//   lo = min(v, 0), hi = max(v, 0), scale = (hi - lo) / 255, zero = round(-lo / scale), q = round(v / scale) + zero
// A row of zeros gets scale 0 (its q dequantize to 0 whatever they hold); a row holding NaN or an infinity gets a
// NaN scale, so that whatever reads it dequantizes to NaN.
struct RowScale {
  float scale, inv, zero;

  explicit RowScale(const RowRange& range) {
    const bool finite = !std::isnan(lane_sum(range.bad));
    const float lo_s = finite ? at::vec::vec_reduce_all<float>(
        [](const fVec& a, const fVec& b) { return min_ignoring_nan(a, b); }, range.lo) : NAN;
    const float hi_s = finite ? at::vec::vec_reduce_all<float>(
        [](const fVec& a, const fVec& b) { return max_ignoring_nan(a, b); }, range.hi) : NAN;
    scale = (hi_s - lo_s) / 255.f;
    inv = scale > 0.f ? 1.f / scale : 0.f;
    zero = std::nearbyint(-lo_s * inv);
  }

  // q[c0:c1] from the values of those columns
  template <typename ValueOf>
  void quantize(int64_t c0, int64_t c1, const ValueOf& value_of, uint8_t* q) const {
    const fVec inv_v(inv), z_v(zero);
    for_each_vec(c1 - c0, [&](int64_t i, auto n) { store_uint8(q + c0 + i, value_of(c0 + i, n) * inv_v, z_v, n); });
  }
};

// The row quantization of values whose range is known: writes q and the row's scale and zero.
template <typename ValueOf>
inline void quantize_row_in(int64_t K, const RowRange& range, const ValueOf& value_of, uint8_t* q, float* scale,
                            float* zero) {
  const RowScale rs(range);
  rs.quantize(0, K, value_of, q);
  *scale = rs.scale;
  *zero = rs.zero;
}

// The same, with a pass of its own for the range.
template <typename ValueOf>
inline void quantize_row(int64_t K, const ValueOf& value_of, uint8_t* q, float* scale, float* zero) {
  RowRange range;
  for_each_vec(K, [&](int64_t k, auto n) { range.add(value_of(k, n), n); });
  quantize_row_in(K, range, value_of, q, scale, zero);
}

template <typename T>
void quantize_rows_kernel(const T* x, const float* smooth, uint8_t* q, int64_t ldq, float* scale, float* zero,
                          int64_t N, int64_t K) {
  at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x_row = x + row * K;
      quantize_row(
          K, [&](int64_t k, auto n) { return load(x_row + k, n) * load(smooth + k, n); }, q + row * ldq, scale + row,
          zero + row);
    }
  });
}

// Checks with the op's name as a runtime string (the MTBF_CHECK_ macros paste a literal).
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_float_or_bf16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but acc is on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

// acc - zero * wsum, the centred sums of a row, as fp32 with a single rounding of the exact value: int32 sums are
// centred in int32 and converted once (zero and wsum hold integers; int32 arithmetic wraps, so the result is exact
// whenever it fits, and |sum_k (q - zero) w| <= 255 * 127 K does for the K that int8_sums takes); fp32 sums hold
// integers exactly (see ops/int8.py), and one fused multiply-add rounds once.
inline fVec centred(const int32_t* acc, const float* wsum, int32_t zero, int64_t d, Full) {
  const iVec c = load_int(acc + d, Full{}) - iVec(zero) * at::vec::convert_to_int_of_same_size(load(wsum + d, Full{}));
  return at::vec::convert_to_fp_of_same_size<float>(c);
}
inline fVec centred(const int32_t* acc, const float* wsum, int32_t zero, int64_t d, int64_t n) {
  const iVec c = load_int(acc + d, n) - iVec(zero) * at::vec::convert_to_int_of_same_size(load(wsum + d, n));
  return at::vec::convert_to_fp_of_same_size<float>(c);
}
template <typename Lanes>
inline fVec centred(const float* acc, const float* wsum, int32_t zero, int64_t d, Lanes n) {
  return at::vec::fnmadd(fVec(static_cast<float>(zero)), load(wsum + d, n), load(acc + d, n));
}
// The same from int32 sums that fp32 holds exactly, with zero * wsum (kExactInFloat): each converted exactly, and one
// fused multiply-add rounds their difference once, as the int32 route's conversion does, in two operations fewer
// (the int32 product of zero and wsum takes two on the port that also converts).
template <typename Lanes>
inline fVec centred_in_float(const int32_t* acc, const float* wsum, int32_t zero, int64_t d, Lanes n) {
  return at::vec::fnmadd(fVec(static_cast<float>(zero)), load(wsum + d, n),
                         at::vec::convert_to_fp_of_same_size<float>(load_int(acc + d, n)));
}
// The longest reduction whose int32 sums and zero * wsum fp32 holds exactly: |q w| <= 255 * 128 per term, 2^24 in all.
constexpr int64_t kExactInFloat = (int64_t{1} << 24) / (255 * 128);

// The dequantized product of one row, plus bias and the outlier channels' fp32 part, handed to f(d, lanes, y)
// vector by vector.
template <typename A>
struct RowDequant {
  const A* acc;         // this row's integer sums from column `first` on
  const float* wscale;  // [N]
  const float* wsum;    // [N]
  float scale;
  float zero;
  const float* outlier_x;  // [k] this row's inputs at the outlier channels
  const float* outlier_w;  // [k, N]
  int64_t outliers;        // k (0: none)
  int64_t first = 0;       // the column of acc[0]
  bool in_float = false;   // int32 sums of a reduction of at most kExactInFloat: centred_in_float

  // Columns [c0, c1) of a row of N (c0 >= first).
  template <typename F>
  inline void columns(int64_t c0, int64_t c1, int64_t N, const float* bias, const F& f) const {
    const fVec s(scale);
    const int32_t z = static_cast<int32_t>(zero);
    const A* a = acc + (c0 - first);
    const auto each = [&](auto centre) {
      for_each_vec(c1 - c0, [&](int64_t i, auto n) {
        const int64_t d = c0 + i;
        fVec y = at::vec::fmadd(centre(a, wsum + c0, z, i, n), s * load(wscale + d, n), load(bias + d, n));
        for (int64_t j = 0; j < outliers; ++j) {
          y = at::vec::fmadd(fVec(outlier_x[j]), load(outlier_w + j * N + d, n), y);
        }
        f(d, n, y);
      });
    };
    if constexpr (std::is_same_v<A, int32_t>) {
      if (in_float) {
        each([](auto&&... args) { return centred_in_float(args...); });
        return;
      }
    }
    each([](auto&&... args) { return centred(args...); });
  }

  template <typename F>
  inline void operator()(int64_t N, const float* bias, const F& f) const {
    columns(0, N, N, bias, f);
  }
};

// The outlier channels' fp32 inputs [T, k] and weights [k, N], given together or not at all.
using Outliers = std::optional<at::Tensor>;

// Rows per block of a product on panels: two 12-row VNNI tiles; their int32 sums (24 x N) stay in the core's cache.
constexpr int64_t kBlockRows = 24;
// The most rows at a time of a column task (Int8Epilogue::run_column_tasks), as tile_panels takes them: each pass over
// the rows reads the task's panels again, from L3 where they do not fit the core's L2 beside the sums (half of
// bert-base's QKV weight is 0.9 MB).
constexpr int64_t kColumnChunkRows = 256;
// Panels a column task takes at a time (an even count: the tiles take 16 rows two panels at a time): their sums
// (256 x 128 int32 at the most) stay in the core's L1 and L2 for the epilogue.
constexpr int64_t kColumnGroupPanels = 4;
// Rows from which a column task prefetches its next group's panels into L2 while the epilogue runs on the group
// before: with fewer, the epilogue is too short to hide the loads behind it.
constexpr int64_t kPrefetchRows = 32;

// The common part of the product ops: checks, then epilogue(row, RowDequant of the row) in parallel over the rows.
// acc: the integer sums [M, N], or with panels the quantized input q uint8 [M, K] (N: weight_scale's length).
struct Int8Epilogue {
  const at::Tensor& acc;
  const at::Tensor& scale;
  const at::Tensor& zero;
  const at::Tensor& wscale;
  const at::Tensor& wsum;
  const at::Tensor& bias;
  const Outliers& outlier_x;
  const Outliers& outlier_w;
  const std::optional<at::Tensor>& panels;

  int64_t outliers() const { return outlier_x.has_value() ? outlier_x->size(1) : 0; }

  int64_t rows() const { return acc.size(0); }
  int64_t out_features() const { return panels.has_value() ? wscale.size(0) : acc.size(1); }

  void check(const char* op) const {
    TORCH_CHECK(acc.device().type() == at::kCPU, op, ": acc must be on cpu, got ", acc.device());
    TORCH_CHECK(acc.dim() == 2, op, ": acc must have 2 dims, got shape ", acc.sizes());
    if (panels.has_value()) {
      check_dtype(op, "acc (with panels, the quantized input q)", acc, at::kByte);
      TORCH_CHECK(wscale.dim() == 1 && wscale.size(0) > 0, op, ": weight_scale must have shape [out_features], got ",
                  wscale.sizes());
      cpu::int8::check_panels(op, acc, *panels, wscale.size(0));
    } else {
      TORCH_CHECK(acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat, op,
                  ": acc (the integer sums) must be int32 or float32, got ", acc.scalar_type());
    }
    const int64_t N = out_features();
    check_vector(op, "scale", scale, acc.size(0), acc);
    check_vector(op, "zero", zero, acc.size(0), acc);
    check_vector(op, "weight_scale", wscale, N, acc);
    check_vector(op, "weight_sum", wsum, N, acc);
    check_vector(op, "bias", bias, N, acc);
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scale", scale}, {"zero", zero},
                                  {"weight_scale", wscale}, {"weight_sum", wsum}}) {
      check_dtype(op, name, t, at::kFloat);
    }
    check_float_or_bf16(op, "bias", bias);
    TORCH_CHECK(outlier_x.has_value() == outlier_w.has_value(), op,
                ": outlier_x and outlier_w go together: pass both or neither");
    if (outlier_x.has_value()) {
      const at::Tensor &x = *outlier_x, &w = *outlier_w;
      for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"outlier_x", x}, {"outlier_w", w}}) {
        check_dtype(op, name, t, at::kFloat);
        TORCH_CHECK(t.device() == acc.device(), op, ": ", name, " is on ", t.device(), " but acc is on ",
                    acc.device());
      }
      TORCH_CHECK(x.dim() == 2 && x.size(0) == acc.size(0), op, ": outlier_x must have shape [", acc.size(0),
                  ", k], got ", x.sizes());
      TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) == N, op, ": outlier_w must have shape [",
                  x.size(1), ", ", N, "] (outlier_x's k, the product's columns), got ", w.sizes());
    }
  }

  // The epilogue's per-row and per-column inputs, contiguous, and each row's RowDequant.
  struct RowInputs {
    at::Tensor sc, zc, wsc, wsm, xo, wo;
    int64_t k;
    const float *sc_p, *zc_p, *wsc_p, *wsm_p, *xo_p, *wo_p;
    bool in_float;  // the sums come from panels of a reduction of at most kExactInFloat (sums of acc: not known)

    explicit RowInputs(const Int8Epilogue& e)
        : sc(e.scale.contiguous()),
          zc(e.zero.contiguous()),
          wsc(e.wscale.contiguous()),
          wsm(e.wsum.contiguous()),
          xo(e.outliers() ? e.outlier_x->contiguous() : at::Tensor()),
          wo(e.outliers() ? e.outlier_w->contiguous() : at::Tensor()),
          k(e.outliers()),
          sc_p(sc.const_data_ptr<float>()),
          zc_p(zc.const_data_ptr<float>()),
          wsc_p(wsc.const_data_ptr<float>()),
          wsm_p(wsm.const_data_ptr<float>()),
          xo_p(k ? xo.const_data_ptr<float>() : nullptr),
          wo_p(k ? wo.const_data_ptr<float>() : nullptr),
          in_float(e.panels.has_value() && e.panels->size(1) * cpu::int8::kGroup <= kExactInFloat) {}

    // row's RowDequant over its sums at acc, which hold the row's columns from `first` on
    template <typename A>
    RowDequant<A> row(int64_t r, const A* acc, int64_t first = 0) const {
      return {acc, wsc_p, wsm_p, sc_p[r], zc_p[r], k ? xo_p + r * k : nullptr, wo_p, k, first, in_float};
    }
  };

  // The most rows of a block that a thread takes through every panel, with its epilogue (with panels): 32 or 128 on
  // AMX tiles (tile_block_rows), else kBlockRows.
  int64_t block_rows() const {
    const int64_t K4 = panels->size(1);
    return cpu::int8::on_tiles(rows(), K4) ? cpu::int8::tile_block_rows(panels->size(0), K4) : kBlockRows;
  }

  // Whether the product's sums come from panels with too few rows for two blocks of rows a thread (run's few-rows
  // route): such products split their panels over the threads.
  bool splits_panels() const {
    return panels.has_value() && rows() > 0 && rows() < 2 * at::get_num_threads() * block_rows();
  }

  // Panels [p0, p1) of column task t of `tasks`: as even a split as whole units allow (pairs of panels where the tiles
  // take the rows two panels at a time).
  std::pair<int64_t, int64_t> task_panels(int64_t t, int64_t tasks) const {
    const int64_t P = panels->size(0), M = rows();
    const int64_t unit = cpu::int8::on_tiles(M, panels->size(1)) && M <= cpu::int8::kTileMinRows ? 2 : 1;
    const int64_t units = (P + unit - 1) / unit;
    return {std::min(P, t * units / tasks * unit), std::min(P, (t + 1) * units / tasks * unit)};
  }

  // The output columns [c0, c1) of the same.
  std::pair<int64_t, int64_t> task_columns(int64_t t, int64_t tasks) const {
    const auto [p0, p1] = task_panels(t, tasks);
    return {p0 * cpu::int8::kPanel, std::min(out_features(), p1 * cpu::int8::kPanel)};
  }

  // The few-rows route (splits_panels()) for epilogues that take a row's columns apart: the panels split into `tasks`
  // ranges (task_panels), a task a thread where there are as many threads. Each task takes the sums of every row at
  // kColumnGroupPanels of its panels at a time (kColumnChunkRows rows at a time) and hands each row's columns [c0, c1)
  // of the group to columns(task, row, c0, c1, dq) while they are in its cache: the sums never leave the core that
  // made them, where run's few-rows route stores them all and then reads half of them back on the other cores. While
  // the epilogue runs on a group, the group after it is fetched into L2: weights read from memory (an encoder's are,
  // call after call) then arrive under the epilogue's arithmetic instead of after it.
  template <typename Columns>
  void run_column_tasks(int64_t tasks, const Columns& columns) const {
    using cpu::int8::kPanel;
    using cpu::int8::kTileMinRows;
    using cpu::int8::kTileRows;
    const int64_t M = rows(), N = out_features(), K4 = panels->size(1);
    const RowInputs in(*this);
    const bool tiles = cpu::int8::on_tiles(M, K4);
    const at::Tensor a = cpu::int8::grouped_rows(acc, cpu::int8::RowBlocks(M).most(), tiles);
    const uint8_t* a_p = a.const_data_ptr<uint8_t>();
    const int64_t lda = a.stride(0);
    const at::Tensor w = panels->contiguous();
    const int8_t* w_p = w.const_data_ptr<int8_t>();
    const int64_t panel_bytes = K4 * kPanel * cpu::int8::kGroup;
    // the rows in as few chunks as kColumnChunkRows allows, as even as whole groups of kTileRows allow
    const int64_t chunks = (M + kColumnChunkRows - 1) / kColumnChunkRows;
    const int64_t chunk = std::min(M, ((M + chunks - 1) / chunks + kTileRows - 1) / kTileRows * kTileRows);
    // a group's sums with room for whole tiles (panel_rows)
    const int64_t room =
        !tiles ? chunk : chunk <= kTileMinRows ? kTileMinRows : (chunk + kTileRows - 1) / kTileRows * kTileRows;
    const int64_t ldc = kColumnGroupPanels * kPanel;
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      thread_local LineVector<int32_t> sums;
      sums.resize(static_cast<size_t>(room * ldc));
      const cpu::amx::TileConfig held(tiles);
      for (int64_t t = t0; t < t1; ++t) {
        const auto [p0, p1] = task_panels(t, tasks);
        for (int64_t r0 = 0; r0 < M; r0 += chunk) {
          const int64_t m = std::min(chunk, M - r0);
          for (int64_t g0 = p0; g0 < p1; g0 += kColumnGroupPanels) {
            const int64_t g1 = std::min(p1, g0 + kColumnGroupPanels);
            cpu::int8::panel_rows(a_p + r0 * lda, m, lda, K4, w_p, g0, g1, sums.data(), N, ldc,
                                  tiles && m >= kTileMinRows);
            // the next group's panels, a share of their lines before each row's epilogue
            const int64_t next_panels = m < kPrefetchRows ? 0 : std::min(p1, g1 + kColumnGroupPanels) - g1;
            const int64_t lines = next_panels * panel_bytes / 64, per_row = (lines + m - 1) / m;
            const char* next = reinterpret_cast<const char*>(w_p + g1 * panel_bytes);
            const int64_t c0 = g0 * kPanel, c1 = std::min(N, g1 * kPanel);
            for (int64_t r = 0; r < m; ++r) {
              for (int64_t l = r * per_row, end = std::min(lines, l + per_row); l < end; ++l) {
                __builtin_prefetch(next + l * 64, 0, 2);  // prefetcht1: into L2
              }
              columns(t, r0 + r, c0, c1, in.row(r0 + r, sums.data() + r * ldc, c0));
            }
          }
        }
      }
    });
  }

  // epilogue(row, dq, scratch) runs once per row, with the row's RowDequant and N floats of this thread's scratch
  // space. `cost`: the epilogue's work per element in units of a plain pass over it (row_grain's), so that a few rows
  // of GELU or LayerNorm still split over the threads.
  template <typename Epilogue>
  void run(const Epilogue& epilogue, int64_t cost = 1) const {
    const RowInputs in(*this);
    const int64_t M = rows(), N = out_features();
    // this thread's scratch row, taken once per parallel task
    const auto scratch = [N] {
      thread_local LineVector<float> row;
      row.resize(static_cast<size_t>(N));
      return row.data();
    };
    // the epilogue of one row whose sums are at acc_row
    const auto row_epilogue = [&](int64_t row, const auto* acc_row, float* space) {
      epilogue(row, in.row(row, acc_row), space);
    };
    const auto each_row = [&](const auto* acc_p) {
      at::parallel_for(0, M, std::max<int64_t>(1, row_grain(N * cost)), [&](int64_t r0, int64_t r1) {
        float* space = scratch();
        for (int64_t row = r0; row < r1; ++row) row_epilogue(row, acc_p + row * N, space);
      });
    };
    if (!panels.has_value()) {
      const at::Tensor ac = acc.contiguous();
      if (ac.scalar_type() == at::kInt) {
        each_row(ac.const_data_ptr<int32_t>());
      } else {
        each_row(ac.const_data_ptr<float>());
      }
      return;
    }
    if (M == 0) return;
    const int64_t threads = at::get_num_threads(), K4 = panels->size(1), P = panels->size(0);
    const at::Tensor w = panels->contiguous();
    const int8_t* w_p = w.const_data_ptr<int8_t>();
    // on AMX tiles: blocks of 32 or 128 rows, their sums stored as whole tiles (ldc: every panel's columns)
    const bool tiles = cpu::int8::on_tiles(M, K4);
    const int64_t block_rows = this->block_rows();
    const int64_t ldc = tiles ? P * cpu::int8::kPanel : N;
    if (splits_panels()) {  // too few blocks for each thread: the panels split over them instead
      const at::Tensor a = cpu::int8::grouped_rows(acc, cpu::int8::RowBlocks(M).most(), tiles);
      at::Tensor sums = at::empty({M, N}, acc.options().dtype(at::kInt));
      cpu::int8::run_panels(a.const_data_ptr<uint8_t>(), M, a.stride(0), K4, w_p, P, sums.mutable_data_ptr<int32_t>(),
                            N, tiles);
      each_row(sums.const_data_ptr<int32_t>());
      return;
    }
    // blocks of at most block_rows rows, their count a multiple of the threads' and their sizes as even as possible
    const int64_t blocks = (M + block_rows * threads - 1) / (block_rows * threads) * threads;
    const int64_t base = M / blocks, extra = M % blocks;
    const at::Tensor a = cpu::int8::grouped_rows(acc, cpu::int8::RowBlocks(base + (extra > 0 ? 1 : 0)).most(), tiles);
    const uint8_t* a_p = a.const_data_ptr<uint8_t>();
    const int64_t lda = a.stride(0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      thread_local LineVector<int32_t> sums;  // the block's int32 sums [rows, N], ldc apart
      sums.resize(static_cast<size_t>((tiles ? block_rows : base + 1) * ldc));
      float* space = scratch();
      const cpu::amx::TileConfig held(tiles);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * base + std::min(b, extra), rows = base + (b < extra ? 1 : 0);
        cpu::int8::panel_rows(a_p + r0 * lda, rows, lda, K4, w_p, 0, P, sums.data(), N, ldc,
                              tiles && rows >= cpu::int8::kTileMinRows);
        for (int64_t r = 0; r < rows; ++r) row_epilogue(r0 + r, sums.data() + r * ldc, space);
      }
    });
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x, const at::Tensor& smooth) {
  MTBF_CHECK_DEVICE_TYPE("quantize_rows", x, at::kCPU);
  MTBF_CHECK_FLOAT_OR_BF16("quantize_rows", x);
  MTBF_CHECK_DIM("quantize_rows", x, 2);
  MTBF_CHECK_DTYPE("quantize_rows", smooth, at::kFloat);
  MTBF_CHECK_SAME_DEVICE("quantize_rows", x, smooth);
  MTBF_CHECK_DIM("quantize_rows", smooth, 1);
  MTBF_CHECK_SIZE("quantize_rows", smooth, 0, x.size(1));
  const at::Tensor xc = x.contiguous(), mc = smooth.contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  at::Tensor q = cpu::int8::new_quantized_rows(N, K, x.options());
  at::Tensor scale = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({N}, x.options().dtype(at::kFloat));
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    quantize_rows_kernel<T>(xc.const_data_ptr<T>(), mc.const_data_ptr<float>(), q.mutable_data_ptr<uint8_t>(),
                            q.stride(0), scale.mutable_data_ptr<float>(), zero.mutable_data_ptr<float>(), N, K);
  });
  return {q, scale, zero};
}

// Quantized rows [M, N] (new_quantized_rows) with their scales and zeros, to be filled row by row by quantize_row.
struct QuantizedRows {
  at::Tensor q, scale, zero;
  uint8_t* q_p;
  float *scale_p, *zero_p;
  int64_t ldq;

  QuantizedRows(int64_t M, int64_t N, const at::Tensor& like)
      : q(cpu::int8::new_quantized_rows(M, N, like.options())),
        scale(at::empty({M}, like.options().dtype(at::kFloat))),
        zero(at::empty({M}, like.options().dtype(at::kFloat))),
        q_p(q.mutable_data_ptr<uint8_t>()),
        scale_p(scale.mutable_data_ptr<float>()),
        zero_p(zero.mutable_data_ptr<float>()),
        ldq(q.stride(0)) {}

  template <typename ValueOf>
  void quantize(int64_t row, int64_t N, const ValueOf& value_of) {
    quantize_row(N, value_of, q_p + row * ldq, scale_p + row, zero_p + row);
  }

  // The same for a row whose range was taken as its values were made.
  template <typename ValueOf>
  void quantize_in(int64_t row, int64_t N, const RowRange& range, const ValueOf& value_of) {
    quantize_row_in(N, range, value_of, q_p + row * ldq, scale_p + row, zero_p + row);
  }
};

// The epilogues' work per element against a plain pass (Int8Epilogue::run's cost): dequantization, GELU and the
// min/max and quantization passes over its row; dequantization, LayerNorm's passes (and a quantization).
constexpr int64_t kGeluEpilogueCost = 4;
constexpr int64_t kLayerNormEpilogueCost = 2;

void check_smooth(const char* op, const at::Tensor& smooth, int64_t N, const at::Tensor& like) {
  check_dtype(op, "smooth", smooth, at::kFloat);
  check_vector(op, "smooth", smooth, N, like);
}

at::Tensor int8_linear_cpu(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& zero,
                           const at::Tensor& weight_scale, const at::Tensor& weight_sum, const at::Tensor& bias,
                           const Outliers& outlier_x, const Outliers& outlier_w,
                           const std::optional<at::Tensor>& panels) {
  const Int8Epilogue prod{acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels};
  prod.check("int8_linear");
  const int64_t N = prod.out_features();
  at::Tensor out = at::empty({prod.rows(), N}, bias.options());
  const at::Tensor bc = bias.contiguous();
  dispatch_float_bf16(bias.scalar_type(), [&](auto t) {
    using T = decltype(t);
    T* o = out.mutable_data_ptr<T>();
    const ParamF32<T> b(bc.const_data_ptr<T>(), N);  // converted once, read by every row
    const auto columns = [&](int64_t row, int64_t c0, int64_t c1, const auto& dq) {
      dq.columns(c0, c1, N, b.data(), [&](int64_t d, auto n, const fVec& y) { store(o + row * N + d, y, n); });
    };
    if (prod.splits_panels()) {
      prod.run_column_tasks(at::get_num_threads(), [&](int64_t, int64_t row, int64_t c0, int64_t c1, const auto& dq) {
        columns(row, c0, c1, dq);
      });
    } else {
      prod.run([&](int64_t row, const auto& dq, float*) { columns(row, 0, N, dq); });
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_gelu_quantize_cpu(
    const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& weight_scale,
    const at::Tensor& weight_sum, const at::Tensor& bias, const Outliers& outlier_x, const Outliers& outlier_w,
    c10::string_view approximate, const at::Tensor& smooth, const std::optional<at::Tensor>& keep,
    const std::optional<at::Tensor>& panels) {
  constexpr const char* op = "int8_linear_gelu_quantize";
  const GeluKind kind = parse_gelu(op, approximate);
  const Int8Epilogue prod{acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels};
  prod.check(op);
  const int64_t M = prod.rows(), N = prod.out_features();
  check_smooth(op, smooth, N, acc);
  const at::Tensor mc = smooth.contiguous();
  int64_t kept_n = 0;
  at::Tensor keep_c;
  if (keep.has_value()) {
    check_dtype(op, "keep", *keep, at::kLong);
    TORCH_CHECK(keep->device() == acc.device() && keep->dim() == 1, op, ": keep must be a 1-D int64 tensor on ",
                acc.device(), ", got shape ", keep->sizes(), " on ", keep->device());
    keep_c = keep->contiguous();
    kept_n = keep_c.numel();
    const int64_t* ix = keep_c.const_data_ptr<int64_t>();
    for (int64_t j = 0; j < kept_n; ++j) {
      TORCH_CHECK(ix[j] >= 0 && ix[j] < N, op, ": keep holds channel ", ix[j], ", outside [0, ", N, ")");
    }
  }
  const int64_t* keep_p = kept_n ? keep_c.const_data_ptr<int64_t>() : nullptr;
  QuantizedRows out(M, N, acc);
  at::Tensor kept = at::empty({M, kept_n}, acc.options().dtype(at::kFloat));
  float* kept_p = kept.mutable_data_ptr<float>();
  const at::Tensor bc = bias.contiguous();
  const float* m = mc.const_data_ptr<float>();
  // GELU of a row's columns [c0, c1) into g (the row's values, in fp32), the range of their smoothed values added to
  // range
  const auto gelu_columns = [&](auto k, const float* b, int64_t c0, int64_t c1, const auto& dq, float* g,
                                RowRange& range) {
    dq.columns(c0, c1, N, b, [&](int64_t d, auto n, const fVec& y) {
      const fVec v = gelu<decltype(k)::value>(y);
      store(g + d, v, n);
      range.add(v * load(m + d, n), n);
    });
  };
  const auto smoothed = [&](const float* g) {
    return [g, m](int64_t d, auto n) { return load(g + d, n) * load(m + d, n); };
  };
  const auto keep_row = [&](int64_t row, const float* g) {
    for (int64_t j = 0; j < kept_n; ++j) kept_p[row * kept_n + j] = g[keep_p[j]];
  };
  const auto epilogue = [&](auto k, const float* b) {
    if (!prod.splits_panels()) {
      prod.run([&](int64_t row, const auto& dq, float* g) {
        RowRange range;
        gelu_columns(k, b, 0, N, dq, g, range);
        keep_row(row, g);
        out.quantize_in(row, N, range, smoothed(g));
      }, kGeluEpilogueCost);
      return;
    }
    // few rows: each task's columns apart (their values in fp32 and each row's range at them), then, once every task's
    // part of the range is in, every row quantized at each task's columns
    const int64_t tasks = at::get_num_threads();
    thread_local LineVector<float> values;  // [M, N] after GELU
    values.resize(static_cast<size_t>(M * N));
    float* g = values.data();
    LineVector<RowRange> ranges(static_cast<size_t>(M * tasks));  // [M, tasks]
    prod.run_column_tasks(tasks, [&](int64_t t, int64_t row, int64_t c0, int64_t c1, const auto& dq) {
      gelu_columns(k, b, c0, c1, dq, g + row * N, ranges[row * tasks + t]);
    });
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const auto [c0, c1] = prod.task_columns(t, tasks);
        for (int64_t row = 0; row < M; ++row) {
          const RowScale rs(merged(ranges.data() + row * tasks, tasks));
          rs.quantize(c0, c1, smoothed(g + row * N), out.q_p + row * out.ldq);
          if (t == 0) {
            out.scale_p[row] = rs.scale;
            out.zero_p[row] = rs.zero;
            keep_row(row, g + row * N);
          }
        }
      }
    });
  };
  dispatch_float_bf16(bias.scalar_type(), [&](auto t) {
    const ParamF32<decltype(t)> b(bc.const_data_ptr<decltype(t)>(), N);
    dispatch_gelu(kind, [&](auto k) { epilogue(k, b.data()); });
  });
  return {out.q, out.scale, out.zero, kept};
}

// LayerNorm(product + bias + residual) into out, each row then handed to after_row(row, out_row).
template <typename AfterRow>
at::Tensor residual_layer_norm(const char* op, const Int8Epilogue& prod, const at::Tensor& residual,
                               const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
                               const AfterRow& after_row) {
  const at::Tensor& bias = prod.bias;
  const int64_t M = prod.rows(), N = prod.out_features();
  check_dtype(op, "residual", residual, bias.scalar_type());
  TORCH_CHECK(residual.device() == prod.acc.device(), op, ": residual is on ", residual.device(), " but acc is on ",
              prod.acc.device());
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == M && residual.size(1) == N, op,
              ": residual must have shape [", M, ", ", N, "], got ", residual.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"norm_weight", norm_weight},
                                {"norm_bias", norm_bias}}) {
    check_vector(op, name, t, N, prod.acc);
    TORCH_CHECK(t.scalar_type() == bias.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 or bias's dtype ", bias.scalar_type(), ", got ", t.scalar_type());
  }
  check_dtype(op, "norm_bias", norm_bias, norm_weight.scalar_type());
  const at::Tensor rc = residual.contiguous(), bc = bias.contiguous();
  const at::Tensor wc = norm_weight.contiguous(), nbc = norm_bias.contiguous();
  at::Tensor out = at::empty({M, N}, bias.options());
  dispatch_layer_norm_types(bias.scalar_type(), norm_weight.scalar_type(), [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    const T* res = rc.const_data_ptr<T>();
    const ParamF32<T> b(bc.const_data_ptr<T>(), N);
    const ParamF32<W> nw(wc.const_data_ptr<W>(), N), nb(nbc.const_data_ptr<W>(), N);
    T* o = out.mutable_data_ptr<T>();
    prod.run([&](int64_t row, const auto& dq, float* s) {  // s: the row's pre-norm values, in fp32
      fVec sum(0.f);
      dq(N, b.data(), [&](int64_t d, auto n, const fVec& y) {
        const fVec v = y + load(res + row * N + d, n);
        store(s + d, v, n);
        sum += keep_lanes(v, n);
      });
      float mean, rstd;
      layer_norm_row(s, lane_sum(sum), nw.data(), nb.data(), eps, o + row * N, &mean, &rstd, N);
      after_row(row, static_cast<const T*>(o + row * N));
    }, kLayerNormEpilogueCost);
  });
  return out;
}

at::Tensor int8_linear_residual_layer_norm_cpu(
    const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& weight_scale,
    const at::Tensor& weight_sum, const at::Tensor& bias, const Outliers& outlier_x, const Outliers& outlier_w,
    const at::Tensor& residual, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    const std::optional<at::Tensor>& panels) {
  constexpr const char* op = "int8_linear_residual_layer_norm";
  const Int8Epilogue prod{acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels};
  prod.check(op);
  return residual_layer_norm(op, prod, residual, norm_weight, norm_bias, eps, [](int64_t, const auto*) {});
}

// The same, and each output row quantized for the next product as quantize_rows(out, smooth) would (from the
// stored values, so in bfloat16 exactly what the next product would have read), while the row is in cache.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> int8_linear_residual_layer_norm_quantize_cpu(
    const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& weight_scale,
    const at::Tensor& weight_sum, const at::Tensor& bias, const Outliers& outlier_x, const Outliers& outlier_w,
    const at::Tensor& residual, const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps,
    const at::Tensor& smooth, const std::optional<at::Tensor>& panels) {
  constexpr const char* op = "int8_linear_residual_layer_norm_quantize";
  const Int8Epilogue prod{acc, scale, zero, weight_scale, weight_sum, bias, outlier_x, outlier_w, panels};
  prod.check(op);
  const int64_t M = prod.rows(), N = prod.out_features();
  check_smooth(op, smooth, N, acc);
  const at::Tensor mc = smooth.contiguous();
  const float* m = mc.const_data_ptr<float>();
  QuantizedRows quantized(M, N, acc);
  const auto quantize_row_of = [&](int64_t row, const auto* o) {
    quantized.quantize(row, N, [&](int64_t d, auto n) { return load(o + d, n) * load(m + d, n); });
  };
  at::Tensor out = residual_layer_norm(op, prod, residual, norm_weight, norm_bias, eps, quantize_row_of);
  return {out, quantized.q, quantized.scale, quantized.zero};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_gelu_quantize", &int8_linear_gelu_quantize_cpu);
  m.impl("int8_linear_residual_layer_norm", &int8_linear_residual_layer_norm_cpu);
  m.impl("int8_linear_residual_layer_norm_quantize", &int8_linear_residual_layer_norm_quantize_cpu);
}

}  // namespace mtbert_fast
