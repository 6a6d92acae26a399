// GELU(x + bias) and its input gradient on the CPU: one pass over the rows, fp32 math, one store in the input dtype.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using namespace cpu;

template <typename T, GeluKind K>
void bias_gelu_kernel(
    const T* x,     // [N, D]
    const T* bias,  // [D]
    T* out,         // [N, D]
    int64_t N,
    int64_t D) {
  at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
    const ParamF32<T> b(bias, D);
    for (int64_t row = begin; row < end; ++row) {
      const T* x_row = x + row * D;
      T* out_row = out + row * D;
      for_each_vec(D, [&](int64_t d, auto n) {
        store(out_row + d, gelu<K>(load(x_row + d, n) + load(b.data() + d, n)), n);
      });
    }
  });
}

template <typename T, GeluKind K>
void bias_gelu_backward_kernel(
    const T* grad_out,  // [N, D]
    const T* x,         // [N, D]
    const T* bias,      // [D]
    T* grad_x,          // [N, D]
    int64_t N,
    int64_t D) {
  at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
    const ParamF32<T> b(bias, D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * D;
      for_each_vec(D, [&](int64_t d, auto n) {
        const fVec dgelu = gelu_grad<K>(load(x + offset + d, n) + load(b.data() + d, n));
        store(grad_x + offset + d, load(grad_out + offset + d, n) * dgelu, n);
      });
    }
  });
}

at::Tensor bias_gelu_cpu(const at::Tensor& x, const at::Tensor& bias, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu", approximate);
  MTBF_CHECK_DEVICE_TYPE("bias_gelu", x, at::kCPU);
  MTBF_CHECK_DEVICE_TYPE("bias_gelu", bias, at::kCPU);
  MTBF_CHECK_FLOAT_OR_BF16("bias_gelu", x);
  MTBF_CHECK_SAME_DTYPE("bias_gelu", x, bias);
  MTBF_CHECK_MIN_DIM("bias_gelu", x, 1);
  MTBF_CHECK_DIM("bias_gelu", bias, 1);
  MTBF_CHECK_SIZE("bias_gelu", bias, 0, x.size(-1));

  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  const int64_t D = x.size(-1);
  const int64_t N = leading_rows(x);
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      bias_gelu_kernel<T, decltype(k)::value>(
          xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), out.mutable_data_ptr<T>(), N, D);
    });
  });
  return out;
}

at::Tensor bias_gelu_backward_cpu(
    const at::Tensor& grad_out,
    const at::Tensor& x,
    const at::Tensor& bias,
    c10::string_view approximate) {
  const GeluKind kind = parse_gelu("bias_gelu_backward", approximate);
  MTBF_CHECK_DEVICE_TYPE("bias_gelu_backward", grad_out, at::kCPU);
  MTBF_CHECK_DEVICE_TYPE("bias_gelu_backward", x, at::kCPU);
  MTBF_CHECK_DEVICE_TYPE("bias_gelu_backward", bias, at::kCPU);
  MTBF_CHECK_FLOAT_OR_BF16("bias_gelu_backward", x);
  MTBF_CHECK_SAME_DTYPE("bias_gelu_backward", x, grad_out);
  MTBF_CHECK_SAME_DTYPE("bias_gelu_backward", x, bias);
  MTBF_CHECK_MIN_DIM("bias_gelu_backward", x, 1);
  MTBF_CHECK_SAME_SHAPE("bias_gelu_backward", x, grad_out);
  MTBF_CHECK_DIM("bias_gelu_backward", bias, 1);
  MTBF_CHECK_SIZE("bias_gelu_backward", bias, 0, x.size(-1));

  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor grad_x = at::empty(xc.sizes(), xc.options());
  const int64_t D = x.size(-1);
  const int64_t N = leading_rows(x);
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      bias_gelu_backward_kernel<T, decltype(k)::value>(
          gc.const_data_ptr<T>(), xc.const_data_ptr<T>(), bc.const_data_ptr<T>(), grad_x.mutable_data_ptr<T>(), N, D);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("bias_gelu", &bias_gelu_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace mtbert_fast
