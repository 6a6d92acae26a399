// A stack of post-norm encoder layers (BERT's) on packed tokens, for inference on the CPU, in one call.
//
// Each layer is the encoder's inference layer, kernel for kernel:
//   qkv = x @ Wqkv^T + bqkv                                  product
//   ctx = attention_varlen(qkv, cu_seqlens, max_seqlen)      (rel_bias added to the scores where given)
//   x   = LayerNorm(ctx @ Wo^T + bo + x)                     product, bias_residual_layer_norm
//   h   = GELU(x @ Wi^T + bi)                                product with its GELU epilogue
//   x   = LayerNorm(h @ Wf^T + bf + x)                       product, bias_residual_layer_norm
// so its output equals the layer-by-layer calls bit for bit. Each product runs on the kernel its weight is packed
// for: panel_linear on the panels of pack_panels (inputs of few rows), oneDNN's linear (mkldnn::_linear_pointwise)
// on a weight in oneDNN's blocked layout (an mkldnn tensor, from mkldnn::_reorder_linear_weight), or mkl_linear on a
// plain weight in x's dtype with its MKL pack (mkl_pack) in packs. Called one by one
// from Python, the kernels wait between each other for argument parsing, the op dispatch and the layer's own code: a
// large share of a short input's forward, and 2 to 4 % of a full batch's. Here they follow each other through the C++
// dispatcher.
//
// With several threads and a batch of enough rows in sequences of even enough lengths, each thread runs the whole
// stack on its own sequences (sequence_groups.h); the result is then that of the kernels called one by one on each
// group of sequences.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_amx.h"
#include "sequence_groups.h"

namespace mtbert_fast {
namespace {

constexpr int64_t kPerLayer = 12;  // tensors per layer in `weights`

using PanelLinear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t, bool,
                               c10::string_view);
using Attention = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t, double, double,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&, int64_t,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&,
                                                     const std::optional<at::Tensor>&);
using ResidualNorm = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, double);

using MklLinear = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, bool, c10::string_view);

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// oneDNN's bf16 linear on AMX tiles (the oneDNN of PyTorch 2.13) runs products of 448-1,280 rows with weights of
// 768-1,024 output features at about half its rate (a BERT-base layer's attention output and FFN output products at
// B=8, L=128: 1,100-1,500 GFLOP/s, where its other products and these at 384 rows or fewer, or 1,536 and more, run at
// 2,100-3,000 on a 2-core Xeon), so such products run in equal blocks of at most 384 rows, one oneDNN call each: the
// rows of each block of a product's input, or all of them.
constexpr int64_t kAmxBlockRows = 384;

int64_t onednn_row_block(int64_t rows, int64_t out_features, at::ScalarType dtype) {
#ifdef MTBF_AMX
  const bool slow = dtype == at::kBFloat16 && out_features >= 768 && out_features <= 1024 && rows >= 448 &&
                    rows <= 1280 && cpu::amx::bf16_tiles();
  if (slow) {
    const int64_t blocks = (rows + kAmxBlockRows - 1) / kAmxBlockRows;
    return (rows + blocks - 1) / blocks;
  }
#endif
  return rows;
}

// oneDNN's linear (mkldnn::_linear_pointwise) of a on a weight w in its blocked layout, with GELU where asked, in
// blocks of onednn_row_block rows.
at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b, bool gelu,
                         c10::string_view approximate) {
  // boxed: the op's C++ argument types are ATen's internals (its schema is the stable part)
  static const c10::OperatorHandle onednn =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  const auto call = [&](const at::Tensor& rows) {
    torch::jit::Stack stack{rows, w, b, std::string(gelu ? "gelu" : "none"), c10::List<std::optional<at::Scalar>>(),
                            std::string(gelu ? approximate : "")};
    onednn.callBoxed(&stack);
    return std::move(stack[0]).toTensor();
  };
  const int64_t block = onednn_row_block(a.size(0), w.size(0), a.scalar_type());
  if (block >= a.size(0)) return call(a);
  std::vector<at::Tensor> parts;
  for (const at::Tensor& rows : a.split(block)) parts.push_back(call(rows));
  return at::cat(parts);
}

// weights: per layer, in order, [Wqkv, bqkv [3H], Wo, bo [H], norm weight [H], norm bias [H], Wi, bi [I], Wf, bf [H],
// norm weight [H], norm bias [H]]; each matrix as the panels of pack_panels or in oneDNN's layout in x's dtype.
at::Tensor post_norm_layers_cpu(const at::Tensor& x,           // [T, H]
                                const at::Tensor& cu_seqlens,  // int32 [B + 1]
                                int64_t max_seqlen, at::TensorList weights, int64_t heads, double scale, double eps,
                                c10::string_view approximate,
                                const std::optional<at::Tensor>& rel_bias,  // fp32 [heads, 2R + 1]
                                // MKL's packs of the weights given plain, 4 a layer
                                const std::optional<at::TensorList>& mkl_packs) {
  constexpr const char* op = "post_norm_layers";
  const int64_t layers = check_layer_stack(op, x, heads, weights, kPerLayer);
  const int64_t T = x.size(0), H = x.size(1);
  const at::TensorList packs = mkl_packs.value_or(at::TensorList());
  TORCH_CHECK(packs.empty() || static_cast<int64_t>(packs.size()) == 4 * layers, op, ": packs must be empty or hold ",
              4 * layers, " tensors (4 a layer), got ", packs.size());
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + i * kPerLayer;
    const std::tuple<int, const char*, int64_t> vectors[] = {
        {1, "the QKV bias [3H]", 3 * H},         {3, "the attention output bias [H]", H},
        {4, "the attention norm's weight [H]", H}, {5, "the attention norm's bias [H]", H},
        {7, "the intermediate bias [I]", 0}, {9, "the output bias [H]", H},
        {10, "the output norm's weight [H]", H},  {11, "the output norm's bias [H]", H}};
    for (const auto& [k, what, n] : vectors) {
      // n == 0: any positive length (I is the intermediate panels' width)
      TORCH_CHECK(w[k].dim() == 1 && (n == 0 ? w[k].size(0) > 0 : w[k].size(0) == n), op, ": weights[",
                  i * kPerLayer + k, "] (layer ", i, ", ", what, ") must be a vector of ",
                  n == 0 ? std::string("I > 0") : std::to_string(n), " elements for x of ", H,
                  " columns, got shape ", w[k].sizes());
    }
    // a matrix in oneDNN's layout: [out_features, in_features] in x's dtype (panel_linear checks its panels itself)
    const int64_t I = w[7].size(0);
    const std::tuple<int, const char*, int64_t, int64_t> matrices[] = {
        {0, "the QKV weight", 3 * H, H}, {2, "the attention output weight", H, H},
        {6, "the intermediate weight", I, H}, {8, "the output weight", H, I}};
    for (const auto& [k, what, n, kk] : matrices) {
      if (!w[k].is_mkldnn() && w[k].dim() == 2) {  // a plain weight, multiplied by mkl_linear on its pack
        TORCH_CHECK(!packs.empty(), op, ": weights[", i * kPerLayer + k, "] (layer ", i, ", ", what,
                    ") is a plain [N, K] weight, which needs its MKL pack in packs");
        TORCH_CHECK(w[k].size(0) == n && w[k].size(1) == kk, op, ": weights[", i * kPerLayer + k, "] (layer ", i,
                    ", ", what, ") must have shape [", n, ", ", kk, "], got ", w[k].sizes());
        TORCH_CHECK(w[k].scalar_type() == x.scalar_type(), op, ": weights[", i * kPerLayer + k, "] (layer ", i, ", ",
                    what, "), a plain weight, must have x's dtype ", x.scalar_type(), ", got ", w[k].scalar_type());
        continue;
      }
      if (!w[k].is_mkldnn()) continue;
      TORCH_CHECK(w[k].dim() == 2 && w[k].size(0) == n && w[k].size(1) == kk, op, ": weights[", i * kPerLayer + k,
                  "] (layer ", i, ", ", what, ") in oneDNN's layout must have shape [", n, ", ", kk, "], got ",
                  w[k].sizes());
      TORCH_CHECK(w[k].scalar_type() == x.scalar_type(), op, ": weights[", i * kPerLayer + k, "] (layer ", i, ", ",
                  what, ") in oneDNN's layout must have x's dtype ", x.scalar_type(), ", got ", w[k].scalar_type());
    }
  }
  static const auto linear = kernel_op<PanelLinear>("mtbert_fast_C::panel_linear");
  static const auto attention = kernel_op<Attention>("mtbert_fast_C::attention_varlen");
  static const auto residual_norm = kernel_op<ResidualNorm>("mtbert_fast_C::bias_residual_layer_norm");
  static const auto mkl_linear = kernel_op<MklLinear>("mtbert_fast_C::mkl_linear");
  const std::optional<at::Tensor> none;
  const auto product = [&](const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b, int64_t n,
                           bool gelu, const at::Tensor* pack) {
    if (!w.is_mkldnn() && w.dim() == 2) return mkl_linear.call(a, *pack, w, b, gelu, gelu ? approximate : "none");
    if (w.is_mkldnn()) return onednn_linear(a, w, b, gelu, approximate);
    return linear.call(a, w, b, n, gelu, gelu ? approximate : "none");
  };
  // the layers over the rows of whole sequences and their cu_seqlens (max_seqlen bounds every group's)
  const auto stack = [&](at::Tensor h, const at::Tensor& cu) {
    const int64_t rows = h.size(0);
    for (int64_t i = 0; i < layers; ++i) {
      const at::Tensor* w = weights.data() + i * kPerLayer;
      const at::Tensor* p = packs.empty() ? nullptr : packs.data() + 4 * i;
      const auto pack = [&](int j) { return p == nullptr ? nullptr : p + j; };
      const at::Tensor qkv = product(h, w[0], w[1], 3 * H, false, pack(0)).view({rows, 3, heads, H / heads});
      const at::Tensor ctx =
          std::get<0>(attention.call(qkv, cu, max_seqlen, scale, 0.0, none, rel_bias, -1, none, none, none));
      h = std::get<0>(
          residual_norm.call(product(ctx.view({rows, H}), w[2], none, H, false, pack(1)), w[3], h, w[4], w[5], eps));
      const at::Tensor inner = product(h, w[6], w[7], w[7].size(0), true, pack(2));
      h = std::get<0>(residual_norm.call(product(inner, w[8], none, H, false, pack(3)), w[9], h, w[10], w[11], eps));
    }
    return h;
  };
  read_cu_seqlens(op, cu_seqlens, T, max_seqlen, "x");
  return cpu::by_sequence_groups(x, cu_seqlens.contiguous(), H, weights[7].size(0), stack);
}

// stack_by_sequences(allow): sets whether the stacks (this op's and int8_layers) may run each thread on its own
// sequences (None leaves it), and returns whether they now may.
bool stack_by_sequences(std::optional<bool> allow) {
  if (allow.has_value()) cpu::by_sequences.store(*allow, std::memory_order_relaxed);
  return cpu::by_sequences.load(std::memory_order_relaxed);
}

// stack_groups(cu_seqlens, threads, hidden, intermediate): the first sequence of each group that a stack of layers
// of those sizes on that many threads runs apart, the batch's count after the last; empty where it stays whole.
std::vector<int64_t> stack_groups(const at::Tensor& cu_seqlens, int64_t threads, int64_t hidden,
                                  int64_t intermediate) {
  constexpr const char* op = "stack_groups";
  TORCH_CHECK(cu_seqlens.device().is_cpu() && cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 &&
                  cu_seqlens.scalar_type() == at::kInt,
              op, ": cu_seqlens must be a 1-D int32 cpu tensor of at least 2 entries, got ", cu_seqlens.scalar_type(),
              " of shape ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  TORCH_CHECK(threads > 0 && hidden > 0 && intermediate > 0, op,
              ": threads, hidden and intermediate must be positive, got ", threads, ", ", hidden, ", ", intermediate);
  const at::Tensor cu = cu_seqlens.contiguous();
  return cpu::sequence_groups(cu.const_data_ptr<int32_t>(), cu.size(0) - 1, threads, hidden, intermediate);
}

}  // namespace

// Queries of this CPU build, in the kernels' namespace: the encoder's layer-by-layer products block their rows as the
// stack's do; the switch of the stack's groups of sequences, and the groups it would take.
TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) {
  m.def("onednn_row_block(int rows, int out_features, ScalarType dtype) -> int", &onednn_row_block);
  m.def("stack_by_sequences(bool? allow=None) -> bool", &stack_by_sequences);
  m.def("stack_groups(Tensor cu_seqlens, int threads, int hidden, int intermediate) -> int[]", &stack_groups);
}

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("post_norm_layers", &post_norm_layers_cpu); }
// weights in oneDNN's blocked layout (mkldnn tensors) put the call under this key
TORCH_LIBRARY_IMPL(mtbert_fast_C, MkldnnCPU, m) { m.impl("post_norm_layers", &post_norm_layers_cpu); }

}  // namespace mtbert_fast
