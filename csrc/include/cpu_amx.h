// AMX tiles for the CPU kernels of the AVX-512 build on x86-64 Linux: whether this process may use them, and the few
// tile instructions the kernels issue.
//
// A tile register holds up to 16 rows of 64 bytes. TDPBF16PS multiplies a bf16 tile A [16, 32] by a bf16 tile B of
// 16 rows of 16 column pairs (B's rows interleaved in pairs, the layout the AVX512-BF16 dot products take too) into an
// fp32 tile C [16, 16]: products exact, sums fp32. TDPBUSD multiplies a uint8 tile A [16, 64] by an int8 tile B of 16
// rows of 16 column quads (B's rows interleaved in fours, the layout of the VNNI dot products) into an int32 tile C
// [16, 16], exactly. In bytes the two are alike: a step reads 64 bytes of each of A's rows and 16 rows of B, each 16
// columns x 4 bytes, and adds into 16 x 16 sums of 4 bytes. Linux hands the tiles' 8 KiB of register state to a
// process only when it asks (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 on); until then a tile instruction faults.
//
// The instructions are inline assembly with a memory clobber: GCC's intrinsics for them declare no memory operands,
// so the compiler could move the stores that fill a tile's source, or the loads that read what a tile stored, past
// them.
#pragma once

#include <c10/util/BFloat16.h>

#include <atomic>
#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__) && defined(__linux__)
#define MTBF_AMX 1

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace mtbert_fast::cpu::amx {

// Whether the CPU has AMX-TILE and AMX-BF16 (CPUID leaf 7: EDX bits 24 and 22) and Linux gave this process the tile
// state. Asked once; every thread of the process may then use the tiles.
inline bool bf16_tiles() {
  static const bool granted = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

// Whether the CPU also has AMX-INT8 (CPUID leaf 7: EDX bit 25), with the tiles granted.
inline bool int8_tiles() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 25) & 1u);
  }();
  return has && bf16_tiles();
}

constexpr int kRows = 16;      // rows of a tile
constexpr int kRowBytes = 64;  // bytes of a tile row: 32 bf16 (the reduction step), or 16 fp32 columns
constexpr int64_t kStep = kRowBytes / 2;  // bf16 of a tile row: the reduction step
constexpr int64_t kCols = kRowBytes / 4;  // fp32 columns of a result tile

// The tile configuration (palette 1): every tile in use kRows rows of kRowBytes.
struct alignas(64) Config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};

  explicit Config(int tiles) {
    for (int t = 0; t < tiles; ++t) {
      row_bytes[t] = kRowBytes;
      rows[t] = kRows;
    }
  }
};

// Loads a configuration into this thread's tile state; release() hands the state back (the tiles' registers then
// cost nothing at context switches).
inline void configure(const Config& config) {
  asm volatile("ldtilecfg %0" : : "m"(config) : "memory");
}
inline void release() { asm volatile("tilerelease" : : : "memory"); }

}  // namespace mtbert_fast::cpu::amx

// Tile t (a literal 0..7): zeroed; loaded from / stored to rows `stride` bytes apart from `base`.
#define MTBF_TILE_ZERO(t) asm volatile("tilezero %%tmm" #t : : : "memory")
#define MTBF_TILE_LOAD(t, base, stride) \
  asm volatile("tileloadd (%0,%1,1), %%tmm" #t : : "r"(base), "r"(static_cast<long>(stride)) : "memory")
#define MTBF_TILE_STORE(t, base, stride) \
  asm volatile("tilestored %%tmm" #t ", (%0,%1,1)" : : "r"(base), "r"(static_cast<long>(stride)) : "memory")
// Tile c += a @ b, a bf16 [16, 32], b bf16 pairs [16, 16, 2], c fp32 [16, 16].
#define MTBF_TILE_DPBF16PS(c, a, b) asm volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c : : : "memory")
// Tile c += a @ b, a uint8 [16, 64], b int8 quads [16, 16, 4], c int32 [16, 16].
#define MTBF_TILE_DPBUSD(c, a, b) asm volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c : : : "memory")
// Tile c += a @ b in the product D (a Dot).
#define MTBF_TILE_DOT(D, c, a, b)    \
  do {                               \
    if constexpr (D == Dot::Bf16) {  \
      MTBF_TILE_DPBF16PS(c, a, b);   \
    } else {                         \
      MTBF_TILE_DPBUSD(c, a, b);     \
    }                                \
  } while (0)

namespace mtbert_fast::cpu::amx {

// The tiles' two products: TDPBF16PS (bf16 pairs into fp32 sums) and TDPBUSD (uint8 x int8 quads into int32 sums).
enum class Dot { Bf16, Int8 };

constexpr int64_t kPanelBytes = 2 * kRowBytes;  // a row of a panel of 32 columns: two B tiles side by side

// c [32, 32] (sums of 4 bytes, rows c_bytes apart) = a [32, steps x 64 bytes] @ b [steps x 16 rows, 32 columns x 4
// bytes], or its first 16 rows (two_rows false) or columns (two_cols false): a's rows a_bytes apart, b's b_bytes,
// b's columns 16-31 64 bytes into its rows; under a configuration of 8 full tiles. Result tiles 0 and 1 take rows
// 0-15, 2 and 3 rows 16-31; tiles 4 and 5 hold a's two row halves, 6 and 7 b's two column halves, so that each loaded
// tile serves two products and no load waits for a product to free its tile. Rows of a past 16 (two_rows false) and
// columns of b past 16 (two_cols false) are not read. With c_in, the sums start from c_in's (rows c_bytes apart, as
// c's; c_in may be c) instead of 0: a product whose reduction runs in chunks. after_step(s) runs after step s's tile
// instructions are issued: vector work placed there overlaps the tiles' (see panel_linear's epilogue).
template <Dot D, typename AfterStep>
inline void product_2x2(bool two_rows, bool two_cols, int64_t steps, const void* a, int64_t a_bytes, const void* b,
                        int64_t b_bytes, void* c, int64_t c_bytes, const void* c_in, AfterStep&& after_step) {
  const char* a0 = static_cast<const char*>(a);
  const char* a1 = a0 + kRows * a_bytes;
  const char* bk = static_cast<const char*>(b);
  char* c0 = static_cast<char*>(c);
  if (c_in != nullptr) {
    const char* i0 = static_cast<const char*>(c_in);
    MTBF_TILE_LOAD(0, i0, c_bytes);
    if (two_cols) MTBF_TILE_LOAD(1, i0 + kRowBytes, c_bytes);
    if (two_rows) MTBF_TILE_LOAD(2, i0 + kRows * c_bytes, c_bytes);
    if (two_rows && two_cols) MTBF_TILE_LOAD(3, i0 + kRows * c_bytes + kRowBytes, c_bytes);
  } else {
    MTBF_TILE_ZERO(0);
    if (two_cols) MTBF_TILE_ZERO(1);
    if (two_rows) MTBF_TILE_ZERO(2);
    if (two_rows && two_cols) MTBF_TILE_ZERO(3);
  }
  for (int64_t s = 0; s < steps; ++s, bk += kRows * b_bytes) {
    const int64_t ak = s * kRowBytes;
    MTBF_TILE_LOAD(4, a0 + ak, a_bytes);
    MTBF_TILE_LOAD(6, bk, b_bytes);
    MTBF_TILE_DOT(D, 0, 4, 6);
    if (two_cols) {
      MTBF_TILE_LOAD(7, bk + kRowBytes, b_bytes);
      MTBF_TILE_DOT(D, 1, 4, 7);
    }
    if (two_rows) {
      MTBF_TILE_LOAD(5, a1 + ak, a_bytes);
      MTBF_TILE_DOT(D, 2, 5, 6);
      if (two_cols) MTBF_TILE_DOT(D, 3, 5, 7);
    }
    after_step(s);
  }
  MTBF_TILE_STORE(0, c0, c_bytes);
  if (two_cols) MTBF_TILE_STORE(1, c0 + kRowBytes, c_bytes);
  if (two_rows) MTBF_TILE_STORE(2, c0 + kRows * c_bytes, c_bytes);
  if (two_rows && two_cols) MTBF_TILE_STORE(3, c0 + kRows * c_bytes + kRowBytes, c_bytes);
}

template <Dot D>
inline void product_2x2(bool two_rows, bool two_cols, int64_t steps, const void* a, int64_t a_bytes, const void* b,
                        int64_t b_bytes, void* c, int64_t c_bytes, const void* c_in = nullptr) {
  product_2x2<D>(two_rows, two_cols, steps, a, a_bytes, b, b_bytes, c, c_bytes, c_in, [](int64_t) {});
}

// The bf16 form: c [32, 32] fp32 (row stride ldc) = a [32, k] bf16 (row stride lda) @ b bf16 in pairs ([k / 2, ldb,
// 2]) (+ c_in), k a multiple of kStep.
template <typename AfterStep = void (*)(int64_t)>
inline void product_2x2(bool two_rows, bool two_cols, int64_t k, const c10::BFloat16* a, int64_t lda,
                        const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc, const float* c_in = nullptr,
                        AfterStep&& after_step = [](int64_t) {}) {
  product_2x2<Dot::Bf16>(two_rows, two_cols, k / kStep, a, lda * 2, b, ldb * 4, c, ldc * 4, c_in, after_step);
}

// c [16, 64] (sums of 4 bytes, rows c_bytes apart) = a [16, steps x 64 bytes] @ the panels b0 and b1 side by
// side, or c [16, 32] = a @ b0 alone (b1 nullptr): panels of 32 columns, rows kPanelBytes apart (a bf16 pair panel or
// an int8 quad panel). Result tiles 0-3 take 16 columns each, tile 4 a's rows, 5-7 the panels' column halves in turn:
// four independent sums, so that each product does not wait on the one before into the same tile (a long panel is a
// long chain of them). The panels' rows kAhead steps on are fetched as these run: weights read once, from memory.
template <Dot D>
inline void panel_pair_product(int64_t steps, const void* a, int64_t a_bytes, const void* b0, const void* b1, void* c,
                               int64_t c_bytes) {
  constexpr int64_t kAhead = 4;                        // steps between a panel row's fetch and its use
  constexpr int64_t kStepBytes = kRows * kPanelBytes;  // a panel's bytes in one step
  const char* ak = static_cast<const char*>(a);
  const char* p0 = static_cast<const char*>(b0);
  const char* p1 = static_cast<const char*>(b1);
  char* cc = static_cast<char*>(c);
  MTBF_TILE_ZERO(0);
  MTBF_TILE_ZERO(1);
  if (p1 != nullptr) {
    MTBF_TILE_ZERO(2);
    MTBF_TILE_ZERO(3);
  }
  for (int64_t s = 0; s < steps; ++s, ak += kRowBytes, p0 += kStepBytes) {
    if (s + kAhead < steps) {
      for (int64_t line = 0; line < kStepBytes; line += 64) {
        __builtin_prefetch(p0 + kAhead * kStepBytes + line, 0, 3);
        if (p1 != nullptr) __builtin_prefetch(p1 + kAhead * kStepBytes + line, 0, 3);
      }
    }
    MTBF_TILE_LOAD(4, ak, a_bytes);
    MTBF_TILE_LOAD(5, p0, kPanelBytes);
    MTBF_TILE_DOT(D, 0, 4, 5);
    MTBF_TILE_LOAD(6, p0 + kRowBytes, kPanelBytes);
    MTBF_TILE_DOT(D, 1, 4, 6);
    if (p1 != nullptr) {
      MTBF_TILE_LOAD(7, p1, kPanelBytes);
      MTBF_TILE_DOT(D, 2, 4, 7);
      MTBF_TILE_LOAD(5, p1 + kRowBytes, kPanelBytes);
      MTBF_TILE_DOT(D, 3, 4, 5);
      p1 += kStepBytes;
    }
  }
  MTBF_TILE_STORE(0, cc, c_bytes);
  MTBF_TILE_STORE(1, cc + kRowBytes, c_bytes);
  if (b1 != nullptr) {
    MTBF_TILE_STORE(2, cc + 2 * kRowBytes, c_bytes);
    MTBF_TILE_STORE(3, cc + 3 * kRowBytes, c_bytes);
  }
}

}  // namespace mtbert_fast::cpu::amx

#endif

namespace mtbert_fast::cpu::amx {

// Whether the kernels may use the tiles (cpu_amx(allow) sets it): one switch for the process.
inline std::atomic<bool> allowed{true};

// Whether they do: allowed, and granted (never in a build without the tile kernels); int8_enabled for the int8
// products.
#ifdef MTBF_AMX
inline bool enabled() { return allowed.load(std::memory_order_relaxed) && bf16_tiles(); }
inline bool int8_enabled() { return allowed.load(std::memory_order_relaxed) && int8_tiles(); }
#else
inline bool enabled() { return false; }
inline bool int8_enabled() { return false; }
#endif

// The tiles configured as 8 full tiles (Config(8)) for the calling thread while it lives, where `tiles`, and released
// after (on an exception too). A build without the tile kernels never configures them.
class TileConfig {
 public:
  explicit TileConfig(bool tiles = true) : tiles_(tiles) {
#ifdef MTBF_AMX
    if (tiles_) configure(Config(8));
#endif
  }
  ~TileConfig() {
#ifdef MTBF_AMX
    if (tiles_) release();
#endif
  }
  TileConfig(const TileConfig&) = delete;
  TileConfig& operator=(const TileConfig&) = delete;

 private:
  bool tiles_;
};

}  // namespace mtbert_fast::cpu::amx
