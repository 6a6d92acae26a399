// int8_panel_sums: the exact integer sums q @ w^T of uint8 rows q [M, K] with an int8 weight w [N, K] packed into
// panels (int8_tiles.h), CPU: a few rows, or any number where the CPU has AVX512-VNNI.
//
// A thread takes whole panels and runs every row block of q over a panel while it sits in its cache, so each weight
// is read once per call, as panel_linear does for float weights. oneDNN's int8 linear is blocked for many rows; at
// one row it runs at a twentieth of its full rate and at 16 rows at a half (on an AVX2 EPYC), where these panels
// keep most of it.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "int8_tiles.h"

namespace mtbert_fast {
namespace {

using namespace cpu::int8;

at::Tensor int8_panel_sums_cpu(const at::Tensor& q, const at::Tensor& panels, int64_t out_features) {
  constexpr const char* op = "int8_panel_sums";
  MTBF_CHECK_DEVICE_TYPE("int8_panel_sums", q, c10::DeviceType::CPU);
  MTBF_CHECK_DIM("int8_panel_sums", q, 2);
  MTBF_CHECK_DTYPE("int8_panel_sums", q, at::kByte);
  const int64_t M = q.size(0), N = out_features;
  TORCH_CHECK(N > 0, op, ": out_features must be positive, got ", N);
  check_panels(op, q, panels, N);
  at::Tensor out = at::empty({M, N}, q.options().dtype(at::kInt));
  if (M == 0) return out;
  const int64_t K4 = panels.size(1);
  const bool tiles = on_tiles(M, K4);  // asked once: the copy below and the kernel go by the same answer
  const at::Tensor a = grouped_rows(q, RowBlocks(M).most(), tiles), w = panels.contiguous();
  run_panels(a.const_data_ptr<uint8_t>(), M, a.stride(0), K4, w.const_data_ptr<int8_t>(), panels.size(0),
             out.mutable_data_ptr<int32_t>(), N, tiles);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("int8_panel_sums", &int8_panel_sums_cpu); }

}  // namespace mtbert_fast
