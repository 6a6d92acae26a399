// AMX tiles for the CPU kernels of the AVX-512 build on x86-64 Linux: whether this process may use them, and the few
// tile instructions the kernels issue.
//
// A tile register holds up to 16 rows of 64 bytes. TDPBF16PS multiplies a bf16 tile A [16, 32] by a bf16 tile B of
// 16 rows of 16 column pairs (B's rows interleaved in pairs, the layout the AVX512-BF16 dot products take too) into an
// fp32 tile C [16, 16]: products exact, sums fp32. Linux hands the tiles' 8 KiB of register state to a process only
// when it asks (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 on); until then a tile instruction faults.
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

namespace mtbert_fast::cpu::amx {

// c [32, 32] (fp32, row stride ldc) = a [32, k] @ b [k, 32], or its first 16 rows (two_rows false) or columns
// (two_cols false): a bf16 row-major (row stride lda), b bf16 in pairs ([k / 2, ldb, 2]), k a multiple of kStep;
// under a configuration of 8 full tiles. Result tiles 0 and 1 take rows 0-15, 2 and 3 rows 16-31; tiles 4 and 5 hold
// a's two row halves, 6 and 7 b's two column halves, so that each loaded tile serves two products and no load waits
// for a product to free its tile. Rows of a past 16 (two_rows false) and columns of b past 16 (two_cols false) are
// not read.
inline void product_2x2(bool two_rows, bool two_cols, int64_t k, const c10::BFloat16* a, int64_t lda,
                        const c10::BFloat16* b, int64_t ldb, float* c, int64_t ldc) {
  const int64_t a_bytes = lda * 2, b_bytes = ldb * 4, c_bytes = ldc * 4;
  const c10::BFloat16* a1 = a + kRows * lda;
  MTBF_TILE_ZERO(0);
  if (two_cols) MTBF_TILE_ZERO(1);
  if (two_rows) MTBF_TILE_ZERO(2);
  if (two_rows && two_cols) MTBF_TILE_ZERO(3);
  for (int64_t kk = 0; kk < k; kk += kStep) {
    const c10::BFloat16* bk = b + kk * ldb;  // pair row kk / 2
    MTBF_TILE_LOAD(4, a + kk, a_bytes);
    MTBF_TILE_LOAD(6, bk, b_bytes);
    MTBF_TILE_DPBF16PS(0, 4, 6);
    if (two_cols) {
      MTBF_TILE_LOAD(7, bk + 2 * kCols, b_bytes);
      MTBF_TILE_DPBF16PS(1, 4, 7);
    }
    if (two_rows) {
      MTBF_TILE_LOAD(5, a1 + kk, a_bytes);
      MTBF_TILE_DPBF16PS(2, 5, 6);
      if (two_cols) MTBF_TILE_DPBF16PS(3, 5, 7);
    }
  }
  MTBF_TILE_STORE(0, c, c_bytes);
  if (two_cols) MTBF_TILE_STORE(1, c + kCols, c_bytes);
  if (two_rows) MTBF_TILE_STORE(2, c + kRows * ldc, c_bytes);
  if (two_rows && two_cols) MTBF_TILE_STORE(3, c + kRows * ldc + kCols, c_bytes);
}

}  // namespace mtbert_fast::cpu::amx

#endif

namespace mtbert_fast::cpu::amx {

// Whether the kernels may use the tiles (cpu_amx(allow) sets it): one switch for the process.
inline std::atomic<bool> allowed{true};

// Whether they do: allowed, and granted (never in a build without the tile kernels).
inline bool enabled() {
#ifdef MTBF_AMX
  return allowed.load(std::memory_order_relaxed) && bf16_tiles();
#else
  return false;
#endif
}

}  // namespace mtbert_fast::cpu::amx
