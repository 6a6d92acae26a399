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
// stack on its own sequences (sequence_groups), every kernel on that one thread: the kernels then share no parallel
// region, so no thread waits at their barriers for the other or for the serial work between them, and each core
// reads only the rows it wrote itself; in exchange each reads every weight. The result is then that of the kernels
// called one by one on each group of sequences.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sub.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cpu_amx.h"

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

// Whether a stack may run each thread on its own sequences (stack_by_sequences).
std::atomic<bool> by_sequences{true};

// The least rows a thread takes its own sequences for, as a share of a layer's weight values per input and output
// width summed over its four products (sum K N / sum (K + N): 307 rows for MiniLM's layers, 614 for bert-base's):
// each thread then reads every weight, which enough rows pay for. With 64 rows a thread (8 sequences of 16 tokens on
// two threads: 0.1-0.2 of that) bert-base's stacks and MiniLM's float32 one ran 6-13 % slower apart, with 128 (0.2-0.4)
// even, from about 0.4 on 0-5 % faster (docs/cpu-full-batch.md, "Each thread on its own sequences").
constexpr double kMinRowsShare = 0.4;
// The most rows a thread takes its own sequences for: past about 1,000 rows a thread the shared kernels ran as fast
// (float32) or up to 4 % faster (MiniLM in bf16 at 2,048 rows a thread).
constexpr int64_t kMaxThreadRows = 768;
// The most rows a group may hold over an even share: the threads wait for the largest.
constexpr double kMaxGroupShare = 1.25;

// The first sequence of each of `threads` groups of whole, consecutive sequences, B after the last, for the stack to
// run each group on its own thread; empty where the batch stays whole: one thread, fewer sequences than threads, fewer
// rows a thread than kMinRowsShare asks of the layers' shapes (H, I) or more than kMaxThreadRows, or no grouping within
// kMaxGroupShare of an even share. Each boundary is the sequence start nearest its even share of the rows.
std::vector<int64_t> sequence_groups(const int32_t* cu, int64_t B, int64_t threads, int64_t H, int64_t I) {
  const int64_t T = cu[B];
  const double weights = 4.0 * H * H + 2.0 * H * I, widths = 7.0 * H + 2.0 * I;
  if (threads < 2 || B < threads || T < kMinRowsShare * weights / widths * threads || T > kMaxThreadRows * threads)
    return {};
  std::vector<int64_t> first(threads + 1, B);
  first[0] = 0;
  int64_t s = 0;
  for (int64_t g = 1; g < threads; ++g) {
    const double even = static_cast<double>(g) * T / threads;
    while (s < B && cu[s + 1] <= even) ++s;  // cu[s] <= even < cu[s + 1]
    const int64_t nearest = s < B && cu[s + 1] - even < even - cu[s] ? s + 1 : s;
    first[g] = std::clamp<int64_t>(nearest, first[g - 1] + 1, B - (threads - g));
  }
  for (int64_t g = 0; g < threads; ++g) {
    if (cu[first[g + 1]] - cu[first[g]] > kMaxGroupShare * T / threads) return {};
  }
  return first;
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
  // the layers over the rows of whole sequences: x [T, H] and their cu_seqlens
  const auto stack = [&](at::Tensor h, const at::Tensor& cu, int64_t max_len) {
    const int64_t rows = h.size(0);
    for (int64_t i = 0; i < layers; ++i) {
      const at::Tensor* w = weights.data() + i * kPerLayer;
      const at::Tensor* p = packs.empty() ? nullptr : packs.data() + 4 * i;
      const auto pack = [&](int j) { return p == nullptr ? nullptr : p + j; };
      const at::Tensor qkv = product(h, w[0], w[1], 3 * H, false, pack(0)).view({rows, 3, heads, H / heads});
      const at::Tensor ctx =
          std::get<0>(attention.call(qkv, cu, max_len, scale, 0.0, none, rel_bias, -1, none, none, none));
      h = std::get<0>(
          residual_norm.call(product(ctx.view({rows, H}), w[2], none, H, false, pack(1)), w[3], h, w[4], w[5], eps));
      const at::Tensor inner = product(h, w[6], w[7], w[7].size(0), true, pack(2));
      h = std::get<0>(residual_norm.call(product(inner, w[8], none, H, false, pack(3)), w[9], h, w[10], w[11], eps));
    }
    return h;
  };
  read_cu_seqlens(op, cu_seqlens, T, max_seqlen, "x");
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t B = cu.size(0) - 1;
  const std::vector<int64_t> first =
      by_sequences.load(std::memory_order_relaxed)
          ? sequence_groups(cu.const_data_ptr<int32_t>(), B, at::get_num_threads(), H, weights[7].size(0))
          : std::vector<int64_t>();
  if (first.empty()) return stack(x, cu, max_seqlen);
  // each group on its own thread, under the caller's thread-local state (inference mode, grad mode); the kernels
  // inside run on that thread alone (at::parallel_for, oneDNN and MKL run serially inside a parallel region)
  const int32_t* c = cu.const_data_ptr<int32_t>();
  at::Tensor out = at::empty_like(x);
  const at::ThreadLocalState state;
  const int64_t groups = static_cast<int64_t>(first.size()) - 1;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = c[first[g]], rows = c[first[g + 1]] - r0;
      const at::Tensor cu_g = at::sub(cu.narrow(0, first[g], first[g + 1] - first[g] + 1), r0);
      out.narrow(0, r0, rows).copy_(stack(x.narrow(0, r0, rows), cu_g, max_seqlen));
    }
  });
  return out;
}

// stack_by_sequences(allow): sets whether a stack may run each thread on its own sequences (None leaves it), and
// returns whether it now may.
bool stack_by_sequences(std::optional<bool> allow) {
  if (allow.has_value()) by_sequences.store(*allow, std::memory_order_relaxed);
  return by_sequences.load(std::memory_order_relaxed);
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
  return sequence_groups(cu.const_data_ptr<int32_t>(), cu.size(0) - 1, threads, hidden, intermediate);
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
