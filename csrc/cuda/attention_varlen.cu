// Bidirectional attention over packed variable-length sequences, CUDA, with fused attention dropout.
//
// Q, K and V are read straight out of the packed qkv [T, 3, heads, head_dim] of the fused QKV GEMM; no padded
// [B, heads, L, L] tensor is ever built. A block owns one (sequence, head) and a tile of query rows, and streams
// the sequence's keys through shared memory with an online softmax in fp32 (FlashAttention's recurrence):
//   m' = max(m, rowmax(S)),  l' = l e^(m - m') + rowsum(e^(S - m')),  O' = O e^(m - m') + e^(S - m') V
// and lse = m + log l (natural log, of the scaled scores) for the backward.
//
// Dropout (dropout_p > 0) multiplies each probability by M_ij = keep_ij / (1 - p), keep_ij drawn from rng_state
// by the Philox mask of csrc/include/philox.h (one definition for every backend; i and j are packed row indices).
// The forward is O = sum_j (P_ij M_ij) V_j with l and lse from the undropped P; the backward regenerates the mask:
// dV = (P o M)^T dO, dP = (dO V^T) o M, dS = P o (dP - delta) with delta = rowsum(dO o O), dQ = scale dS K,
// dK = scale dS^T Q. Every kernel takes the dropout as a template flag, so dropout off costs nothing.
//
// Position terms (MPNet's and T5's relative position bias, DeBERTa's disentangled attention, ModernBERT's local
// window), with i, j the query's and the key's positions in their sequence (packed rows s + i, s + j):
//   S_ij = scale q_i.k_j + rel_bias[h, clamp(j - i, -R, R) + R] + pos_q[h, s + i, c] + pos_k[h, s + j, c],
//   c = pos_index[clamp(j - i, -P, P) + P],
// and S_ij = -inf where window >= 0 and |j - i| > window. Every kernel takes them as one template flag POS (has a
// table or a window, which terms are there tested at run time inside), so the plain path's code is that of a build
// without them and the instantiations only double. With a window, a block visits only the key (dK/dV: query) tiles
// that meet its rows' band, and a row that a tile masks entirely keeps m = -inf without making a NaN.
// grad_rel_bias[h, c] sums dS_ij over the pairs of bucket c: the dQ kernel (which forms every dS once) adds them up
// per block in shared memory, then one atomicAdd per touched entry into a zeroed fp32 buffer (straight to global
// memory for a table wider than kMaxSharedBiasGrad). grad_pos_q[h, s + i, c] sums dS_ij over query i's keys of
// column c, grad_pos_k[h, s + j, c] over key j's queries: each row belongs to one warp of the dQ (pos_q) or the dK/dV
// (pos_k) kernel, so these go straight into zeroed fp32 buffers [heads, T, W] with no contention between blocks, and
// are converted to the tables' dtype at the end.
//
// Forward, fp16/bf16 with head_dim <= 128, where the build holds the tensor-core kernel as sm80+ code: tensor cores
//   through WMMA (16x16x16 tiles, fp32 accumulators). 4 warps x 16 query rows, 64 keys per step; head_dim is
//   zero-padded in shared memory to 32, 64, 96 or 128 (80 -> 96), which adds nothing to Q K^T and only unused columns
//   to P V. The scores go through shared memory for the softmax; P (times the 0/1 keep mask) is rounded to the input
//   dtype for P V (as FlashAttention does) while l sums the fp32, undropped P; 1 / (1 - p) is applied with 1 / l.
// Forward otherwise (fp32, head_dim > 128 up to 256, or code compiled for an arch before sm80): CUDA cores, fp32
//   throughout, one key per lane and 8 query rows per warp.
// Backward (every dtype, head_dim <= 256): CUDA cores, fp32; grad_qkv is deterministic (no atomics), grad_rel_bias,
//   grad_pos_q and grad_pos_k are summed with atomics (their last bits vary with the order). delta = rowsum(dO * O);
//   P = exp(S - lse); one kernel walks keys for dQ, one walks queries for dK and dV.
//
// cu_seqlens stays on the GPU (no host sync). Its consistency (starts at 0, non-decreasing, ends at T) is checked by
// device asserts; a sequence longer than max_seqlen is still computed in full (the blocks loop over query tiles).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "attention_dropout.h"
#include "build_info.h"
#include "checks.h"
#include "cuda_utils.cuh"
#include "philox.h"

namespace mtbert_fast {
namespace {

using namespace cuda;
namespace wmma = nvcuda::wmma;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTensorCoreHeadDim = 128;
constexpr int kMaxGridZ = 65535;

// The packed batch as the kernels see it. Strides are in elements; out and grad_qkv are contiguous.
struct Problem {
  const int* cu_seqlens;  // [batch + 1]
  int64_t tokens;
  int batch;
  int heads;
  int head_dim;
  int64_t tok_stride, part_stride, head_stride;  // of qkv
  float scale;
  DropoutParams drop;     // used by the kernels instantiated with DROP = true only
  const float* rel_bias;  // [heads, 2R+1] or null; this, window and the pos_ fields: used with POS = true only
  int rel_r;              // R
  int window;             // -1: none
  const int* pos_index;   // [2P+1] of columns in [0, W) of the tables (TokenTables), or null without tables
  int pos_p;              // P
  int pos_w;              // W
};
// Past 128 bytes, nvcc compiles the by-value Problem differently (its fields read through its address), which changes
// the code and the registers of the plain kernels too; so the tables' pointers are a kernel argument of their own.
static_assert(sizeof(Problem) <= 128, "Problem must stay within 128 bytes");

// The per-token position tables, pos_q and pos_k [heads, T, W] in qkv's dtype, contiguous; either may be null.
template <typename T>
struct TokenTables {
  const T* q;
  const T* k;
};

// Bounds of sequence b, with the consistency of cu_seqlens asserted on the device.
__device__ __forceinline__ void sequence_bounds(const Problem& p, int b, int64_t& start, int& len) {
  const int s = p.cu_seqlens[b];
  const int e = p.cu_seqlens[b + 1];
  CUDA_KERNEL_ASSERT(s >= 0 && s <= e && e <= p.tokens && "attention_varlen: cu_seqlens must be non-decreasing in [0, T]");
  CUDA_KERNEL_ASSERT((b > 0 || s == 0) && "attention_varlen: cu_seqlens[0] must be 0");
  CUDA_KERNEL_ASSERT((b + 1 < p.batch || e == p.tokens) && "attention_varlen: cu_seqlens[-1] must be T");
  start = s;
  len = e - s;
}

// Whether probability (h, i, j) survives dropout: query row i, key row j (packed row indices), head h; word j & 3 of
// the Philox draw for counter (j >> 2, i, h, offset), kept iff >= threshold (philox.h).
__device__ __forceinline__ bool dropout_kept(const DropoutParams& d, int64_t i, int64_t j, int h) {
  const uint32_t ju = static_cast<uint32_t>(j);
  const Philox4 r = dropout_words(d, ju >> 2, static_cast<uint32_t>(i), static_cast<uint32_t>(h));
  const uint32_t k = ju & 3u;
  const uint32_t word = k == 0u ? r.w[0] : k == 1u ? r.w[1] : k == 2u ? r.w[2] : r.w[3];
  return word >= d.threshold;
}

// What the position terms of one (sequence, head) read.
template <typename T>
struct SequenceTerms {
  const float* bias;  // the head's row of rel_bias [2R+1], or null
  const T* pos_q;     // the head's rows of the sequence in pos_q [len, W], or null
  const T* pos_k;     // the head's rows of the sequence in pos_k [len, W], or null
  int len;            // rows past it (a tile's padding) read no table: they may lie past T
};

template <typename T>
__device__ __forceinline__ SequenceTerms<T> sequence_terms(const Problem& p, const TokenTables<T>& tables, int h,
                                                           int64_t start, int len) {
  const int64_t rows = (static_cast<int64_t>(h) * p.tokens + start) * p.pos_w;
  return {p.rel_bias == nullptr ? nullptr : p.rel_bias + static_cast<int64_t>(h) * (2 * p.rel_r + 1),
          tables.q == nullptr ? nullptr : tables.q + rows, tables.k == nullptr ? nullptr : tables.k + rows, len};
}

// The tables' column of clamped distance k - P (k in [0, 2P]), checked by check_pos_index_kernel before any launch
// that reads it (an assert here, in the inner loops, would cost registers and spills).
__device__ __forceinline__ int table_column(const Problem& p, int k) { return p.pos_index[k]; }

// Score (i, j) in log2 units from s2 = scale q_i.k_j log2(e): plus the bias of the clamped distance (bias_h: the
// head's row of rel_bias, or null), -inf outside the window. i, j: positions in the sequence.
__device__ __forceinline__ float bias_score(const Problem& p, const float* __restrict__ bias_h, float s2, int i,
                                            int j) {
  if (p.window >= 0 && abs(j - i) > p.window) return -INFINITY;
  if (bias_h != nullptr) s2 = fmaf(bias_h[min(max(j - i, -p.rel_r), p.rel_r) + p.rel_r], kLog2e, s2);
  return s2;
}

// s2 plus the tables' entries of pair (i, j) (positions in the sequence) in log2 units: none without tables, or for
// a row past the sequence.
template <typename T>
__device__ __forceinline__ float table_score(const Problem& p, const SequenceTerms<T>& t, float s2, int i, int j) {
  if (p.pos_index == nullptr || i >= t.len || j >= t.len) return s2;
  const int c = table_column(p, min(max(j - i, -p.pos_p), p.pos_p) + p.pos_p);
  float v = 0.f;
  if (t.pos_q != nullptr) v = static_cast<float>(t.pos_q[static_cast<int64_t>(i) * p.pos_w + c]);
  if (t.pos_k != nullptr) v += static_cast<float>(t.pos_k[static_cast<int64_t>(j) * p.pos_w + c]);
  return fmaf(v, kLog2e, s2);
}

// Score (i, j) with every position term: bias_score, then table_score where the window keeps the pair.
template <typename T>
__device__ __forceinline__ float position_score(const Problem& p, const SequenceTerms<T>& t, float s2, int i, int j) {
  s2 = bias_score(p, t.bias, s2, i, j);
  return s2 == -INFINITY ? s2 : table_score(p, t, s2, i, j);
}

// The positions [lo, hi) of a sequence of len that rows first..last (first <= last) see: all without a window.
__device__ __forceinline__ void window_band(const Problem& p, int len, int first, int last, int& lo, int& hi) {
  lo = 0;
  hi = len;
  if (p.window >= 0) {
    lo = max(0, first - p.window);
    const int64_t end = static_cast<int64_t>(last) + p.window + 1;  // may pass INT_MAX
    hi = end < len ? static_cast<int>(end) : len;
  }
}

// Adds the dS of one row's pairs (lane: the pair at distance dist = j - i, v = 0 where there is none) to acc at
// column(clamp(dist, -r, r) + r); the whole warp calls it. The unclamped distances differ from lane to lane; the
// clamped ones (every lane, far from the diagonal of a long sequence) are summed over the warp first, so that no 32
// lanes collide. rel_bias: r = R, acc [2R+1], column the identity; a position table: r = P, acc the row's [W],
// column table_column.
template <typename Column>
__device__ __forceinline__ void add_clamped_grad(float* acc, int r, int dist, float v, int lane, const Column& column) {
  const bool lo = dist <= -r;
  const bool hi = !lo && dist >= r;  // r = 0: every distance is lo
  const float lo_sum = warp_sum(lo ? v : 0.f);
  const float hi_sum = warp_sum(hi ? v : 0.f);
  if (!lo && !hi && v != 0.f) atomicAdd(acc + column(dist + r), v);
  if (lane == 0) {
    if (lo_sum != 0.f) atomicAdd(acc + column(0), lo_sum);
    if (hi_sum != 0.f) atomicAdd(acc + column(2 * r), hi_sum);
  }
}

__device__ __forceinline__ void add_bias_grad(float* acc, int rel_r, int dist, float v, int lane) {
  add_clamped_grad(acc, rel_r, dist, v, lane, [](int k) { return k; });
}

// Adds the dS of one query row (dQ kernel, acc: its row of grad_pos_q) or key row (dK/dV kernel, grad_pos_k) at the
// tables' column of each pair; the whole warp calls it.
__device__ __forceinline__ void add_table_grad(const Problem& p, float* acc, int dist, float v, int lane) {
  add_clamped_grad(acc, p.pos_p, dist, v, lane, [&](int k) { return table_column(p, k); });
}

// =====================================================================================================================
// Forward on tensor cores (WMMA), fp16 / bf16.

template <typename T>
struct MmaType;
template <>
struct MmaType<at::Half> {
  using type = __half;
};
template <>
struct MmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

__device__ __forceinline__ __half to_mma(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_mma(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }

constexpr int kTcWarps = 4;
constexpr int kTcRows = 16 * kTcWarps;  // query rows per block
constexpr int kTcKeys = 64;             // keys per step

constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Shared memory of the tensor-core kernel, for a head dim padded to HD. Every WMMA pointer is 32-byte aligned and every
// leading dimension a multiple of 16 bytes; the +8 / +4 pads move consecutive rows to other banks.
template <int HD>
struct TcLayout {
  static constexpr int kLdh = HD + 8;       // Q, K, V tiles (16-bit elements)
  static constexpr int kLds = kTcKeys + 4;  // scores (fp32)
  static constexpr int kLdp = kTcKeys + 8;  // probabilities (16-bit)
  static constexpr int kLdo = HD + 4;       // output staging (fp32)
  static constexpr int kKvBytes = kTcKeys * kLdh * 2;
  static constexpr int kSBytes = 16 * kLds * 4;
  static constexpr int kPBytes = 16 * kLdp * 2;
  // per warp: its 16 Q rows until they are in registers, then its scores and probabilities; then m, l and alpha
  static constexpr int kScratchBytes = round_up(std::max(16 * kLdh * 2, kSBytes + kPBytes), 128);
  static constexpr int kWarpBytes = kScratchBytes + 256;
  static constexpr int kBytes = 2 * kKvBytes + kTcWarps * kWarpBytes;
  static_assert(kTcWarps * 16 * kLdo * 4 <= 2 * kKvBytes, "the output staging must fit where K and V were");
};

// The head dim the tensor-core kernel pads head_dim (<= 128) to.
constexpr int tc_padded_head_dim(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }

// Dynamic shared memory of a tensor-core forward launch: the one number the launch asks for and the dispatch reads.
inline size_t tc_forward_bytes(int d) {
  switch (tc_padded_head_dim(d)) {
    case 32: return TcLayout<32>::kBytes;
    case 64: return TcLayout<64>::kBytes;
    case 96: return TcLayout<96>::kBytes;
    default: return TcLayout<128>::kBytes;
  }
}

// dst [rows, LD] = src rows [0, valid) x columns [0, d), zero elsewhere up to HD columns; 16-bit elements moved as raw
// bits. vec: 8 elements (16 bytes) at a time, for d % 8 == 0 and 16-byte aligned source rows.
template <int HD, int LD>
__device__ __forceinline__ void load_tile(uint16_t* __restrict__ dst, const uint16_t* __restrict__ src,
                                          int64_t stride, int rows, int valid, int d, bool vec, int tid,
                                          int nthreads) {
  if (vec) {
    constexpr int kChunks = HD / 8;
    for (int c = tid; c < rows * kChunks; c += nthreads) {
      const int r = c / kChunks;
      const int col = (c % kChunks) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < valid && col < d) v = *reinterpret_cast<const uint4*>(src + r * stride + col);
      *reinterpret_cast<uint4*>(dst + r * LD + col) = v;
    }
  } else {
    for (int c = tid; c < rows * HD; c += nthreads) {
      const int r = c / HD;
      const int col = c % HD;
      dst[r * LD + col] = (r < valid && col < d) ? src[r * stride + col] : uint16_t{0};
    }
  }
}

template <typename T, int HD, bool DROP, bool POS>
__global__ void __launch_bounds__(kTcWarps * 32) attention_forward_tc_kernel(
    Problem p,
    const T* __restrict__ qkv,  // [T, 3, heads, head_dim], strided
    TokenTables<T> tables,      // [heads, T, W] each, or null (used with POS only)
    T* __restrict__ out,        // [T, heads, head_dim]
    float* __restrict__ lse,    // [heads, T]
    bool vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using E = typename MmaType<T>::type;
  using L = TcLayout<HD>;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  uint16_t* ks = reinterpret_cast<uint16_t*>(smem);                // [kTcKeys, kLdh]
  uint16_t* vs = reinterpret_cast<uint16_t*>(smem + L::kKvBytes);  // [kTcKeys, kLdh]
  unsigned char* scratch = smem + 2 * L::kKvBytes + warp * L::kWarpBytes;
  uint16_t* qw = reinterpret_cast<uint16_t*>(scratch);             // [16, kLdh]
  float* sw = reinterpret_cast<float*>(scratch);                   // [16, kLds], over qw
  E* pw = reinterpret_cast<E*>(scratch + L::kSBytes);              // [16, kLdp]
  float* row_max = reinterpret_cast<float*>(scratch + L::kScratchBytes);  // [16], log2 units
  float* row_sum = row_max + 16;                                   // [16]
  float* row_alpha = row_sum + 16;                                 // [16]
  float* ow = reinterpret_cast<float*>(smem) + warp * 16 * L::kLdo;  // [16, kLdo], over K and V at the end

  int64_t start;
  int len;
  sequence_bounds(p, blockIdx.x, start, len);
  const int h = blockIdx.y;
  const int d = p.head_dim;
  const int64_t out_stride = static_cast<int64_t>(p.heads) * d;
  const uint16_t* q_base = reinterpret_cast<const uint16_t*>(qkv + start * p.tok_stride + h * p.head_stride);
  const uint16_t* k_base = q_base + p.part_stride;
  const uint16_t* v_base = k_base + p.part_stride;
  const float scale_log2 = p.scale * kLog2e;
  const SequenceTerms<T> terms = sequence_terms(p, tables, h, start, len);

  // The row of each accumulator element (WMMA leaves the layout opaque): load a matrix whose rows hold their index.
  Acc row_of;
  for (int i = lane; i < 256; i += 32) sw[(i / 16) * L::kLds + i % 16] = static_cast<float>(i / 16);
  __syncwarp();
  wmma::load_matrix_sync(row_of, sw, L::kLds, wmma::mem_row_major);
  __syncwarp();

  for (int q0 = blockIdx.z * kTcRows; q0 < len; q0 += gridDim.z * kTcRows) {
    const int wq0 = q0 + warp * 16;  // this warp's first query row
    const int rows_valid = min(16, max(0, len - wq0));
    load_tile<HD, L::kLdh>(qw, q_base + static_cast<int64_t>(wq0) * p.tok_stride, p.tok_stride, 16, rows_valid, d,
                           vec, lane, 32);
    __syncwarp();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> qf[HD / 16];
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
      wmma::load_matrix_sync(qf[kk], reinterpret_cast<const E*>(qw) + kk * 16, L::kLdh);
    }
    Acc acc[HD / 16];
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
    __syncwarp();  // the scores overwrite Q
    if (lane < 16) {
      row_max[lane] = -INFINITY;
      row_sum[lane] = 0.f;
    }
    // keys [k_lo, k_hi): those the block's rows see; [w_lo, w_hi): those this warp's rows see (none if it has none)
    int k_lo = 0, k_hi = len, w_lo = 0, w_hi = 0;
    if constexpr (POS) {
      window_band(p, len, q0, min(q0 + kTcRows, len) - 1, k_lo, k_hi);
      if (rows_valid > 0) window_band(p, len, wq0, wq0 + rows_valid - 1, w_lo, w_hi);
    }

    for (int k0 = k_lo; k0 < k_hi; k0 += kTcKeys) {
      const int kv_valid = min(kTcKeys, k_hi - k0);
      __syncthreads();  // every warp is done with the previous K and V (or with the output staging over them)
      load_tile<HD, L::kLdh>(ks, k_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kTcKeys, kv_valid,
                             d, vec, threadIdx.x, kTcWarps * 32);
      load_tile<HD, L::kLdh>(vs, v_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kTcKeys, kv_valid,
                             d, vec, threadIdx.x, kTcWarps * 32);
      __syncthreads();
      if constexpr (POS) {
        if (k0 >= w_hi || k0 + kv_valid <= w_lo) continue;  // this tile is outside the warp's band: nothing to add
      }

      // S = Q K^T for this warp's 16 rows; K [keys, HD] row-major is K^T [HD, keys] column-major
#pragma unroll
      for (int j = 0; j < kTcKeys / 16; ++j) {
        Acc s;
        wmma::fill_fragment(s, 0.f);
#pragma unroll
        for (int kk = 0; kk < HD / 16; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, reinterpret_cast<const E*>(ks) + j * 16 * L::kLdh + kk * 16, L::kLdh);
          wmma::mma_sync(s, qf[kk], kf, s);
        }
        wmma::store_matrix_sync(sw + j * 16, s, L::kLds, wmma::mem_row_major);
      }
      __syncwarp();

      // Online softmax: two lanes per row, 32 columns each, in log2 units
      {
        const int r = lane >> 1;
        const int half = lane & 1;
        float* srow = sw + r * L::kLds + half * 32;
        E* prow = pw + r * L::kLdp + half * 32;
        const int valid = kv_valid - half * 32;  // columns of this half that hold keys
        // Bit c: column c of this half survives dropout. Its 32 keys j0 .. j0 + 31 take the words of the 8 or 9
        // Philox groups j >> 2 they span (j0 % 4 is the same for every lane, so every lane draws as many).
        uint32_t kept = 0xffffffffu;
        if constexpr (DROP) {
          kept = 0u;
          const uint32_t i = static_cast<uint32_t>(start + wq0 + r);
          const uint32_t j0 = static_cast<uint32_t>(start + k0 + half * 32);
          const int lead = static_cast<int>(j0 & 3u);  // keys of j0's group before j0
          const int groups = (lead + 35) / 4;
#pragma unroll 1
          for (int g = 0; g < groups; ++g) {
            const Philox4 w = dropout_words(p.drop, (j0 >> 2) + static_cast<uint32_t>(g), i, static_cast<uint32_t>(h));
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const int c = 4 * g + k - lead;
              if (c >= 0 && c < 32 && w.w[k] >= p.drop.threshold) kept |= 1u << c;
            }
          }
        }
        if constexpr (POS) {
          // the biased, masked scores in log2 units over the raw ones (each lane its own columns), for both passes
#pragma unroll 8
          for (int i = 0; i < 32; ++i) {
            const int c = (i + lane) & 31;
            if (c < valid) srow[c] = bias_score(p, terms.bias, srow[c] * scale_log2, wq0 + r, k0 + half * 32 + c);
          }
          // the tables in a loop of their own, not unrolled: their loads unrolled cost registers (and spills) that
          // the bias-only path would pay too
          if (p.pos_index != nullptr) {
#pragma unroll 1
            for (int i = 0; i < 32; ++i) {
              const int c = (i + lane) & 31;
              if (c < valid) srow[c] = table_score(p, terms, srow[c], wq0 + r, k0 + half * 32 + c);
            }
          }
        }
        const float to_log2 = POS ? 1.f : scale_log2;  // the factor that takes srow to log2 units
        float mx = -INFINITY;
#pragma unroll 8
        for (int i = 0; i < 32; ++i) {
          const int c = (i + lane) & 31;  // staggered, so that the 32 lanes read 32 different banks
          if (c < valid) mx = fmaxf(mx, srow[c] * to_log2);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_old = row_max[r];
        const float m_new = fmaxf(m_old, mx);  // finite without POS: each step has at least one key
        // with POS, a row whose keys so far are all masked keeps m = -inf: its exponents are taken from 0 instead
        const float m_ref = POS && m_new == -INFINITY ? 0.f : m_new;
        float sum = 0.f;
#pragma unroll 8
        for (int i = 0; i < 32; ++i) {
          const int c = (i + lane) & 31;
          const float pv = c < valid ? exp2f(fmaf(srow[c], to_log2, -m_ref)) : 0.f;
          if constexpr (DROP) {
            prow[c] = to_mma((kept >> c) & 1u ? pv : 0.f, E{});
          } else {
            prow[c] = to_mma(pv, E{});
          }
          sum += pv;  // l sums the undropped probabilities
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        __syncwarp();
        if (half == 0) {
          const float alpha = exp2f(m_old - m_ref);
          row_alpha[r] = alpha;
          row_sum[r] = fmaf(row_sum[r], alpha, sum);
          row_max[r] = m_new;
        }
        __syncwarp();
      }

      // O = O * alpha + P V
#pragma unroll
      for (int n = 0; n < HD / 16; ++n) {
#pragma unroll
        for (int i = 0; i < acc[n].num_elements; ++i) acc[n].x[i] *= row_alpha[static_cast<int>(row_of.x[i])];
      }
#pragma unroll
      for (int kk = 0; kk < kTcKeys / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, E, wmma::row_major> pf;
        wmma::load_matrix_sync(pf, pw + kk * 16, L::kLdp);
#pragma unroll
        for (int n = 0; n < HD / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, E, wmma::row_major> vf;
          wmma::load_matrix_sync(vf, reinterpret_cast<const E*>(vs) + kk * 16 * L::kLdh + n * 16, L::kLdh);
          wmma::mma_sync(acc[n], pf, vf, acc[n]);
        }
      }
    }

    // O / l (times 1 / (1 - p) with dropout) through shared memory (over K and V) to the output rows
    __syncthreads();
#pragma unroll
    for (int n = 0; n < HD / 16; ++n) {
#pragma unroll
      for (int i = 0; i < acc[n].num_elements; ++i) {
        if constexpr (DROP) {
          acc[n].x[i] *= p.drop.scale / row_sum[static_cast<int>(row_of.x[i])];
        } else {
          acc[n].x[i] /= row_sum[static_cast<int>(row_of.x[i])];
        }
      }
      wmma::store_matrix_sync(ow + n * 16, acc[n], L::kLdo, wmma::mem_row_major);
    }
    __syncwarp();
    T* out_base = out + (start + wq0) * out_stride + static_cast<int64_t>(h) * d;
    if (vec) {
      constexpr int kChunks = HD / 8;
      for (int c = lane; c < 16 * kChunks; c += 32) {
        const int r = c / kChunks;
        const int col = (c % kChunks) * 8;
        if (r < rows_valid && col < d) {
          float v[8];
#pragma unroll
          for (int k = 0; k < 8; ++k) v[k] = ow[r * L::kLdo + col + k];
          store_vec<T, 8>(out_base + r * out_stride + col, v);
        }
      }
    } else {
      for (int c = lane; c < 16 * d; c += 32) {
        const int r = c / d;
        const int col = c % d;
        if (r < rows_valid) out_base[r * out_stride + col] = static_cast<T>(ow[r * L::kLdo + col]);
      }
    }
    if (lane < rows_valid) lse[h * p.tokens + start + wq0 + lane] = (row_max[lane] + log2f(row_sum[lane])) * kLn2;
  }
#else
  CUDA_KERNEL_ASSERT(false && "attention_varlen: the tensor-core kernel needs sm80 or newer");
#endif
}

template <typename Kernel>
void allow_shared_bytes(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

template <typename T, int HD, bool DROP, bool POS>
void launch_forward_tc(const Problem& p, dim3 grid, const T* qkv, TokenTables<T> tables, T* out, float* lse, bool vec,
                       cudaStream_t stream) {
  const size_t bytes = tc_forward_bytes(HD);
  auto kernel = attention_forward_tc_kernel<T, HD, DROP, POS>;
  allow_shared_bytes(kernel, bytes);
  kernel<<<grid, kTcWarps * 32, bytes, stream>>>(p, qkv, tables, out, lse, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Whether the tensor-core forward of this build runs as sm80+ code on the current device, asked once per device of
// the runtime (cudaFuncGetAttributes of one instantiation: all were compiled for the same archs). A build whose
// archs lack sm_80 (say 7.5+PTX, JIT-compiled on an H100) holds it only as the device assert of its #else branch.
// Where the build holds no code at all for the device, this raises, naming the archs and the GPU.
bool tensor_core_forward_compiled(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int8_t> known;  // per device: -1 not asked yet, 0 no, 1 yes
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (device < static_cast<int>(known.size()) && known[device] >= 0) return known[device] == 1;
  }
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, attention_forward_tc_kernel<at::Half, 32, false, false>);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the error, so that it does not surface at the next launch check
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
      const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
      const std::string archs = built_cuda_archs();
      TORCH_CHECK(false, "attention_varlen: mtbert_fast._C holds CUDA code for ", archs.empty() ? "no known arch" : archs,
                  ", none of which runs on GPU ", static_cast<int>(device), " (", prop->name, ", sm_", prop->major,
                  prop->minor, "); rebuild with TORCH_CUDA_ARCH_LIST=\"", prop->major, ".", prop->minor, "\" (",
                  cudaGetErrorString(err), ")");
    }
    C10_CUDA_CHECK(err);
  }
  // ptxVersion: the virtual arch the code was compiled from (its __CUDA_ARCH__); binaryVersion: the machine code's
  const int virtual_arch = attr.ptxVersion > 0 ? attr.ptxVersion : attr.binaryVersion;
  const bool ok = virtual_arch >= 80 && attr.binaryVersion >= 80;
  const std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(known.size())) known.resize(device + 1, -1);
  known[device] = ok ? 1 : 0;
  return ok;
}

// =====================================================================================================================
// CUDA-core kernels, fp32 math, any dtype. NC = head-dim columns per lane (head_dim <= 32 * NC).

constexpr int kSimpleWarps = 4;
constexpr int kSimpleThreads = kSimpleWarps * 32;
constexpr int kForwardRowsPerWarp = 8;
constexpr int kForwardRows = kSimpleWarps * kForwardRowsPerWarp;  // query rows per block
constexpr int kBackwardRowsPerWarp = 4;
constexpr int kBackwardRows = kSimpleWarps * kBackwardRowsPerWarp;  // rows (queries or keys) per block
constexpr int kLaneRows = 32;  // keys (forward, dQ) or queries (dK, dV) per step: one per lane
// The widest rel_bias table (2R+1 entries) whose gradient the dQ kernel sums in shared memory; its 2 KB keep the
// head_dim 256 launches within the 99 KB per block of sm_86 and sm_89. Wider tables are summed in global memory.
constexpr int kMaxSharedBiasGrad = 512;

// The fewest columns per lane (1, 2, 4 or 8) that cover head_dim.
constexpr int columns_per_lane(int d) { return d <= 32 ? 1 : d <= 64 ? 2 : d <= 128 ? 4 : 8; }

// Calls f(std::integral_constant<int, NC>{}) with NC = columns_per_lane(head_dim).
template <typename F>
void dispatch_columns(int head_dim, const F& f) {
  switch (columns_per_lane(head_dim)) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// Dynamic shared memory of the CUDA-core launches (the launches and the dispatch both read these).
inline size_t simple_forward_bytes(int d) {
  return sizeof(float) * (kForwardRows * d + kLaneRows * (d + 1) + kLaneRows * 32 * columns_per_lane(d));
}
inline size_t dq_bytes(int d) { return sizeof(float) * (2 * kBackwardRows * d + 2 * kLaneRows * (d + 1)); }
// What the dQ kernel asks for beyond dq_bytes with a rel_bias table: its sums of dS per bucket, where they fit.
inline size_t dq_bias_bytes(const Problem& p) {
  const int entries = 2 * p.rel_r + 1;
  return p.rel_bias != nullptr && entries <= kMaxSharedBiasGrad ? sizeof(float) * entries : 0;
}
inline size_t dkv_bytes(int d) {
  return sizeof(float) * (2 * kBackwardRows * d + 2 * kLaneRows * (d + 1) + 2 * kLaneRows);
}

// The most dynamic shared memory per block that an attention launch (forward: tensor-core where dtype and head_dim
// allow it, else CUDA-core; backward: dQ, with a rel_bias table's sums at their widest, and dK/dV) asks for at this
// head_dim and dtype.
size_t attention_shared_bytes(int d, at::ScalarType dtype) {
  size_t bytes = std::max({simple_forward_bytes(d), dq_bytes(d) + sizeof(float) * kMaxSharedBiasGrad, dkv_bytes(d)});
  if (dtype != at::kFloat && d <= kMaxTensorCoreHeadDim) bytes = std::max(bytes, tc_forward_bytes(d));
  return bytes;
}

// dst [rows, ld] (fp32) = src rows [0, valid) x columns [0, d), zero elsewhere up to `cols` columns.
template <typename T>
__device__ __forceinline__ void load_rows_f32(float* __restrict__ dst, int ld, const T* __restrict__ src,
                                              int64_t stride, int rows, int valid, int d, int cols) {
  for (int i = threadIdx.x; i < rows * cols; i += blockDim.x) {
    const int r = i / cols;
    const int c = i % cols;
    dst[r * ld + c] = (r < valid && c < d) ? static_cast<float>(src[r * stride + c]) : 0.f;
  }
}

__device__ __forceinline__ float dot(const float* __restrict__ a, const float* __restrict__ b, int d) {
  float acc = 0.f;
#pragma unroll 4
  for (int c = 0; c < d; ++c) acc = fmaf(a[c], b[c], acc);
  return acc;
}

template <typename T, int NC, bool DROP, bool POS>
__global__ void __launch_bounds__(kSimpleThreads) attention_forward_simple_kernel(
    Problem p,
    const T* __restrict__ qkv,  // [T, 3, heads, head_dim], strided
    TokenTables<T> tables,      // [heads, T, W] each, or null (used with POS only)
    T* __restrict__ out,        // [T, heads, head_dim]
    float* __restrict__ lse) {  // [heads, T]
  constexpr int DP = 32 * NC;
  constexpr int R = kForwardRowsPerWarp;
  extern __shared__ float fsmem[];
  const int d = p.head_dim;
  float* qs = fsmem;                    // [kForwardRows, d]
  float* ks = qs + kForwardRows * d;    // [32, d + 1]: lanes read different rows without bank conflicts
  float* vs = ks + kLaneRows * (d + 1);  // [32, DP], zero past d
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;

  int64_t start;
  int len;
  sequence_bounds(p, blockIdx.x, start, len);
  const int h = blockIdx.y;
  const int64_t out_stride = static_cast<int64_t>(p.heads) * d;
  const T* q_base = qkv + start * p.tok_stride + h * p.head_stride;
  const T* k_base = q_base + p.part_stride;
  const T* v_base = k_base + p.part_stride;
  const float scale_log2 = p.scale * kLog2e;
  const SequenceTerms<T> terms = sequence_terms(p, tables, h, start, len);

  for (int q0 = blockIdx.z * kForwardRows; q0 < len; q0 += gridDim.z * kForwardRows) {
    __syncthreads();  // the previous tile is done with qs
    load_rows_f32(qs, d, q_base + static_cast<int64_t>(q0) * p.tok_stride, p.tok_stride, kForwardRows, len - q0, d, d);
    float o[R][NC], m[R], l[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      m[rr] = -INFINITY;
      l[rr] = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) o[rr][c] = 0.f;
    }
    int k_lo = 0, k_hi = len;  // the keys the tile's rows see
    if constexpr (POS) window_band(p, len, q0, min(q0 + kForwardRows, len) - 1, k_lo, k_hi);
    for (int k0 = k_lo; k0 < k_hi; k0 += kLaneRows) {
      const int kv_valid = min(kLaneRows, k_hi - k0);
      __syncthreads();
      load_rows_f32(ks, d + 1, k_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kLaneRows, kv_valid,
                    d, d);
      load_rows_f32(vs, DP, v_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kLaneRows, kv_valid, d,
                    DP);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const float* qrow = qs + (warp * R + rr) * d;
        float s = lane < kv_valid ? dot(qrow, ks + lane * (d + 1), d) * scale_log2 : -INFINITY;
        if constexpr (POS) {
          if (lane < kv_valid) s = position_score(p, terms, s, q0 + warp * R + rr, k0 + lane);
        }
        const float m_new = fmaxf(m[rr], warp_max(s));
        // with POS, a row whose keys so far are all masked keeps m = -inf: its exponents are taken from 0 instead
        const float m_ref = POS && m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m[rr] - m_ref);
        const float pv = lane < kv_valid ? exp2f(s - m_ref) : 0.f;
        l[rr] = fmaf(l[rr], alpha, warp_sum(pv));  // the undropped sum
        m[rr] = m_new;
        float pd = pv;  // the probability that meets V: dropped to 0 where the mask says so
        if constexpr (DROP) {
          if (lane < kv_valid && !dropout_kept(p.drop, start + q0 + warp * R + rr, start + k0 + lane, h)) pd = 0.f;
        }
#pragma unroll
        for (int c = 0; c < NC; ++c) o[rr][c] *= alpha;
        for (int j = 0; j < kv_valid; ++j) {
          const float pj = __shfl_sync(0xffffffffu, pd, j);
          const float* vrow = vs + j * DP + lane;
#pragma unroll
          for (int c = 0; c < NC; ++c) o[rr][c] = fmaf(pj, vrow[32 * c], o[rr][c]);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int row = q0 + warp * R + rr;
      if (row < len) {
        const float inv = (DROP ? p.drop.scale : 1.f) / l[rr];
        T* dst = out + (start + row) * out_stride + static_cast<int64_t>(h) * d;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          if (lane + 32 * c < d) dst[lane + 32 * c] = static_cast<T>(o[rr][c] * inv);
        }
        if (lane == 0) lse[h * p.tokens + start + row] = (m[rr] + log2f(l[rr])) * kLn2;
      }
    }
  }
}

// Stops with a device assert where pos_index holds a value outside [0, W): the attention kernels read the tables (and
// the dQ and dK/dV kernels add into their gradients) at these columns unchecked.
__global__ void check_pos_index_kernel(const int* __restrict__ pos_index,  // [n]
                                       int n, int width) {
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += gridDim.x * blockDim.x) {
    const int c = pos_index[k];
    CUDA_KERNEL_ASSERT(c >= 0 && c < width && "attention_varlen: pos_index holds a column outside [0, W)");
  }
}

// Launches check_pos_index_kernel where there are tables.
void check_pos_index(const Problem& p, cudaStream_t stream) {
  if (p.pos_index == nullptr) return;
  const int n = 2 * p.pos_p + 1;
  check_pos_index_kernel<<<grid_for(n, 256), 256, 0, stream>>>(p.pos_index, n, p.pos_w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// delta [heads, T] = rowsum(grad_out * out), one warp per (token, head). out is the dropped output, so this is also
// rowsum(P o dP) with the masked dP of the backward.
template <typename T>
__global__ void attention_delta_kernel(
    const T* __restrict__ grad_out,  // [T, heads, head_dim]
    const T* __restrict__ out,       // [T, heads, head_dim]
    float* __restrict__ delta,       // [heads, T]
    int64_t tokens,
    int heads,
    int d) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; w < tokens * heads;
       w += warps) {
    const int64_t t = w / heads;
    const int h = static_cast<int>(w % heads);
    const int64_t base = w * d;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) {
      acc = fmaf(static_cast<float>(grad_out[base + c]), static_cast<float>(out[base + c]), acc);
    }
    acc = warp_sum(acc);
    if (lane == 0) delta[h * tokens + t] = acc;
  }
}

// dQ = scale * dS K over the keys of the sequence, for a tile of query rows; with a rel_bias table or pos_q, also
// their gradients (every dS_ij is formed here exactly once, and each query row by one warp).
template <typename T, int NC, bool DROP, bool POS>
__global__ void __launch_bounds__(kSimpleThreads) attention_dq_kernel(
    Problem p,
    const T* __restrict__ qkv,         // [T, 3, heads, head_dim], strided
    const T* __restrict__ grad_out,    // [T, heads, head_dim]
    const float* __restrict__ lse,     // [heads, T]
    const float* __restrict__ delta,   // [heads, T]
    TokenTables<T> tables,             // [heads, T, W] each, or null (used with POS only)
    T* __restrict__ grad_qkv,          // [T, 3, heads, head_dim]
    float* __restrict__ grad_bias,     // [heads, 2R+1], zeroed, or null (no table; used with POS only)
    float* __restrict__ grad_pos_q) {  // [heads, T, W], zeroed, or null (no pos_q; used with POS only)
  constexpr int R = kBackwardRowsPerWarp;
  extern __shared__ float fsmem[];
  const int d = p.head_dim;
  float* qs = fsmem;                       // [kBackwardRows, d]
  float* dos = qs + kBackwardRows * d;     // [kBackwardRows, d]
  float* ks = dos + kBackwardRows * d;     // [32, d + 1]
  float* vs = ks + kLaneRows * (d + 1);    // [32, d + 1]
  float* gb_s = vs + kLaneRows * (d + 1);  // [2R+1] where shared_grad: this block's sums of dS per bucket
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;

  int64_t start;
  int len;
  sequence_bounds(p, blockIdx.x, start, len);
  const int h = blockIdx.y;
  const int64_t row_stride = static_cast<int64_t>(p.heads) * d;  // of grad_out
  const T* q_base = qkv + start * p.tok_stride + h * p.head_stride;
  const T* k_base = q_base + p.part_stride;
  const T* v_base = k_base + p.part_stride;
  const T* go_base = grad_out + start * row_stride + static_cast<int64_t>(h) * d;
  const float scale_log2 = p.scale * kLog2e;
  const SequenceTerms<T> terms = sequence_terms(p, tables, h, start, len);
  const int entries = 2 * p.rel_r + 1;
  const bool bias_grad = POS && grad_bias != nullptr;
  const bool shared_grad = bias_grad && entries <= kMaxSharedBiasGrad;  // as dq_bias_bytes sized the launch
  float* gb_h = bias_grad ? grad_bias + static_cast<int64_t>(h) * entries : nullptr;
  if (shared_grad) {
    for (int c = threadIdx.x; c < entries; c += blockDim.x) gb_s[c] = 0.f;  // the loop's first barrier orders this
  }
  // the sequence's rows of this head in grad_pos_q [len, W]
  float* gq_rows = POS && grad_pos_q != nullptr
                       ? grad_pos_q + (static_cast<int64_t>(h) * p.tokens + start) * p.pos_w
                       : nullptr;

  for (int q0 = blockIdx.z * kBackwardRows; q0 < len; q0 += gridDim.z * kBackwardRows) {
    __syncthreads();
    load_rows_f32(qs, d, q_base + static_cast<int64_t>(q0) * p.tok_stride, p.tok_stride, kBackwardRows, len - q0, d,
                  d);
    load_rows_f32(dos, d, go_base + static_cast<int64_t>(q0) * row_stride, row_stride, kBackwardRows, len - q0, d, d);
    float dq[R][NC], lse2[R], dl[R];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int row = q0 + warp * R + rr;
      lse2[rr] = row < len ? lse[h * p.tokens + start + row] * kLog2e : 0.f;
      dl[rr] = row < len ? delta[h * p.tokens + start + row] : 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) dq[rr][c] = 0.f;
    }
    int k_lo = 0, k_hi = len;  // the keys the tile's rows see
    if constexpr (POS) window_band(p, len, q0, min(q0 + kBackwardRows, len) - 1, k_lo, k_hi);
    for (int k0 = k_lo; k0 < k_hi; k0 += kLaneRows) {
      const int kv_valid = min(kLaneRows, k_hi - k0);
      __syncthreads();
      load_rows_f32(ks, d + 1, k_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kLaneRows, kv_valid,
                    d, d);
      load_rows_f32(vs, d + 1, v_base + static_cast<int64_t>(k0) * p.tok_stride, p.tok_stride, kLaneRows, kv_valid,
                    d, d);
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const float* qrow = qs + (warp * R + rr) * d;
        const float* dorow = dos + (warp * R + rr) * d;
        const int i = q0 + warp * R + rr;  // the query's position
        float ds = 0.f;
        if (lane < kv_valid) {
          const float qk = dot(qrow, ks + lane * (d + 1), d);
          float pv;
          if constexpr (POS) {
            pv = exp2f(position_score(p, terms, qk * scale_log2, i, k0 + lane) - lse2[rr]);
          } else {
            pv = exp2f(fmaf(qk, scale_log2, -lse2[rr]));
          }
          float dp = dot(dorow, vs + lane * (d + 1), d);
          if constexpr (DROP) {
            dp = dropout_kept(p.drop, start + i, start + k0 + lane, h) ? dp * p.drop.scale : 0.f;
          }
          ds = pv * (dp - dl[rr]);
        }
        if (bias_grad) {
          const float v = i < len ? ds : 0.f;  // rows past the sequence add nothing
          if (shared_grad) {
            add_bias_grad(gb_s, p.rel_r, k0 + lane - i, v, lane);
          } else {
            add_bias_grad(gb_h, p.rel_r, k0 + lane - i, v, lane);
          }
        }
        if (gq_rows != nullptr && i < len) {  // i: the same for the whole warp
          add_table_grad(p, gq_rows + static_cast<int64_t>(i) * p.pos_w, k0 + lane - i, ds, lane);
        }
        for (int j = 0; j < kv_valid; ++j) {
          const float dsj = __shfl_sync(0xffffffffu, ds, j);
          const float* krow = ks + j * (d + 1) + lane;
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            if (lane + 32 * c < d) dq[rr][c] = fmaf(dsj, krow[32 * c], dq[rr][c]);
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int row = q0 + warp * R + rr;
      if (row < len) {
        T* dst = grad_qkv + (start + row) * 3 * row_stride + static_cast<int64_t>(h) * d;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          if (lane + 32 * c < d) dst[lane + 32 * c] = static_cast<T>(dq[rr][c] * p.scale);
        }
      }
    }
  }
  if (shared_grad) {
    __syncthreads();
    for (int c = threadIdx.x; c < entries; c += blockDim.x) {
      if (gb_s[c] != 0.f) atomicAdd(gb_h + c, gb_s[c]);
    }
  }
}

// dK = scale * dS^T Q and dV = (P o M)^T dO over the queries of the sequence, for a tile of key rows; with pos_k,
// also its gradient (every dS_ij is formed here exactly once, and each key row by one warp).
template <typename T, int NC, bool DROP, bool POS>
__global__ void __launch_bounds__(kSimpleThreads) attention_dkv_kernel(
    Problem p,
    const T* __restrict__ qkv,         // [T, 3, heads, head_dim], strided
    const T* __restrict__ grad_out,    // [T, heads, head_dim]
    const float* __restrict__ lse,     // [heads, T]
    const float* __restrict__ delta,   // [heads, T]
    TokenTables<T> tables,             // [heads, T, W] each, or null (used with POS only)
    T* __restrict__ grad_qkv,          // [T, 3, heads, head_dim]
    float* __restrict__ grad_pos_k) {  // [heads, T, W], zeroed, or null (no pos_k; used with POS only)
  constexpr int R = kBackwardRowsPerWarp;
  extern __shared__ float fsmem[];
  const int d = p.head_dim;
  float* ks = fsmem;                         // [kBackwardRows, d]
  float* vs = ks + kBackwardRows * d;        // [kBackwardRows, d]
  float* qs = vs + kBackwardRows * d;        // [32, d + 1]
  float* dos = qs + kLaneRows * (d + 1);     // [32, d + 1]
  float* lse_s = dos + kLaneRows * (d + 1);  // [32], log2 units
  float* delta_s = lse_s + kLaneRows;        // [32]
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;

  int64_t start;
  int len;
  sequence_bounds(p, blockIdx.x, start, len);
  const int h = blockIdx.y;
  const int64_t row_stride = static_cast<int64_t>(p.heads) * d;
  const T* q_base = qkv + start * p.tok_stride + h * p.head_stride;
  const T* k_base = q_base + p.part_stride;
  const T* v_base = k_base + p.part_stride;
  const T* go_base = grad_out + start * row_stride + static_cast<int64_t>(h) * d;
  const float* lse_base = lse + h * p.tokens + start;
  const float* delta_base = delta + h * p.tokens + start;
  const float scale_log2 = p.scale * kLog2e;
  const SequenceTerms<T> terms = sequence_terms(p, tables, h, start, len);
  // the sequence's rows of this head in grad_pos_k [len, W]
  float* gk_rows = POS && grad_pos_k != nullptr
                       ? grad_pos_k + (static_cast<int64_t>(h) * p.tokens + start) * p.pos_w
                       : nullptr;

  for (int j0 = blockIdx.z * kBackwardRows; j0 < len; j0 += gridDim.z * kBackwardRows) {
    __syncthreads();
    load_rows_f32(ks, d, k_base + static_cast<int64_t>(j0) * p.tok_stride, p.tok_stride, kBackwardRows, len - j0, d,
                  d);
    load_rows_f32(vs, d, v_base + static_cast<int64_t>(j0) * p.tok_stride, p.tok_stride, kBackwardRows, len - j0, d,
                  d);
    float dk[R][NC], dv[R][NC];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
#pragma unroll
      for (int c = 0; c < NC; ++c) dk[rr][c] = dv[rr][c] = 0.f;
    }
    int i_lo = 0, i_hi = len;  // the queries that see the tile's keys
    if constexpr (POS) window_band(p, len, j0, min(j0 + kBackwardRows, len) - 1, i_lo, i_hi);
    for (int i0 = i_lo; i0 < i_hi; i0 += kLaneRows) {
      const int q_valid = min(kLaneRows, i_hi - i0);
      __syncthreads();
      load_rows_f32(qs, d + 1, q_base + static_cast<int64_t>(i0) * p.tok_stride, p.tok_stride, kLaneRows, q_valid, d,
                    d);
      load_rows_f32(dos, d + 1, go_base + static_cast<int64_t>(i0) * row_stride, row_stride, kLaneRows, q_valid, d, d);
      if (threadIdx.x < kLaneRows) {
        lse_s[threadIdx.x] = threadIdx.x < q_valid ? lse_base[i0 + threadIdx.x] * kLog2e : 0.f;
        delta_s[threadIdx.x] = threadIdx.x < q_valid ? delta_base[i0 + threadIdx.x] : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const float* krow = ks + (warp * R + rr) * d;
        const float* vrow = vs + (warp * R + rr) * d;
        float pv = 0.f, ds = 0.f;  // pv: the probability that met V in the forward (P o M)
        if (lane < q_valid) {
          const float qk = dot(krow, qs + lane * (d + 1), d);
          float pu;
          if constexpr (POS) {
            pu = exp2f(position_score(p, terms, qk * scale_log2, i0 + lane, j0 + warp * R + rr) - lse_s[lane]);
          } else {
            pu = exp2f(fmaf(qk, scale_log2, -lse_s[lane]));
          }
          const float dp = dot(vrow, dos + lane * (d + 1), d);
          if constexpr (DROP) {
            const float mult =
                dropout_kept(p.drop, start + i0 + lane, start + j0 + warp * R + rr, h) ? p.drop.scale : 0.f;
            pv = pu * mult;
            ds = pu * (dp * mult - delta_s[lane]);
          } else {
            pv = pu;
            ds = pu * (dp - delta_s[lane]);
          }
        }
        const int j = j0 + warp * R + rr;  // the key's position: the same for the whole warp
        if (gk_rows != nullptr && j < len) {
          add_table_grad(p, gk_rows + static_cast<int64_t>(j) * p.pos_w, j - (i0 + lane), ds, lane);
        }
        for (int i = 0; i < q_valid; ++i) {
          const float pi = __shfl_sync(0xffffffffu, pv, i);
          const float dsi = __shfl_sync(0xffffffffu, ds, i);
          const float* qrow = qs + i * (d + 1) + lane;
          const float* dorow = dos + i * (d + 1) + lane;
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            if (lane + 32 * c < d) {
              dv[rr][c] = fmaf(pi, dorow[32 * c], dv[rr][c]);
              dk[rr][c] = fmaf(dsi, qrow[32 * c], dk[rr][c]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int row = j0 + warp * R + rr;
      if (row < len) {
        T* dst = grad_qkv + (start + row) * 3 * row_stride + static_cast<int64_t>(h) * d;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          if (lane + 32 * c < d) {
            dst[row_stride + lane + 32 * c] = static_cast<T>(dk[rr][c] * p.scale);
            dst[2 * row_stride + lane + 32 * c] = static_cast<T>(dv[rr][c]);
          }
        }
      }
    }
  }
}

// =====================================================================================================================
// Entry points.

// Calls f(std::bool_constant<DROP>{}): the kernels are instantiated with and without dropout.
template <typename F>
void dispatch_dropout(const DropoutParams& drop, const F& f) {
  if (drop.enabled) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f(std::bool_constant<POS>{}), POS: a rel_bias table, a window or a position table is there.
template <typename F>
void dispatch_position(const Problem& p, const F& f) {
  if (p.rel_bias != nullptr || p.window >= 0 || p.pos_index != nullptr) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

void check_qkv(const char* op, const at::Tensor& qkv) {
  TORCH_CHECK(qkv.is_cuda(), op, ": qkv must be a CUDA tensor, got one on ", qkv.device());
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3, op, ": qkv must have shape [T, 3, heads, head_dim], got ",
              qkv.sizes());
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kHalf ||
                  qkv.scalar_type() == at::kBFloat16,
              op, ": qkv must be float32, float16 or bfloat16, got ", qkv.scalar_type());
  TORCH_CHECK(qkv.size(3) <= kMaxHeadDim, op, ": head_dim must be at most ", kMaxHeadDim, ", got qkv of shape ",
              qkv.sizes());
  TORCH_CHECK(qkv.size(0) < INT_MAX, op, ": qkv has ", qkv.size(0), " rows; cu_seqlens (int32) indexes at most ",
              INT_MAX - 1);
  TORCH_CHECK(qkv.size(2) <= kMaxGridZ, op, ": at most ", kMaxGridZ, " heads, got qkv of shape ", qkv.sizes());
}

// Sizes only: the values of cu_seqlens stay on the GPU (device asserts check them).
void check_cu_seqlens(const char* op, const at::Tensor& cu_seqlens, const at::Tensor& qkv, int64_t max_seqlen) {
  TORCH_CHECK(cu_seqlens.device() == qkv.device(), op, ": cu_seqlens is on ", cu_seqlens.device(), " but qkv is on ",
              qkv.device());
  TORCH_CHECK(cu_seqlens.dim() == 1, op, ": cu_seqlens must have 1 dim, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be Int (int32), got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.numel() >= 1, op, ": cu_seqlens must hold at least one offset (B + 1 entries)");
  TORCH_CHECK(cu_seqlens.numel() >= 2 || qkv.size(0) == 0, op,
              ": cu_seqlens has a single entry (B = 0 sequences), but qkv has ", qkv.size(0),
              " rows; cu_seqlens must hold B + 1 offsets from 0 to T");
  TORCH_CHECK(cu_seqlens.numel() - 1 <= INT_MAX, op, ": too many sequences (", cu_seqlens.numel() - 1, ")");
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
}

// rel_bias and window as check_position_args takes them, the tables as check_token_position_args does, with
// pos_index contiguous. A window of T - 1 or more masks nothing and is dropped, so that the int window never
// overflows and a table-less call with it runs the plain kernels.
Problem make_problem(const at::Tensor& qkv, const at::Tensor& cu_seqlens, double scale, const DropoutParams& drop,
                     const std::optional<at::Tensor>& rel_bias, int64_t window, const std::optional<at::Tensor>& pos_q,
                     const std::optional<at::Tensor>& pos_k, const std::optional<at::Tensor>& pos_index) {
  const bool has_bias = rel_bias.has_value();
  const bool has_tables = pos_index.has_value();
  return Problem{cu_seqlens.const_data_ptr<int>(),
                 qkv.size(0),
                 static_cast<int>(cu_seqlens.numel() - 1),
                 static_cast<int>(qkv.size(2)),
                 static_cast<int>(qkv.size(3)),
                 qkv.stride(0),
                 qkv.stride(1),
                 qkv.stride(2),
                 static_cast<float>(scale),
                 drop,
                 has_bias ? rel_bias->const_data_ptr<float>() : nullptr,
                 has_bias ? static_cast<int>((rel_bias->size(1) - 1) / 2) : 0,
                 window < 0 || window >= qkv.size(0) - 1 ? -1 : static_cast<int>(window),
                 has_tables ? pos_index->const_data_ptr<int>() : nullptr,
                 has_tables ? static_cast<int>((pos_index->size(0) - 1) / 2) : 0,
                 has_tables ? static_cast<int>((pos_q.has_value() ? *pos_q : *pos_k).size(2)) : 0};
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

template <typename T>
TokenTables<T> token_tables(const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k) {
  return {pos_q.has_value() ? pos_q->const_data_ptr<T>() : nullptr,
          pos_k.has_value() ? pos_k->const_data_ptr<T>() : nullptr};
}

dim3 grid_of(const Problem& p, int64_t max_seqlen, int rows_per_block) {
  const int64_t tiles = std::max<int64_t>(1, (max_seqlen + rows_per_block - 1) / rows_per_block);
  return dim3(static_cast<unsigned>(p.batch), static_cast<unsigned>(p.heads),
              static_cast<unsigned>(std::min<int64_t>(tiles, kMaxGridZ)));
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_cuda(const at::Tensor& qkv_in, const at::Tensor& cu_seqlens_in,
                                                         int64_t max_seqlen, double scale, double dropout_p,
                                                         const std::optional<at::Tensor>& rng_state,
                                                         const std::optional<at::Tensor>& rel_bias, int64_t window,
                                                         const std::optional<at::Tensor>& pos_q,
                                                         const std::optional<at::Tensor>& pos_k,
                                                         const std::optional<at::Tensor>& pos_index) {
  constexpr const char* op = "attention_varlen";
  check_qkv(op, qkv_in);
  check_cu_seqlens(op, cu_seqlens_in, qkv_in, max_seqlen);
  check_position_args(op, qkv_in, rel_bias, window);
  check_token_position_args(op, qkv_in, pos_q, pos_k, pos_index);
  const DropoutParams drop = make_dropout_params(op, dropout_p, rng_state);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(qkv_in));
  const at::Tensor qkv = qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const std::optional<at::Tensor> index = contiguous_or_none(pos_index);
  const Problem p = make_problem(qkv, cu_seqlens, scale, drop, rel_bias, window, pos_q, pos_k, index);
  at::Tensor out = at::empty({p.tokens, p.heads, p.head_dim}, qkv.options());
  at::Tensor lse = at::empty({p.heads, p.tokens}, qkv.options().dtype(at::kFloat));
  if (p.tokens == 0 || p.heads == 0) return {out, lse};  // T = 0: empty, whatever B is
  const bool tc_compiled = tensor_core_forward_compiled(qkv.device().index());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool tensor_cores = qkv.scalar_type() != at::kFloat && p.head_dim <= kMaxTensorCoreHeadDim && tc_compiled;
  check_pos_index(p, stream);
  dispatch_floating(qkv.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* qkv_p = qkv.const_data_ptr<T>();
    const TokenTables<T> tables = token_tables<T>(pos_q, pos_k);
    T* out_p = out.mutable_data_ptr<T>();
    float* lse_p = lse.mutable_data_ptr<float>();
    dispatch_dropout(drop, [&](auto dropout) {
      constexpr bool DROP = decltype(dropout)::value;
      dispatch_position(p, [&](auto position) {
        constexpr bool POS = decltype(position)::value;
        if constexpr (!std::is_same_v<T, float>) {
          if (tensor_cores) {
            const bool vec = p.head_dim % 8 == 0 && p.tok_stride % 8 == 0 && p.part_stride % 8 == 0 &&
                             p.head_stride % 8 == 0 && aligned_to(16, qkv_p, out_p);
            const dim3 grid = grid_of(p, max_seqlen, kTcRows);
            switch (tc_padded_head_dim(p.head_dim)) {
              case 32: launch_forward_tc<T, 32, DROP, POS>(p, grid, qkv_p, tables, out_p, lse_p, vec, stream); break;
              case 64: launch_forward_tc<T, 64, DROP, POS>(p, grid, qkv_p, tables, out_p, lse_p, vec, stream); break;
              case 96: launch_forward_tc<T, 96, DROP, POS>(p, grid, qkv_p, tables, out_p, lse_p, vec, stream); break;
              default: launch_forward_tc<T, 128, DROP, POS>(p, grid, qkv_p, tables, out_p, lse_p, vec, stream); break;
            }
            return;
          }
        }
        dispatch_columns(p.head_dim, [&](auto nc) {
          constexpr int NC = decltype(nc)::value;
          const size_t bytes = simple_forward_bytes(p.head_dim);
          auto kernel = attention_forward_simple_kernel<T, NC, DROP, POS>;
          allow_shared_bytes(kernel, bytes);
          kernel<<<grid_of(p, max_seqlen, kForwardRows), kSimpleThreads, bytes, stream>>>(p, qkv_p, tables, out_p,
                                                                                         lse_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& cu_seqlens_in, int64_t max_seqlen, double scale, double dropout_p,
    const std::optional<at::Tensor>& rng_state, const std::optional<at::Tensor>& rel_bias, int64_t window,
    const std::optional<at::Tensor>& pos_q, const std::optional<at::Tensor>& pos_k,
    const std::optional<at::Tensor>& pos_index) {
  constexpr const char* op = "attention_varlen_backward";
  check_qkv(op, qkv_in);
  check_cu_seqlens(op, cu_seqlens_in, qkv_in, max_seqlen);
  check_position_args(op, qkv_in, rel_bias, window);
  check_token_position_args(op, qkv_in, pos_q, pos_k, pos_index);
  const at::Tensor no_table = at::empty({0}, qkv_in.options());
  const int64_t tokens = qkv_in.size(0), heads = qkv_in.size(2), head_dim = qkv_in.size(3);
  MTBF_CHECK_SAME_DEVICE("attention_varlen_backward", qkv_in, grad_out_in);
  MTBF_CHECK_SAME_DEVICE("attention_varlen_backward", qkv_in, out_in);
  MTBF_CHECK_SAME_DEVICE("attention_varlen_backward", qkv_in, lse_in);
  MTBF_CHECK_SAME_DTYPE("attention_varlen_backward", qkv_in, grad_out_in);
  MTBF_CHECK_SAME_DTYPE("attention_varlen_backward", qkv_in, out_in);
  MTBF_CHECK_DTYPE("attention_varlen_backward", lse_in, at::kFloat);
  for (const at::Tensor* t : {&grad_out_in, &out_in}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef({tokens, heads, head_dim}), op, ": ",
                t == &grad_out_in ? "grad_out" : "out", " must have shape [T, heads, head_dim] = [", tokens, ", ",
                heads, ", ", head_dim, "], got ", t->sizes());
  }
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({heads, tokens}), op, ": lse must have shape [heads, T] = [", heads,
              ", ", tokens, "], got ", lse_in.sizes());
  const DropoutParams drop = make_dropout_params(op, dropout_p, rng_state);
  const at::cuda::OptionalCUDAGuard device_guard(device_of(qkv_in));
  const at::Tensor qkv = qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const at::Tensor cu_seqlens = cu_seqlens_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  const std::optional<at::Tensor> index = contiguous_or_none(pos_index);
  const Problem p = make_problem(qkv, cu_seqlens, scale, drop, rel_bias, window, pos_q, pos_k, index);
  at::Tensor grad_qkv = at::empty({tokens, 3, heads, head_dim}, qkv.options());
  // the dQ kernel adds into it: zeros, also where no pair lands and where there is nothing to compute
  at::Tensor grad_rel_bias = rel_bias.has_value() ? at::zeros(rel_bias->sizes(), qkv.options().dtype(at::kFloat))
                                                  : at::empty({0}, qkv.options().dtype(at::kFloat));
  float* grad_bias_p = rel_bias.has_value() ? grad_rel_bias.mutable_data_ptr<float>() : nullptr;
  // the dQ (pos_q) and dK/dV (pos_k) kernels add into them in fp32; the tables' dtype at the end
  const auto table_grad = [&](const std::optional<at::Tensor>& t) {
    return t.has_value() ? at::zeros(t->sizes(), qkv.options().dtype(at::kFloat)) : at::Tensor();
  };
  const at::Tensor grad_pos_q32 = table_grad(pos_q), grad_pos_k32 = table_grad(pos_k);
  const auto table_result = [&](const at::Tensor& g) { return g.defined() ? g.to(qkv.scalar_type()) : no_table; };
  if (tokens == 0 || heads == 0) {  // T = 0: empty, any B
    return {grad_qkv, grad_rel_bias, table_result(grad_pos_q32), table_result(grad_pos_k32)};
  }
  float* grad_pos_q_p = grad_pos_q32.defined() ? grad_pos_q32.mutable_data_ptr<float>() : nullptr;
  float* grad_pos_k_p = grad_pos_k32.defined() ? grad_pos_k32.mutable_data_ptr<float>() : nullptr;
  (void)tensor_core_forward_compiled(qkv.device().index());  // raises where the build holds no code for this GPU
  at::Tensor delta = at::empty({heads, tokens}, qkv.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_pos_index(p, stream);
  dispatch_floating(qkv.scalar_type(), [&](auto t) {
    using T = decltype(t);
    const T* qkv_p = qkv.const_data_ptr<T>();
    const T* go_p = grad_out.const_data_ptr<T>();
    const float* lse_p = lse.const_data_ptr<float>();
    float* delta_p = delta.mutable_data_ptr<float>();
    const TokenTables<T> tables = token_tables<T>(pos_q, pos_k);
    T* grad_p = grad_qkv.mutable_data_ptr<T>();
    attention_delta_kernel<T><<<grid_for(tokens * heads * 32, 256), 256, 0, stream>>>(
        go_p, out.const_data_ptr<T>(), delta_p, tokens, p.heads, p.head_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dispatch_dropout(drop, [&](auto dropout) {
      constexpr bool DROP = decltype(dropout)::value;
      dispatch_position(p, [&](auto position) {
        constexpr bool POS = decltype(position)::value;
        dispatch_columns(p.head_dim, [&](auto nc) {
          constexpr int NC = decltype(nc)::value;
          const dim3 grid = grid_of(p, max_seqlen, kBackwardRows);
          const size_t dq_launch_bytes = dq_bytes(p.head_dim) + (POS ? dq_bias_bytes(p) : 0);
          auto dq_kernel = attention_dq_kernel<T, NC, DROP, POS>;
          allow_shared_bytes(dq_kernel, dq_launch_bytes);
          dq_kernel<<<grid, kSimpleThreads, dq_launch_bytes, stream>>>(p, qkv_p, go_p, lse_p, delta_p, tables,
                                                                       grad_p, grad_bias_p, grad_pos_q_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          auto dkv_kernel = attention_dkv_kernel<T, NC, DROP, POS>;
          allow_shared_bytes(dkv_kernel, dkv_bytes(p.head_dim));
          dkv_kernel<<<grid, kSimpleThreads, dkv_bytes(p.head_dim), stream>>>(p, qkv_p, go_p, lse_p, delta_p,
                                                                              tables, grad_p, grad_pos_k_p);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  });
  return {grad_qkv, grad_rel_bias, table_result(grad_pos_q32), table_result(grad_pos_k32)};
}

// ---- tensor-less ops for the Python dispatch (mtbert_fast/_ext.py) ----

// The most dynamic shared memory per block the attention launches ask for at this head_dim and dtype; the dispatch
// compares it with the GPU's shared_memory_per_block_optin.
int64_t cuda_attention_shared_bytes_op(int64_t head_dim, at::ScalarType dtype) {
  TORCH_CHECK(head_dim >= 0 && head_dim <= kMaxHeadDim, "cuda_attention_shared_bytes: head_dim must be in [0, ",
              kMaxHeadDim, "], got ", head_dim);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "cuda_attention_shared_bytes: dtype must be float32, float16 or bfloat16, got ", dtype);
  return static_cast<int64_t>(attention_shared_bytes(static_cast<int>(head_dim), dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(mtbert_fast_C, CUDA, m) {
  m.impl("attention_varlen", &attention_varlen_cuda);
  m.impl("attention_varlen_backward", &attention_varlen_backward_cuda);
}

// Tensor-less ops get a catch-all kernel: they answer without a GPU.
TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) {
  m.def("cuda_attention_shared_bytes(int head_dim, ScalarType dtype) -> int", &cuda_attention_shared_bytes_op);
}

}  // namespace mtbert_fast
