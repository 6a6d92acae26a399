// x @ W^T + bias, optionally GELU, for a few rows of x (a short query, a small batch), CPU.
//
// W [N, K] is packed once into panels of kPanel columns (mtbert_fast.ops.panel_linear.pack_panels): [P, K, kPanel]
// in W's dtype, or bf16 pairs [P, ceil(K / 2), kPanel, 2] with each pair of reduction rows interleaved, as vdpbf16ps
// multiplies them; columns past N and the odd row past K are zero. A thread takes whole panels and runs every row
// block of x over a panel while it sits in its cache, so each weight is read from memory once per call. With few
// rows a call is bound by reading the weights; oneDNN's linear, blocked for many rows, reads them at about half the
// rate there (docs/cpu-latency.md). For such x a panel is walked in chunks that stay in L1 over every row block; for a
// few hundred rows, a long panel in chunks of L2's size (chunk_rows). The next chunk or panel is fetched while the
// row blocks run over the current one. Both where fetch_ahead holds (panel_fetch): with the AVX2 kernels, and with the
// AVX-512 ones on Intel CPUs; elsewhere x walks whole panels and the hardware's prefetcher fetches them.
//
// Accumulation is fp32: between chunks a row block's partial sums wait in a per-thread fp32 buffer. bf16 pair panels
// use the AVX512-BF16 dot product (exact products, fp32 sums). Elsewhere a bf16 weight is packed as bf16 panels of
// rows ([P, K, kPanel]) that the fp32 products widen as they load them: half the bytes of fp32 panels to read, the
// same results. A bf16 x with panels of rows is widened once per call. The bias starts the fp32 accumulators, and
// GELU is applied to them before the single store of the last chunk.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu_amx.h"
#include "cpu_tiles.h"
#include "cpu_utils.h"
#include "tile_rows.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace mtbert_fast {
namespace {

using cpu::kLanes;
using cpu::Vec;

constexpr int64_t kPanel = 32;                       // columns per panel
constexpr int kPanelVecs = kPanel / kLanes;          // accumulator vectors per row of a tile
constexpr int kMaxRows = kLanes >= 16 ? 12 : 3;      // rows per tile: 24 of 32 AVX-512 registers, 12 of 16 AVX2
constexpr int64_t kTaskFmas = int64_t{1} << 16;      // multiply-adds below which a thread takes more panels
constexpr int64_t kWholeRows = 384;                  // x of more rows: whole panels, nothing fetched

// Whether the CPU is Intel's (CPUID's vendor string); asked once.
bool intel_cpu() {
#if defined(__x86_64__)
  static const bool intel = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    char vendor[12];
    std::memcpy(vendor, &b, 4);
    std::memcpy(vendor + 4, &d, 4);
    std::memcpy(vendor + 8, &c, 4);
    return std::memcmp(vendor, "GenuineIntel", 12) == 0;
  }();
  return intel;
#else
  return false;
#endif
}

// Whether x of up to kWholeRows rows walks the panels in chunks (chunk_rows) with the next chunk or panel fetched into
// L1 as the row blocks run (panel_fetch(allow) sets it); otherwise whole panels, fetched by the hardware's
// prefetcher. The same sums in the same order either way. On by default for the AVX2 kernels (3-row tiles, which pass
// over a panel four times as often as 12-row ones; chunk_rows has what the chunks gain there) and for the AVX-512
// kernels on Intel CPUs (on a Xeon without AMX, bert-base's forwards of 16-64 tokens ran 1.04-1.28x faster with
// them). Off for the AVX-512 kernels on other CPUs: on an AMD EPYC (Zen 4: 32 KiB of L1 and 1 MiB of L2 a core)
// forwards of one sequence of 1-256 tokens ran faster on whole panels, bert-base's 1.01-1.22x in float32 and
// 1.01-1.14x in bf16 except at 16 tokens (0.95-1.00x), MiniLM's 0.96-1.14x (docs/cpu-latency.md, "Later: the
// panels' walk on an AMD EPYC").
std::atomic<bool> fetch_ahead{kLanes < 16 || intel_cpu()};

bool panel_fetch(std::optional<bool> allow) {
  if (allow.has_value()) fetch_ahead.store(*allow, std::memory_order_relaxed);
  return fetch_ahead.load(std::memory_order_relaxed);
}

// Sets up and takes away one tile's accumulators for one chunk of a panel. The first chunk starts them at the bias,
// later ones at the partial sums that the previous chunk left in `partial`; the last chunk sends them through GELU
// (when Gelu) into out, whose valid columns in this panel are `cols` (the last panel may hold fewer than kPanel),
// the others leave them in `partial`.
template <typename T, bool Gelu, GeluKind K>
struct PanelStore {
  const float* bias;  // [cols] fp32, this panel's part of the bias; nullptr: none
  float* partial;     // [rows, kPanel] fp32 partial sums of this tile
  T* out;             // [rows, ldo]
  int64_t ldo;
  int64_t cols;
  bool first;
  bool last;
  const void* fetch = nullptr;  // cache lines for the tile to fetch as it runs (cpu_tiles.h's FetchAhead)
  int64_t fetch_lines = 0;

  template <int MR, int NV>
  void init(Vec (&acc)[MR][NV]) const {
    if (!first) {
      MTBF_UNROLL for (int r = 0; r < MR; ++r)
        MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Vec::loadu(partial + r * kPanel + v * kLanes);
      return;
    }
    const bool whole = bias != nullptr && cols >= NV * kLanes;  // plain loads, no column checks
    MTBF_UNROLL for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(kLanes, cols - v * kLanes);
      const Vec b = whole ? Vec::loadu(bias + v * kLanes)
                          : (bias != nullptr && n > 0 ? cpu::load(bias + v * kLanes, n) : Vec(0.f));
      MTBF_UNROLL for (int r = 0; r < MR; ++r) acc[r][v] = b;
    }
  }
  template <int MR, int NV>
  void finish(const Vec (&acc)[MR][NV]) const {
    if (!last) {
      MTBF_UNROLL for (int r = 0; r < MR; ++r)
        MTBF_UNROLL for (int v = 0; v < NV; ++v) acc[r][v].store(partial + r * kPanel + v * kLanes);
      return;
    }
    // locals: stores through out could otherwise reload the members after every store
    T* const o = out;
    const int64_t ld = ldo, c = cols;
    if (c >= NV * kLanes) {
      MTBF_UNROLL for (int r = 0; r < MR; ++r)
        MTBF_UNROLL for (int v = 0; v < NV; ++v)
          cpu::store(o + r * ld + v * kLanes, Gelu ? cpu::gelu<K>(acc[r][v]) : acc[r][v], cpu::Full{});
      return;
    }
    MTBF_UNROLL for (int r = 0; r < MR; ++r) {
      MTBF_UNROLL for (int v = 0; v < NV; ++v) {
        const Vec y = Gelu ? cpu::gelu<K>(acc[r][v]) : acc[r][v];
        const int64_t n = c - v * kLanes;
        if (n >= kLanes) cpu::store(o + r * ld + v * kLanes, y, cpu::Full{});
        else if (n > 0) cpu::store(o + r * ld + v * kLanes, y, n);
      }
    }
  }
};

// Reduction rows per chunk of a panel for x of M rows: few rows are bound by fetching the weights, and chunks that
// stay in L1 (8 or 16 KiB of fp32 panel) over every row block, each fetched while the previous one runs, read them
// about 1.3x as fast at 16 rows as whole panels do. From about a hundred rows on, the panels are reused enough that
// chunks of L2's size are enough: a panel of 768 or more reduction rows (96 KiB and up in fp32) walked in chunks of
// 512 ran bert-base's products 1.03-1.08x faster at 128-256 rows, and shorter panels gain nothing. From a few hundred
// rows on, chunking costs more (x's rows fetched again and partial sums stored per chunk) than it saves: one chunk.
// Measured with the 3-row tiles of AVX2. The AVX-512 kernels' 12-row tiles pass over a panel a quarter as often:
// there x of one row block keeps whole panels, and x of 13-96 rows takes the small chunks (whole forwards on a Xeon
// 1.04-1.28x faster at 16-64 rows, where whole panels had run about as fast as oneDNN's linear or slower). For 97-384
// rows they take chunks of 768: bert-base's FFN output product (3,072 reduction rows, whose x of 128 rows alone is
// most of L2) ran 1.07-1.09x faster at 128-192 rows on that Xeon than on whole panels, and as fast at 256-384.
// `fetch`: whether this call walks panels fetched ahead at all (fetch_ahead, and at most kWholeRows rows).
inline int64_t chunk_rows(int64_t M, int64_t Kp, bool fetch) {
  if (!fetch || (kLanes >= 16 && M <= kMaxRows)) return Kp;
  if (M > 96) return kLanes >= 16 ? std::min<int64_t>(Kp, 768) : 512;
  return M <= 32 ? 64 : 128;
}

// The tile for AT rows of x over BT panels: the bf16 dot product for bf16 pairs, fp32 products otherwise (bf16
// panels of plain rows widened as they are loaded).
template <typename AT, typename BT, typename Epilogue>
using PanelTile = void (*)(int64_t, const AT*, int64_t, const BT*, int64_t, const Epilogue&);

template <typename AT, typename BT, typename Epilogue, int MR>
constexpr PanelTile<AT, BT, Epilogue> tile_of() {
  if constexpr (std::is_same<AT, BT>::value) return cpu::tile_fn<AT, MR, kPanelVecs, Epilogue>();
  else return &cpu::tile_f32<MR, kPanelVecs, Epilogue, BT>;
}

template <typename AT, typename BT, typename Epilogue, int MR = kMaxRows>
PanelTile<AT, BT, Epilogue> pick_rows(int mr) {
  if constexpr (MR == 1) {
    return tile_of<AT, BT, Epilogue, 1>();
  } else {
    return mr == MR ? tile_of<AT, BT, Epilogue, MR>() : pick_rows<AT, BT, Epilogue, MR - 1>(mr);
  }
}

// Row blocks of x for M >= 1 rows: at most kMaxRows each, as even as possible (16 rows: two of 8, not 12 and 4).
inline int64_t row_blocks(int64_t M) { return (M + kMaxRows - 1) / kMaxRows; }

// out [M, N] = act(a [M, Kp] @ panels + bias); AT and BT the types of a and the panels, Kp their reduction length,
// lda >= Kp a's row stride, ldo >= N out's.
template <typename AT, typename BT, typename T, bool Gelu, GeluKind K>
void run_panels(const AT* a, int64_t lda, int64_t M, int64_t Kp, const BT* panels, int64_t P, const float* bias,
                T* out, int64_t N, int64_t ldo) {
  using Epilogue = PanelStore<T, Gelu, K>;
  const int64_t blocks = row_blocks(M), base = M / blocks, extra = M % blocks;
  const int64_t grain = std::max<int64_t>(1, kTaskFmas / (std::max<int64_t>(M, 4) * Kp * kPanel));
  const bool fetch = fetch_ahead.load(std::memory_order_relaxed) && M <= kWholeRows;
  const int64_t chunk = chunk_rows(M, Kp, fetch);
  // bf16 panels of rows under fp32 products: a single row block widens them as it loads them; more row blocks run
  // over a chunk widened once into fp32, since widening in every block would cost more than the products.
  constexpr bool widened = std::is_same<AT, float>::value && !std::is_same<BT, float>::value;
  const bool widen_once = widened && blocks > 1;
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    cpu::LineVector<float> partial(chunk < Kp ? M * kPanel : 0);
    cpu::LineVector<float> wide(widen_once ? std::min(chunk, Kp) * kPanel : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const BT* panel = panels + p * Kp * kPanel;
      for (int64_t k0 = 0; k0 < Kp; k0 += chunk) {
        const int64_t kc = std::min(chunk, Kp - k0);
        Epilogue epi{bias != nullptr ? bias + p * kPanel : nullptr, partial.data(), out + p * kPanel, ldo,
                     std::min(kPanel, N - p * kPanel), k0 == 0, k0 + kc == Kp};
        // Where `fetch`, the next chunk or panel (of this panel or of the thread's next one) is fetched while this
        // one runs: each row block's tile fetches a share of its cache lines, spread over its steps. Without that,
        // the first row block over a panel waits on memory for all of it (a single block for every step). On a
        // Xeon, bert-base's four products of a layer, on weights that come from memory as in a forward, ran
        // 1.2-1.3x faster with it at 8-12 rows, 1.15-1.27x at 32-128 and 1.0-1.1x at 256-384 than on whole panels
        // unfetched, and 1.03-1.05x at 16 than on the small chunks fetched in a burst before each row block. Beyond
        // 384 rows the first row block's wait is spread over dozens of blocks, and the fetches cost the tiles more
        // than they save (the AVX2 kernels' products at 512-1,024 rows ran 0.93-0.95x with them): nothing is fetched.
        const char* next = reinterpret_cast<const char*>(panel + (k0 + kc) * kPanel);
        const char* next_end =
            reinterpret_cast<const char*>(panels + std::min(p1 * Kp, p * Kp + k0 + kc + chunk) * kPanel);
        const int64_t share = fetch ? ((next_end - next) / 64 + blocks - 1) / blocks : 0;
        const auto run_blocks = [&](const auto* b) {
          using B = std::remove_const_t<std::remove_pointer_t<decltype(b)>>;
          int64_t m0 = 0;
          for (int64_t i = 0; i < blocks; ++i) {
            epi.fetch = next;
            epi.fetch_lines = std::min<int64_t>(share, (next_end - next) / 64);
            next += epi.fetch_lines * 64;
            const int mr = static_cast<int>(base + (i < extra ? 1 : 0));
            pick_rows<AT, B, Epilogue>(mr)(kc, a + m0 * lda + k0, lda, b, kPanel, epi);
            epi.partial += mr * kPanel;
            epi.out += mr * ldo;
            m0 += mr;
          }
        };
        const BT* b = panel + k0 * kPanel;
        if constexpr (widened) {
          if (widen_once) {
            cpu::for_each_vec(kc * kPanel,
                              [&](int64_t e, auto n) { cpu::store(wide.data() + e, cpu::load(b + e, n), n); });
            run_blocks(static_cast<const float*>(wide.data()));
            continue;
          }
        }
        run_blocks(b);
      }
    }
  });
}

template <typename AT, typename BT, typename T>
void dispatch_activation(bool gelu, GeluKind kind, const at::Tensor& a, int64_t M, int64_t Kp, const BT* panels,
                         int64_t P, const float* bias, at::Tensor& out) {
  const AT* ap = a.const_data_ptr<AT>();
  const int64_t lda = a.stride(0), N = out.size(1), ldo = out.stride(0);
  T* o = out.mutable_data_ptr<T>();
  if (!gelu) return run_panels<AT, BT, T, false, GeluKind::Erf>(ap, lda, M, Kp, panels, P, bias, o, N, ldo);
  cpu::dispatch_gelu(kind, [&](auto tag) {
    run_panels<AT, BT, T, true, decltype(tag)::value>(ap, lda, M, Kp, panels, P, bias, o, N, ldo);
  });
}

#ifdef MTBF_AMX
// out [M, N] = act(a [M, Kp] @ panels + bias) on AMX tiles, for bf16 pair panels with Kp a multiple of the tiles'
// reduction step (32): a pair panel [Kp / 2, kPanel, 2] is the tiles' B layout two result tiles wide, at a row stride
// of 128 bytes. The tiles read whole tiles of 16 rows (the rows past M are read, never stored): a's row group from
// row `tail_row` on (the last, or all of a with 16 rows or fewer) is read from `tail`, a copy of those rows with room
// for a whole group at the same row stride, where a's storage does not hold them (tail_row = M: a does). x of up to
// 16 rows runs two panels at a time, more rows a panel at a time in groups of 32 (cpu_amx.h's panel_pair_product and
// 2 x 2 tiles); the results go through an fp32 buffer to the epilogue: bias, GELU, one rounding. With few rows the
// vdpbf16ps tiles spend 32 dot products on each 128 bytes of a panel, more than two cores take to read them from
// memory; on the tiles the read is the bound.
constexpr int64_t kAmxGroup = 2 * cpu::amx::kRows;

// More rows are blocked so that the tiles read both operands from the core's caches: a's rows in blocks of about
// kAmxBlockBytes, which stay in L2 while every panel of the thread's share runs over them, and each panel in chunks
// of at most kAmxChunk reduction rows (24 KiB), which stay in L1 over a block's row groups; between chunks a group's
// sums wait in an fp32 buffer. Unblocked, one panel ran over all of a: a whole panel of 768 reduction rows (48 KiB)
// does not stay in L1 while a's rows stream past it, and a of 1,024 rows by 3,072 (6 MiB) not even in L2.
constexpr int64_t kAmxBlockBytes = 768 * 1024;
constexpr int64_t kAmxChunk = 384;

// Rows of a block for M rows of Kp bf16: whole groups of 32, as many as fit kAmxBlockBytes, in equal blocks.
inline int64_t amx_row_block(int64_t M, int64_t Kp) {
  const int64_t fit = std::max<int64_t>(1, kAmxBlockBytes / (Kp * 2 * kAmxGroup));
  const int64_t groups = (M + kAmxGroup - 1) / kAmxGroup, blocks = (groups + fit - 1) / fit;
  return (groups + blocks - 1) / blocks * kAmxGroup;
}

// Reduction rows of a panel's chunk for Kp of them: the fewest chunks of at most kAmxChunk, as equal as the tiles'
// step of 32 allows.
inline int64_t amx_chunk(int64_t Kp) {
  const int64_t steps = Kp / cpu::amx::kStep, chunks = (Kp + kAmxChunk - 1) / kAmxChunk;
  return (steps + chunks - 1) / chunks * cpu::amx::kStep;
}

// Whether a product of M rows (more than 16) shares its work among `threads` threads by rows, each thread running
// every panel over its own rows, rather than by panels, each thread running its panels over every row. By panels each
// thread reads every row of x and writes some columns of every output row; by rows it reads the whole weight. Inside a
// forward the encoder's other kernels (attention by sequences, LayerNorm by rows) give each thread a contiguous share
// of the rows, the same share at::parallel_for gives thread t here, so by rows a thread's product reads the rows its
// own previous kernel wrote and writes those its next one reads, in its own cache: an FFN's [M, 4H] inner activation
// no longer crosses between the cores. That pays where the activations (x and the output, M (Kp + N) values) hold at
// least 0.8 times as many values as the weight (Kp N), which every thread then reads, and each thread has two row
// groups. Whole bf16 forwards of B sequences of 128 tokens on a 2-core Xeon with AMX (family 6 model 167), every
// product by panels' time over this rule's (two builds, processes alternated, 2-4 rounds): MiniLM B=2 1.02-1.08x,
// B=4 1.02-1.12x, B=8 1.00-1.08x, B=16 1.06-1.09x; bert-base B=4 0.98-1.02x, B=8 1.04-1.08x, B=16 0.97-1.00x. At B=2
// bert-base's products stay by panels: all of them by rows ran it 0.94-1.01x.
inline bool amx_rows_per_thread(int64_t M, int64_t Kp, int64_t N, int64_t threads) {
  return threads > 1 && M >= 2 * kAmxGroup * threads && 5 * M * (Kp + N) >= 4 * Kp * N;
}

template <typename T, bool Gelu, GeluKind K>
void run_panels_amx(const at::BFloat16* a, int64_t lda, int64_t M, int64_t Kp, const at::BFloat16* panels, int64_t P,
                    const float* bias, T* out, int64_t N, int64_t ldo, const at::BFloat16* tail, int64_t tail_row) {
  constexpr int64_t kGroup = kAmxGroup;
  const auto rows_at = [&](int64_t m0) { return m0 >= tail_row ? tail + (m0 - tail_row) * lda : a + m0 * lda; };
  const bool pairs = M <= cpu::amx::kRows;
  const int64_t grain = std::max<int64_t>(pairs ? 2 : 1, kTaskFmas / (std::max<int64_t>(M, 4) * Kp * kPanel));
  const int64_t chunk = amx_chunk(Kp);
  // c's columns for p0's panel and, with pairs, the next one: the epilogue of `rows` rows from row m0
  const auto finish = [&](const float* c, int64_t ldc, int64_t p0, int64_t panels_done, int64_t m0, int64_t rows) {
    const int64_t c0 = p0 * kPanel, cols = std::min(panels_done * kPanel, N - c0);
    for (int64_t r = 0; r < rows; ++r) {
      T* o = out + (m0 + r) * ldo + c0;
      const float* cr = c + r * ldc;
      cpu::for_each_vec(cols, [&](int64_t j, auto n) {
        Vec x = cpu::load(cr + j, n);
        if (bias != nullptr) x = x + cpu::load(bias + c0 + j, n);
        if constexpr (Gelu) x = cpu::gelu<K>(x);
        cpu::store(o + j, x, n);
      });
    }
  };
  // panels [p0, p1) over rows [m_lo, m_hi) (all of them with pairs)
  const auto run = [&](int64_t p0, int64_t p1, int64_t m_lo, int64_t m_hi) {
    const cpu::amx::TileConfig held;
    if (pairs) {
      alignas(64) float c[cpu::amx::kRows * 2 * kPanel];
      for (int64_t p = p0; p < p1; p += 2) {
        const at::BFloat16* panel = panels + p * Kp * kPanel;
        const bool two = p + 1 < p1;
        cpu::amx::panel_pair_product<cpu::amx::Dot::Bf16>(Kp / cpu::amx::kStep, rows_at(0), lda * 2, panel,
                                                          two ? panel + Kp * kPanel : nullptr, c, 2 * kPanel * 4);
        finish(c, 2 * kPanel, p, two ? 2 : 1, 0, M);
      }
    } else {
      // A group's epilogue runs while the next group's products do, a few of its rows after each of their tile
      // steps, from the other of two buffers: the vector work then overlaps the tiles' instead of waiting behind them
      // (after a group's products its epilogue's first loads wait for the last product, and the front end, filled
      // with the epilogue's operations, issues no tile work until they start).
      const int64_t block = amx_row_block(m_hi - m_lo, Kp);
      cpu::LineVector<float> partial(chunk < Kp ? block * kPanel : 0), done(2 * kGroup * kPanel);
      struct Pending {
        int64_t p = -1, m0 = 0, rows = 0, next = 0;  // next: the first row whose epilogue has not run
      } pending;
      int flip = 0;
      const auto drain = [&](int64_t upto) {  // the pending group's rows up to `upto`, from the buffer before flip's
        if (pending.p < 0) return;
        upto = std::min(upto, pending.rows);
        if (upto > pending.next) {
          finish(done.data() + (1 - flip) * kGroup * kPanel + pending.next * kPanel, kPanel, pending.p, 1,
                 pending.m0 + pending.next, upto - pending.next);
          pending.next = upto;
        }
      };
      for (int64_t b0 = m_lo; b0 < m_hi; b0 += block) {
        const int64_t b1 = std::min(m_hi, b0 + block);
        for (int64_t p = p0; p < p1; ++p) {
          const at::BFloat16* panel = panels + p * Kp * kPanel;
          for (int64_t k0 = 0; k0 < Kp; k0 += chunk) {
            const int64_t kn = std::min(chunk, Kp - k0);
            const bool first = k0 == 0, last = k0 + kn == Kp;
            const int64_t per_step = (kGroup * cpu::amx::kStep + kn - 1) / kn;
            for (int64_t m0 = b0; m0 < b1; m0 += kGroup) {
              const int64_t rows = std::min(kGroup, b1 - m0);
              float* sums = partial.data() + (m0 - b0) * kPanel;
              float* dst = last ? done.data() + flip * kGroup * kPanel : sums;
              const int64_t start = pending.next;
              cpu::amx::product_2x2(rows > cpu::amx::kRows, true, kn, rows_at(m0) + k0, lda, panel + k0 * kPanel,
                                    kPanel, dst, kPanel, first ? nullptr : sums,
                                    [&](int64_t s) { drain(start + (s + 1) * per_step); });
              if (last) {
                drain(kGroup);
                pending = {p, m0, rows, 0};
                flip = 1 - flip;
              }
            }
          }
        }
      }
      drain(kGroup);
    }
  };
  const int64_t threads = at::get_num_threads();
  if (pairs || !amx_rows_per_thread(M, Kp, N, threads)) {
    at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) { run(p0, p1, 0, M); });
    return;
  }
  // each thread a contiguous run of whole row groups, as at::parallel_for shares rows in the other kernels
  at::parallel_for(0, (M + kGroup - 1) / kGroup, 1,
                   [&](int64_t g0, int64_t g1) { run(0, P, g0 * kGroup, std::min(M, g1 * kGroup)); });
}

// Whether M rows of x over bf16 pair panels of Kp reduction rows run on AMX tiles: from 2 rows on. At one row the
// dot products, bound by reading the weights either way, ran bf16 forwards on a 2-core Xeon with AMX 1.03x (bert-base)
// and 1.08x (MiniLM) faster; from 2 rows on they are bound by their own rate, and the tiles ran them 1.23x faster at
// 2 rows of bert-base, 1.50x at 4 and about 1.6x at 8 (MiniLM: even at 2, 1.06x at 4, about 1.35x at 8).
inline bool panels_on_tiles(int64_t M, int64_t Kp) {
  return M >= 2 && Kp % cpu::amx::kStep == 0 && cpu::amx::enabled();
}
#endif

// The most rows a tile of x takes when M >= 1 rows run in row_blocks(M) even blocks.
inline int64_t tile_rows(int64_t M) {
  const int64_t blocks = row_blocks(M);
  return (M + blocks - 1) / blocks;
}

// The output [M, N]: with GELU (an FFN's inner activation, which the FFN's output product reads next) its rows one
// cache line apart more where that product's tiles would take them aliased (mtbert_fast.ops.panel_linear's fake
// gives the same strides), so that it reads them without a copy; else contiguous.
at::Tensor new_output(const at::Tensor& x, int64_t N, bool gelu) {
  const int64_t M = x.size(0);
  return cpu::new_rows(M, N, x.options(), gelu && M > 0 && cpu::rows_alias(tile_rows(M), N * x.element_size()));
}

// x [M >= 1, K] as fp32 rows for the float tiles: an fp32 x as rows_for_tiles takes it, a bf16 x widened once into
// rows that do not alias.
at::Tensor float_rows_for_tiles(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1), rows = tile_rows(M);
  if (x.scalar_type() == at::kFloat) return cpu::rows_for_tiles(x, K, rows);
  at::Tensor a = cpu::new_rows(M, K, x.options().dtype(at::kFloat), cpu::rows_alias(rows, K * 4));
  a.copy_(x);
  return a;
}

at::Tensor panel_linear_cpu(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                            int64_t out_features, bool gelu, c10::string_view approximate) {
  constexpr const char* op = "panel_linear";
  MTBF_CHECK_DEVICE_TYPE("panel_linear", x, c10::DeviceType::CPU);
  MTBF_CHECK_SAME_DEVICE("panel_linear", x, panels);
  MTBF_CHECK_DIM("panel_linear", x, 2);
  MTBF_CHECK_FLOAT_OR_BF16("panel_linear", x);
  MTBF_CHECK_FLOAT_OR_BF16("panel_linear", panels);
  const bool bf16_panels = panels.scalar_type() == at::kBFloat16;
  const bool pairs = bf16_panels && panels.dim() == 4;  // else rows of fp32 or of bf16 widened on load
  TORCH_CHECK(!bf16_panels || x.scalar_type() == at::kBFloat16, op,
              ": bfloat16 panels multiply a bfloat16 x only, got x of dtype ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t Kp = pairs ? (K + 1) / 2 * 2 : K;
  const int64_t P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(N > 0, op, ": out_features must be positive, got ", N);
  const std::vector<int64_t> want = pairs ? std::vector<int64_t>{P, Kp / 2, kPanel, 2}
                                          : std::vector<int64_t>{P, K, kPanel};
  TORCH_CHECK(panels.sizes() == at::IntArrayRef(want), op, ": panels must have shape ", at::IntArrayRef(want),
              " for x of ", K, " columns and ", N, " out_features, got ", panels.sizes());
  const GeluKind kind = parse_gelu(op, approximate);
  // the bias as the accumulators' fp32: an fp32 bias read where it is, a bf16 one widened into this call's buffer
  // (a short forward makes a dozen such calls, each of which a new tensor would cost an allocation and a dispatch)
  at::Tensor bias_rows;
  cpu::LineVector<float> widened_bias;
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    MTBF_CHECK_SAME_DEVICE("panel_linear", x, *bias);
    MTBF_CHECK_FLOAT_OR_BF16("panel_linear", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "] (out_features), got ",
                bias->sizes());
    bias_rows = bias->contiguous();
    if (bias_rows.scalar_type() == at::kFloat) {
      bias_ptr = bias_rows.const_data_ptr<float>();
    } else {
      const at::BFloat16* b = bias_rows.const_data_ptr<at::BFloat16>();
      widened_bias.assign(b, b + N);
      bias_ptr = widened_bias.data();
    }
  }
  const at::Tensor w = panels.contiguous();
  at::Tensor out = new_output(x, N, gelu);
  if (M == 0) return out;
  if (pairs) {
#ifdef MTBF_BF16_DOT
    TORCH_CHECK(cpu::cpu_has_bf16_dot(), op,
                ": bfloat16 pair panels need a CPU with AVX512-BF16; pack the weight as panels of rows here");
    const at::BFloat16* wp = w.const_data_ptr<at::BFloat16>();
#ifdef MTBF_AMX
    if (panels_on_tiles(M, Kp)) {
      // x's rows Kp wide (zeros past K, which an odd K leaves: the panels' last pair row is half padding), read up
      // to a multiple of 16 by the tiles; where x's storage ends before, its last row group is read from a copy with
      // room for a whole group (the rows past M left as they come: never stored), not the whole of x
      const at::Tensor a = cpu::rows_for_tiles(x, Kp, cpu::amx::kRows);
      const int64_t lda = a.stride(0);
      const int64_t rows = (M + cpu::amx::kRows - 1) / cpu::amx::kRows * cpu::amx::kRows;
      int64_t tail_row = M;
      at::Tensor tail;
      if (!cpu::rows_readable(a, rows)) {
        tail_row = M <= cpu::amx::kRows ? 0 : (M - 1) / kAmxGroup * kAmxGroup;
        tail = at::empty({kAmxGroup, lda}, a.options());
        tail.narrow(0, 0, M - tail_row).narrow(1, 0, Kp).copy_(a.narrow(0, tail_row, M - tail_row).narrow(1, 0, Kp));
      }
      const at::BFloat16* ap = a.const_data_ptr<at::BFloat16>();
      const at::BFloat16* tp = tail.defined() ? tail.const_data_ptr<at::BFloat16>() : nullptr;
      at::BFloat16* o = out.mutable_data_ptr<at::BFloat16>();
      const auto run = [&](auto gelu_tag, auto kind_tag) {
        run_panels_amx<at::BFloat16, decltype(gelu_tag)::value, decltype(kind_tag)::value>(
            ap, lda, M, Kp, wp, P, bias_ptr, o, N, out.stride(0), tp, tail_row);
      };
      if (!gelu) run(std::false_type{}, std::integral_constant<GeluKind, GeluKind::Erf>{});
      else cpu::dispatch_gelu(kind, [&](auto tag) { run(std::true_type{}, tag); });
      return out;
    }
#endif
    const at::Tensor a = cpu::rows_for_tiles(x, Kp, tile_rows(M));
    dispatch_activation<at::BFloat16, at::BFloat16, at::BFloat16>(gelu, kind, a, M, Kp, wp, P, bias_ptr, out);
#else
    TORCH_CHECK(false, op, ": bfloat16 pair panels need the AVX-512 build of the CPU kernels on a CPU with "
                "AVX512-BF16; pack the weight as panels of rows here");
#endif
    return out;
  }
  const at::Tensor a = float_rows_for_tiles(x);
  cpu::dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    if (bf16_panels) {
      dispatch_activation<float, at::BFloat16, T>(gelu, kind, a, M, K, w.const_data_ptr<at::BFloat16>(), P, bias_ptr,
                                                  out);
    } else {
      dispatch_activation<float, float, T>(gelu, kind, a, M, K, w.const_data_ptr<float>(), P, bias_ptr, out);
    }
  });
  return out;
}

}  // namespace

// A tensor-less switch of this CPU build, in the kernels' namespace.
TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) { m.def("panel_fetch(bool? allow=None) -> bool", &panel_fetch); }

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("panel_linear", &panel_linear_cpu); }

}  // namespace mtbert_fast
