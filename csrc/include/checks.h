// Input checks shared by every kernel: a failing check names the op, the tensor and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

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

// GELU variant named by the op's `approximate` argument.
enum class GeluKind { Erf, Tanh };

inline GeluKind parse_gelu(const char* op, c10::string_view approximate) {
  if (approximate == "none") return GeluKind::Erf;
  if (approximate == "tanh") return GeluKind::Tanh;
  TORCH_CHECK(false, op, ": approximate must be \"none\" or \"tanh\", got \"", std::string(approximate), "\"");
}

}  // namespace mtbert_fast
