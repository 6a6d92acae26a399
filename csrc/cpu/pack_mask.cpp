// pack_mask on the CPU: one pass over an attention mask [B, L] that finds where its real tokens sit and what is
// wrong with it, for the encoder's input checks and unpadding (a dozen small ATen calls and host reads otherwise).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "checks.h"

namespace mtbert_fast {
namespace {

// What pack_mask reports in its stats tensor, in this order.
enum Stat : int64_t { kTokens, kLongest, kFirstOther, kFirstEmptyRow, kFirstColumnPadded, kStats };

template <typename M>
void pack_mask_kernel(
    const M* mask,       // [B, L]
    int64_t* slots,      // [B * L]: the real tokens' slots in order, then the padding's
    int32_t* cu,         // [B + 1]
    int64_t* stats,      // [kStats]
    int64_t B,
    int64_t L) {
  int64_t tokens = 0, longest = 0, other = -1, empty = -1, first_padded = 0;
  cu[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    const M* row = mask + b * L;
    int64_t n = 0;
    for (int64_t l = 0; l < L; ++l) {
      const M v = row[l];
      if (v != M(0)) {
        slots[tokens + n++] = b * L + l;
        if (other < 0 && v != M(1)) other = b * L + l;
      }
    }
    if (n == 0 && empty < 0) empty = b;
    if (L > 0 && row[0] == M(0)) first_padded = 1;
    tokens += n;
    longest = std::max(longest, n);
    cu[b + 1] = static_cast<int32_t>(tokens);
  }
  int64_t pad = tokens;
  for (int64_t s = 0; s < B * L; ++s) {
    if (mask[s] == M(0)) slots[pad++] = s;
  }
  stats[kTokens] = tokens;
  stats[kLongest] = longest;
  stats[kFirstOther] = other;
  stats[kFirstEmptyRow] = empty;
  stats[kFirstColumnPadded] = first_padded;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_mask_cpu(const at::Tensor& attention_mask) {
  MTBF_CHECK_DEVICE_TYPE("pack_mask", attention_mask, at::kCPU);
  MTBF_CHECK_DIM("pack_mask", attention_mask, 2);
  TORCH_CHECK(!attention_mask.is_complex(), "pack_mask: attention_mask must hold integers, bools or floats, got ",
              attention_mask.scalar_type());
  const int64_t B = attention_mask.size(0), L = attention_mask.size(1);
  TORCH_CHECK(B * L <= INT32_MAX, "pack_mask: ", B, " x ", L, " tokens do not fit cu_seqlens' int32");
  const at::Tensor mc = attention_mask.contiguous();
  const auto options = attention_mask.options().dtype(at::kLong);
  at::Tensor slots = at::empty({B * L}, options);
  at::Tensor cu = at::empty({B + 1}, options.dtype(at::kInt));
  at::Tensor stats = at::empty({kStats}, options);
  AT_DISPATCH_ALL_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, mc.scalar_type(), "pack_mask", [&] {
    pack_mask_kernel<scalar_t>(mc.const_data_ptr<scalar_t>(), slots.mutable_data_ptr<int64_t>(),
                               cu.mutable_data_ptr<int32_t>(), stats.mutable_data_ptr<int64_t>(), B, L);
  });
  return {slots, cu, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("pack_mask", &pack_mask_cpu); }

}  // namespace mtbert_fast
