// Input checks shared by every kernel: a failing check names the op, the tensor and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <climits>
#include <optional>
#include <utility>
#include <vector>

#define MTBF_CHECK_DIM(op, t, n) \
  TORCH_CHECK((t).dim() == (n), op ": " #t " must have " #n " dims, got shape ", (t).sizes())

#define MTBF_CHECK_CONTIGUOUS(op, t) \
  TORCH_CHECK((t).is_contiguous(), op ": " #t " must be contiguous (shape ", (t).sizes(), ", strides ", (t).strides(), ")")

#define MTBF_CHECK_DTYPE(op, t, dt) \
  TORCH_CHECK((t).scalar_type() == (dt), op ": " #t " must be ", dt, ", got ", (t).scalar_type())

#define MTBF_CHECK_SAME_DTYPE(op, a, b)                                                                           \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), op ": " #b " has dtype ", (b).scalar_type(), " but " #a \
              " has ", (a).scalar_type())

#define MTBF_CHECK_SAME_DEVICE(op, a, b) \
  TORCH_CHECK((a).device() == (b).device(), op ": " #b " is on ", (b).device(), " but " #a " is on ", (a).device())

#define MTBF_CHECK_SIZE(op, t, d, n) \
  TORCH_CHECK((t).size(d) == (n), op ": " #t ".size(" #d ") must be ", (n), ", got shape ", (t).sizes())

#define MTBF_CHECK_DEVICE_TYPE(op, t, dev)                                                                \
  TORCH_CHECK((t).device().type() == (dev), op ": " #t " must be on ", c10::DeviceTypeName(dev), ", got ", \
              (t).device())

#define MTBF_CHECK_MIN_DIM(op, t, n) \
  TORCH_CHECK((t).dim() >= (n), op ": " #t " must have at least " #n " dims, got shape ", (t).sizes())

#define MTBF_CHECK_SAME_SHAPE(op, a, b) \
  TORCH_CHECK((a).sizes() == (b).sizes(), op ": " #b " has shape ", (b).sizes(), " but " #a " has shape ", (a).sizes())

#define MTBF_CHECK_FLOAT_OR_BF16(op, t)                                                                   \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16,                      \
              op ": " #t " must be float32 or bfloat16, got ", (t).scalar_type())

namespace mtbert_fast {

// A tensor argument and its name, for checks that several ops share.
struct NamedTensor {
  const char* name;
  const at::Tensor& t;
};

// The checks every LayerNorm op shares, on the CPU and on CUDA, with the messages of the MTBF_CHECK_ macros.
// x [..., D], D > 0, on a `device` device: float32 or bfloat16 (CUDA: float16 too); like_x: tensors of x's shape;
// params: [D] vectors; all of x's dtype. stats: fp32 [N] (the saved mean and rstd, N = rows of x). affine: [D]
// vectors of one dtype, x's or float32 (a LayerNorm's weight and beta, which mixed precision keeps in fp32; a kernel
// that passes them here reads them in either dtype). Every tensor on x's device. Returns D.
inline int64_t check_layer_norm_args(const char* op, c10::DeviceType device, const at::Tensor& x,
                                     std::initializer_list<NamedTensor> like_x, std::initializer_list<NamedTensor> params,
                                     std::initializer_list<NamedTensor> stats = {},
                                     std::initializer_list<NamedTensor> affine = {}) {
  const auto on_device = [&](const NamedTensor& a) {
    TORCH_CHECK(a.t.device() == x.device(), op, ": ", a.name, " is on ", a.t.device(), " but x is on ", x.device());
  };
  const auto same_dtype = [&](const NamedTensor& a) {
    TORCH_CHECK(a.t.scalar_type() == x.scalar_type(), op, ": ", a.name, " has dtype ", a.t.scalar_type(),
                " but x has ", x.scalar_type());
  };
  const auto vector_of = [&](const NamedTensor& a, int64_t n) {
    TORCH_CHECK(a.t.dim() == 1, op, ": ", a.name, " must have 1 dims, got shape ", a.t.sizes());
    TORCH_CHECK(a.t.size(0) == n, op, ": ", a.name, ".size(0) must be ", n, ", got shape ", a.t.sizes());
  };
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", c10::DeviceTypeName(device), ", got ", x.device());
  for (const auto& a : like_x) on_device(a);
  for (const auto& a : params) on_device(a);
  for (const auto& a : stats) on_device(a);
  for (const auto& a : affine) on_device(a);
  const bool half_ok = device == c10::DeviceType::CUDA;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  (half_ok && x.scalar_type() == at::kHalf),
              op, ": x must be float32", half_ok ? ", float16" : "", " or bfloat16, got ", x.scalar_type());
  for (const auto& a : like_x) same_dtype(a);
  for (const auto& a : params) same_dtype(a);
  const NamedTensor* first_affine = nullptr;
  for (const auto& a : affine) {
    if (first_affine == nullptr) {
      TORCH_CHECK(a.t.scalar_type() == x.scalar_type() || a.t.scalar_type() == at::kFloat, op, ": ", a.name,
                  " has dtype ", a.t.scalar_type(), " but x has ", x.scalar_type(), "; it must be x's dtype or ",
                  at::kFloat);
      first_affine = &a;
    } else {
      TORCH_CHECK(a.t.scalar_type() == first_affine->t.scalar_type(), op, ": ", a.name, " has dtype ",
                  a.t.scalar_type(), " but ", first_affine->name, " has ", first_affine->t.scalar_type());
    }
  }
  for (const auto& a : stats) {
    TORCH_CHECK(a.t.scalar_type() == at::kFloat, op, ": ", a.name, " must be ", at::kFloat, ", got ",
                a.t.scalar_type());
  }
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dims, got shape ", x.sizes());
  for (const auto& a : like_x) {
    TORCH_CHECK(a.t.sizes() == x.sizes(), op, ": ", a.name, " has shape ", a.t.sizes(), " but x has shape ",
                x.sizes());
  }
  const int64_t D = x.size(-1);
  TORCH_CHECK(D > 0, op, ": x must have a non-empty last dim, got shape ", x.sizes());
  for (const auto& a : params) vector_of(a, D);
  for (const auto& a : affine) vector_of(a, D);
  for (const auto& a : stats) vector_of(a, x.numel() / D);
  return D;
}

// rotary_qk's arguments, on the CPU and on CUDA: qkv [N, 3, H, D] (D even) of a float dtype the device takes (CUDA:
// float16 too), cos and sin fp32 [P, D/2], positions int32/int64 [N], all on qkv's device.
inline void check_rotary_qk_args(c10::DeviceType device, const at::Tensor& qkv, const at::Tensor& cos,
                                 const at::Tensor& sin, const at::Tensor& positions) {
  constexpr const char* op = "rotary_qk";
  TORCH_CHECK(qkv.device().type() == device, op, ": qkv must be on ", c10::DeviceTypeName(device), ", got ",
              qkv.device());
  MTBF_CHECK_SAME_DEVICE("rotary_qk", qkv, cos);
  MTBF_CHECK_SAME_DEVICE("rotary_qk", qkv, sin);
  MTBF_CHECK_SAME_DEVICE("rotary_qk", qkv, positions);
  const bool half_ok = device == c10::DeviceType::CUDA;
  TORCH_CHECK(qkv.scalar_type() == at::kFloat || qkv.scalar_type() == at::kBFloat16 ||
                  (half_ok && qkv.scalar_type() == at::kHalf),
              op, ": qkv must be float32", half_ok ? ", float16" : "", " or bfloat16, got ", qkv.scalar_type());
  MTBF_CHECK_DIM("rotary_qk", qkv, 4);
  MTBF_CHECK_SIZE("rotary_qk", qkv, 1, 3);
  TORCH_CHECK(qkv.size(3) % 2 == 0, op, ": head_dim must be even, got ", qkv.size(3));
  MTBF_CHECK_DTYPE("rotary_qk", cos, at::kFloat);
  MTBF_CHECK_DTYPE("rotary_qk", sin, at::kFloat);
  MTBF_CHECK_DIM("rotary_qk", cos, 2);
  MTBF_CHECK_SIZE("rotary_qk", cos, 1, qkv.size(3) / 2);
  MTBF_CHECK_SAME_SHAPE("rotary_qk", cos, sin);
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, op,
              ": positions must be int32 or int64, got ", positions.scalar_type());
  MTBF_CHECK_DIM("rotary_qk", positions, 1);
  MTBF_CHECK_SIZE("rotary_qk", positions, 0, qkv.size(0));
}

// geglu's arguments, on the CPU and on CUDA: x [..., 2I] of a float dtype the device takes (CUDA: float16 too) and,
// for the backward, grad_out [..., I] of x's dtype on its device. Returns the output's shape [..., I].
inline std::vector<int64_t> check_geglu_args(const char* op, c10::DeviceType device, const at::Tensor& x,
                                             const at::Tensor* grad_out = nullptr) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ", c10::DeviceTypeName(device), ", got ", x.device());
  const bool half_ok = device == c10::DeviceType::CUDA;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  (half_ok && x.scalar_type() == at::kHalf),
              op, ": x must be float32", half_ok ? ", float16" : "", " or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dims, got shape ", x.sizes());
  TORCH_CHECK(x.size(-1) % 2 == 0, op, ": x's last dim must be even, got shape ", x.sizes());
  std::vector<int64_t> half = x.sizes().vec();
  half.back() /= 2;
  if (grad_out != nullptr) {
    TORCH_CHECK(grad_out->device() == x.device(), op, ": grad_out is on ", grad_out->device(), " but x is on ",
                x.device());
    TORCH_CHECK(grad_out->scalar_type() == x.scalar_type(), op, ": grad_out has dtype ", grad_out->scalar_type(),
                " but x has ", x.scalar_type());
    TORCH_CHECK(grad_out->sizes() == at::IntArrayRef(half), op, ": grad_out must have shape ", at::IntArrayRef(half),
                " (x's with the last dim halved), got ", grad_out->sizes());
  }
  return half;
}

// attention_varlen's position terms, on the CPU and on CUDA: rel_bias fp32 [heads, 2R+1] (heads = qkv.size(2)),
// contiguous, on qkv's device, or none; window >= 0 (local attention) or -1 (none). qkv's shape is checked before.
inline void check_position_args(const char* op, const at::Tensor& qkv, const std::optional<at::Tensor>& rel_bias,
                                int64_t window) {
  TORCH_CHECK(window >= -1, op, ": window must be >= 0 (local attention) or -1 (none), got ", window);
  if (!rel_bias.has_value()) return;
  const at::Tensor& t = *rel_bias;
  TORCH_CHECK(t.device() == qkv.device(), op, ": rel_bias is on ", t.device(), " but qkv is on ", qkv.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": rel_bias must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == qkv.size(2) && t.size(1) % 2 == 1, op,
              ": rel_bias must be [heads, 2R+1] = [", qkv.size(2), ", odd], got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= INT_MAX, op, ": rel_bias has ", t.size(1), " columns, at most ", INT_MAX);
  TORCH_CHECK(t.is_contiguous(), op, ": rel_bias must be contiguous, got strides ", t.strides());
}

// pos_q / pos_k [heads, T, W] in qkv's dtype, contiguous, on qkv's device, one W >= 1 for both; pos_index int32
// [2P+1] on qkv's device, given iff a table is (its values must be columns in [0, W);
// each backend checks them where it reads them). After qkv's own checks.
inline void check_token_position_args(const char* op, const at::Tensor& qkv, const std::optional<at::Tensor>& pos_q,
                               const std::optional<at::Tensor>& pos_k, const std::optional<at::Tensor>& pos_index) {
  if (!pos_q.has_value() && !pos_k.has_value()) {
    TORCH_CHECK(!pos_index.has_value(), op, ": pos_index given without pos_q or pos_k");
    return;
  }
  const at::Tensor& first = pos_q.has_value() ? *pos_q : *pos_k;
  TORCH_CHECK(pos_index.has_value(), op, ": ", pos_q.has_value() ? "pos_q" : "pos_k",
              " needs pos_index (the column of each distance)");
  const int64_t width = first.dim() == 3 ? first.size(2) : 0;
  for (const auto& [name, table] : {std::pair{"pos_q", &pos_q}, std::pair{"pos_k", &pos_k}}) {
    if (!table->has_value()) continue;
    const at::Tensor& t = **table;
    TORCH_CHECK(t.device() == qkv.device(), op, ": ", name, " is on ", t.device(), " but qkv is on ", qkv.device());
    TORCH_CHECK(t.scalar_type() == qkv.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but qkv has ",
                qkv.scalar_type());
    TORCH_CHECK(t.dim() == 3 && t.size(0) == qkv.size(2) && t.size(1) == qkv.size(0) && t.size(2) == width &&
                    width >= 1,
                op, ": ", name, " must be [heads, T, W] = [", qkv.size(2), ", ", qkv.size(0),
                ", W], W >= 1 and the same for pos_q and pos_k, got shape ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides());
  }
  TORCH_CHECK(width <= INT_MAX, op, ": the position tables have ", width, " columns, at most ", INT_MAX);
  const at::Tensor& index = *pos_index;
  TORCH_CHECK(index.device() == qkv.device(), op, ": pos_index is on ", index.device(), " but qkv is on ",
              qkv.device());
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kInt && index.size(0) % 2 == 1, op,
              ": pos_index must be a 1-D int32 tensor of odd length 2P+1, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(index.size(0) <= INT_MAX, op, ": pos_index has ", index.size(0), " entries, at most ", INT_MAX);
}

// The leading checks of a stack of encoder layers in one call (post_norm_layers, int8_layers): x [T, H] float32 or
// bfloat16 on the CPU, H a multiple of heads, `per_layer` tensors per layer in weights. Returns the layers' count.
inline int64_t check_layer_stack(const char* op, const at::Tensor& x, int64_t heads, at::TensorList weights,
                                 int64_t per_layer) {
  TORCH_CHECK(x.device().type() == c10::DeviceType::CPU, op, ": x must be on cpu, got ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must have 2 dims, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(heads > 0 && x.size(1) % heads == 0, op, ": the hidden size ", x.size(1),
              " (x's columns) must be a multiple of heads, got heads = ", heads);
  TORCH_CHECK(!weights.empty() && weights.size() % per_layer == 0, op, ": weights must hold ", per_layer,
              " tensors per layer and at least one layer, got ", weights.size());
  return static_cast<int64_t>(weights.size()) / per_layer;
}

// Checks cu_seqlens against the T packed rows of `rows_of` (the tensor's name, for the message); returns the (start,
// len) of every sequence. max_seqlen only has to be >= 0, as on every backend: a longer sequence is computed in full.
inline std::vector<std::pair<int64_t, int64_t>> read_cu_seqlens(const char* op, const at::Tensor& cu_seqlens,
                                                                int64_t tokens, int64_t max_seqlen,
                                                                const char* rows_of = "qkv") {
  TORCH_CHECK(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  TORCH_CHECK(cu_seqlens.device().is_cpu(), op, ": cu_seqlens must be on cpu, got ", cu_seqlens.device());
  TORCH_CHECK(cu_seqlens.dim() == 1, op, ": cu_seqlens must have 1 dim, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be Int (int32), got ",
              cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.numel() >= 1, op, ": cu_seqlens must hold at least one offset (B + 1 entries)");
  const at::Tensor cu = cu_seqlens.contiguous();
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t batch = cu.numel() - 1;
  TORCH_CHECK(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
  TORCH_CHECK(batch > 0 || tokens == 0, op, ": cu_seqlens = [0] describes no sequence, but ", rows_of, " has ",
              tokens, " rows");
  TORCH_CHECK(c[batch] == tokens, op, ": cu_seqlens[-1] must equal the ", tokens, " rows of ", rows_of, ", got ",
              c[batch]);
  std::vector<std::pair<int64_t, int64_t>> seqs;
  seqs.reserve(batch);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = int64_t{c[b + 1]} - c[b];
    TORCH_CHECK(len >= 0, op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b, "] = ", c[b],
                " > cu_seqlens[", b + 1, "] = ", c[b + 1]);
    seqs.emplace_back(c[b], len);
  }
  return seqs;
}

// GELU variant named by the op's `approximate` argument.
enum class GeluKind { Erf, Tanh };

inline GeluKind parse_gelu(const char* op, c10::string_view approximate) {
  if (approximate == "none") return GeluKind::Erf;
  if (approximate == "tanh") return GeluKind::Tanh;
  TORCH_CHECK(false, op, ": approximate must be \"none\" or \"tanh\", got \"", std::string(approximate), "\"");
}

}  // namespace mtbert_fast
