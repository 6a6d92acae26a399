// Masked-LM loss without [N, vocab] logits, CPU.
//
// Only the rows whose label != ignore_index are projected to the vocabulary, chunk_size rows at a time: each chunk's
// hidden @ weight.T comes from one at::mm in the input dtype (oneDNN's bf16 GEMM for bf16), and the bias, the
// log-sum-exp, the loss and the gradient of the logits are taken from it in fp32 (adding the bias there saves the
// pass of addmm that copies it into the output). The backward recomputes each chunk's logits instead of keeping them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace mtbert_fast {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();

constexpr int64_t kDefaultChunkRows = 4096;
constexpr int64_t kChunkBytes = int64_t{64} << 20;  // default bound on one chunk's fp32-sized logits
constexpr int64_t kColumnGrain = 4096;               // vocabulary columns per task in the backward

template <typename T>
Vec load_as_float(const T* p) {
  if constexpr (std::is_same<T, float>::value) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

// log(sum_j exp(x_j + bias_j)) over one row, in fp32.
template <typename T>
float row_logsumexp(const T* x,         // [n]
                    const float* bias,  // [n]
                    int64_t n) {
  Vec best(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) best = at::vec::maximum(best, load_as_float(x + j) + Vec::loadu(bias + j));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, best);
  for (; j < n; ++j) m = std::max(m, static_cast<float>(x[j]) + bias[j]);
  if (m == -std::numeric_limits<float>::infinity()) return m;
  const Vec shift(m);
  Vec sum(0.f);
  for (j = 0; j + kLanes <= n; j += kLanes) sum = sum + (load_as_float(x + j) + Vec::loadu(bias + j) - shift).exp_u20();
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
  for (; j < n; ++j) s += std::exp(static_cast<float>(x[j]) + bias[j] - m);
  return m + std::log(s);
}

// Calls fn(T{}) with the float type of dtype (Float or BFloat16, as checked).
template <typename Fn>
void dispatch_float_or_bf16(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kFloat) fn(float{});
  else fn(at::BFloat16{});
}

struct Inputs {
  int64_t rows, hidden_size, vocab;
  std::vector<int64_t> kept;  // rows whose label != ignore_index, ascending
  at::Tensor kept_index;      // the same, int64 [n_kept]
  int64_t chunk;
};

Inputs check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                    const at::Tensor& labels, int64_t ignore_index, int64_t chunk_size) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"hidden", &hidden}, {"weight", &weight},
                                {"bias", &bias}, {"labels", &labels}})
    TORCH_CHECK(t->device().is_cpu(), op, ": ", name, " must be on cpu, got ", t->device());
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must have 2 dims [N, H], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must have 2 dims [V, H], got shape ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1, op, ": bias must have 1 dim [V], got shape ", bias.sizes());
  TORCH_CHECK(labels.dim() == 1, op, ": labels must have 1 dim [N], got shape ", labels.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight must be [V, H] with H = ", hidden.size(1),
              " (hidden ", hidden.sizes(), "), got ", weight.sizes());
  TORCH_CHECK(bias.size(0) == weight.size(0), op, ": bias must have V = ", weight.size(0), " entries, got ",
              bias.sizes());
  TORCH_CHECK(labels.size(0) == hidden.size(0), op, ": labels must have N = ", hidden.size(0), " entries, got ",
              labels.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16, op,
              ": hidden must be Float or BFloat16, got ", hidden.scalar_type());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight has dtype ", weight.scalar_type(),
              " but hidden has ", hidden.scalar_type());
  TORCH_CHECK(bias.scalar_type() == hidden.scalar_type(), op, ": bias has dtype ", bias.scalar_type(),
              " but hidden has ", hidden.scalar_type());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be Long (int64), got ", labels.scalar_type());

  Inputs in;
  in.rows = hidden.size(0);
  in.hidden_size = hidden.size(1);
  in.vocab = weight.size(0);
  const at::Tensor lab = labels.contiguous();
  const int64_t* l = lab.data_ptr<int64_t>();
  for (int64_t r = 0; r < in.rows; ++r) {
    if (l[r] == ignore_index) continue;
    TORCH_CHECK_VALUE(l[r] >= 0 && l[r] < in.vocab, op, ": label ", l[r], " at row ", r, " is outside [0, ",
                      in.vocab, ") and is not ignore_index (", ignore_index, ")");
    in.kept.push_back(r);
  }
  in.kept_index = at::tensor(in.kept, labels.options().dtype(at::kLong));
  const int64_t bytes_per_row = std::max<int64_t>(1, in.vocab * static_cast<int64_t>(sizeof(float)));
  in.chunk = chunk_size > 0 ? chunk_size : std::clamp<int64_t>(kChunkBytes / bytes_per_row, 1, kDefaultChunkRows);
  return in;
}

// hidden_rows @ weight.T [n, V] (the logits less the bias) into the first n rows of buf.
at::Tensor chunk_products(at::Tensor& buf, const at::Tensor& hidden_rows, const at::Tensor& weight) {
  at::Tensor products = buf.narrow(0, 0, hidden_rows.size(0));
  at::mm_out(products, hidden_rows, weight.t());
  return products;
}

std::tuple<at::Tensor, at::Tensor> mlm_gather_loss_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                                       const at::Tensor& bias, const at::Tensor& labels,
                                                       int64_t ignore_index, int64_t chunk_size) {
  const Inputs in = check_inputs("mlm_gather_loss", hidden, weight, bias, labels, ignore_index, chunk_size);
  const int64_t n_kept = static_cast<int64_t>(in.kept.size());
  at::Tensor lse = at::zeros({in.rows}, hidden.options().dtype(at::kFloat));
  std::vector<double> terms(n_kept);
  if (n_kept > 0) {
    const at::Tensor kept_hidden = hidden.index_select(0, in.kept_index);
    const at::Tensor lab = labels.contiguous();
    const int64_t* l = lab.data_ptr<int64_t>();
    const at::Tensor bias_f32 = bias.to(at::kFloat).contiguous();
    const float* b = bias_f32.data_ptr<float>();
    float* lse_p = lse.data_ptr<float>();
    at::Tensor buf = at::empty({std::min(in.chunk, n_kept), in.vocab}, hidden.options());
    for (int64_t c0 = 0; c0 < n_kept; c0 += in.chunk) {
      const int64_t cn = std::min(in.chunk, n_kept - c0);
      const at::Tensor products = chunk_products(buf, kept_hidden.narrow(0, c0, cn), weight);
      dispatch_float_or_bf16(products.scalar_type(), [&](auto tag) {
        using scalar_t = decltype(tag);
        const scalar_t* z = products.data_ptr<scalar_t>();
        at::parallel_for(0, cn, 1, [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t row = in.kept[c0 + r];
            const scalar_t* zr = z + r * in.vocab;
            const float row_lse = row_logsumexp(zr, b, in.vocab);
            lse_p[row] = row_lse;
            terms[c0 + r] = static_cast<double>(row_lse) - (static_cast<float>(zr[l[row]]) + b[l[row]]);
          }
        });
      });
    }
  }
  double loss = 0;
  for (double t : terms) loss += t;
  return {at::scalar_tensor(loss, hidden.options().dtype(at::kFloat)), lse};
}

// dlogits = g * (softmax(products + bias) - onehot(label)) in place over products [n, V], and grad_bias [V] += its
// column sums, both taken in fp32 before dlogits is rounded to the products' dtype.
template <typename T>
void products_to_grad(T* products,           // [n, V], becomes dlogits
                      const float* bias,     // [V]
                      const float* row_lse,  // [n]
                      const int64_t* label,  // [n]
                      int64_t n, int64_t vocab, float g,
                      float* grad_bias) {    // [V]
  at::parallel_for(0, vocab, kColumnGrain, [&](int64_t j0, int64_t j1) {
    std::vector<float> seg(j1 - j0);
    for (int64_t r = 0; r < n; ++r) {
      T* zr = products + r * vocab + j0;
      const float* br = bias + j0;
      const int64_t len = j1 - j0;
      const Vec shift(row_lse[r]), scale(g);
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
        const Vec d = (load_as_float(zr + j) + Vec::loadu(br + j) - shift).exp_u20() * scale;
        d.store(seg.data() + j);
      }
      for (; j < len; ++j) seg[j] = std::exp(static_cast<float>(zr[j]) + br[j] - row_lse[r]) * g;
      if (label[r] >= j0 && label[r] < j1) seg[label[r] - j0] -= g;
      at::vec::map2([](Vec acc, Vec d) { return acc + d; }, grad_bias + j0, grad_bias + j0, seg.data(), len);
      at::vec::convert(seg.data(), zr, len);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mlm_gather_loss_backward_cpu(
    const at::Tensor& grad_loss_sum, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index, int64_t chunk_size) {
  constexpr const char* op = "mlm_gather_loss_backward";
  const Inputs in = check_inputs(op, hidden, weight, bias, labels, ignore_index, chunk_size);
  TORCH_CHECK(grad_loss_sum.numel() == 1, op, ": grad_loss_sum must hold one value, got shape ",
              grad_loss_sum.sizes());
  MTBF_CHECK_DEVICE_TYPE("mlm_gather_loss_backward", lse, at::kCPU);
  MTBF_CHECK_DTYPE("mlm_gather_loss_backward", lse, at::kFloat);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == in.rows, op, ": lse must have shape [N] = [", in.rows, "], got ",
              lse.sizes());
  const int64_t n_kept = static_cast<int64_t>(in.kept.size());
  at::Tensor grad_hidden = at::zeros_like(hidden, at::MemoryFormat::Contiguous);
  at::Tensor grad_bias = at::zeros({in.vocab}, bias.options().dtype(at::kFloat));
  if (n_kept == 0)
    return {grad_hidden, at::zeros_like(weight, at::MemoryFormat::Contiguous), grad_bias.to(bias.scalar_type())};

  const float g = grad_loss_sum.item<float>();
  const bool one_chunk = n_kept <= in.chunk;
  const bool accumulate_f32 = weight.scalar_type() == at::kFloat;
  // One chunk writes grad_weight directly; more accumulate in fp32 (in place for fp32, through a dtype product for
  // bf16, whose GEMM writes only bf16).
  const std::vector<int64_t> weight_shape{in.vocab, in.hidden_size};
  at::Tensor grad_weight = one_chunk || accumulate_f32 ? at::empty(weight_shape, weight.options())
                                                       : at::zeros(weight_shape, weight.options().dtype(at::kFloat));
  at::Tensor chunk_grad_weight;
  if (!one_chunk && !accumulate_f32) chunk_grad_weight = at::empty(weight_shape, weight.options());

  const at::Tensor kept_hidden = hidden.index_select(0, in.kept_index);
  const at::Tensor kept_labels = labels.index_select(0, in.kept_index).contiguous();
  const at::Tensor kept_lse = lse.index_select(0, in.kept_index).contiguous();
  const at::Tensor bias_f32 = bias.to(at::kFloat).contiguous();
  at::Tensor buf = at::empty({std::min(in.chunk, n_kept), in.vocab}, hidden.options());
  for (int64_t c0 = 0; c0 < n_kept; c0 += in.chunk) {
    const int64_t cn = std::min(in.chunk, n_kept - c0);
    const at::Tensor h = kept_hidden.narrow(0, c0, cn);
    const at::Tensor dlogits = chunk_products(buf, h, weight);
    dispatch_float_or_bf16(dlogits.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      products_to_grad(dlogits.data_ptr<scalar_t>(), bias_f32.data_ptr<float>(), kept_lse.data_ptr<float>() + c0,
                       kept_labels.data_ptr<int64_t>() + c0, cn, in.vocab, g, grad_bias.data_ptr<float>());
    });
    grad_hidden.index_copy_(0, in.kept_index.narrow(0, c0, cn), at::mm(dlogits, weight));
    if (one_chunk) {
      at::mm_out(grad_weight, dlogits.t(), h);
    } else if (accumulate_f32) {
      if (c0 == 0) at::mm_out(grad_weight, dlogits.t(), h);
      else grad_weight.addmm_(dlogits.t(), h);
    } else {
      at::mm_out(chunk_grad_weight, dlogits.t(), h);
      grad_weight.add_(chunk_grad_weight);
    }
  }
  return {grad_hidden, grad_weight.to(weight.scalar_type()), grad_bias.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) {
  m.impl("mlm_gather_loss", &mlm_gather_loss_cpu);
  m.impl("mlm_gather_loss_backward", &mlm_gather_loss_backward_cpu);
}

}  // namespace mtbert_fast
