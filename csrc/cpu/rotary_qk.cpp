// Rotary position embeddings on the query and key heads of a packed qkv, on the CPU: one pass over the tokens,
// fp32 math, one store in the input dtype; the value heads are copied.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using namespace cpu;

template <typename T, typename I>
void rotary_kernel(
    const T* qkv,        // [N, 3, H, D]
    const float* cos,    // [P, D/2]
    const float* sin,    // [P, D/2]
    const I* positions,  // [N]
    T* out,              // [N, 3, H, D]
    int64_t N,
    int64_t H,
    int64_t D,
    bool inverse) {
  const int64_t half = D / 2;
  const int64_t token = 3 * H * D;
  const fVec sign(inverse ? -1.f : 1.f);
  at::parallel_for(0, N, row_grain(token), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = static_cast<int64_t>(positions[t]);
      const float* c = cos + p * half;
      const float* s = sin + p * half;
      const T* x = qkv + t * token;
      T* o = out + t * token;
      for (int64_t h = 0; h < 2 * H; ++h) {
        const T* xh = x + h * D;
        T* oh = o + h * D;
        for_each_vec(half, [&](int64_t i, auto n) {
          const fVec x1 = load(xh + i, n), x2 = load(xh + half + i, n);
          const fVec cv = load(c + i, n), sv = load(s + i, n) * sign;
          store(oh + i, x1 * cv - x2 * sv, n);
          store(oh + half + i, x2 * cv + x1 * sv, n);
        });
      }
      std::copy(x + 2 * H * D, x + token, o + 2 * H * D);
    }
  });
}

at::Tensor rotary_qk_cpu(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         const at::Tensor& positions, bool inverse) {
  constexpr const char* op = "rotary_qk";
  check_rotary_qk_args(c10::DeviceType::CPU, qkv, cos, sin, positions);
  const int64_t N = qkv.size(0), H = qkv.size(2), D = qkv.size(3);

  const at::Tensor xc = qkv.contiguous();
  const at::Tensor cc = cos.contiguous();
  const at::Tensor sc = sin.contiguous();
  const at::Tensor pc = positions.contiguous();
  const int64_t P = cos.size(0);
  at::Tensor out = at::empty(xc.sizes(), xc.options());
  dispatch_float_bf16(qkv.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AT_DISPATCH_INDEX_TYPES(pc.scalar_type(), "rotary_qk", [&] {
      const index_t* pos = pc.const_data_ptr<index_t>();
      for (int64_t t = 0; t < N; ++t) {
        TORCH_CHECK_VALUE(pos[t] >= 0 && pos[t] < P, op, ": positions[", t, "] = ", pos[t], " is outside the ", P,
                          " positions of the cos/sin tables");
      }
      rotary_kernel<T, index_t>(xc.const_data_ptr<T>(), cc.const_data_ptr<float>(), sc.const_data_ptr<float>(), pos,
                                out.mutable_data_ptr<T>(), N, H, D, inverse);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("rotary_qk", &rotary_qk_cpu); }

}  // namespace mtbert_fast
