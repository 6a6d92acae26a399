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

#endif
