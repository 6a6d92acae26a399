// int8 panel tiles for the CPU kernels: the exact integer sums q @ w^T of uint8 rows q [M, K] with an int8 weight
// w [N, K] packed once into panels of kPanel columns (mtbert_fast.ops.int8.pack_int8_panels): int8 [P, K4, kPanel,
// 4] with K4 = ceil(K / 4), the four reduction entries k = 4j..4j+3 of a column next to each other; columns past N
// and entries past K are zero. int8_panel_sums runs them over whole panels per thread (run_panels); the int8
// epilogues of int8_linear.cpp over blocks of rows per thread (panel_rows), each block's sums taken away by the
// epilogue while they are in cache.
//
// AVX2 (and the AVX-512 build on a CPU without VNNI, on its 256-bit registers): a 32-byte load of a panel holds 8
// columns x 4 entries, the row's 4 bytes are broadcast to all 8, vpmaddubsw multiplies uint8 by int8 and adds the pairs
// (4j, 4j + 1) and (4j + 2, 4j + 3) in saturating int16, and vpmaddwd by ones adds the two pairs into int32. The int16
// step is exact only while 255 times a pair of one sign fits it: weights whose same-sign neighbouring pairs (columns
// 2i, 2i + 1 of w's rows) sum to at most 128 in magnitude, which pack_int8_panels checks. Without AVX2 the sums are
// plain int32 loops, exact for any weight.
//
// AMX-INT8: a panel's rows of 32 columns x 4 entries (128 bytes) are two B tiles of TDPBUSD side by side, so the same
// panels run on the tiles where the reduction is whole steps of 16 groups (K4 a multiple of 16): up to 16 rows two
// panels at a time, more in groups of 32 rows (cpu_amx.h). The sums are the same exact int32 sums.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_amx.h"
#include "tile_rows.h"

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#define MTBF_INT8_PAIRS 1
#endif

namespace mtbert_fast::cpu::int8 {

inline constexpr int64_t kPanel = 32;                   // columns per panel
inline constexpr int64_t kGroup = 4;                    // reduction entries per column next to each other
inline constexpr int kMaxRows = 3;                      // rows per tile: 12 accumulators of the 16 AVX2 registers
inline constexpr int64_t kTaskMacs = int64_t{1} << 17;  // multiply-adds below which a thread takes more panels

// Stores a tile row's sums for the panel's valid columns (the last panel may hold fewer than kPanel).
inline void store_row(const int32_t* sums, int32_t* out, int64_t cols) {
  std::memcpy(out, sums, sizeof(int32_t) * static_cast<size_t>(std::min(kPanel, cols)));
}

#ifdef MTBF_INT8_PAIRS
inline constexpr int kVecs = kPanel / 8;  // int32 vectors of 8 columns per panel row

inline __m256i broadcast4(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm256_set1_epi32(v);
}

// out[r, :cols] = q[r, :] @ panel for MR rows of q (lda apart) over one panel of K4 groups.
template <int MR>
void tile(int64_t K4, const uint8_t* a, int64_t lda, const int8_t* panel, int32_t* out, int64_t ldo, int64_t cols) {
  __m256i acc[MR][kVecs];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t j = 0; j < K4; ++j) {
    __m256i x[MR];
    for (int r = 0; r < MR; ++r) x[r] = broadcast4(a + r * lda + kGroup * j);
    const int8_t* b = panel + j * kPanel * kGroup;
    for (int v = 0; v < kVecs; ++v) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + v * 32));
      for (int r = 0; r < MR; ++r)
        acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(_mm256_maddubs_epi16(x[r], w), ones));
    }
  }
  alignas(32) int32_t sums[kPanel];
  for (int r = 0; r < MR; ++r) {
    for (int v = 0; v < kVecs; ++v) _mm256_store_si256(reinterpret_cast<__m256i*>(sums + v * 8), acc[r][v]);
    store_row(sums, out + r * ldo, cols);
  }
}

using Tile = void (*)(int64_t, const uint8_t*, int64_t, const int8_t*, int32_t*, int64_t, int64_t);

inline Tile tile_of(int64_t rows) {
  switch (rows) {
    case 1: return &tile<1>;
    case 2: return &tile<2>;
    default: return &tile<3>;
  }
}

#ifdef CPU_CAPABILITY_AVX512
// AVX512-VNNI: vpdpbusd multiplies the row's 4 uint8 (broadcast) by a column's 4 int8 and adds all four products to
// the column's int32 lane, exactly (no int16 step, no saturation), so any int8 weight runs here. A 64-byte load holds
// 16 columns x 4 entries: 2 accumulators per row and panel, kVnniRows rows per tile (24 of the 32 registers).
inline constexpr std::size_t kVnniRows = 12;

// One row's step: its 4 entries of the group, broadcast, times both halves of the panel's group.
__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline)) inline void vnni_row(
    const uint8_t* x, const __m512i& w0, const __m512i& w1, __m512i& lo, __m512i& hi) {
  int32_t v;
  std::memcpy(&v, x, sizeof(v));
  const __m512i xv = _mm512_set1_epi32(v);
  // acc += xv (uint8) . w (int8) in place; GCC 12 compiles _mm512_dpbusd_epi32 into a copy of the accumulator and a
  // store to the stack around every step, which halves the tile's rate
  asm("vpdpbusd %2, %1, %0" : "+v"(lo) : "v"(xv), "v"(w0));
  asm("vpdpbusd %2, %1, %0" : "+v"(hi) : "v"(xv), "v"(w1));
}

// The rows are a pack expanded at compile time (not a loop), so every accumulator has a constant index and the
// compiler keeps them all in registers.
template <std::size_t... R>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_vnni(int64_t K4, const uint8_t* a, int64_t lda,
                                                                       const int8_t* panel, int32_t* out, int64_t ldo,
                                                                       int64_t cols) {
  constexpr std::size_t MR = sizeof...(R);
  __m512i lo_acc[MR], hi_acc[MR];
  ((lo_acc[R] = _mm512_setzero_si512(), hi_acc[R] = _mm512_setzero_si512()), ...);
  for (int64_t j = 0; j < K4; ++j) {
    const int8_t* b = panel + j * kPanel * kGroup;
    const __m512i w0 = _mm512_loadu_si512(b), w1 = _mm512_loadu_si512(b + 64);
    const uint8_t* x = a + kGroup * j;
    (vnni_row(x + R * lda, w0, w1, lo_acc[R], hi_acc[R]), ...);
  }
  const __mmask16 lo = static_cast<__mmask16>(cols >= 16 ? 0xFFFF : (1u << cols) - 1);
  const __mmask16 hi = static_cast<__mmask16>(cols >= kPanel ? 0xFFFF : cols <= 16 ? 0 : (1u << (cols - 16)) - 1);
  ((_mm512_mask_storeu_epi32(out + R * ldo, lo, lo_acc[R]),
    _mm512_mask_storeu_epi32(out + R * ldo + 16, hi, hi_acc[R])),
   ...);
}

template <typename Rows>
struct VnniTile;
template <std::size_t... R>
struct VnniTile<std::index_sequence<R...>> {
  static constexpr Tile fn = &tile_vnni<R...>;
};

template <std::size_t... R>
constexpr std::array<Tile, sizeof...(R)> vnni_tiles(std::index_sequence<R...>) {
  return {VnniTile<std::make_index_sequence<R + 1>>::fn...};
}

inline bool cpu_has_vnni() {
  static const bool has = __builtin_cpu_supports("avx512vnni");
  return has;
}
#endif
#else
inline void tile_rows(int64_t rows, int64_t K4, const uint8_t* a, int64_t lda, const int8_t* panel, int32_t* out,
               int64_t ldo, int64_t cols) {
  int32_t sums[kPanel];
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(sums, sums + kPanel, 0);
    for (int64_t j = 0; j < K4; ++j) {
      const int8_t* b = panel + j * kPanel * kGroup;
      const uint8_t* x = a + r * lda + kGroup * j;
      for (int64_t c = 0; c < kPanel; ++c)
        for (int64_t e = 0; e < kGroup; ++e) sums[c] += int32_t{x[e]} * int32_t{b[c * kGroup + e]};
    }
    store_row(sums, out + r * ldo, cols);
  }
}
#endif

inline constexpr int64_t kTileGroups = 16;  // groups of a reduction step on the tiles: 64 entries
inline constexpr int64_t kTileRows = 32;    // rows of q in one 2 x 2 tile product
inline constexpr int64_t kChunkRows = 256;  // rows of q that tile_panels runs over its panels at a time

inline constexpr int64_t kTileMinRows = 16;  // fewer rows take the VNNI tiles

// Whether a product of M rows over panels of K4 groups runs on AMX tiles here (cpu_amx(allow) switches them with the
// others): from 16 rows. A tile product costs what 16 rows do whatever the rows it holds; with fewer, the VNNI tiles
// ran the int8 products of all-MiniLM-L6-v2 and bert-base 1.2-2x faster at 1-4 rows, 0.97-1.25x at 8, and 0.7-1.2x
// at 12, where the tiles ran them 1.1-1.4x faster at 16 rows but one shape (0.91x at [384, 384]) and 1.9-2.5x at 128
// (2-core Xeon with AMX, benchmarks/int8_panels.py).
inline bool on_tiles(int64_t M, int64_t K4) {
  return M >= kTileMinRows && K4 % kTileGroups == 0 && amx::int8_enabled();
}

// The most rows a thread takes at a time through P panels of K4 groups on the tiles, its sums then handed to an
// epilogue while they are in its cache: 32 where the weight fits 1 MiB (half the L2 of a core of the CPUs with AMX), so
// it stays in the core's L2 from block to block; else 128, so that each weight byte read from the shared L3 serves 128
// rows. Int8 forwards of B=4 and B=8 sequences of 128 tokens on a 2-core Xeon with AMX, each shape's best of 32, 64 and
// 128 for all its products: all-MiniLM-L6-v2 (weights of at most 590 KB) 32, 1.04-1.16x faster than 128; bert-base
// (weights of up to 2.4 MB) 128, 1.05-1.11x faster than 32.
inline int64_t tile_block_rows(int64_t P, int64_t K4) {
  return P * K4 * kPanel * kGroup <= (int64_t{1} << 20) ? kTileRows : 4 * kTileRows;
}

#ifdef MTBF_AMX

// out [M, columns of panels p0..p1-1] = a [M, K4 * 4] @ those panels on the tiles, under a configuration of 8 full
// tiles; on_tiles(M, K4). out's column 0 is panel p0's first (N, the weight's columns, tells the last panel's valid
// ones). 16 rows two panels at a time (panel_pair_product), more a panel at a time in groups of 32 rows
// (product_2x2). A tile load reads 16 rows, so a's rows must be readable up to M + 15 (readable_rows); those past
// M are never stored. `whole`: out has room for whole tiles (16 rows with M <= 16, else M rounded up to 32, and
// every panel's 32 columns) and the tiles store there; else whole tiles go straight to out and partial ones through
// a buffer.
inline void tile_panels(const uint8_t* a, int64_t M, int64_t lda, int64_t K4, const int8_t* panels, int64_t p0,
                        int64_t p1, int64_t N, int32_t* out, int64_t ldo, bool whole) {
  using amx::Dot;
  const int64_t steps = K4 / kTileGroups, panel_bytes = K4 * kPanel * kGroup, out_bytes = ldo * 4;
  alignas(64) int32_t c[kTileRows * 2 * kPanel];
  const auto copy = [&](const int32_t* from, int64_t ldc, int64_t m0, int64_t rows, int64_t c0, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(out + (m0 + r) * ldo + c0, from + r * ldc, sizeof(int32_t) * static_cast<size_t>(cols));
    }
  };
  if (M <= amx::kRows) {
    for (int64_t p = p0; p < p1; p += 2) {
      const bool two = p + 1 < p1;
      const int8_t* b0 = panels + p * panel_bytes;
      const int64_t c0 = (p - p0) * kPanel, cols = std::min((two ? 2 : 1) * kPanel, N - p * kPanel);
      if (whole || (M == amx::kRows && cols == (two ? 2 : 1) * kPanel)) {
        amx::panel_pair_product<Dot::Int8>(steps, a, lda, b0, two ? b0 + panel_bytes : nullptr, out + c0, out_bytes);
      } else {
        amx::panel_pair_product<Dot::Int8>(steps, a, lda, b0, two ? b0 + panel_bytes : nullptr, c, 2 * kPanel * 4);
        copy(c, 2 * kPanel, 0, M, c0, cols);
      }
    }
    return;
  }
  // rows in chunks of kChunkRows, each run over the panels in turn: a chunk's rows stay in the core's L2 while they
  // meet every panel, and a panel in L1 while it meets the chunk's row groups
  for (int64_t chunk = 0; chunk < M; chunk += kChunkRows) {
    const int64_t chunk_end = std::min(M, chunk + kChunkRows);
    for (int64_t p = p0; p < p1; ++p) {
      const int8_t* b = panels + p * panel_bytes;
      const int64_t c0 = (p - p0) * kPanel, cols = std::min(kPanel, N - p * kPanel);
      for (int64_t m0 = chunk; m0 < chunk_end; m0 += kTileRows) {
        const int64_t rows = std::min(kTileRows, M - m0);
        const bool two_rows = rows > amx::kRows;
        if (whole || (cols == kPanel && rows == (two_rows ? kTileRows : amx::kRows))) {
          amx::product_2x2<Dot::Int8>(two_rows, true, steps, a + m0 * lda, lda, b, amx::kPanelBytes,
                                      out + m0 * ldo + c0, out_bytes);
        } else {
          amx::product_2x2<Dot::Int8>(two_rows, true, steps, a + m0 * lda, lda, b, amx::kPanelBytes, c, kPanel * 4);
          copy(c, kPanel, m0, rows, c0, cols);
        }
      }
    }
  }
}
#endif

// Checks that `panels` (int8, on q's device) hold an [N, K] weight for q's rows of K entries, and that such rows'
// sums fit int32; q [M, K] is the kernel's 2-D uint8 input, checked by the caller.
inline void check_panels(const char* op, const at::Tensor& q, const at::Tensor& panels, int64_t N) {
  TORCH_CHECK(panels.scalar_type() == at::kChar, op, ": panels must be ", at::kChar, ", got ", panels.scalar_type());
  TORCH_CHECK(panels.device() == q.device(), op, ": panels are on ", panels.device(), " but q is on ", q.device());
  const int64_t K = q.size(1), K4 = (K + kGroup - 1) / kGroup, P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(panels.sizes() == at::IntArrayRef({P, K4, kPanel, kGroup}), op, ": panels must have shape [", P, ", ",
              K4, ", ", kPanel, ", ", kGroup, "] for q of ", K, " columns and ", N, " out_features, got ",
              panels.sizes());
  // sums of K products of at most 255 * 127 in magnitude fit int32 up to K = (2^31 - 1) / (255 * 127)
  TORCH_CHECK(K <= ((int64_t{1} << 31) - 1) / (255 * 127), op, ": rows of ", K, " entries can sum past int32");
}

// The most rows a tile takes: kVnniRows where the AVX-512 kernels run on a CPU with VNNI, else kMaxRows.
inline int64_t max_tile_rows() {
#ifdef CPU_CAPABILITY_AVX512
  return cpu_has_vnni() ? static_cast<int64_t>(kVnniRows) : kMaxRows;
#else
  return kMaxRows;
#endif
}

// M > 0 rows in blocks of at most the tile's rows, as even as possible (4 rows: two of 2, not 3 and 1).
struct RowBlocks {
  int64_t count, base, extra;
  explicit RowBlocks(int64_t M) {
    const int64_t max_rows = max_tile_rows();
    count = (M + max_rows - 1) / max_rows;
    base = M / count;
    extra = M % count;
  }
  int64_t rows(int64_t i) const { return base + (i < extra ? 1 : 0); }
  int64_t most() const { return base + (extra > 0 ? 1 : 0); }  // rows of the largest block
};

// Uninitialised uint8 rows [M, K] for a product's quantized input: contiguous, or one cache line apart more where the
// rows would alias in a tile, so that grouped_rows takes them as they are (the ops' fakes give the same strides:
// mtbert_fast.ops.int8.quantized_row_stride); on the AMX tiles with room for 15 rows more in their storage.
inline at::Tensor new_quantized_rows(int64_t M, int64_t K, const at::TensorOptions& options) {
  const int64_t room = on_tiles(M, (K + kGroup - 1) / kGroup) ? kTileGroups - 1 : 0;
  return new_rows(M + room, K, options.dtype(at::kByte), rows_alias(std::min(M, max_tile_rows()), K)).narrow(0, 0, M);
}

// q [M, K] as the tiles read it, its rows in blocks of at most `tile_rows` rows: q itself where its rows are whole
// groups of kGroup entries, contiguous and apart enough; else a copy padded with zeros to whole groups
// (rows_for_tiles). The tiles take its row stride as lda. `tiles`: the product runs on AMX tiles (on_tiles, asked once
// per call by the caller, who hands the same answer to run_panels or panel_rows), which read 15 rows past M.
inline at::Tensor grouped_rows(const at::Tensor& q, int64_t tile_rows, bool tiles) {
  const at::Tensor a = rows_for_tiles(q, (q.size(1) + kGroup - 1) / kGroup * kGroup, tile_rows);
  return tiles ? readable_rows(a, a.size(0) + kTileGroups - 1) : a;
}

// out [M, p's columns] = a [M, K4 * 4] @ panel p, every row block of a run over the panel while it sits in cache;
// a's rows lda apart, out's ldo; out's column 0 is the panel's first.
inline void panel_blocks(const uint8_t* a, int64_t M, int64_t lda, int64_t K4, const int8_t* panels, int64_t p,
                         int64_t N, const RowBlocks& blocks, int32_t* out, int64_t ldo) {
#ifdef CPU_CAPABILITY_AVX512
  static constexpr auto kVnniTiles = vnni_tiles(std::make_index_sequence<kVnniRows>{});
  const bool vnni = cpu_has_vnni();
#endif
  const int8_t* panel = panels + p * K4 * kPanel * kGroup;
  const int64_t cols = std::min(kPanel, N - p * kPanel);
  int64_t m0 = 0;
  for (int64_t i = 0; i < blocks.count; ++i) {
    const int64_t mr = blocks.rows(i);
    int32_t* o = out + m0 * ldo;
#ifdef CPU_CAPABILITY_AVX512
    (vnni ? kVnniTiles[mr - 1] : tile_of(mr))(K4, a + m0 * lda, lda, panel, o, ldo, cols);
#elif defined(MTBF_INT8_PAIRS)
    tile_of(mr)(K4, a + m0 * lda, lda, panel, o, ldo, cols);
#else
    tile_rows(mr, K4, a + m0 * lda, lda, panel, o, ldo, cols);
#endif
    m0 += mr;
  }
}

// out [M, N] = a [M, K4 * 4] @ panels (P of them), the panels split over the threads: each weight is read once. On AMX
// tiles where `tiles` (on_tiles(M, K4), a from grouped_rows with the same answer), and there, from two blocks of
// tile_block_rows a thread on, the blocks split over the threads instead.
inline void run_panels(const uint8_t* a, int64_t M, int64_t lda, int64_t K4, const int8_t* panels, int64_t P,
                       int32_t* out, int64_t N, bool tiles) {
#ifdef MTBF_AMX
  const int64_t block = tile_block_rows(P, K4), threads = at::get_num_threads();
  if (tiles && M >= 2 * threads * block) {
    // many rows: blocks of rows split over the threads, each block through every panel, as the fused epilogues run
    // them (a thread streaming all the rows past its half of the panels reads them from L3 once per panel)
    at::parallel_for(0, (M + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
      const amx::TileConfig held;
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t r0 = b * block;
        tile_panels(a + r0 * lda, std::min(block, M - r0), lda, K4, panels, 0, P, N, out + r0 * N, N, false);
      }
    });
    return;
  }
  if (tiles) {
    const bool pairs = M <= amx::kRows;
    const int64_t macs = std::max<int64_t>(M, 4) * K4 * kGroup * kPanel;  // a panel's
    const int64_t grain = std::max<int64_t>(pairs ? 2 : 1, kTaskMacs / macs);
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
      const amx::TileConfig held;
      tile_panels(a, M, lda, K4, panels, p0, p1, N, out + p0 * kPanel, N, false);
    });
    return;
  }
#endif
  const RowBlocks blocks(M);
  const int64_t grain = std::max<int64_t>(1, kTaskMacs / (std::max<int64_t>(M, 4) * K4 * kGroup * kPanel));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) panel_blocks(a, M, lda, K4, panels, p, N, blocks, out + p * kPanel, N);
  });
}

// The same for a few rows on the calling thread (no parallel region), over panels p0..p1-1: out [M, their columns],
// its rows ldo apart. On the tiles (`tiles`: on_tiles(M, K4), under an amx::TileConfig the thread holds) out has room
// for whole tiles: M rounded up to kTileRows rows (amx::kRows where M is at most that) of (p1 - p0) * kPanel columns.
inline void panel_rows(const uint8_t* a, int64_t M, int64_t lda, int64_t K4, const int8_t* panels, int64_t p0,
                       int64_t p1, int32_t* out, int64_t N, int64_t ldo, bool tiles) {
#ifdef MTBF_AMX
  if (tiles) {
    tile_panels(a, M, lda, K4, panels, p0, p1, N, out, ldo, true);
    return;
  }
#endif
  const RowBlocks blocks(M);
  for (int64_t p = p0; p < p1; ++p) panel_blocks(a, M, lda, K4, panels, p, N, blocks, out + (p - p0) * kPanel, ldo);
}

}  // namespace mtbert_fast::cpu::int8
