// x @ W^T + bias, optionally GELU, for a few rows of x (a short query, a small batch), CPU.
//
// W [N, K] is packed once into panels of kPanel columns (mtbert_fast.ops.panel_linear.pack_panels): fp32
// [P, K, kPanel], or bf16 [P, ceil(K / 2), kPanel, 2] with each pair of reduction rows interleaved, as vdpbf16ps
// multiplies them; columns past N and the odd row past K are zero. A thread takes whole panels and runs every row
// block of x over a panel while the panel sits in its cache, so each weight is read from memory once per call. With
// few rows a call is bound by reading the weights; oneDNN's linear, blocked for many rows, reads them at about half
// the rate there (docs/cpu-latency.md).
//
// Accumulation is fp32. bf16 panels use the AVX512-BF16 dot product (exact products, fp32 sums); a bf16 x with fp32
// panels is widened once per call. The bias is added to the fp32 accumulators and GELU applied to them before the
// single store.
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "checks.h"
#include "cpu_tiles.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using cpu::kLanes;
using cpu::Vec;

constexpr int64_t kPanel = 32;                       // columns per panel
constexpr int kPanelVecs = kPanel / kLanes;          // accumulator vectors per row of a tile
constexpr int kMaxRows = kLanes >= 16 ? 12 : 3;      // rows per tile: 24 of 32 AVX-512 registers, 12 of 16 AVX2
constexpr int64_t kTaskFmas = int64_t{1} << 16;      // multiply-adds below which a thread takes more panels

// Stores one tile of a panel: acc starts at the bias, and leaves through GELU (when Gelu) into out, whose valid
// columns in this panel are `cols` (the last panel may hold fewer than kPanel).
template <typename T, bool Gelu, GeluKind K>
struct PanelStore {
  const float* bias;  // [cols] fp32, this panel's part of the bias; nullptr: none
  T* out;             // [rows, ldo]
  int64_t ldo;
  int64_t cols;

  template <int MR, int NV>
  void init(Vec (&acc)[MR][NV]) const {
    for (int v = 0; v < NV; ++v) {
      const int64_t n = std::min<int64_t>(kLanes, cols - v * kLanes);
      const Vec b = bias != nullptr && n > 0 ? cpu::load(bias + v * kLanes, n) : Vec(0.f);
      for (int r = 0; r < MR; ++r) acc[r][v] = b;
    }
  }
  template <int MR, int NV>
  void finish(const Vec (&acc)[MR][NV]) const {
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < NV; ++v) {
        const Vec y = Gelu ? cpu::gelu<K>(acc[r][v]) : acc[r][v];
        const int64_t n = cols - v * kLanes;
        if (n >= kLanes) cpu::store(out + r * ldo + v * kLanes, y, cpu::Full{});
        else if (n > 0) cpu::store(out + r * ldo + v * kLanes, y, n);
      }
    }
  }
};

template <typename CT, typename Epilogue, int MR = kMaxRows>
cpu::TileFn<CT, Epilogue> pick_rows(int mr) {
  if constexpr (MR == 1) {
    return cpu::tile_fn<CT, 1, kPanelVecs, Epilogue>();
  } else {
    return mr == MR ? cpu::tile_fn<CT, MR, kPanelVecs, Epilogue>() : pick_rows<CT, Epilogue, MR - 1>(mr);
  }
}

// out [M, N] = act(a [M, Kp] @ panels + bias); CT the compute type of a and the panels, Kp their reduction length.
template <typename CT, typename T, bool Gelu, GeluKind K>
void run_panels(const CT* a, int64_t M, int64_t Kp, const CT* panels, int64_t P, const float* bias, T* out,
                int64_t N) {
  using Epilogue = PanelStore<T, Gelu, K>;
  // row blocks of at most kMaxRows, as even as possible (16 rows: two of 8, not 12 and 4)
  const int64_t blocks = (M + kMaxRows - 1) / kMaxRows, base = M / blocks, extra = M % blocks;
  const int64_t grain = std::max<int64_t>(1, kTaskFmas / (std::max<int64_t>(M, 4) * Kp * kPanel));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const CT* panel = panels + p * Kp * kPanel;
      const Epilogue tail_free{bias != nullptr ? bias + p * kPanel : nullptr, out + p * kPanel, N,
                               std::min(kPanel, N - p * kPanel)};
      int64_t m0 = 0;
      for (int64_t i = 0; i < blocks; ++i) {
        const int mr = static_cast<int>(base + (i < extra ? 1 : 0));
        Epilogue epi = tail_free;
        epi.out += m0 * N;
        pick_rows<CT, Epilogue>(mr)(Kp, a + m0 * Kp, Kp, panel, kPanel, epi);
        m0 += mr;
      }
    }
  });
}

template <typename CT, typename T>
void dispatch_activation(bool gelu, GeluKind kind, const CT* a, int64_t M, int64_t Kp, const CT* panels,
                         int64_t P, const float* bias, T* out, int64_t N) {
  if (!gelu) return run_panels<CT, T, false, GeluKind::Erf>(a, M, Kp, panels, P, bias, out, N);
  cpu::dispatch_gelu(kind, [&](auto tag) {
    run_panels<CT, T, true, decltype(tag)::value>(a, M, Kp, panels, P, bias, out, N);
  });
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
  TORCH_CHECK(!bf16_panels || x.scalar_type() == at::kBFloat16, op,
              ": bfloat16 panels multiply a bfloat16 x only, got x of dtype ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = out_features;
  const int64_t Kp = bf16_panels ? (K + 1) / 2 * 2 : K;
  const int64_t P = (N + kPanel - 1) / kPanel;
  TORCH_CHECK(N > 0, op, ": out_features must be positive, got ", N);
  const std::vector<int64_t> want = bf16_panels ? std::vector<int64_t>{P, Kp / 2, kPanel, 2}
                                                : std::vector<int64_t>{P, K, kPanel};
  TORCH_CHECK(panels.sizes() == at::IntArrayRef(want), op, ": panels must have shape ", at::IntArrayRef(want),
              " for x of ", K, " columns and ", N, " out_features, got ", panels.sizes());
  const GeluKind kind = parse_gelu(op, approximate);
  at::Tensor bias_f32;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    MTBF_CHECK_SAME_DEVICE("panel_linear", x, b);
    MTBF_CHECK_FLOAT_OR_BF16("panel_linear", b);
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N, op, ": bias must have shape [", N, "] (out_features), got ", b.sizes());
    bias_f32 = b.to(at::kFloat).contiguous();
  }
  const float* bias_ptr = bias_f32.defined() ? bias_f32.const_data_ptr<float>() : nullptr;
  const at::Tensor w = panels.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  if (bf16_panels) {
#ifdef MTBF_BF16_DOT
    TORCH_CHECK(cpu::cpu_has_bf16_dot(), op,
                ": bfloat16 panels need a CPU with AVX512-BF16; pack the weight as float32 panels here");
    at::Tensor a = x.contiguous();
    if (Kp != K) a = at::constant_pad_nd(a, {0, 1});
    dispatch_activation(gelu, kind, a.const_data_ptr<at::BFloat16>(), M, Kp,
                        w.const_data_ptr<at::BFloat16>(), P, bias_ptr, out.mutable_data_ptr<at::BFloat16>(), N);
#else
    TORCH_CHECK(false, op, ": bfloat16 panels need the AVX-512 build of the CPU kernels on a CPU with AVX512-BF16; "
                "pack the weight as float32 panels here");
#endif
    return out;
  }
  const at::Tensor a = x.to(at::kFloat).contiguous();
  cpu::dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_activation(gelu, kind, a.const_data_ptr<float>(), M, K, w.const_data_ptr<float>(), P, bias_ptr,
                        out.mutable_data_ptr<T>(), N);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("panel_linear", &panel_linear_cpu); }

}  // namespace mtbert_fast
