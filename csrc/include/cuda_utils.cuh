// Shared pieces of the CUDA kernels: input checks that name the tensor, the dtype and GELU switches, fp32 loads and
// stores of 1 to 8 elements at once (one 128-bit access for 8 fp16/bf16 or 4 fp32, two for 8 fp32), warp and block
// sums, and the two GELU forms with their derivatives.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <type_traits>

#include "checks.h"

#define MTBF_CHECK_CUDA(op, t) \
  TORCH_CHECK((t).is_cuda(), op ": " #t " must be a CUDA tensor, got one on ", (t).device())

#define MTBF_CHECK_CUDA_FLOATING(op, t)                                                                      \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||                          \
                  (t).scalar_type() == at::kBFloat16,                                                       \
              op ": " #t " must be float32, float16 or bfloat16, got ", (t).scalar_type())

namespace mtbert_fast::cuda {

// Calls f(T{}) with T = float, at::Half or at::BFloat16 for the tensors' dtype (checked by the caller).
template <typename F>
inline void dispatch_floating(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: f(float{}); break;
  }
}

template <GeluKind K>
using GeluTag = std::integral_constant<GeluKind, K>;

// Calls f(GeluTag<K>{}) so that the GELU form is a compile-time constant inside the kernels.
template <typename F>
inline void dispatch_gelu(GeluKind kind, const F& f) {
  if (kind == GeluKind::Erf) {
    f(GeluTag<GeluKind::Erf>{});
  } else {
    f(GeluTag<GeluKind::Tanh>{});
  }
}

// Whether every pointer is aligned to `bytes`.
template <typename... P>
inline bool aligned_to(int64_t bytes, const P*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % bytes == 0) && ...);
}

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Blocks for a grid-stride loop over `work` items, `threads` per block: enough to fill the GPU a few times over.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t wanted = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(num_sms()) * 32;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(wanted, cap)));
}

// VEC elements of T moved as one access (16 bytes for 8 fp16/bf16 or 4 fp32); the address must be aligned to it.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Moves VEC elements as few accesses of at most 16 bytes (8 fp32 weights beside 8 fp16 activations: two accesses);
// the address must be aligned to min(16, sizeof(T) * VEC) bytes.
template <typename T, int VEC>
constexpr int vec_chunk() {
  return sizeof(T) * VEC <= 16 ? VEC : static_cast<int>(16 / sizeof(T));
}

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  constexpr int kChunk = vec_chunk<T, VEC>();
  static_assert(VEC % kChunk == 0, "VEC must be a multiple of the 16-byte chunk");
#pragma unroll
  for (int c = 0; c < VEC; c += kChunk) {
    const Pack<T, kChunk> pk = *reinterpret_cast<const Pack<T, kChunk>*>(p + c);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[c + i] = static_cast<float>(pk.v[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[VEC]) {
  constexpr int kChunk = vec_chunk<T, VEC>();
  static_assert(VEC % kChunk == 0, "VEC must be a multiple of the 16-byte chunk");
#pragma unroll
  for (int c = 0; c < VEC; c += kChunk) {
    Pack<T, kChunk> pk;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) pk.v[i] = static_cast<T>(in[c + i]);
    *reinterpret_cast<Pack<T, kChunk>*>(p + c) = pk;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sums of a and b over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread. Every
// thread must call it; it may be called again right away (the leading barrier protects the scratch).
__device__ __forceinline__ float2 block_sum2(float a, float b) {
  __shared__ float2 scratch[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();
  if (lane == 0) scratch[warp] = make_float2(a, b);
  __syncthreads();
  float2 t = lane < warps ? scratch[lane] : make_float2(0.f, 0.f);
  t.x = warp_sum(t.x);
  t.y = warp_sum(t.y);
  return t;
}

__device__ __forceinline__ float block_sum(float a) { return block_sum2(a, 0.f).x; }

// ---- GELU ----
// erf:  x Phi(x), Phi(x) = erfc(-x / sqrt 2) / 2 (no cancellation in the negative tail); d/dx = Phi(x) + x phi(x)
// tanh: 0.5 x (1 + tanh(k (x + c x^3))) = x s(u), s the logistic sigmoid, u = 2k (x + c x^3);
//       d/dx = s + x s (1 - s) u',  u' = 2k (1 + 3c x^2)

constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;
constexpr float kTanhK2 = 2.f * 0.7978845608028654f;  // 2 sqrt(2 / pi)
constexpr float kTanhC = 0.044715f;

// 1 / (1 + e^-u): e^-u overflows to inf for very negative u, and 1 / inf = 0 is the right limit.
__device__ __forceinline__ float sigmoid(float u) { return 1.f / (1.f + __expf(-u)); }

template <GeluKind K>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (K == GeluKind::Erf) {
    return x * 0.5f * erfcf(-x * kSqrtHalf);
  } else {
    return x * sigmoid(kTanhK2 * x * fmaf(kTanhC, x * x, 1.f));
  }
}

template <GeluKind K>
__device__ __forceinline__ void gelu_and_grad(float x, float& y, float& dy) {
  if constexpr (K == GeluKind::Erf) {
    const float cdf = 0.5f * erfcf(-x * kSqrtHalf);
    y = x * cdf;
    dy = fmaf(x * kInvSqrt2Pi, __expf(-0.5f * x * x), cdf);
  } else {
    const float x2 = x * x;
    const float s = sigmoid(kTanhK2 * x * fmaf(kTanhC, x2, 1.f));
    y = x * s;
    dy = fmaf(y * (1.f - s), kTanhK2 * fmaf(3.f * kTanhC, x2, 1.f), s);
  }
}

}  // namespace mtbert_fast::cuda
