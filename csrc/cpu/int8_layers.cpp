// A stack of post-norm encoder layers (BERT's) with int8 products on packed tokens, for inference on the CPU, in one
// call.
//
// Each layer is the int8 layer (mtbert_fast.models.int8.int8_layer_forward) on weights whose sums come from int8
// panels, kernel for kernel:
//   qkv = int8 product of x (quantized for it by the previous layer, or by quantize_rows for the first)  int8_linear
//   ctx = attention_varlen(qkv, cu_seqlens, max_seqlen)                   (rel_bias added to the scores where given)
//   x   = LayerNorm(int8 product of quantize_rows(ctx) + x), and x quantized for the next product
//                                                                         int8_linear_residual_layer_norm_quantize
//   h   = GELU(int8 product of x), quantized for the next product         int8_linear_gelu_quantize
//   x   = LayerNorm(int8 product of h + x), quantized for the next layer's QKV product (plain for the last layer)
//                                                          int8_linear_residual_layer_norm[_quantize]
// where each product adds back its outlier channels in fp32 (the input's values there, gathered in fp32, times the
// float weight's columns there; GELU's output keeps its values at the next product's outlier channels), so its output
// equals the layer-by-layer calls bit for bit. A short input spends a large share of a forward between those kernels
// when Python calls them one by one; here they follow each other through the C++ dispatcher. With several threads and
// a batch of enough rows in sequences of even enough lengths, each thread runs the whole stack on its own sequences
// (sequence_groups.h); the result is then that of the kernels called one by one on each group of sequences.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cpu_utils.h"
#include "sequence_groups.h"

namespace mtbert_fast {
namespace {

// Per product: panels, weight_scale, weight_sum, bias, smooth, outlier_index, outlier_weight.
constexpr int64_t kPerProduct = 7;
constexpr int64_t kProducts = 4;  // QKV, attention output, intermediate, output
// Per layer: the four products, then the attention norm's weight and bias and the output norm's weight and bias.
constexpr int64_t kPerLayer = kProducts * kPerProduct + 4;
constexpr const char* kProductNames[kProducts] = {"the QKV product", "the attention output product",
                                                  "the intermediate product", "the output product"};

using OptTensor = std::optional<at::Tensor>;
using Quantized = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Quantized4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using QuantizeRows = Quantized(const at::Tensor&, const at::Tensor&);
#define MTBF_PRODUCT_ARGS                                                                                            \
  const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, \
      const OptTensor&, const OptTensor&
using Linear = at::Tensor(MTBF_PRODUCT_ARGS, const OptTensor&);
using GeluQuantize = Quantized4(MTBF_PRODUCT_ARGS, c10::string_view, const at::Tensor&, const OptTensor&,
                                const OptTensor&);
using ResidualNorm = at::Tensor(MTBF_PRODUCT_ARGS, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                const OptTensor&);
using ResidualNormQuantize = Quantized4(MTBF_PRODUCT_ARGS, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        double, const at::Tensor&, const OptTensor&);
#undef MTBF_PRODUCT_ARGS
using Attention = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                                     const OptTensor&, const OptTensor&, int64_t, const OptTensor&,
                                                     const OptTensor&, const OptTensor&);

// x [T, H]'s columns `index` (int64 [k], checked in [0, H)) as fp32 [T, k]: ATen's index_select along the columns
// and a cast, in one pass that takes a fraction of their time on short inputs.
at::Tensor gather_columns(const at::Tensor& x, const at::Tensor& index) {
  const int64_t T = x.size(0), H = x.size(1), k = index.numel();
  const at::Tensor xc = x.contiguous(), ic = index.contiguous();
  const int64_t* ix = ic.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(ix[j] >= 0 && ix[j] < H, "outlier_index holds channel ", ix[j], ", outside [0, ", H, ")");
  }
  at::Tensor out = at::empty({T, k}, x.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  cpu::dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using S = decltype(t);
    const S* src = xc.const_data_ptr<S>();
    for (int64_t r = 0; r < T; ++r)
      for (int64_t j = 0; j < k; ++j) o[r * k + j] = static_cast<float>(src[r * H + ix[j]]);
  });
  return out;
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// One product's tensors of `weights`.
struct Product {
  const at::Tensor* w;
  const at::Tensor& panels() const { return w[0]; }
  const at::Tensor& smooth() const { return w[4]; }
  const at::Tensor& outlier_index() const { return w[5]; }
  int64_t out_features() const { return w[1].size(0); }

  // The product's outlier_x and outlier_w for the float input x (none where it has no outlier channels).
  std::pair<OptTensor, OptTensor> outliers(const at::Tensor& x) const {
    if (w[5].numel() == 0) return {};
    return {gather_columns(x, w[5]), w[6]};
  }
  // The same for inputs already gathered at the outlier channels (kept [T, k] fp32).
  std::pair<OptTensor, OptTensor> kept(const at::Tensor& kept) const {
    if (w[5].numel() == 0) return {};
    return {kept, w[6]};
  }
};

// Runs f(); an error it raises names the layer and the product (or step) it came from.
template <typename F>
auto in_layer(int64_t layer, const char* what, const F& f) {
  try {
    return f();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "int8_layers: layer ", layer, ", ", what, ": ", e.what_without_backtrace());
  }
}

at::Tensor int8_layers_cpu(const at::Tensor& x,           // [T, H]
                           const at::Tensor& cu_seqlens,  // int32 [B + 1]
                           int64_t max_seqlen, at::TensorList weights, int64_t heads, double scale, double eps,
                           c10::string_view approximate,
                           const OptTensor& rel_bias) {  // fp32 [heads, 2R + 1]
  constexpr const char* op = "int8_layers";
  const int64_t layers = check_layer_stack(op, x, heads, weights, kPerLayer);
  const int64_t T = x.size(0), H = x.size(1);
  for (int64_t i = 0; i < layers; ++i) {
    for (int64_t p = 0; p < kProducts; ++p) {
      const at::Tensor* w = weights.data() + i * kPerLayer + p * kPerProduct;
      TORCH_CHECK(w[1].dim() == 1 && w[1].size(0) > 0, op, ": weights[", i * kPerLayer + p * kPerProduct + 1,
                  "] (layer ", i, ", ", kProductNames[p], "'s weight_scale) must be a vector of out_features > 0, got "
                  "shape ", w[1].sizes());
      TORCH_CHECK(w[5].scalar_type() == at::kLong && w[5].dim() == 1, op, ": weights[",
                  i * kPerLayer + p * kPerProduct + 5, "] (layer ", i, ", ", kProductNames[p],
                  "'s outlier_index) must be a 1-D int64 tensor, got ", w[5].scalar_type(), " of shape ",
                  w[5].sizes());
    }
    const int64_t widths[kProducts] = {3 * H, H, 0, H};  // 0: any (the intermediate size)
    for (int64_t p = 0; p < kProducts; ++p) {
      const int64_t n = weights[i * kPerLayer + p * kPerProduct + 1].size(0);
      TORCH_CHECK(widths[p] == 0 || n == widths[p], op, ": layer ", i, ", ", kProductNames[p], " has ", n,
                  " out_features (weight_scale's length), expected ", widths[p], " for x of ", H, " columns");
    }
  }
  static const auto quantize_rows = kernel_op<QuantizeRows>("mtbert_fast_C::quantize_rows");
  static const auto linear = kernel_op<Linear>("mtbert_fast_C::int8_linear");
  static const auto gelu_quantize = kernel_op<GeluQuantize>("mtbert_fast_C::int8_linear_gelu_quantize");
  static const auto residual_norm = kernel_op<ResidualNorm>("mtbert_fast_C::int8_linear_residual_layer_norm");
  static const auto residual_norm_quantize =
      kernel_op<ResidualNormQuantize>("mtbert_fast_C::int8_linear_residual_layer_norm_quantize");
  static const auto attention = kernel_op<Attention>("mtbert_fast_C::attention_varlen");
  const OptTensor none;
  const auto product = [&](int64_t layer, int64_t p) {
    return Product{weights.data() + layer * kPerLayer + p * kPerProduct};
  };
  // the layers over the rows of whole sequences and their cu_seqlens (max_seqlen bounds every group's)
  const auto stack = [&](at::Tensor h, const at::Tensor& cu) {
    const int64_t rows = h.size(0);
    // h quantized for the next product: (q, scale, zero)
    Quantized hq = in_layer(0, "quantizing x", [&] { return quantize_rows.call(h, product(0, 0).smooth()); });
    for (int64_t i = 0; i < layers; ++i) {
      const Product qkv_w = product(i, 0), out_w = product(i, 1), inner_w = product(i, 2), ffn_w = product(i, 3);
      const at::Tensor* norms = weights.data() + i * kPerLayer + kProducts * kPerProduct;
      const auto call = [&](const Product& w, const Quantized& q, const std::pair<OptTensor, OptTensor>& outliers,
                            const auto& kernel, auto&&... rest) {
        return kernel.call(std::get<0>(q), std::get<1>(q), std::get<2>(q), w.w[1], w.w[2], w.w[3], outliers.first,
                           outliers.second, rest...);
      };
      const at::Tensor qkv = in_layer(i, kProductNames[0], [&] {
        return call(qkv_w, hq, qkv_w.outliers(h), linear, OptTensor(qkv_w.panels()));
      });
      const at::Tensor ctx = in_layer(i, "attention", [&] {
        return std::get<0>(attention.call(qkv.view({rows, 3, heads, H / heads}), cu, max_seqlen, scale, 0.0,
                                          none, rel_bias, -1, none, none, none))
            .reshape({rows, H});
      });
      Quantized4 normed = in_layer(i, kProductNames[1], [&] {
        const Quantized cq = quantize_rows.call(ctx, out_w.smooth());
        return call(out_w, cq, out_w.outliers(ctx), residual_norm_quantize, h, norms[0], norms[1], eps,
                    inner_w.smooth(), OptTensor(out_w.panels()));
      });
      h = std::get<0>(normed);
      hq = {std::get<1>(normed), std::get<2>(normed), std::get<3>(normed)};
      const Quantized4 inner = in_layer(i, kProductNames[2], [&] {
        return call(inner_w, hq, inner_w.outliers(h), gelu_quantize, approximate, ffn_w.smooth(),
                    OptTensor(ffn_w.outlier_index()), OptTensor(inner_w.panels()));
      });
      const Quantized iq = {std::get<0>(inner), std::get<1>(inner), std::get<2>(inner)};
      const auto outliers = ffn_w.kept(std::get<3>(inner));
      if (i + 1 == layers) {
        h = in_layer(i, kProductNames[3], [&] {
          return call(ffn_w, iq, outliers, residual_norm, h, norms[2], norms[3], eps, OptTensor(ffn_w.panels()));
        });
      } else {
        normed = in_layer(i, kProductNames[3], [&] {
          return call(ffn_w, iq, outliers, residual_norm_quantize, h, norms[2], norms[3], eps,
                      product(i + 1, 0).smooth(), OptTensor(ffn_w.panels()));
        });
        h = std::get<0>(normed);
        hq = {std::get<1>(normed), std::get<2>(normed), std::get<3>(normed)};
      }
    }
    return h;
  };
  read_cu_seqlens(op, cu_seqlens, T, max_seqlen, "x");
  return cpu::by_sequence_groups(x, cu_seqlens.contiguous(), H, weights[2 * kPerProduct + 1].size(0), stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("int8_layers", &int8_layers_cpu); }

}  // namespace mtbert_fast
