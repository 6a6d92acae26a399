// LayerNorm(GELU(x + bias)), the masked-LM head transform, and its backward on the CPU. Each row is read once;
// the fp32 GELU output (and, backward, its derivative) waits in per-thread row buffers (L1).
// x and bias share a dtype T; weight and beta are in T or both fp32 (mixed precision), and grad_weight and grad_beta,
// summed in fp32, come back in their dtype.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using namespace cpu;

template <typename T, typename W, GeluKind K>
void bias_gelu_layer_norm_kernel(
    const T* x,       // [N, D]
    const T* bias,    // [D]
    const W* weight,  // [D]
    const W* beta,    // [D]
    double eps,
    T* out,           // [N, D]
    float* mean,      // [N]
    float* rstd,      // [N]
    int64_t N,
    int64_t D) {
  at::parallel_for(0, N, layer_norm_row_grain(D), [&](int64_t begin, int64_t end) {
    const ParamF32<T> b(bias, D);
    const ParamF32<W> w(weight, D), bt(beta, D);
    LineVector<float> s(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * D;
      const fVec sum = reduce_vecs(D, fVec(0.f), [&](int64_t d, auto n, fVec& acc) {
        const fVec v = gelu<K>(load(x + offset + d, n) + load(b.data() + d, n));
        store(s.data() + d, v, n);
        acc += v;
      });
      layer_norm_row(s.data(), lane_sum(sum), w.data(), bt.data(), eps, out + offset, mean + row, rstd + row, D);
    }
  });
}

template <typename T, typename W, GeluKind K>
void bias_gelu_layer_norm_backward_kernel(
    const T* grad_out,  // [N, D]
    const T* x,         // [N, D]
    const T* bias,      // [D]
    const W* weight,    // [D]
    const float* mean,  // [N]
    const float* rstd,  // [N]
    T* grad_x,          // [N, D]
    float* partial,     // [blocks, 2, D]
    int64_t N,
    int64_t D) {
  const int64_t blocks = num_row_blocks(N);
  const int64_t grain = std::max<int64_t>(1, row_grain(D) / kRowsPerBlock);
  at::parallel_for(0, blocks, grain, [&](int64_t first, int64_t last) {
    const ParamF32<T> b(bias, D);
    const ParamF32<W> w(weight, D);
    LineVector<float> scratch(3 * D);
    float* xhat = scratch.data();
    float* g = xhat + D;
    float* dgelu = g + D;
    // The GELU derivative shares the GELU's exp, so it is taken in the first pass and kept for the second.
    const auto s_of = [&](int64_t row, int64_t d, auto n) {
      fVec y, dy;
      gelu_and_grad<K>(load(x + row * D + d, n) + load(b.data() + d, n), y, dy);
      store(dgelu + d, dy, n);
      return y;
    };
    const auto put = [&](int64_t row, int64_t d, auto n, const fVec& grad) {
      store(grad_x + row * D + d, grad * load(dgelu + d, n), n);
    };
    for (int64_t k = first; k < last; ++k) {
      float* dw = partial + 2 * k * D;
      float* db = dw + D;
      std::fill(dw, db + D, 0.f);
      const int64_t begin = k * kRowsPerBlock;
      const int64_t end = std::min(N, begin + kRowsPerBlock);
      layer_norm_backward_block(grad_out, w.data(), mean, rstd, xhat, g, dw, db, begin, end, D, s_of, put);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_gelu_layer_norm_cpu(
    const at::Tensor& x,
    const at::Tensor& bias,
    const at::Tensor& weight,
    const at::Tensor& beta,
    double eps,
    c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu_layer_norm", approximate);
  const int64_t D = check_layer_norm_args("bias_gelu_layer_norm", at::kCPU, x, {}, {{"bias", bias}}, {},
                                          {{"weight", weight}, {"beta", beta}});

  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor betac = beta.contiguous();
  const int64_t N = leading_rows(x);
  at::Tensor out = at::empty_like(xc);
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  dispatch_layer_norm_types(x.scalar_type(), weight.scalar_type(), [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    dispatch_gelu(kind, [&](auto k) {
      bias_gelu_layer_norm_kernel<T, W, decltype(k)::value>(
          xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), wc.const_data_ptr<W>(), betac.const_data_ptr<W>(), eps,
          out.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), N, D);
    });
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_gelu_layer_norm_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& bias,
    const at::Tensor& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu_layer_norm_backward", approximate);
  const int64_t D = check_layer_norm_args("bias_gelu_layer_norm_backward", at::kCPU, x, {{"grad_out", grad_out}},
                                          {{"bias", bias}}, {{"mean", mean}, {"rstd", rstd}}, {{"weight", weight}});
  const int64_t N = leading_rows(x);

  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor sc = rstd.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_weight = at::empty({D}, weight.options());
  at::Tensor grad_beta = at::empty({D}, weight.options());
  const int64_t blocks = num_row_blocks(N);
  at::Tensor partial = at::empty({blocks, 2, D}, x.options().dtype(at::kFloat));
  dispatch_layer_norm_types(x.scalar_type(), weight.scalar_type(), [&](auto t, auto w) {
    using T = decltype(t);
    using W = decltype(w);
    dispatch_gelu(kind, [&](auto k) {
      bias_gelu_layer_norm_backward_kernel<T, W, decltype(k)::value>(
          gc.const_data_ptr<T>(), xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), wc.const_data_ptr<W>(),
          mc.const_data_ptr<float>(), sc.const_data_ptr<float>(), grad_x.mutable_data_ptr<T>(),
          partial.mutable_data_ptr<float>(), N, D);
    });
    reduce_row_blocks(
        partial.const_data_ptr<float>(), blocks, D, grad_weight.mutable_data_ptr<W>(), grad_beta.mutable_data_ptr<W>());
  });
  return {grad_x, grad_weight, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("bias_gelu_layer_norm", &bias_gelu_layer_norm_cpu);
  m.impl("bias_gelu_layer_norm_backward", &bias_gelu_layer_norm_backward_cpu);
}

}  // namespace mtbert_fast
