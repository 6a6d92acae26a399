// int8 inference on the CPU: activations quantized per token, the products on int8 (VNNI where the CPU has it,
// through at::_int_mm, which oneDNN runs), and the dequantization fused with what follows each product.
//
// A row of activations x (float or bfloat16), multiplied by a per-channel smoothing vector m, is stored as int8 q
// with an fp32 scale and an integer zero (asymmetric, so a row that is mostly positive, like GELU's output, keeps
// all 256 levels):  x * m ~= scale * (q - zero).  A weight row n holds int8 w[n, :] with scale ws[n] (per output
// channel) and wsum[n] = sum_k w[n, k], so that
//   (x * m) . (w[n] * ws[n]) ~= scale * ws[n] * (acc[n] - zero * wsum[n]),   acc = q @ w^T in int32.
// The weights carry 1 / m (folded in when they were quantized), so the products equal x @ W^T.
//
// Ops: quantize_rows; int8_linear (+ bias, float out); int8_linear_gelu_quantize (+ bias, GELU, and the result
// quantized again for the next product, so the [T, I] activation never goes to memory in float);
// int8_linear_residual_layer_norm (+ bias + residual, LayerNorm).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using namespace cpu;
using iVec = at::vec::Vectorized<int32_t>;

// Rows of the int32 product computed at a time. oneDNN re-lays-out the weight on every call, so few large calls win
// (measured on [1024, 768] x [768, 3072]: blocks of 128 rows ran at 0.87 of one call's rate, of 512 at 0.94); the
// bound keeps the int32 block at 4 KB per output column (12 MB for a BERT-base FFN).
constexpr int64_t kBlockRows = 1024;

inline fVec load_acc(const int32_t* p, Full) { return at::vec::convert_to_fp_of_same_size<float>(iVec::loadu(p)); }
inline fVec load_acc(const int32_t* p, int64_t n) {
  return at::vec::convert_to_fp_of_same_size<float>(iVec::loadu(p, n));
}

// round(v) + zero, saturated to int8 (v and zero hold integers after the rounding; ties go to even, as torch.round).
inline void store_int8(int8_t* p, const fVec& v, const fVec& zero, int64_t n) {
  const fVec r = at::vec::clamp(v.round() + zero, fVec(-128.f), fVec(127.f));
#if defined(CPU_CAPABILITY_AVX512)
  _mm_mask_storeu_epi8(p, static_cast<__mmask16>(n == kVec ? 0xFFFF : (1u << n) - 1),
                       _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
#else
  float buf[kVec];
  r.store(buf);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<int8_t>(buf[i]);
#endif
}
inline void store_int8(int8_t* p, const fVec& v, const fVec& zero, Full) { store_int8(p, v, zero, kVec); }

// The row quantization of fp32 values v (already smoothed): returns nothing, writes q and the row's scale and zero.
//   lo = min(v, 0), hi = max(v, 0), scale = (hi - lo) / 255, zero = round(-lo / scale) - 128, q = round(v / scale) + zero
// A row of zeros gets scale 0 (its q dequantize to 0 whatever they hold).
template <typename ValueOf>
inline void quantize_row(int64_t K, const ValueOf& value_of, int8_t* q, float* scale, float* zero) {
  fVec lo(0.f), hi(0.f);
  for_each_vec(K, [&](int64_t k, auto n) {
    const fVec v = keep_lanes(value_of(k, n), n);
    lo = at::vec::minimum(lo, v);
    hi = at::vec::maximum(hi, v);
  });
  const float lo_s = at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::minimum(a, b); }, lo);
  const float hi_s = at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, hi);
  const float s = (hi_s - lo_s) / 255.f;
  const float inv = s > 0.f ? 1.f / s : 0.f;
  const float z = std::nearbyint(-lo_s * inv) - 128.f;
  const fVec inv_v(inv), z_v(z);
  for_each_vec(K, [&](int64_t k, auto n) { store_int8(q + k, value_of(k, n) * inv_v, z_v, n); });
  *scale = s;
  *zero = z;
}

template <typename T>
void quantize_rows_kernel(const T* x, const float* smooth, int8_t* q, float* scale, float* zero, int64_t N,
                          int64_t K) {
  at::parallel_for(0, N, row_grain(K), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* x_row = x + row * K;
      quantize_row(
          K, [&](int64_t k, auto n) { return load(x_row + k, n) * load(smooth + k, n); }, q + row * K, scale + row,
          zero + row);
    }
  });
}

// Checks with the op's name as a runtime string (the MTBF_CHECK_ macros paste a literal).
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_float_or_bf16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
}

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but q is on ", like.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

// The dequantized product of one row, plus bias, handed to f(d, lanes, y) vector by vector.
struct RowDequant {
  const int32_t* acc;   // [N] this row's int32 products
  const float* wscale;  // [N]
  const float* wsum;    // [N]
  float scale;
  float zero;

  template <typename F>
  inline void operator()(int64_t N, const float* bias, const F& f) const {
    const fVec s(scale), z(zero);
    for_each_vec(N, [&](int64_t d, auto n) {
      const fVec centred = at::vec::fnmadd(z, load(wsum + d, n), load_acc(acc + d, n));
      f(d, n, at::vec::fmadd(centred, s * load(wscale + d, n), load(bias + d, n)));
    });
  }
};

// The common part of the three product ops: checks, then for each block of rows the int32 product of the block
// and epilogue(rows [begin, end) of the block, RowDequant of a row) in parallel over the block's rows.
struct Int8Product {
  const at::Tensor& q;
  const at::Tensor& scale;
  const at::Tensor& zero;
  const at::Tensor& weight;
  const at::Tensor& wscale;
  const at::Tensor& wsum;
  const at::Tensor& bias;

  int64_t rows() const { return q.size(0); }
  int64_t out_features() const { return weight.size(0); }

  void check(const char* op) const {
    TORCH_CHECK(q.device().type() == at::kCPU, op, ": q must be on cpu, got ", q.device());
    check_dtype(op, "q", q, at::kChar);
    check_dtype(op, "weight", weight, at::kChar);
    TORCH_CHECK(q.dim() == 2, op, ": q must have 2 dims, got shape ", q.sizes());
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == q.size(1), op, ": weight must have shape [N, ", q.size(1),
                "], got ", weight.sizes());
    TORCH_CHECK(weight.device() == q.device(), op, ": weight is on ", weight.device(), " but q is on ", q.device());
    check_vector(op, "scale", scale, q.size(0), q);
    check_vector(op, "zero", zero, q.size(0), q);
    check_vector(op, "weight_scale", wscale, weight.size(0), q);
    check_vector(op, "weight_sum", wsum, weight.size(0), q);
    check_vector(op, "bias", bias, weight.size(0), q);
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"scale", scale}, {"zero", zero},
                                  {"weight_scale", wscale}, {"weight_sum", wsum}}) {
      check_dtype(op, name, t, at::kFloat);
    }
    check_float_or_bf16(op, "bias", bias);
  }

  template <typename Epilogue>
  void run(const Epilogue& epilogue) const {
    const at::Tensor qc = q.contiguous();
    const at::Tensor w_t = weight.contiguous().t();  // [K, N] view: the layout _int_mm reads as its second operand
    const at::Tensor sc = scale.contiguous(), zc = zero.contiguous();
    const at::Tensor wsc = wscale.contiguous(), wsm = wsum.contiguous();
    const int64_t M = rows(), N = out_features();
    for (int64_t begin = 0; begin < M; begin += kBlockRows) {
      const int64_t end = std::min(M, begin + kBlockRows);
      const at::Tensor acc = at::_int_mm(qc.narrow(0, begin, end - begin), w_t);
      const int32_t* acc_p = acc.const_data_ptr<int32_t>();
      at::parallel_for(begin, end, std::max<int64_t>(1, row_grain(N)), [&](int64_t r0, int64_t r1) {
        for (int64_t row = r0; row < r1; ++row) {
          const RowDequant dq{acc_p + (row - begin) * N, wsc.const_data_ptr<float>(), wsm.const_data_ptr<float>(),
                              sc.const_data_ptr<float>()[row], zc.const_data_ptr<float>()[row]};
          epilogue(row, dq);
        }
      });
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_cpu(const at::Tensor& x, const at::Tensor& smooth) {
  MTBF_CHECK_DEVICE_TYPE("quantize_rows", x, at::kCPU);
  MTBF_CHECK_FLOAT_OR_BF16("quantize_rows", x);
  MTBF_CHECK_DIM("quantize_rows", x, 2);
  MTBF_CHECK_DTYPE("quantize_rows", smooth, at::kFloat);
  MTBF_CHECK_SAME_DEVICE("quantize_rows", x, smooth);
  MTBF_CHECK_DIM("quantize_rows", smooth, 1);
  MTBF_CHECK_SIZE("quantize_rows", smooth, 0, x.size(1));
  const at::Tensor xc = x.contiguous(), mc = smooth.contiguous();
  const int64_t N = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({N, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({N}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({N}, x.options().dtype(at::kFloat));
  dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    quantize_rows_kernel<T>(xc.const_data_ptr<T>(), mc.const_data_ptr<float>(), q.mutable_data_ptr<int8_t>(),
                            scale.mutable_data_ptr<float>(), zero.mutable_data_ptr<float>(), N, K);
  });
  return {q, scale, zero};
}

at::Tensor int8_linear_cpu(const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero,
                           const at::Tensor& weight, const at::Tensor& weight_scale, const at::Tensor& weight_sum,
                           const at::Tensor& bias) {
  const Int8Product prod{q, scale, zero, weight, weight_scale, weight_sum, bias};
  prod.check("int8_linear");
  const int64_t N = prod.out_features();
  at::Tensor out = at::empty({prod.rows(), N}, bias.options());
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  dispatch_float_bf16(bias.scalar_type(), [&](auto t) {
    using T = decltype(t);
    T* o = out.mutable_data_ptr<T>();
    prod.run([&](int64_t row, const RowDequant& dq) {
      dq(N, bf.const_data_ptr<float>(), [&](int64_t d, auto n, const fVec& y) { store(o + row * N + d, y, n); });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_linear_gelu_quantize_cpu(
    const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& weight,
    const at::Tensor& weight_scale, const at::Tensor& weight_sum, const at::Tensor& bias,
    c10::string_view approximate, const at::Tensor& smooth) {
  constexpr const char* op = "int8_linear_gelu_quantize";
  const GeluKind kind = parse_gelu(op, approximate);
  const Int8Product prod{q, scale, zero, weight, weight_scale, weight_sum, bias};
  prod.check(op);
  const int64_t M = prod.rows(), N = prod.out_features();
  check_dtype(op, "smooth", smooth, at::kFloat);
  check_vector(op, "smooth", smooth, N, q);
  const at::Tensor mc = smooth.contiguous();
  at::Tensor q_out = at::empty({M, N}, q.options());
  at::Tensor scale_out = at::empty({M}, scale.options());
  at::Tensor zero_out = at::empty({M}, scale.options());
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  dispatch_gelu(kind, [&](auto k) {
    constexpr GeluKind K = decltype(k)::value;
    prod.run([&](int64_t row, const RowDequant& dq) {
      thread_local std::vector<float> h;  // the row after GELU and smoothing, in fp32
      h.resize(N);
      const float* m = mc.const_data_ptr<float>();
      dq(N, bf.const_data_ptr<float>(), [&](int64_t d, auto n, const fVec& y) {
        store(h.data() + d, gelu<K>(y) * load(m + d, n), n);
      });
      quantize_row(
          N, [&](int64_t d, auto n) { return load(h.data() + d, n); }, q_out.mutable_data_ptr<int8_t>() + row * N,
          scale_out.mutable_data_ptr<float>() + row, zero_out.mutable_data_ptr<float>() + row);
    });
  });
  return {q_out, scale_out, zero_out};
}

at::Tensor int8_linear_residual_layer_norm_cpu(
    const at::Tensor& q, const at::Tensor& scale, const at::Tensor& zero, const at::Tensor& weight,
    const at::Tensor& weight_scale, const at::Tensor& weight_sum, const at::Tensor& bias, const at::Tensor& residual,
    const at::Tensor& norm_weight, const at::Tensor& norm_bias, double eps) {
  constexpr const char* op = "int8_linear_residual_layer_norm";
  const Int8Product prod{q, scale, zero, weight, weight_scale, weight_sum, bias};
  prod.check(op);
  const int64_t M = prod.rows(), N = prod.out_features();
  check_dtype(op, "residual", residual, bias.scalar_type());
  TORCH_CHECK(residual.device() == q.device(), op, ": residual is on ", residual.device(), " but q is on ",
              q.device());
  TORCH_CHECK(residual.dim() == 2 && residual.size(0) == M && residual.size(1) == N, op,
              ": residual must have shape [", M, ", ", N, "], got ", residual.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"norm_weight", norm_weight},
                                {"norm_bias", norm_bias}}) {
    check_vector(op, name, t, N, q);
    TORCH_CHECK(t.scalar_type() == bias.scalar_type() || t.scalar_type() == at::kFloat, op, ": ", name,
                " must be float32 or bias's dtype ", bias.scalar_type(), ", got ", t.scalar_type());
  }
  check_dtype(op, "norm_bias", norm_bias, norm_weight.scalar_type());
  const at::Tensor rc = residual.contiguous();
  const at::Tensor bf = bias.to(at::kFloat).contiguous();
  const at::Tensor wf = norm_weight.to(at::kFloat).contiguous(), bt = norm_bias.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, bias.options());
  dispatch_float_bf16(bias.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* res = rc.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    prod.run([&](int64_t row, const RowDequant& dq) {
      thread_local std::vector<float> s;  // the row's pre-norm values, in fp32
      s.resize(N);
      fVec sum(0.f);
      dq(N, bf.const_data_ptr<float>(), [&](int64_t d, auto n, const fVec& y) {
        const fVec v = y + load(res + row * N + d, n);
        store(s.data() + d, v, n);
        sum += keep_lanes(v, n);
      });
      float mean, rstd;
      layer_norm_row(s.data(), lane_sum(sum), wf.const_data_ptr<float>(), bt.const_data_ptr<float>(), eps,
                     o + row * N, &mean, &rstd, N);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("quantize_rows", &quantize_rows_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_gelu_quantize", &int8_linear_gelu_quantize_cpu);
  m.impl("int8_linear_residual_layer_norm", &int8_linear_residual_layer_norm_cpu);
}

}  // namespace mtbert_fast
