// Every mtbert_fast op signature, in one place. Backends register implementations with
// TORCH_LIBRARY_IMPL(mtbert_fast_C, <Key>, m) in their own files (csrc/cpu, csrc/cuda); fake (meta)
// implementations and autograd live in Python (mtbert_fast/ops/).
#include <torch/library.h>

TORCH_LIBRARY(mtbert_fast_C, m) {
  // qkv [T, 3, heads, head_dim], cu_seqlens int32 [B+1] -> out [T, heads, head_dim], lse fp32 [heads, T].
  // max_seqlen sizes the launch only: a longer sequence is still computed in full. dropout_p > 0 drops attention
  // probabilities with the Philox mask of csrc/include/philox.h drawn from rng_state (int64 [2] on the CPU: seed,
  // offset); the backward regenerates the same mask from the same rng_state.
  m.def(
      "attention_varlen(Tensor qkv, Tensor cu_seqlens, int max_seqlen, float scale, float dropout_p=0., "
      "Tensor? rng_state=None) -> (Tensor, Tensor)");
  // -> grad_qkv [T, 3, heads, head_dim]
  m.def(
      "attention_varlen_backward(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, Tensor cu_seqlens, "
      "int max_seqlen, float scale, float dropout_p=0., Tensor? rng_state=None) -> Tensor");

  // x [N, D], bias [D] -> GELU(x + bias) [N, D]; approximate is "none" (erf) or "tanh"
  m.def("bias_gelu(Tensor x, Tensor bias, str approximate) -> Tensor");
  // -> grad_x [N, D]; grad_bias is its column sum, taken by the caller
  m.def("bias_gelu_backward(Tensor grad_out, Tensor x, Tensor bias, str approximate) -> Tensor");

  // LayerNorm(x + bias + residual) over the last dim -> out [N, D], mean fp32 [N], rstd fp32 [N]
  m.def(
      "bias_residual_layer_norm(Tensor x, Tensor bias, Tensor residual, Tensor weight, Tensor beta, float eps) "
      "-> (Tensor, Tensor, Tensor)");
  // -> grad_sum [N, D] (the gradient of x, of residual, and summed over rows of bias), grad_weight [D], grad_beta [D]
  m.def(
      "bias_residual_layer_norm_backward(Tensor grad_out, Tensor x, Tensor bias, Tensor residual, Tensor weight, "
      "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");

  // LayerNorm(GELU(x + bias)) over the last dim -> out [N, D], mean fp32 [N], rstd fp32 [N]
  m.def(
      "bias_gelu_layer_norm(Tensor x, Tensor bias, Tensor weight, Tensor beta, float eps, str approximate) "
      "-> (Tensor, Tensor, Tensor)");
  // -> grad_x [N, D], grad_weight [D], grad_beta [D]
  m.def(
      "bias_gelu_layer_norm_backward(Tensor grad_out, Tensor x, Tensor bias, Tensor weight, Tensor mean, "
      "Tensor rstd, str approximate) -> (Tensor, Tensor, Tensor)");

  // x [R, ...], indices int64 [N] -> x[indices] [N, ...]
  m.def("gather_rows(Tensor x, Tensor indices) -> Tensor");
  // x [N, ...], indices int64 [N] (distinct) -> out [num_rows, ...], zero where no index points
  m.def("scatter_rows(Tensor x, Tensor indices, int num_rows) -> Tensor");

  // hidden [N, H], weight [V, H], bias [V], labels int64 [N]: cross-entropy of hidden @ weight.T + bias,
  // computed chunk_size rows at a time over the rows whose label != ignore_index
  // -> loss_sum fp32 [] (summed over the counted rows), lse fp32 [N] (0 at ignored rows)
  m.def(
      "mlm_gather_loss(Tensor hidden, Tensor weight, Tensor bias, Tensor labels, int ignore_index, int chunk_size) "
      "-> (Tensor, Tensor)");
  // grad_loss_sum [] -> grad_hidden [N, H], grad_weight [V, H], grad_bias [V]
  m.def(
      "mlm_gather_loss_backward(Tensor grad_loss_sum, Tensor hidden, Tensor weight, Tensor bias, Tensor labels, "
      "Tensor lse, int ignore_index, int chunk_size) -> (Tensor, Tensor, Tensor)");
}
