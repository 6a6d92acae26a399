// token_embeddings on the CPU: the embedding rows of the real tokens looked up, added and normalized in one pass,
// LayerNorm(word[id] + token_type[type] + position[slot % L]) per packed token, the sum in fp32 in a per-thread row
// buffer (L1). It replaces a dozen small ATen calls (two gathers of the ids, three lookups, two additions, the
// positions, the LayerNorm) whose fixed costs dominate a short input's embedding step. Every id, type and position
// is checked before any row is written, and a bad one is named.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "checks.h"
#include "cpu_utils.h"

namespace mtbert_fast {
namespace {

using namespace cpu;

constexpr const char* kOp = "token_embeddings";

template <typename T, typename W, typename I>
void token_embeddings_kernel(
    const I* ids,             // [B * L]
    const I* types,           // [B * L], or null: type 0 for every token
    const int64_t* slots,     // [N] into B * L, or null: token n sits in slot n
    const T* word,            // [V, E]
    const T* position,        // [P, E], or null
    const T* token_type,      // [TT, E], or null
    const W* weight,          // [E]
    const W* beta,            // [E]
    double eps,
    T* out,                   // [N, E]
    int64_t N,
    int64_t L,
    int64_t E) {
  at::parallel_for(0, N, layer_norm_row_grain(E), [&](int64_t begin, int64_t end) {
    const ParamF32<W> w(weight, E), bt(beta, E);
    LineVector<float> s(E);
    float mean, rstd;
    for (int64_t n = begin; n < end; ++n) {
      const int64_t slot = slots != nullptr ? slots[n] : n;
      const T* wr = word + static_cast<int64_t>(ids[slot]) * E;
      const T* tr = token_type != nullptr ? token_type + (types != nullptr ? static_cast<int64_t>(types[slot]) : 0) * E
                                          : nullptr;
      const T* pr = position != nullptr ? position + (slot % L) * E : nullptr;
      // (word + type) + position, the order of the modules' own additions
      const fVec sum = reduce_vecs(E, fVec(0.f), [&](int64_t d, auto k, fVec& acc) {
        fVec v = load(wr + d, k);
        if (tr != nullptr) v = v + load(tr + d, k);
        if (pr != nullptr) v = v + load(pr + d, k);
        store(s.data() + d, v, k);
        acc += v;  // a tail's loads leave the lanes past it zero
      });
      layer_norm_row(s.data(), lane_sum(sum), w.data(), bt.data(), eps, out + n * E, &mean, &rstd, E);
    }
  });
}

// A table [rows, E] of the word table's dtype and width, on the CPU.
void check_table(const char* name, const at::Tensor& t, const at::Tensor& word) {
  TORCH_CHECK(t.device() == word.device(), kOp, ": ", name, " is on ", t.device(), " but word is on ", word.device());
  TORCH_CHECK(t.scalar_type() == word.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but word has ", word.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == word.size(1), kOp, ": ", name, " must be [rows, ", word.size(1),
              "] like word, got shape ", t.sizes());
}

// The LayerNorm's weight or bias: [E], of the word table's dtype or float32.
void check_norm_param(const char* name, const at::Tensor& t, const at::Tensor& word) {
  TORCH_CHECK(t.device() == word.device(), kOp, ": ", name, " is on ", t.device(), " but word is on ", word.device());
  TORCH_CHECK(t.scalar_type() == word.scalar_type() || t.scalar_type() == at::kFloat, kOp, ": ", name, " has dtype ",
              t.scalar_type(), " but word has ", word.scalar_type(), "; it must be word's dtype or float32");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == word.size(1), kOp, ": ", name, " must be a vector of ", word.size(1),
              " elements (word's width), got shape ", t.sizes());
}

// ids [B, L] (or types, of ids' shape): int64 or int32, on the CPU.
void check_ids(const char* name, const at::Tensor& t, const at::Tensor& ids) {
  TORCH_CHECK(t.device().type() == at::kCPU, kOp, ": ", name, " must be on cpu, got ", t.device());
  TORCH_CHECK(t.scalar_type() == ids.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but input_ids has ", ids.scalar_type());
  TORCH_CHECK(t.sizes() == ids.sizes(), kOp, ": ", name, " has shape ", t.sizes(), " but input_ids has shape ",
              ids.sizes());
}

// Every token's id below `rows` of its table, named with its slot where not.
template <typename I>
void check_lookups(const char* what, const I* ids, const int64_t* slots, int64_t N, int64_t L, int64_t rows) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t slot = slots != nullptr ? slots[n] : n;
    const int64_t id = static_cast<int64_t>(ids[slot]);
    TORCH_CHECK_VALUE(id >= 0 && id < rows, kOp, ": ", what, "[", slot / L, ", ", slot % L, "] = ", id,
                      " is outside the table's ", rows, " rows");
  }
}

at::Tensor token_embeddings_cpu(
    const at::Tensor& input_ids,
    const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& token_type_ids,
    const at::Tensor& word,
    const std::optional<at::Tensor>& position,
    const std::optional<at::Tensor>& token_type,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    double eps) {
  MTBF_CHECK_DEVICE_TYPE("token_embeddings", word, at::kCPU);
  MTBF_CHECK_FLOAT_OR_BF16("token_embeddings", word);
  MTBF_CHECK_DIM("token_embeddings", word, 2);
  const int64_t E = word.size(1);
  TORCH_CHECK(E > 0, kOp, ": word must have a non-empty last dim, got shape ", word.sizes());
  MTBF_CHECK_DEVICE_TYPE("token_embeddings", input_ids, at::kCPU);
  MTBF_CHECK_DIM("token_embeddings", input_ids, 2);
  TORCH_CHECK(input_ids.scalar_type() == at::kLong || input_ids.scalar_type() == at::kInt, kOp,
              ": input_ids must be int64 or int32, got ", input_ids.scalar_type());
  if (token_type_ids.has_value()) check_ids("token_type_ids", *token_type_ids, input_ids);
  if (position.has_value()) check_table("position", *position, word);
  if (token_type.has_value()) check_table("token_type", *token_type, word);
  check_norm_param("weight", weight, word);
  if (bias.has_value()) {
    check_norm_param("bias", *bias, word);
    TORCH_CHECK(bias->scalar_type() == weight.scalar_type(), kOp, ": bias has dtype ", bias->scalar_type(),
                " but weight has ", weight.scalar_type());
  }
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  int64_t N = B * L;
  if (indices.has_value()) {
    MTBF_CHECK_DEVICE_TYPE("token_embeddings", *indices, at::kCPU);
    MTBF_CHECK_DIM("token_embeddings", *indices, 1);
    MTBF_CHECK_DTYPE("token_embeddings", *indices, at::kLong);
    N = indices->size(0);
  }
  const at::Tensor slots_c = indices.has_value() ? indices->contiguous() : at::Tensor();
  const int64_t* slots = indices.has_value() ? slots_c.const_data_ptr<int64_t>() : nullptr;
  for (int64_t n = 0; n < N && slots != nullptr; ++n) {
    TORCH_CHECK_VALUE(slots[n] >= 0 && slots[n] < B * L, kOp, ": indices[", n, "] = ", slots[n],
                      " is outside the ", B, " x ", L, " input_ids");
  }
  if (position.has_value()) {
    // a slot's position is its column: every column of a row of L must have its row in the table
    TORCH_CHECK_VALUE(L <= position->size(0), kOp, ": input_ids has ", L, " columns but the position table only ",
                      position->size(0), " rows");
  }
  const at::Tensor ids_c = input_ids.contiguous();
  const at::Tensor types_c = token_type_ids.has_value() ? token_type_ids->contiguous() : at::Tensor();
  const at::Tensor word_c = word.contiguous();
  const at::Tensor position_c = position.has_value() ? position->contiguous() : at::Tensor();
  const at::Tensor token_type_c = token_type.has_value() ? token_type->contiguous() : at::Tensor();
  const at::Tensor weight_c = weight.contiguous();
  at::Tensor out = at::empty({N, E}, word.options());
  AT_DISPATCH_INDEX_TYPES(input_ids.scalar_type(), "token_embeddings", [&] {
    const index_t* ids = ids_c.const_data_ptr<index_t>();
    const index_t* types = token_type_ids.has_value() ? types_c.const_data_ptr<index_t>() : nullptr;
    check_lookups("input_ids", ids, slots, N, L, word.size(0));
    if (token_type.has_value()) {
      TORCH_CHECK_INDEX(types != nullptr || token_type->size(0) > 0, kOp,
                        ": no token_type_ids, and the token_type table has no type 0");
      if (types != nullptr) check_lookups("token_type_ids", types, slots, N, L, token_type->size(0));
    }
    if (N == 0) return;
    const at::Tensor beta_c = bias.has_value() ? bias->contiguous() : at::zeros({E}, weight.options());
    dispatch_layer_norm_types(word.scalar_type(), weight.scalar_type(), [&](auto t, auto w) {
      using T = decltype(t);
      using W = decltype(w);
      token_embeddings_kernel<T, W, index_t>(
          ids, token_type.has_value() ? types : nullptr, slots, word_c.const_data_ptr<T>(),
          position.has_value() ? position_c.const_data_ptr<T>() : nullptr,
          token_type.has_value() ? token_type_c.const_data_ptr<T>() : nullptr, weight_c.const_data_ptr<W>(),
          beta_c.const_data_ptr<W>(), eps, out.mutable_data_ptr<T>(), N, L, E);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("token_embeddings", &token_embeddings_cpu); }

}  // namespace mtbert_fast
