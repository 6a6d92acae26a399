// GELU(x + bias) and its backward on CUDA: elementwise, grid-stride, 128-bit loads and stores when every row
// starts 16-byte aligned (D a multiple of the vector, aligned pointers), one element at a time otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"

namespace mtbert_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;

template <typename T, int VEC, GeluKind K>
__global__ void __launch_bounds__(kThreads) bias_gelu_kernel(
    const T* __restrict__ x,     // [N, D]
    const T* __restrict__ bias,  // [D]
    T* __restrict__ out,         // [N, D]
    int64_t vectors,             // N * D / VEC
    int64_t D) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC;
    float a[VEC], b[VEC];
    load_vec<T, VEC>(x + i, a);
    load_vec<T, VEC>(bias + i % D, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = gelu<K>(a[k] + b[k]);
    store_vec<T, VEC>(out + i, a);
  }
}

template <typename T, int VEC, GeluKind K>
__global__ void __launch_bounds__(kThreads) bias_gelu_backward_kernel(
    const T* __restrict__ grad_out,  // [N, D]
    const T* __restrict__ x,         // [N, D]
    const T* __restrict__ bias,      // [D]
    T* __restrict__ grad_x,          // [N, D]
    int64_t vectors,                 // N * D / VEC
    int64_t D) {
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < vectors;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = v * VEC;
    float a[VEC], b[VEC], g[VEC];
    load_vec<T, VEC>(x + i, a);
    load_vec<T, VEC>(bias + i % D, b);
    load_vec<T, VEC>(grad_out + i, g);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float y, dy;
      gelu_and_grad<K>(a[k] + b[k], y, dy);
      g[k] *= dy;
    }
    store_vec<T, VEC>(grad_x + i, g);
  }
}

// 16 bytes per access where D keeps every row aligned, else one element.
template <typename T>
int vector_width(int64_t D, const void* a, const void* b, const void* c, const void* d = nullptr) {
  constexpr int kVec = 16 / sizeof(T);
  const bool ok = D % kVec == 0 && aligned_to(16, a, b, c) && (d == nullptr || aligned_to(16, d));
  return ok ? kVec : 1;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& bias) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(bias.is_cuda(), op, ": bias must be a CUDA tensor, got one on ", bias.device());
  TORCH_CHECK(x.device() == bias.device(), op, ": bias is on ", bias.device(), " but x is on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), op, ": bias has dtype ", bias.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got shape ", x.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(-1), op, ": bias must have shape [", x.size(-1),
              "] (x's last dim), got ", bias.sizes());
}

at::Tensor bias_gelu_cuda(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu", approximate);
  check_inputs("bias_gelu", x, bias);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t numel = xc.numel();
  const int64_t D = x.size(-1);
  if (numel == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* xp = xc.const_data_ptr<T>();
    const T* bp = bc.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    const int vec = vector_width<T>(D, xp, bp, op);
    dispatch_gelu(kind, [&](auto k) {
      constexpr GeluKind K = decltype(k)::value;
      if (vec > 1) {
        constexpr int V = 16 / sizeof(T);
        bias_gelu_kernel<T, V, K><<<grid_for(numel / V, kThreads), kThreads, 0, stream>>>(xp, bp, op, numel / V, D);
      } else {
        bias_gelu_kernel<T, 1, K><<<grid_for(numel, kThreads), kThreads, 0, stream>>>(xp, bp, op, numel, D);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor bias_gelu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& bias,
                                   c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu_backward", approximate);
  check_inputs("bias_gelu_backward", x, bias);
  MTBF_CHECK_CUDA("bias_gelu_backward", grad_out);
  MTBF_CHECK_SAME_DEVICE("bias_gelu_backward", x, grad_out);
  MTBF_CHECK_SAME_DTYPE("bias_gelu_backward", x, grad_out);
  MTBF_CHECK_SAME_SHAPE("bias_gelu_backward", x, grad_out);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  const int64_t numel = xc.numel();
  const int64_t D = x.size(-1);
  if (numel == 0) return grad_x;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* gp = gc.const_data_ptr<T>();
    const T* xp = xc.const_data_ptr<T>();
    const T* bp = bc.const_data_ptr<T>();
    T* op = grad_x.mutable_data_ptr<T>();
    const int vec = vector_width<T>(D, xp, bp, op, gp);
    dispatch_gelu(kind, [&](auto k) {
      constexpr GeluKind K = decltype(k)::value;
      if (vec > 1) {
        constexpr int V = 16 / sizeof(T);
        bias_gelu_backward_kernel<T, V, K>
            <<<grid_for(numel / V, kThreads), kThreads, 0, stream>>>(gp, xp, bp, op, numel / V, D);
      } else {
        bias_gelu_backward_kernel<T, 1, K>
            <<<grid_for(numel, kThreads), kThreads, 0, stream>>>(gp, xp, bp, op, numel, D);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) {
  m.impl("bias_gelu", &bias_gelu_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}

}  // namespace mtbert_fast
