// The attention-dropout mask, one definition for every backend (CPU, CUDA, Triton, and the PyTorch reference in
// mtbert_fast/ops/dropout.py), so that a seed gives the same mask everywhere and the backward regenerates the
// forward's mask instead of storing it.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), counter-based:
//   key     = (seed & 0xffffffff, seed >> 32)            seed = rng_state[0] (int64)
//   counter = (j >> 2, i, h, offset)                     offset = rng_state[1] & 0xffffffff
// for the score of query row i and key row j (both packed row indices in [0, T)) of head h; of the four 32-bit
// words, element (h, i, j) takes word j & 3. It is kept iff word >= threshold = floor(dropout_p * 2^32), and a kept
// probability is scaled by 1 / (1 - dropout_p).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MTBF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MTBF_HOST_DEVICE inline
#endif

namespace mtbert_fast {

struct Philox4 {
  uint32_t w[4];
};

MTBF_HOST_DEVICE uint32_t philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

// Philox4x32 with 10 rounds: the four words for `counter` under `key`.
MTBF_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = philox_mulhilo(kMul0, c0, &hi0);
    const uint32_t lo1 = philox_mulhilo(kMul1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// What a kernel needs to regenerate the mask: the key, the offset, the threshold and the scale of kept values.
struct DropoutParams {
  uint32_t k0 = 0, k1 = 0, offset = 0;
  uint32_t threshold = 0;  // keep iff word >= threshold
  float scale = 1.f;       // 1 / (1 - dropout_p)
  bool enabled = false;
};

// The four words for key rows 4g .. 4g+3 (g = j >> 2) of query row i, head h.
MTBF_HOST_DEVICE Philox4 dropout_words(const DropoutParams& d, uint32_t g, uint32_t i, uint32_t h) {
  return philox4x32_10(g, i, h, d.offset, d.k0, d.k1);
}

// The multiplier of probability (h, i, j): 0 where dropped, 1 / (1 - p) where kept.
MTBF_HOST_DEVICE float dropout_multiplier(const DropoutParams& d, uint32_t i, uint32_t j, uint32_t h) {
  const Philox4 r = dropout_words(d, j >> 2, i, h);
  return r.w[j & 3] >= d.threshold ? d.scale : 0.f;
}

}  // namespace mtbert_fast
