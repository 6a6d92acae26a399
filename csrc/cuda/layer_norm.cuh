// Row LayerNorm on CUDA, shared by bias_residual_layer_norm and bias_gelu_layer_norm: a `Rows` producer gives the
// fp32 pre-norm values s of a row (x + bias + residual, or GELU(x + bias)) and, for the backward, ds/dx.
//
// Forward: one block per row. On the fast path the row sits in registers (ITEMS vectors of VEC elements per thread,
// 128-bit loads); mean and variance are two block sums over the registers (two passes: no E[s^2] - mean^2
// cancellation; the second also sums the deviations from the first mean, whose rounding it corrects, so a constant
// row normalizes to exactly beta). Rows that are unaligned (D not a multiple of the vector) or too long for the registers take the
// generic kernel, which re-reads the row (from L1/L2) instead of keeping it.
//
// Backward: xhat = (s - mean) * rstd, g = grad_out * weight, grad_s = rstd * (g - mean(g) - xhat * mean(g * xhat)).
// Each block takes a fixed run of rows (the run length depends on N only) and writes its partial sums of
// grad_out * xhat and grad_out to partial [blocks, 2, D]; a second kernel adds the blocks up column by column in a
// fixed order, so grad_weight and grad_beta are the same from run to run (no atomics).
//
// Dtypes: the activations (x, bias, residual, grad_out, out, grad_in) are T (fp32, bf16 or fp16); weight and beta
// are W, which is T or fp32 (fp32 LayerNorm parameters beside fp16/bf16 activations, as mixed-precision training
// keeps them). grad_weight and grad_beta are W, summed in fp32 and rounded once, to W.
#pragma once

#include <algorithm>
#include <climits>
#include <initializer_list>
#include <type_traits>

#include "cuda_utils.cuh"

namespace mtbert_fast::cuda {

constexpr int kLnMaxThreads = 512;
constexpr int kLnMaxElemsPerThread = 16;
constexpr int kLnTargetBackwardBlocks = 2048;

template <typename T>
struct BiasResidualRows {
  const T* __restrict__ x;         // [N, D]
  const T* __restrict__ bias;      // [D]
  const T* __restrict__ residual;  // [N, D]
  static constexpr bool kHasGrad = false;

  template <int VEC>
  __device__ __forceinline__ void values(int64_t offset, int64_t col, float (&s)[VEC]) const {
    float b[VEC], r[VEC];
    load_vec<T, VEC>(x + offset + col, s);
    load_vec<T, VEC>(bias + col, b);
    load_vec<T, VEC>(residual + offset + col, r);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = s[k] + b[k] + r[k];
  }

  template <int VEC>
  __device__ __forceinline__ void values_and_grads(int64_t offset, int64_t col, float (&s)[VEC],
                                                   float (&)[VEC]) const {
    values<VEC>(offset, col, s);
  }
};

template <typename T, GeluKind K>
struct BiasGeluRows {
  const T* __restrict__ x;     // [N, D]
  const T* __restrict__ bias;  // [D]
  static constexpr bool kHasGrad = true;

  template <int VEC>
  __device__ __forceinline__ void values(int64_t offset, int64_t col, float (&s)[VEC]) const {
    float b[VEC];
    load_vec<T, VEC>(x + offset + col, s);
    load_vec<T, VEC>(bias + col, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) s[k] = gelu<K>(s[k] + b[k]);
  }

  template <int VEC>
  __device__ __forceinline__ void values_and_grads(int64_t offset, int64_t col, float (&s)[VEC],
                                                   float (&ds)[VEC]) const {
    float b[VEC];
    load_vec<T, VEC>(x + offset + col, s);
    load_vec<T, VEC>(bias + col, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) gelu_and_grad<K>(s[k] + b[k], s[k], ds[k]);
  }
};

// ---- arguments ----

// weight and beta (and in the backward, weight alone): [D] vectors on x's device, of one dtype W that is x's dtype or
// float32; anything else is refused, naming the tensor. (bias, residual and grad_out are checked as x's dtype by
// check_layer_norm_args.) Returns whether W is float32 while x is not.
inline bool check_ln_params(const char* op, const at::Tensor& x, int64_t D, std::initializer_list<NamedTensor> params) {
  const NamedTensor* first = nullptr;
  for (const NamedTensor& a : params) {
    TORCH_CHECK(a.t.device() == x.device(), op, ": ", a.name, " is on ", a.t.device(), " but x is on ", x.device());
    TORCH_CHECK(a.t.dim() == 1, op, ": ", a.name, " must have 1 dims, got shape ", a.t.sizes());
    TORCH_CHECK(a.t.size(0) == D, op, ": ", a.name, ".size(0) must be ", D, ", got shape ", a.t.sizes());
    TORCH_CHECK(a.t.scalar_type() == x.scalar_type() || a.t.scalar_type() == at::kFloat, op, ": ", a.name,
                " has dtype ", a.t.scalar_type(), " but x has ", x.scalar_type(),
                "; the LayerNorm weight and beta must be x's dtype or float32");
    if (first == nullptr) {
      first = &a;
    } else {
      TORCH_CHECK(a.t.scalar_type() == first->t.scalar_type(), op, ": ", a.name, " has dtype ", a.t.scalar_type(),
                  " but ", first->name, " has ", first->t.scalar_type(), "; weight and beta must share one dtype");
    }
  }
  return first != nullptr && first->t.scalar_type() == at::kFloat && x.scalar_type() != at::kFloat;
}

// Calls f(T{}, W{}) with T the activations' dtype and W the parameters' (T, or float where fp32_params).
template <typename F>
inline void dispatch_ln_types(at::ScalarType x_dtype, bool fp32_params, const F& f) {
  dispatch_floating(x_dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      f(t, float{});
    } else if (fp32_params) {
      f(t, float{});
    } else {
      f(t, T{});
    }
  });
}

// ---- forward ----

template <typename T, typename W, int VEC, int ITEMS, class Rows>
__global__ void __launch_bounds__(kLnMaxThreads) ln_forward_kernel(
    Rows rows,
    const W* __restrict__ weight,  // [D]
    const W* __restrict__ beta,    // [D]
    float eps,
    T* __restrict__ out,           // [N, D]
    float* __restrict__ mean,      // [N]
    float* __restrict__ rstd,      // [N]
    int64_t N,
    int64_t D) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t offset = row * D;
    float s[ITEMS][VEC];
    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
      if (col < D) {
        rows.template values<VEC>(offset, col, s[it]);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += s[it][k];
      }
    }
    const float mu0 = block_sum(sum) * inv_d;
    float sc = 0.f, sq = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
      if (col < D) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float c = s[it][k] - mu0;
          sc += c;
          sq = fmaf(c, c, sq);
        }
      }
    }
    const float2 dev = block_sum2(sc, sq);
    const float shift = dev.x / static_cast<float>(D);
    const float mu = mu0 + shift;
    const float rs = rsqrtf(fmaxf(dev.y * inv_d - shift * shift, 0.f) + eps);
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
      if (col < D) {
        float w[VEC], b[VEC];
        load_vec<W, VEC>(weight + col, w);
        load_vec<W, VEC>(beta + col, b);
#pragma unroll
        for (int k = 0; k < VEC; ++k) w[k] = fmaf((s[it][k] - mu) * rs, w[k], b[k]);
        store_vec<T, VEC>(out + offset + col, w);
      }
    }
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

template <typename T, typename W, class Rows>
__global__ void __launch_bounds__(kLnMaxThreads) ln_forward_generic_kernel(
    Rows rows,
    const W* __restrict__ weight,  // [D]
    const W* __restrict__ beta,    // [D]
    float eps,
    T* __restrict__ out,           // [N, D]
    float* __restrict__ mean,      // [N]
    float* __restrict__ rstd,      // [N]
    int64_t N,
    int64_t D) {
  const float inv_d = 1.f / static_cast<float>(D);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const int64_t offset = row * D;
    float sum = 0.f;
    for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
      float s[1];
      rows.template values<1>(offset, col, s);
      sum += s[0];
    }
    const float mu0 = block_sum(sum) * inv_d;
    float sc = 0.f, sq = 0.f;
    for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
      float s[1];
      rows.template values<1>(offset, col, s);
      const float c = s[0] - mu0;
      sc += c;
      sq = fmaf(c, c, sq);
    }
    const float2 dev = block_sum2(sc, sq);
    const float shift = dev.x / static_cast<float>(D);
    const float mu = mu0 + shift;
    const float rs = rsqrtf(fmaxf(dev.y * inv_d - shift * shift, 0.f) + eps);
    for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
      float s[1];
      rows.template values<1>(offset, col, s);
      out[offset + col] =
          static_cast<T>(fmaf((s[0] - mu) * rs, static_cast<float>(weight[col]), static_cast<float>(beta[col])));
    }
    if (threadIdx.x == 0) {
      mean[row] = mu;
      rstd[row] = rs;
    }
  }
}

// ---- backward ----

template <typename T, typename W, int VEC, int ITEMS, class Rows>
__global__ void __launch_bounds__(kLnMaxThreads) ln_backward_kernel(
    Rows rows,
    const T* __restrict__ grad_out,  // [N, D]
    const W* __restrict__ weight,    // [D]
    const float* __restrict__ mean,  // [N]
    const float* __restrict__ rstd,  // [N]
    T* __restrict__ grad_in,         // [N, D]: grad of s, times ds/dx where Rows has it
    float* __restrict__ partial,     // [gridDim.x, 2, D]
    int64_t N,
    int64_t D,
    int64_t rows_per_block) {
  const float inv_d = 1.f / static_cast<float>(D);
  float dw[ITEMS][VEC], db[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[it][k] = db[it][k] = 0.f;
  }
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = min(N, first + rows_per_block);
  for (int64_t row = first; row < last; ++row) {
    const int64_t offset = row * D;
    const float mu = mean[row];
    const float rs = rstd[row];
    float xh[ITEMS][VEC], g[ITEMS][VEC], ds[ITEMS][VEC];
    float sum_g = 0.f, sum_gx = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
      if (col < D) {
        float s[VEC], dy[VEC], w[VEC];
        if constexpr (Rows::kHasGrad) {
          rows.template values_and_grads<VEC>(offset, col, s, ds[it]);
        } else {
          rows.template values<VEC>(offset, col, s);
        }
        load_vec<T, VEC>(grad_out + offset + col, dy);
        load_vec<W, VEC>(weight + col, w);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          xh[it][k] = (s[k] - mu) * rs;
          g[it][k] = dy[k] * w[k];
          sum_g += g[it][k];
          sum_gx = fmaf(g[it][k], xh[it][k], sum_gx);
          dw[it][k] = fmaf(dy[k], xh[it][k], dw[it][k]);
          db[it][k] += dy[k];
        }
      }
    }
    const float2 sums = block_sum2(sum_g, sum_gx);
    const float mean_g = sums.x * inv_d;
    const float mean_gx = sums.y * inv_d;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
      if (col < D) {
        float v[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          // g - mean(g) first: exactly 0 on a constant row, so the large rstd there amplifies no rounding
          v[k] = rs * fmaf(-xh[it][k], mean_gx, g[it][k] - mean_g);
          if constexpr (Rows::kHasGrad) v[k] *= ds[it][k];
        }
        store_vec<T, VEC>(grad_in + offset + col, v);
      }
    }
  }
  float* dw_out = partial + 2 * blockIdx.x * D;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int64_t col = (threadIdx.x + static_cast<int64_t>(it) * blockDim.x) * VEC;
    if (col < D) {
      store_vec<float, VEC>(dw_out + col, dw[it]);
      store_vec<float, VEC>(dw_out + D + col, db[it]);
    }
  }
}

template <typename T, typename W, class Rows>
__global__ void __launch_bounds__(kLnMaxThreads) ln_backward_generic_kernel(
    Rows rows,
    const T* __restrict__ grad_out,  // [N, D]
    const W* __restrict__ weight,    // [D]
    const float* __restrict__ mean,  // [N]
    const float* __restrict__ rstd,  // [N]
    T* __restrict__ grad_in,         // [N, D]
    float* __restrict__ partial,     // [gridDim.x, 2, D]; each thread owns its columns
    int64_t N,
    int64_t D,
    int64_t rows_per_block) {
  const float inv_d = 1.f / static_cast<float>(D);
  float* dw = partial + 2 * blockIdx.x * D;
  float* db = dw + D;
  for (int64_t col = threadIdx.x; col < D; col += blockDim.x) dw[col] = db[col] = 0.f;
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = min(N, first + rows_per_block);
  for (int64_t row = first; row < last; ++row) {
    const int64_t offset = row * D;
    const float mu = mean[row];
    const float rs = rstd[row];
    float sum_g = 0.f, sum_gx = 0.f;
    for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
      float s[1];
      rows.template values<1>(offset, col, s);
      const float dy = static_cast<float>(grad_out[offset + col]);
      const float xh = (s[0] - mu) * rs;
      const float g = dy * static_cast<float>(weight[col]);
      sum_g += g;
      sum_gx = fmaf(g, xh, sum_gx);
      dw[col] = fmaf(dy, xh, dw[col]);
      db[col] += dy;
    }
    const float2 sums = block_sum2(sum_g, sum_gx);
    const float mean_g = sums.x * inv_d;
    const float mean_gx = sums.y * inv_d;
    for (int64_t col = threadIdx.x; col < D; col += blockDim.x) {
      float s[1], ds[1];
      rows.template values_and_grads<1>(offset, col, s, ds);
      const float xh = (s[0] - mu) * rs;
      const float g = static_cast<float>(grad_out[offset + col]) * static_cast<float>(weight[col]);
      float v = rs * fmaf(-xh, mean_gx, g - mean_g);
      if constexpr (Rows::kHasGrad) v *= ds[0];
      grad_in[offset + col] = static_cast<T>(v);
    }
  }
}

// grad_weight and grad_beta [D] from partial [blocks, 2, D]: threadIdx.x picks the column, threadIdx.y every
// kReduceRows-th block; the kReduceRows sums are then added in order, in fp32, and rounded once to W.
constexpr int kReduceRows = 16;

template <typename W>
__global__ void __launch_bounds__(32 * kReduceRows) ln_reduce_partials_kernel(
    const float* __restrict__ partial,  // [blocks, 2, D]
    int64_t blocks,
    int64_t D,
    W* __restrict__ grad_weight,        // [D]
    W* __restrict__ grad_beta) {        // [D]
  __shared__ float sw[kReduceRows][33];
  __shared__ float sb[kReduceRows][33];
  const int64_t col = blockIdx.x * 32 + threadIdx.x;
  float w = 0.f, b = 0.f;
  if (col < D) {
    for (int64_t k = threadIdx.y; k < blocks; k += kReduceRows) {
      w += partial[2 * k * D + col];
      b += partial[(2 * k + 1) * D + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = w;
  sb[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && col < D) {
    float tw = 0.f, tb = 0.f;
#pragma unroll
    for (int j = 0; j < kReduceRows; ++j) {
      tw += sw[j][threadIdx.x];
      tb += sb[j][threadIdx.x];
    }
    grad_weight[col] = static_cast<W>(tw);
    grad_beta[col] = static_cast<W>(tb);
  }
}

// ---- launch ----

// How a row of D is spread over a block: `items` vectors of `vec` elements per thread, or the generic kernel.
struct LnShape {
  int vec;
  int items;
  int threads;
  bool generic;
};

inline int round_up_32(int64_t n) { return static_cast<int>(std::max<int64_t>(32, (n + 31) / 32 * 32)); }

template <typename T>
LnShape ln_shape(int64_t D, bool aligned) {
  constexpr int kVec = 16 / sizeof(T);
  if (aligned && D % kVec == 0) {
    const int64_t vectors = D / kVec;
    for (int items = 1; items * kVec <= kLnMaxElemsPerThread; items *= 2) {
      if (vectors <= static_cast<int64_t>(items) * kLnMaxThreads) {
        return {kVec, items, round_up_32((vectors + items - 1) / items), false};
      }
    }
  }
  return {1, 1, round_up_32(std::min<int64_t>(D, kLnMaxThreads)), true};
}

// Calls f(std::integral_constant<int, I>{}) for items == I, over the I that keep VEC * I within the registers.
template <int VEC, typename F>
void dispatch_items(int items, const F& f) {
  if (items == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (items == 2) {
    if constexpr (2 * VEC <= kLnMaxElemsPerThread) f(std::integral_constant<int, 2>{});
  } else {
    if constexpr (4 * VEC <= kLnMaxElemsPerThread) f(std::integral_constant<int, 4>{});
  }
}

inline unsigned row_grid(int64_t N) { return static_cast<unsigned>(std::min<int64_t>(N, INT_MAX)); }

// aligned: every pointer of the launch (activations and parameters) is 16-byte aligned; the vectors then move
// 16 / sizeof(T) elements of each tensor at once (two 16-byte accesses for fp32 parameters beside fp16/bf16).
template <typename T, typename W, class Rows>
void launch_ln_forward(const Rows& rows, const W* weight, const W* beta, float eps, T* out, float* mean, float* rstd,
                       int64_t N, int64_t D, bool aligned, cudaStream_t stream) {
  if (N == 0) return;
  const LnShape shape = ln_shape<T>(D, aligned);
  if (shape.generic) {
    ln_forward_generic_kernel<T, W, Rows>
        <<<row_grid(N), shape.threads, 0, stream>>>(rows, weight, beta, eps, out, mean, rstd, N, D);
  } else {
    constexpr int kVec = 16 / sizeof(T);
    dispatch_items<kVec>(shape.items, [&](auto items) {
      ln_forward_kernel<T, W, kVec, decltype(items)::value, Rows>
          <<<row_grid(N), shape.threads, 0, stream>>>(rows, weight, beta, eps, out, mean, rstd, N, D);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows per backward block: a function of N alone, so that the order of the grad_weight sums never changes.
inline int64_t ln_backward_rows_per_block(int64_t N) {
  return std::max<int64_t>(1, (N + kLnTargetBackwardBlocks - 1) / kLnTargetBackwardBlocks);
}

// grad_in [N, D]; grad_weight, grad_beta [D]. `partial` must hold [ceil(N / rows_per_block), 2, D] floats.
template <typename T, typename W, class Rows>
void launch_ln_backward(const Rows& rows, const T* grad_out, const W* weight, const float* mean, const float* rstd,
                        T* grad_in, float* partial, W* grad_weight, W* grad_beta, int64_t N, int64_t D, bool aligned,
                        cudaStream_t stream) {
  const int64_t per_block = ln_backward_rows_per_block(N);
  const int64_t blocks = (N + per_block - 1) / per_block;
  const LnShape shape = ln_shape<T>(D, aligned);
  if (shape.generic) {
    ln_backward_generic_kernel<T, W, Rows><<<static_cast<unsigned>(blocks), shape.threads, 0, stream>>>(
        rows, grad_out, weight, mean, rstd, grad_in, partial, N, D, per_block);
  } else {
    constexpr int kVec = 16 / sizeof(T);
    dispatch_items<kVec>(shape.items, [&](auto items) {
      ln_backward_kernel<T, W, kVec, decltype(items)::value, Rows><<<static_cast<unsigned>(blocks), shape.threads, 0,
                                                                     stream>>>(
          rows, grad_out, weight, mean, rstd, grad_in, partial, N, D, per_block);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 reduce_block(32, kReduceRows);
  ln_reduce_partials_kernel<W><<<static_cast<unsigned>((D + 31) / 32), reduce_block, 0, stream>>>(
      partial, blocks, D, grad_weight, grad_beta);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline int64_t ln_backward_blocks(int64_t N) {
  const int64_t per_block = ln_backward_rows_per_block(N);
  return (N + per_block - 1) / per_block;
}

}  // namespace mtbert_fast::cuda
