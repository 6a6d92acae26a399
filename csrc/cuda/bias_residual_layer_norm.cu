// LayerNorm(x + bias + residual) and its backward on CUDA; the row kernels are in layer_norm.cuh. x, bias and residual
// share one dtype T; weight and beta are T or float32 (layer_norm.cuh), and so are grad_weight and grad_beta.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"
#include "layer_norm.cuh"

namespace mtbert_fast {
namespace {

using namespace cuda;

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_residual_layer_norm_cuda(
    const at::Tensor& x,
    const at::Tensor& bias,
    const at::Tensor& residual,
    const at::Tensor& weight,
    const at::Tensor& beta,
    double eps) {
  constexpr const char* op = "bias_residual_layer_norm";
  const int64_t D = check_layer_norm_args(op, at::kCUDA, x, {{"residual", residual}}, {{"bias", bias}});
  const bool fp32_params = check_ln_params(op, x, D, {{"weight", weight}, {"beta", beta}});

  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor rc = residual.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor betac = beta.contiguous();
  const int64_t N = xc.numel() / D;
  at::Tensor out = at::empty_like(xc);
  at::Tensor mean = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_ln_types(x.scalar_type(), fp32_params, [&](auto t, auto w_type) {
    using T = decltype(t);
    using W = decltype(w_type);
    const BiasResidualRows<T> rows{xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), rc.const_data_ptr<T>()};
    const W* w = wc.const_data_ptr<W>();
    const W* b = betac.const_data_ptr<W>();
    T* o = out.mutable_data_ptr<T>();
    const bool aligned = aligned_to(16, rows.x, rows.bias, rows.residual, o) && aligned_to(16, w, b);
    launch_ln_forward<T, W>(rows, w, b, static_cast<float>(eps), o, mean.mutable_data_ptr<float>(),
                            rstd.mutable_data_ptr<float>(), N, D, aligned, stream);
  });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bias_residual_layer_norm_backward_cuda(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& bias,
    const at::Tensor& residual,
    const at::Tensor& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd) {
  constexpr const char* op = "bias_residual_layer_norm_backward";
  const int64_t D = check_layer_norm_args(op, at::kCUDA, x, {{"grad_out", grad_out}, {"residual", residual}},
                                          {{"bias", bias}}, {{"mean", mean}, {"rstd", rstd}});
  const bool fp32_params = check_ln_params(op, x, D, {{"weight", weight}});
  const int64_t N = x.numel() / D;

  const at::cuda::OptionalCUDAGuard device_guard(device_of(x));
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  const at::Tensor rc = residual.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor mc = mean.contiguous();
  const at::Tensor sc = rstd.contiguous();
  at::Tensor grad_s = at::empty_like(xc);
  // grad_weight and grad_beta in weight's dtype (W)
  if (N == 0) return {grad_s, at::zeros({D}, weight.options()), at::zeros({D}, weight.options())};
  at::Tensor grad_weight = at::empty({D}, weight.options());
  at::Tensor grad_beta = at::empty({D}, weight.options());
  at::Tensor partial = at::empty({ln_backward_blocks(N), 2, D}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_ln_types(x.scalar_type(), fp32_params, [&](auto t, auto w_type) {
    using T = decltype(t);
    using W = decltype(w_type);
    const BiasResidualRows<T> rows{xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), rc.const_data_ptr<T>()};
    const T* g = gc.const_data_ptr<T>();
    const W* w = wc.const_data_ptr<W>();
    T* gs = grad_s.mutable_data_ptr<T>();
    const bool aligned = aligned_to(16, rows.x, rows.bias, rows.residual, g, gs) && aligned_to(16, w);
    launch_ln_backward<T, W>(rows, g, w, mc.const_data_ptr<float>(), sc.const_data_ptr<float>(), gs,
                             partial.mutable_data_ptr<float>(), grad_weight.mutable_data_ptr<W>(),
                             grad_beta.mutable_data_ptr<W>(), N, D, aligned, stream);
  });
  return {grad_s, grad_weight, grad_beta};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) {
  m.impl("bias_residual_layer_norm", &bias_residual_layer_norm_cuda);
  m.impl("bias_residual_layer_norm_backward", &bias_residual_layer_norm_backward_cuda);
}

}  // namespace mtbert_fast
