// gather_rows / scatter_rows on CUDA: whole rows copied in the widest unit (16 bytes down to 1) that the row size
// and the pointers allow, so every dtype works. Nothing is read back to the host: an index out of range is a device
// assert (it prints the op, the position and the index, and the CUDA context then reports a device-side assert on
// its next synchronisation). Repeated indices of scatter_rows are detected on the device as the rows are mapped; they
// are reported, with a readback, only when MTBERT_FAST_DEBUG_CHECKS=1 (read once); otherwise one of the repeated rows
// wins. While a CUDA graph is being captured nothing is read back even then.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "checks.h"
#include "cuda_utils.cuh"

namespace mtbert_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 128;
constexpr unsigned long long kNone = ~0ull;  // an empty flag or map slot (-1 as int64)

// MTBERT_FAST_DEBUG_CHECKS=1: checks that need a readback of device values run (read once, at the first call).
bool debug_checks() {
  static const bool on = [] {
    const char* v = std::getenv("MTBERT_FAST_DEBUG_CHECKS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

// Elements per row of a tensor whose first dim counts the rows (its numel may be 0 with rows of any size).
int64_t row_numel(const at::Tensor& t) {
  int64_t n = 1;
  for (int64_t i = 1; i < t.dim(); ++i) n *= t.size(i);
  return n;
}

// Threads per row: a power of two, up to the whole block; the block's other threads take the next rows.
int threads_per_row(int64_t units) {
  int tpr = 1;
  while (tpr < kThreads && tpr < units) tpr *= 2;
  return tpr;
}

template <typename U>
__device__ __forceinline__ void copy_row(const U* __restrict__ src, U* __restrict__ dst, int64_t units, int lane,
                                         int tpr) {
  for (int64_t u = lane; u < units; u += tpr) dst[u] = src[u];
}

template <typename U>
__device__ __forceinline__ void zero_row(U* __restrict__ dst, int64_t units, int lane, int tpr) {
  for (int64_t u = lane; u < units; u += tpr) dst[u] = U{};
}

template <typename U>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(
    const U* __restrict__ x,            // [R, units]
    const int64_t* __restrict__ index,  // [N]
    U* __restrict__ out,                // [N, units]
    int64_t N,
    int64_t R,
    int64_t units,
    int tpr) {
  const int rows_per_block = kThreads / tpr;
  const int lane = threadIdx.x % tpr;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(rows_per_block) + threadIdx.x / tpr; i < N;
       i += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t r = index[i];
    if (r < 0 || r >= R) {
      if (lane == 0) {
        printf("gather_rows: indices[%lld] = %lld is out of range for x with %lld rows\n", static_cast<long long>(i),
               static_cast<long long>(r), static_cast<long long>(R));
      }
      CUDA_KERNEL_ASSERT(r >= 0 && r < R && "gather_rows: an index of indices is out of range for x");
      zero_row(out + i * units, units, lane, tpr);  // where device asserts are compiled out
    } else {
      copy_row(x + r * units, out + i * units, units, lane, tpr);
    }
  }
}

// source[r] = the position i with index[i] == r (an index out of range is a device assert); where `repeated` is
// given, it gets the first position that lost the race for a row already taken (a repeated index).
__global__ void scatter_map_kernel(
    const int64_t* __restrict__ index,   // [N]
    int64_t N,
    int64_t num_rows,
    unsigned long long* __restrict__ source,     // [num_rows], kNone where no index points
    unsigned long long* __restrict__ repeated) {  // [1] or nullptr
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = index[i];
    if (r < 0 || r >= num_rows) {
      printf("scatter_rows: indices[%lld] = %lld is out of range for num_rows = %lld\n", static_cast<long long>(i),
             static_cast<long long>(r), static_cast<long long>(num_rows));
      CUDA_KERNEL_ASSERT(r >= 0 && r < num_rows && "scatter_rows: an index of indices is out of range for num_rows");
    } else if (atomicCAS(&source[r], kNone, static_cast<unsigned long long>(i)) != kNone && repeated != nullptr) {
      atomicMin(repeated, static_cast<unsigned long long>(i));
    }
  }
}

// Writes every output row once, from its source row or as zeros, so the output is not zero-filled first.
template <typename U>
__global__ void __launch_bounds__(kThreads) scatter_rows_kernel(
    const U* __restrict__ x,                        // [N, units]
    const unsigned long long* __restrict__ source,  // [num_rows]
    U* __restrict__ out,                            // [num_rows, units]
    int64_t num_rows,
    int64_t units,
    int tpr) {
  const int rows_per_block = kThreads / tpr;
  const int lane = threadIdx.x % tpr;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(rows_per_block) + threadIdx.x / tpr; r < num_rows;
       r += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const unsigned long long s = source[r];
    if (s == kNone) {
      zero_row(out + r * units, units, lane, tpr);
    } else {
      copy_row(x + static_cast<int64_t>(s) * units, out + r * units, units, lane, tpr);
    }
  }
}

// Calls f(U{}) with the widest unsigned type that divides the row and to which every pointer is aligned.
template <typename F>
void dispatch_unit(int64_t row_bytes, const void* a, const void* b, const F& f) {
  if (row_bytes % 16 == 0 && aligned_to(16, a, b)) return f(uint4{});
  if (row_bytes % 8 == 0 && aligned_to(8, a, b)) return f(uint2{});
  if (row_bytes % 4 == 0 && aligned_to(4, a, b)) return f(uint32_t{});
  if (row_bytes % 2 == 0 && aligned_to(2, a, b)) return f(uint16_t{});
  f(uint8_t{});
}

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

void check_rows_args(const char* op, const at::Tensor& x, const at::Tensor& indices) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(indices.device() == x.device(), op, ": indices is on ", indices.device(), " but x is on ", x.device());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got shape ", x.sizes());
  TORCH_CHECK(indices.dim() == 1, op, ": indices must have 1 dim, got shape ", indices.sizes());
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be Long (int64), got ", indices.scalar_type());
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& indices) {
  check_rows_args("gather_rows", x, indices);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = indices.contiguous();
  const int64_t R = x.size(0);
  const int64_t N = indices.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = N;
  at::Tensor out = at::empty(sizes, x.options());
  if (N == 0) return out;
  const int64_t row_bytes = row_numel(x) * x.element_size();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_unit(row_bytes, xc.const_data_ptr(), out.const_data_ptr(), [&](auto unit) {
    using U = decltype(unit);
    const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
    const int tpr = threads_per_row(units);
    gather_rows_kernel<U><<<grid_for(N * tpr, kThreads), kThreads, 0, stream>>>(
        static_cast<const U*>(xc.const_data_ptr()), ic.const_data_ptr<int64_t>(),
        static_cast<U*>(out.mutable_data_ptr()), N, R, units, tpr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& x, const at::Tensor& indices, int64_t num_rows) {
  check_rows_args("scatter_rows", x, indices);
  MTBF_CHECK_SIZE("scatter_rows", indices, 0, x.size(0));
  TORCH_CHECK(num_rows >= 0, "scatter_rows: num_rows must be >= 0, got ", num_rows);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = indices.contiguous();
  const int64_t N = x.size(0);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes[0] = num_rows;
  at::Tensor out = at::empty(sizes, x.options());
  if (N == 0 && num_rows == 0) return out;
  at::Tensor source = at::full({num_rows}, -1, indices.options());
  auto* source_p = reinterpret_cast<unsigned long long*>(source.mutable_data_ptr<int64_t>());
  const bool check_repeated = N > 0 && debug_checks() && !capturing();
  at::Tensor repeated;
  if (check_repeated) repeated = at::full({1}, -1, indices.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (N > 0) {
    scatter_map_kernel<<<grid_for(N, kThreads), kThreads, 0, stream>>>(
        ic.const_data_ptr<int64_t>(), N, num_rows, source_p,
        check_repeated ? reinterpret_cast<unsigned long long*>(repeated.mutable_data_ptr<int64_t>()) : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (num_rows > 0) {
    const int64_t row_bytes = row_numel(x) * x.element_size();
    dispatch_unit(row_bytes, xc.const_data_ptr(), out.const_data_ptr(), [&](auto unit) {
      using U = decltype(unit);
      const int64_t units = row_bytes / static_cast<int64_t>(sizeof(U));
      const int tpr = threads_per_row(units);
      scatter_rows_kernel<U><<<grid_for(num_rows * tpr, kThreads), kThreads, 0, stream>>>(
          static_cast<const U*>(xc.const_data_ptr()), source_p, static_cast<U*>(out.mutable_data_ptr()), num_rows,
          units, tpr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (check_repeated) {
    // MTBERT_FAST_DEBUG_CHECKS=1 only: reads the flag back (a synchronisation)
    const int64_t first = repeated.item<int64_t>();
    if (first >= 0) {
      const int64_t r = ic[first].item<int64_t>();
      const int64_t other = source[r].item<int64_t>();
      TORCH_CHECK(false, "scatter_rows: indices must be distinct, but indices[", std::min(first, other),
                  "] and indices[", std::max(first, other), "] are both ", r);
    }
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace mtbert_fast
