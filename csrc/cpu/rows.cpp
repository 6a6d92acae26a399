// gather_rows / scatter_rows on the CPU: whole rows moved with memcpy, so every dtype works. Indices are checked
// before any row moves, and a bad one is named in the error.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"

namespace mtbert_fast {
namespace {

// Bytes per parallel task: enough that a thread's start costs little next to its copies.
constexpr int64_t kGrainBytes = 1 << 17;

int64_t row_grain_bytes(int64_t row_bytes) { return std::max<int64_t>(1, kGrainBytes / std::max<int64_t>(row_bytes, 1)); }

// Elements per row of a tensor whose first dim counts the rows (its numel may be 0 with rows of any size).
int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 1; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

void gather_rows_kernel(
    const char* x,          // [R, row_bytes]
    const int64_t* index,   // [N]
    char* out,              // [N, row_bytes]
    int64_t N,
    int64_t row_bytes) {
  at::parallel_for(0, N, row_grain_bytes(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::memcpy(out + i * row_bytes, x + index[i] * row_bytes, row_bytes);
  });
}

// Writes every output row once, either from its source row or as zeros, so the output is not zero-filled first.
void scatter_rows_kernel(
    const char* x,          // [N, row_bytes]
    const int64_t* source,  // [num_rows]: row of x for each output row, -1 where none
    char* out,              // [num_rows, row_bytes]
    int64_t num_rows,
    int64_t row_bytes) {
  at::parallel_for(0, num_rows, row_grain_bytes(row_bytes), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (source[r] >= 0) {
        std::memcpy(out + r * row_bytes, x + source[r] * row_bytes, row_bytes);
      } else {
        std::memset(out + r * row_bytes, 0, row_bytes);
      }
    }
  });
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& indices) {
  MTBF_CHECK_DEVICE_TYPE("gather_rows", x, at::kCPU);
  MTBF_CHECK_DEVICE_TYPE("gather_rows", indices, at::kCPU);
  MTBF_CHECK_MIN_DIM("gather_rows", x, 1);
  MTBF_CHECK_DIM("gather_rows", indices, 1);
  MTBF_CHECK_DTYPE("gather_rows", indices, at::kLong);

  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = indices.contiguous();
  const int64_t R = x.size(0);
  const int64_t N = indices.size(0);
  const int64_t* index = ic.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK_VALUE(index[i] >= 0 && index[i] < R, "gather_rows: indices[", i, "] = ", index[i],
                      " is out of range for x with ", R, " rows (shape ", x.sizes(), ")");
  }

  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = N;
  at::Tensor out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  gather_rows_kernel(static_cast<const char*>(xc.const_data_ptr()), index, static_cast<char*>(out.mutable_data_ptr()),
                     N, row_numel(x) * x.element_size());
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows) {
  MTBF_CHECK_DEVICE_TYPE("scatter_rows", x, at::kCPU);
  MTBF_CHECK_DEVICE_TYPE("scatter_rows", indices, at::kCPU);
  MTBF_CHECK_MIN_DIM("scatter_rows", x, 1);
  MTBF_CHECK_DIM("scatter_rows", indices, 1);
  MTBF_CHECK_DTYPE("scatter_rows", indices, at::kLong);
  MTBF_CHECK_SIZE("scatter_rows", indices, 0, x.size(0));
  TORCH_CHECK(num_rows >= 0, "scatter_rows: num_rows must be >= 0, got ", num_rows);

  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = indices.contiguous();
  const int64_t N = x.size(0);
  const int64_t* index = ic.const_data_ptr<int64_t>();
  // The inverse map also finds repeated indices, whose rows would race for one output row.
  std::vector<int64_t> source(num_rows, -1);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t r = index[i];
    TORCH_CHECK_VALUE(r >= 0 && r < num_rows, "scatter_rows: indices[", i, "] = ", r,
                      " is out of range for num_rows = ", num_rows);
    TORCH_CHECK_VALUE(source[r] < 0, "scatter_rows: indices must be distinct, but indices[", source[r],
                      "] and indices[", i, "] are both ", r);
    source[r] = i;
  }

  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = num_rows;
  at::Tensor out = at::empty(sizes, x.options());
  if (out.numel() == 0) return out;
  scatter_rows_kernel(static_cast<const char*>(xc.const_data_ptr()), source.data(),
                      static_cast<char*>(out.mutable_data_ptr()), num_rows, row_numel(x) * x.element_size());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace mtbert_fast
