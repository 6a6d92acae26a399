// Host side of the attention-dropout mask (philox.h): checks dropout_p and rng_state and turns them into the
// DropoutParams every attention kernel takes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <optional>

#include "philox.h"

namespace mtbert_fast {

// dropout_p in [0, 1); rng_state int64 [2] = (seed, offset) on the CPU, required when dropout_p > 0. Reading it is a
// host read, never a device synchronisation.
inline DropoutParams make_dropout_params(const char* op, double dropout_p, const std::optional<at::Tensor>& rng_state) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
  DropoutParams d;
  if (dropout_p == 0.0) return d;
  TORCH_CHECK(rng_state.has_value(), op, ": dropout_p = ", dropout_p, " needs rng_state (int64 [2]: seed, offset)");
  const at::Tensor& s = *rng_state;
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kLong && s.dim() == 1 && s.size(0) == 2, op,
              ": rng_state must be an int64 CPU tensor of shape [2] (seed, offset), got ", s.scalar_type(), " ",
              s.sizes(), " on ", s.device());
  const at::Tensor sc = s.contiguous();
  const uint64_t seed = static_cast<uint64_t>(sc.const_data_ptr<int64_t>()[0]);
  d.k0 = static_cast<uint32_t>(seed);
  d.k1 = static_cast<uint32_t>(seed >> 32);
  d.offset = static_cast<uint32_t>(static_cast<uint64_t>(sc.const_data_ptr<int64_t>()[1]));
  d.threshold = static_cast<uint32_t>(std::min(std::floor(dropout_p * 4294967296.0), 4294967295.0));
  d.scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  d.enabled = true;
  return d;
}

}  // namespace mtbert_fast
