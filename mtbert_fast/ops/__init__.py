"""The mtbert_fast ops: typed wrappers over torch.ops.mtbert_fast with backend choice (see dispatch.py)."""

from mtbert_fast._ext import cpu_amx
from mtbert_fast.ops.attention_varlen import attention_varlen
from mtbert_fast.ops.bias_gelu import bias_gelu
from mtbert_fast.ops.bias_gelu_layer_norm import bias_gelu_layer_norm
from mtbert_fast.ops.bias_residual_layer_norm import bias_residual_layer_norm
from mtbert_fast.ops.dispatch import BACKENDS, BackendUnavailable
from mtbert_fast.ops.geglu import geglu
from mtbert_fast.ops.int8 import (
    int8_linear, int8_linear_gelu_quantize, int8_linear_residual_layer_norm, int8_linear_residual_layer_norm_quantize,
    int8_panel_sums, int8_sums, pack_int8_panels, pack_int8_weight, quantize_rows,
)
from mtbert_fast.ops.int8_layers import int8_layers
from mtbert_fast.ops.mkl_linear import mkl_linear, pack_mkl
from mtbert_fast.ops.mlm_gather_loss import mlm_gather_loss
from mtbert_fast.ops.pack_mask import pack_mask
from mtbert_fast.ops.panel_linear import pack_panels, panel_fetch, panel_linear
from mtbert_fast.ops.post_norm_layers import post_norm_layers, stack_by_sequences, stack_groups
from mtbert_fast.ops.rotary_qk import rotary_qk, rotary_tables
from mtbert_fast.ops.rows import gather_rows, pad, scatter_rows, unpad, unpad_indices
from mtbert_fast.ops.token_embeddings import token_embeddings

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "attention_varlen",
    "bias_gelu",
    "bias_gelu_layer_norm",
    "bias_residual_layer_norm",
    "cpu_amx",
    "gather_rows",
    "geglu",
    "int8_layers",
    "int8_linear",
    "int8_linear_gelu_quantize",
    "int8_linear_residual_layer_norm",
    "int8_linear_residual_layer_norm_quantize",
    "int8_panel_sums",
    "int8_sums",
    "mkl_linear",
    "mlm_gather_loss",
    "pack_int8_panels",
    "pack_int8_weight",
    "pack_mask",
    "pack_mkl",
    "pack_panels",
    "panel_fetch",
    "pad",
    "panel_linear",
    "post_norm_layers",
    "quantize_rows",
    "rotary_qk",
    "rotary_tables",
    "scatter_rows",
    "stack_by_sequences",
    "stack_groups",
    "token_embeddings",
    "unpad",
    "unpad_indices",
]
