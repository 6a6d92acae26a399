"""Each mtbert_fast op (the cpu backend) against its unfused PyTorch composition in the same dtype, bert-base
shapes (B=8 sequences of 128 tokens packed: T=1024, H=768, I=3072, 12 heads), fp32 and bf16; the ratio of the
composition's time to the op's in extra_info. Outputs are checked against each other."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mtbert_fast.ops as ops
from mtbert_fast.ops import dispatch

T, H, I, HEADS, B, L, V = 1024, 768, 3072, 12, 8, 128, 30522
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _t(*shape, dtype, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) + shape[-1])) * scale).to(dtype)


def _padded_attention(qkv):
    q, k, v = qkv.view(B, L, 3, HEADS, H // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, HEADS, H // HEADS)


def _cases(dtype):
    x, xi = _t(T, H, dtype=dtype), _t(T, I, dtype=dtype)
    b, bi, w, beta = _t(H, dtype=dtype), _t(I, dtype=dtype), _t(H, dtype=dtype), _t(H, dtype=dtype)
    res = _t(T, H, dtype=dtype)
    qkv = _t(T, 3, HEADS, H // HEADS, dtype=dtype)
    cu = torch.arange(0, T + 1, L, dtype=torch.int32)
    n = 154  # 15% of T masked rows
    hid, dec, vb = _t(n, H, dtype=dtype), _t(V, H, dtype=dtype, scale=0.02), _t(V, dtype=dtype)
    labels = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(0))
    return {
        "bias_gelu": (lambda: ops.bias_gelu(xi, bi, backend="cpu"), lambda: F.gelu(xi + bi)),
        "bias_residual_layer_norm": (lambda: ops.bias_residual_layer_norm(x, b, res, w, beta, 1e-12, backend="cpu"),
                                     lambda: F.layer_norm(x + b + res, (H,), w, beta, 1e-12)),
        "bias_gelu_layer_norm": (lambda: ops.bias_gelu_layer_norm(x, b, w, beta, 1e-12, backend="cpu"),
                                 lambda: F.layer_norm(F.gelu(x + b), (H,), w, beta, 1e-12)),
        "attention_varlen": (lambda: ops.attention_varlen(qkv, cu, L, 1 / math.sqrt(H // HEADS), backend="cpu"),
                             lambda: _padded_attention(qkv)),
        "mlm_gather_loss": (lambda: ops.mlm_gather_loss(hid, dec, vb, labels, backend="cpu"),
                            lambda: F.cross_entropy(F.linear(hid, dec, vb).float(), labels)),
    }  # fmt: skip


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("op", ["bias_gelu", "bias_residual_layer_norm", "bias_gelu_layer_norm", "attention_varlen",
                                "mlm_gather_loss"])  # fmt: skip
def test_op_vs_composition(compare, report, op, dtype_name):
    dtype = DTYPES[dtype_name]
    why = dispatch.reason("cpu", op, torch.device("cpu"), dtype)
    if why is not None:
        pytest.skip(f"cpu backend: {why}")
    fused, unfused = _cases(dtype)[op]
    with torch.inference_mode():
        a, b = fused().float(), unfused().float()
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        err = float((a - b).abs().max())
        assert err <= tol * max(1.0, float(b.abs().max())), f"{op}: {err:.2e}"
        t = compare({"pytorch": unfused, "mtbert_fast": fused}, rounds=10)
    report(op, dtype_name, "speed-up vs unfused PyTorch", t["pytorch"].median / t["mtbert_fast"].median,
           "reported", f"op {t['mtbert_fast'].median * 1e6:.0f} us, PyTorch {t['pytorch'].median * 1e6:.0f} us")
