// GELU(a) * g over the halves [a | g] of each row, and its input gradient, on CUDA: one thread per output element,
// grid-stride, fp32 math.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cuda_utils.cuh"

namespace mtbert_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;

template <typename T, GeluKind K>
__global__ void __launch_bounds__(kThreads) geglu_kernel(
    const T* __restrict__ x,  // [N, 2I]
    T* __restrict__ out,      // [N, I]
    int64_t numel,            // N * I
    int64_t I) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < numel;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / I;
    const int64_t i = k - row * I;
    const T* a = x + row * 2 * I;
    out[k] = static_cast<T>(gelu<K>(static_cast<float>(a[i])) * static_cast<float>(a[I + i]));
  }
}

template <typename T, GeluKind K>
__global__ void __launch_bounds__(kThreads) geglu_backward_kernel(
    const T* __restrict__ grad_out,  // [N, I]
    const T* __restrict__ x,         // [N, 2I]
    T* __restrict__ grad_x,          // [N, 2I]
    int64_t numel,                   // N * I
    int64_t I) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < numel;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = k / I;
    const int64_t i = k - row * I;
    const int64_t a = row * 2 * I + i;
    float y, dy;
    gelu_and_grad<K>(static_cast<float>(x[a]), y, dy);
    const float g = static_cast<float>(grad_out[k]);
    grad_x[a] = static_cast<T>(g * static_cast<float>(x[a + I]) * dy);
    grad_x[a + I] = static_cast<T>(g * y);
  }
}

at::Tensor geglu_cuda(const at::Tensor& x, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("geglu", approximate);
  const std::vector<int64_t> shape = check_geglu_args("geglu", c10::DeviceType::CUDA, x);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(shape, xc.options());
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const int64_t I = shape.back();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      geglu_kernel<T, decltype(k)::value><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          xc.const_data_ptr<T>(), out.mutable_data_ptr<T>(), numel, I);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor geglu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("geglu_backward", approximate);
  const int64_t I = check_geglu_args("geglu_backward", c10::DeviceType::CUDA, x, &grad_out).back();
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const int64_t numel = gc.numel();
  if (numel == 0) return grad_x;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      geglu_backward_kernel<T, decltype(k)::value><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(
          gc.const_data_ptr<T>(), xc.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(), numel, I);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) {
  m.impl("geglu", &geglu_cuda);
  m.impl("geglu_backward", &geglu_backward_cuda);
}

}  // namespace mtbert_fast
