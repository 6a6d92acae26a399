// mkl_linear: x @ W^T (+ bias) (GELU) in float32 by MKL's packed sgemm, on a weight packed once (mkl_pack).
// bfloat16 x and weights run the same float32 products of the same exact terms, rounded once to bf16: x is widened a
// block of rows at a time, the weight when it is packed. That is the encoder's bf16 on CPUs without bf16 arithmetic.
//
// MKL ships inside PyTorch's x86 builds (libtorch_cpu exports its cblas functions). Its packed sgemm stores the
// weight in the layout its kernels read, once, and then multiplies any number of rows by it: on a Xeon with AVX-512
// it ran bert-base's and MiniLM's products of 160-256 rows 1.1-1.3x faster than oneDNN's linear on a weight packed in
// oneDNN's blocked layout, and whole forwards of 256-1,024 tokens 1.00-1.21x. The cblas functions are weak
// references here: a PyTorch built without MKL leaves them null, mkl_sgemm_available() says so, and the encoder keeps
// oneDNN's linear.
//
// A pack is MKL's buffer behind a 64-byte header (the magic, the address the buffer was packed at, N and K). MKL asks
// for a buffer of the same size for every row count (the pack serves all of them). The buffer holds addresses into
// itself: a copy of it, even at the same alignment, multiplied wrong numbers and once raised a floating-point
// exception once the original was overwritten. So a pack that has moved (copied into another tensor) is refused.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "cpu_utils.h"

extern "C" {
// MKL's cblas (LP64: 32-bit integers), as mkl_cblas.h declares them; weak, so that a build without MKL loads.
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace mtbert_fast {
namespace {

// mkl_cblas.h's values
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kBMatrix = 162, kPacked = 151;
constexpr int64_t kHeader = 64;  // bytes before MKL's buffer, which stays 64-byte aligned
constexpr int64_t kMagic = 0x6d6b6c7061636b31;  // "mklpack1"
// The row count handed to MKL's pack: the buffer's size is the same for every count and any count multiplies
// correctly, but MKL shares the work among threads as it planned for this count. On a 2-core Xeon, packed for 1,024
// rows, products of 256 rows by 768 columns ran at half the rate (one thread's); packed for 256 rows, products of
// 160 to 2,048 rows ran at the full rate (packed for 512, MiniLM's FFN output at 160 rows ran at half).
constexpr int kPackRows = 256;

struct Header {
  int64_t magic, address, n, k;
};

bool available() { return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute; }

bool mkl_sgemm_available() { return available(); }

void check_int(const char* op, const char* what, int64_t v) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), op, ": ", what, " of ", v, " exceeds MKL's 32-bit sizes");
}

// weight [N, K] float32 or bfloat16 (widened, exactly) -> uint8 [64 + MKL's size]: the header, then MKL's packed
// float32 weight.
at::Tensor mkl_pack(const at::Tensor& weight) {
  constexpr const char* op = "mkl_pack";
  TORCH_CHECK(available(), op, ": this PyTorch has no MKL (its cblas_sgemm_pack is missing)");
  MTBF_CHECK_DEVICE_TYPE("mkl_pack", weight, c10::DeviceType::CPU);
  MTBF_CHECK_DIM("mkl_pack", weight, 2);
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16, op,
              ": weight must be float32 or bfloat16, got ", weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N > 0 && K > 0, op, ": weight must be non-empty, got shape ", weight.sizes());
  check_int(op, "the weight's elements", N * K);
  const at::Tensor w = weight.to(at::kFloat).contiguous();  // bf16 widens exactly
  const int64_t size = static_cast<int64_t>(cblas_sgemm_pack_get_size(kBMatrix, kPackRows, N, K));
  at::Tensor pack = at::empty({kHeader + size}, weight.options().dtype(at::kByte));
  uint8_t* base = pack.mutable_data_ptr<uint8_t>();
  float* dest = reinterpret_cast<float*>(base + kHeader);
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, kPackRows, N, K, 1.f, w.const_data_ptr<float>(), K, dest);
  const Header header{kMagic, reinterpret_cast<int64_t>(base), N, K};
  std::memcpy(base, &header, sizeof(header));
  return pack;
}

// The packed weight of `pack`, checked against x's K and weight's [N, K] and against where it was packed.
const float* packed_weight(const char* op, const at::Tensor& pack, int64_t M, int64_t N, int64_t K) {
  TORCH_CHECK(pack.scalar_type() == at::kByte && pack.dim() == 1 && pack.is_contiguous() &&
                  pack.numel() > kHeader,
              op, ": pack must be a contiguous uint8 vector made by mkl_pack, got shape ", pack.sizes());
  const uint8_t* base = pack.const_data_ptr<uint8_t>();
  Header header;
  std::memcpy(&header, base, sizeof(header));
  TORCH_CHECK(header.magic == kMagic, op, ": pack was not made by mkl_pack");
  TORCH_CHECK(header.n == N && header.k == K, op, ": pack holds a [", header.n, ", ", header.k,
              "] weight, but the weight is [", N, ", ", K, "]");
  const int64_t size = static_cast<int64_t>(cblas_sgemm_pack_get_size(kBMatrix, static_cast<int>(M), N, K));
  TORCH_CHECK(pack.numel() == kHeader + size, op, ": MKL asks for a pack of ", size, " bytes for ", M,
              " rows, but this pack holds ", pack.numel() - kHeader);
  TORCH_CHECK(header.address == reinterpret_cast<int64_t>(base), op,
              ": pack has moved since mkl_pack made it (MKL's packed buffer holds addresses into itself); pack the "
              "weight where it is used");
  return reinterpret_cast<const float*>(base + kHeader);
}

// out [M, N] = epilogue(x @ W^T) for x of T (float32, or bfloat16 widened a block of rows at a time), kPackRows
// rows at a time (the count MKL planned its threads for), each block's epilogue passing over it while it is still in
// cache: bias, GELU, and the rounding to T. Over the whole output after the product, MiniLM's FFN input GELU took
// 1.3 ms a layer on a Xeon, against 0.4 ms in oneDNN's epilogue.
template <typename T, GeluKind G>
void blocked_product(const T* ap, int64_t lda, const float* packed, const float* b, bool gelu, int64_t M, int64_t N,
                     int64_t K, T* out) {
  constexpr bool kWiden = !std::is_same_v<T, float>;
  const int64_t block = std::min<int64_t>(kPackRows, M);
  // float32 x is multiplied in place and its product written to out; bf16 x goes through float32 blocks
  at::Tensor a_block, c_block;
  if constexpr (kWiden) {
    a_block = at::empty({block, K}, at::TensorOptions().dtype(at::kFloat));
    c_block = at::empty({block, N}, at::TensorOptions().dtype(at::kFloat));
  }
  const int64_t grain = cpu::row_grain(std::max(N, K));
  for (int64_t m0 = 0; m0 < M; m0 += kPackRows) {
    const int64_t mc = std::min<int64_t>(kPackRows, M - m0);
    const float* a = nullptr;
    int64_t a_stride = lda;
    float* c = nullptr;
    if constexpr (kWiden) {
      float* aw = a_block.mutable_data_ptr<float>();
      at::parallel_for(0, mc, grain, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const T* src = ap + (m0 + r) * lda;
          cpu::for_each_vec(K, [&](int64_t d, auto n) { cpu::store(aw + r * K + d, cpu::load(src + d, n), n); });
        }
      });
      a = aw, a_stride = K, c = c_block.mutable_data_ptr<float>();
    } else {
      a = ap + m0 * lda, c = out + m0 * N;
    }
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, mc, N, K, a, a_stride, packed, N, 0.f, c, N);
    at::parallel_for(0, mc, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = c + r * N;
        T* dst = out + (m0 + r) * N;
        cpu::for_each_vec(N, [&](int64_t d, auto n) {
          cpu::fVec v = cpu::load(row + d, n);
          if (b != nullptr) v = v + cpu::load(b + d, n);
          cpu::store(dst + d, gelu ? cpu::gelu<G>(v) : v, n);
        });
      }
    });
  }
}

at::Tensor mkl_linear_cpu(const at::Tensor& x, const at::Tensor& pack, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias, bool gelu, c10::string_view approximate) {
  constexpr const char* op = "mkl_linear";
  TORCH_CHECK(available(), op, ": this PyTorch has no MKL (its cblas_sgemm_compute is missing)");
  MTBF_CHECK_DEVICE_TYPE("mkl_linear", x, c10::DeviceType::CPU);
  MTBF_CHECK_SAME_DEVICE("mkl_linear", x, pack);
  MTBF_CHECK_SAME_DEVICE("mkl_linear", x, weight);
  MTBF_CHECK_DIM("mkl_linear", x, 2);
  MTBF_CHECK_DIM("mkl_linear", weight, 2);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, op, ": weight must be [N, ", K, "] for x of ", K, " columns, got ",
              weight.sizes());
  const GeluKind kind = parse_gelu(op, approximate);
  const float* b = nullptr;
  at::Tensor bias_rows;
  if (bias.has_value()) {
    MTBF_CHECK_SAME_DEVICE("mkl_linear", x, *bias);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), op, ": bias must have x's dtype ", x.scalar_type(), ", got ",
                bias->scalar_type());
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "] (out_features), got ",
                bias->sizes());
    bias_rows = bias->to(at::kFloat).contiguous();
    b = bias_rows.const_data_ptr<float>();
  }
  check_int(op, "x's rows", M);
  const float* packed = packed_weight(op, pack, std::max<int64_t>(M, 1), N, K);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // MKL reads rows of x at any stride with unit columns
  const at::Tensor a = x.stride(1) == 1 && x.stride(0) >= K ? x : x.contiguous();
  check_int(op, "x's row stride", a.stride(0));
  const int64_t lda = a.stride(0);
  if (x.scalar_type() == at::kFloat && b == nullptr && !gelu) {
    cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, M, N, K, a.const_data_ptr<float>(), lda, packed, N, 0.f,
                        out.mutable_data_ptr<float>(), N);
    return out;
  }
  cpu::dispatch_float_bf16(x.scalar_type(), [&](auto t) {
    using T = decltype(t);
    cpu::dispatch_gelu(kind, [&](auto tag) {
      constexpr GeluKind G = decltype(tag)::value;
      blocked_product<T, G>(a.const_data_ptr<T>(), lda, packed, b, gelu, M, N, K, out.mutable_data_ptr<T>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mtbert_fast_C, m) {
  m.def("mkl_sgemm_available() -> bool", &mkl_sgemm_available);
  m.def("mkl_pack(Tensor weight) -> Tensor", &mkl_pack);
}

TORCH_LIBRARY_IMPL(mtbert_fast_C, CPU, m) { m.impl("mkl_linear", &mkl_linear_cpu); }

}  // namespace mtbert_fast
