// GELU(a) * g over the halves [a | g] of each row, and its input gradient, on the CPU: one pass over the rows, fp32
// math, one store in the input dtype.
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
void geglu_kernel(
    const T* x,  // [N, 2I]
    T* out,      // [N, I]
    int64_t N,
    int64_t I) {
  at::parallel_for(0, N, row_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* a = x + row * 2 * I;
      T* o = out + row * I;
      for_each_vec(I, [&](int64_t i, auto n) { store(o + i, gelu<K>(load(a + i, n)) * load(a + I + i, n), n); });
    }
  });
}

template <typename T, GeluKind K>
void geglu_backward_kernel(
    const T* grad_out,  // [N, I]
    const T* x,         // [N, 2I]
    T* grad_x,          // [N, 2I]
    int64_t N,
    int64_t I) {
  at::parallel_for(0, N, row_grain(2 * I), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* a = x + row * 2 * I;
      const T* go = grad_out + row * I;
      T* ga = grad_x + row * 2 * I;
      for_each_vec(I, [&](int64_t i, auto n) {
        fVec y, dy;
        gelu_and_grad<K>(load(a + i, n), y, dy);
        const fVec g = load(go + i, n);
        store(ga + i, g * load(a + I + i, n) * dy, n);
        store(ga + I + i, g * y, n);
      });
    }
  });
}

at::Tensor geglu_cpu(const at::Tensor& x, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("geglu", approximate);
  const std::vector<int64_t> shape = check_geglu_args("geglu", c10::DeviceType::CPU, x);
  const int64_t I = shape.back();
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(shape, xc.options());
  const int64_t N = leading_rows(x);
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      geglu_kernel<T, decltype(k)::value>(xc.const_data_ptr<T>(), out.mutable_data_ptr<T>(), N, I);
    });
  });
  return out;
}

at::Tensor geglu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, c10::string_view approximate) {
  const GeluKind kind = parse_gelu("geglu_backward", approximate);
  const int64_t I = check_geglu_args("geglu_backward", c10::DeviceType::CPU, x, &grad_out).back();
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = x.contiguous();
  at::Tensor grad_x = at::empty(xc.sizes(), xc.options());
  const int64_t N = leading_rows(x);
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    dispatch_gelu(kind, [&](auto k) {
      geglu_backward_kernel<T, decltype(k)::value>(gc.const_data_ptr<T>(), xc.const_data_ptr<T>(),
                                                   grad_x.mutable_data_ptr<T>(), N, I);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("geglu", &geglu_cpu);
  m.impl("geglu_backward", &geglu_backward_cpu);
}

}  // namespace mtbert_fast
