// Rotary position embeddings on the query and key heads of a packed qkv, on CUDA: one thread per (token, head, pair
// (i, i + D/2)), grid-stride, fp32 math; the value heads are copied. Raising on an out-of-range position would need a
// device sync (the Python wrapper checks positions where that is cheap): such a token's query and key come out NaN.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"

namespace mtbert_fast {
namespace {

using namespace cuda;

constexpr int kThreads = 256;

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads) rotary_kernel(
    const T* __restrict__ qkv,        // [N, 3, H, D]
    const float* __restrict__ cos,    // [P, D/2]
    const float* __restrict__ sin,    // [P, D/2]
    const I* __restrict__ positions,  // [N]
    T* __restrict__ out,              // [N, 3, H, D]
    int64_t pairs,                    // N * 3H * D/2
    int64_t P,                        // rows of cos and sin
    int64_t H,
    int64_t half,
    float sign) {                     // -1: rotate by the negative angles
  const int64_t per_token = 3 * H * half;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < pairs;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = k / per_token;
    const int64_t rem = k - t * per_token;
    const int64_t h = rem / half;
    const int64_t i = rem - h * half;
    const int64_t base = (t * 3 * H + h) * 2 * half;
    const float x1 = static_cast<float>(qkv[base + i]);
    const float x2 = static_cast<float>(qkv[base + half + i]);
    if (h < 2 * H) {
      const int64_t p = static_cast<int64_t>(positions[t]);
      const bool valid = p >= 0 && p < P;
      const float c = valid ? cos[p * half + i] : NAN;
      const float s = valid ? sign * sin[p * half + i] : NAN;
      out[base + i] = static_cast<T>(x1 * c - x2 * s);
      out[base + half + i] = static_cast<T>(x2 * c + x1 * s);
    } else {
      out[base + i] = qkv[base + i];
      out[base + half + i] = qkv[base + half + i];
    }
  }
}

at::Tensor rotary_qk_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                          const at::Tensor& positions, bool inverse) {
  check_rotary_qk_args(c10::DeviceType::CUDA, qkv, cos, sin, positions);
  const int64_t N = qkv.size(0), H = qkv.size(2), D = qkv.size(3);

  const at::cuda::OptionalCUDAGuard device_guard(device_of(qkv));
  const at::Tensor xc = qkv.contiguous();
  const at::Tensor cc = cos.contiguous();
  const at::Tensor sc = sin.contiguous();
  const at::Tensor pc = positions.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t pairs = N * 3 * H * (D / 2);
  if (pairs == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_floating(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AT_DISPATCH_INDEX_TYPES(pc.scalar_type(), "rotary_qk", [&] {
      rotary_kernel<T, index_t><<<grid_for(pairs, kThreads), kThreads, 0, stream>>>(
          xc.const_data_ptr<T>(), cc.const_data_ptr<float>(), sc.const_data_ptr<float>(), pc.const_data_ptr<index_t>(),
          out.mutable_data_ptr<T>(), pairs, cos.size(0), H, D / 2, inverse ? -1.f : 1.f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) { m.impl("rotary_qk", &rotary_qk_cuda); }

}  // namespace mtbert_fast
