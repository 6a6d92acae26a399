// The layer stacks' groups of sequences: with several threads and a batch of enough rows in sequences that split
// evenly enough, a stack of layers in one call (post_norm_layers, int8_layers) runs each thread on its own consecutive
// sequences, every kernel of every layer on that thread alone. The kernels then share no parallel region, so no thread
// waits at their barriers for the other or for the serial work between them, and each core reads only the rows it
// wrote itself; in exchange each reads every weight. The result is then the stack's on each group run on its own.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sub.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace mtbert_fast::cpu {

// Whether a stack may run each thread on its own sequences (the op stack_by_sequences).
inline std::atomic<bool> by_sequences{true};

// The least rows a thread takes its own sequences for, as a share of a layer's weight values per input and output
// width summed over its four products (sum K N / sum (K + N): 307 rows for MiniLM's layers, 614 for bert-base's):
// each thread then reads every weight, which enough rows pay for. With 64 rows a thread (8 sequences of 16 tokens on
// two threads: 0.1-0.2 of that) bert-base's float stacks and MiniLM's float32 one ran 6-13 % slower apart and the int8
// ones 0-3 %, with 128 (0.2-0.4) float ones even, from about 0.4 on 0-12 % faster (docs/cpu-full-batch.md, "Each
// thread on its own sequences").
constexpr double kMinRowsShare = 0.4;
// The most rows a thread takes its own sequences for: past about 1,000 rows a thread the shared kernels ran as fast
// (float32) or up to 4 % faster (MiniLM in bf16 at 2,048 rows a thread).
constexpr int64_t kMaxThreadRows = 768;
// The most rows a group may hold over an even share: the threads wait for the largest.
constexpr double kMaxGroupShare = 1.25;

// The first sequence of each of `threads` groups of whole, consecutive sequences (cu: the B + 1 offsets, checked), B
// after the last, for a stack of layers of hidden size H and intermediate size I to run each group on its own thread;
// empty where the batch stays whole: one thread, fewer sequences than threads, fewer rows a thread than kMinRowsShare
// asks or more than kMaxThreadRows, or no grouping within kMaxGroupShare of an even share. Each boundary is the
// sequence start nearest its even share of the rows.
inline std::vector<int64_t> sequence_groups(const int32_t* cu, int64_t B, int64_t threads, int64_t H, int64_t I) {
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

// stack(rows, their cu_seqlens) -> [rows, H] over x [T, H] with cu (checked int32 offsets): over the whole batch, or
// where sequence_groups forms groups, each group on its own thread under the caller's thread-local state (inference
// mode, grad mode), its rows written into the output. Inside the parallel region at::parallel_for, oneDNN and MKL
// run serially, so every kernel of a group runs on its thread alone.
template <typename Stack>
at::Tensor by_sequence_groups(const at::Tensor& x, const at::Tensor& cu, int64_t H, int64_t I, const Stack& stack) {
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int64_t B = cu.size(0) - 1;
  const std::vector<int64_t> first = by_sequences.load(std::memory_order_relaxed)
                                         ? sequence_groups(c, B, at::get_num_threads(), H, I)
                                         : std::vector<int64_t>();
  if (first.empty()) return stack(x, cu);
  at::Tensor out = at::empty_like(x);
  const at::ThreadLocalState state;
  at::parallel_for(0, static_cast<int64_t>(first.size()) - 1, 1, [&](int64_t g0, int64_t g1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t r0 = c[first[g]], rows = c[first[g + 1]] - r0;
      const at::Tensor cu_g = at::sub(cu.narrow(0, first[g], first[g + 1] - first[g] + 1), r0);
      out.narrow(0, r0, rows).copy_(stack(x.narrow(0, r0, rows), cu_g));
    }
  });
  return out;
}

}  // namespace mtbert_fast::cpu
