// Rows of a matrix as a register tile reads them. The CPU product kernels (panel_linear's float panels, the int8
// VNNI panels) hold a tile of up to 12 or 16 rows of their input x and read those rows side by side, one cache line
// of each at a step. Rows a multiple of 4 KiB apart fall into one set of the 8-way L1 cache, so from 9 rows a tile
// they evict each other on every step: bert-base's fp32 FFN output (K=3072, rows of 12 KiB) ran at 0.6-0.86x
// oneDNN's speed on panel_linear, and a bert-large-sized int8 FFN output (K=4096) at 0.72-0.77x the rate of K=4032.
// Up to 8 rows share a set without loss. These helpers decide when rows alias, allocate rows one cache line further
// apart where they would, and give a kernel its input in place or as a copy that does not alias.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>

#include <cstdint>

namespace mtbert_fast::cpu {

constexpr int64_t kCacheLine = 64;

// Whether rows row_bytes apart evict each other in a tile of tile_rows rows.
inline bool rows_alias(int64_t tile_rows, int64_t row_bytes) {
  return tile_rows > 8 && row_bytes > 0 && row_bytes % 4096 == 0;
}

// Uninitialised rows [M, N] of `options`: contiguous, or each row one cache line longer (narrowed back to N
// columns) where `apart`.
inline at::Tensor new_rows(int64_t M, int64_t N, const at::TensorOptions& options, bool apart) {
  const int64_t pad = apart ? kCacheLine / static_cast<int64_t>(options.dtype().itemsize()) : 0;
  const at::Tensor rows = at::empty({M, N + pad}, options);
  return apart ? rows.narrow(1, 0, N) : rows;
}

// x [M, K] as tiles of tile_rows rows read it, each row Kp >= K entries wide: x itself where its Kp columns are
// contiguous and its rows do not alias; else a copy [M, Kp] (zeros past x's K columns), its rows one cache line
// longer where they would alias. The kernels take the result's row stride as their lda.
inline at::Tensor rows_for_tiles(const at::Tensor& x, int64_t Kp, int64_t tile_rows) {
  const int64_t M = x.size(0), K = x.size(1), elem = x.element_size();
  if (K == Kp && x.stride(1) == 1 && (M == 1 || x.stride(0) >= K) && !rows_alias(tile_rows, x.stride(0) * elem)) {
    return x;
  }
  const int64_t pad = Kp - K + (rows_alias(tile_rows, Kp * elem) ? kCacheLine / elem : 0);
  const at::Tensor a = x.contiguous();
  return pad > 0 ? at::constant_pad_nd(a, {0, pad}) : a;
}

// Whether a [M, K]'s storage holds `rows` >= M rows at its row stride: an AMX tile load reads 16 rows, past the last
// one a kernel stores.
inline bool rows_readable(const at::Tensor& a, int64_t rows) {
  const int64_t K = a.size(1), lda = std::max(a.stride(0), K);
  const int64_t stored = static_cast<int64_t>(a.storage().nbytes()) / static_cast<int64_t>(a.element_size());
  return a.stride(1) == 1 && a.storage_offset() + (rows - 1) * lda + K <= stored;
}

// a as it is where rows_readable(a, rows), else a copy whose storage holds them (the rows past M uninitialised).
inline at::Tensor readable_rows(const at::Tensor& a, int64_t rows) {
  if (rows_readable(a, rows)) return a;
  const int64_t M = a.size(0), K = a.size(1), lda = std::max(a.stride(0), K);
  const at::Tensor room = at::empty({rows, lda}, a.options()).narrow(0, 0, M).narrow(1, 0, K);
  room.copy_(a);
  return room;
}

}  // namespace mtbert_fast::cpu
