"""Every C++ CPU op, forward and backward, against its PyTorch reference in fp32 and bf16, on the CPU build of the
kernels this process loaded; run by test_cpu_isa.py in a subprocess per instruction set ($MTBERT_FAST_CPU_ISA).
Left to tests/ops/test_int8.py (on the build loaded): the ops that quantize rows (quantize_rows and the epilogues
ending in _quantize), whose uint8 results may move by a step where a value lies at a rounding tie; to
tests/ops/test_pack_mask.py: pack_mask, integer bookkeeping without vector code or floating-point results.
Prints one JSON line: the instruction set loaded, the libraries of the extension loaded, the load error, and the
cases that passed.

Tolerances: fp32 within 1e-4 of the reference (both compute in fp32; the kernels sum in another order). bf16: the
kernel's error against the exact (fp64) result of the same bf16 inputs at most twice the reference's own bf16 error
(the reference computes in fp32 and rounds once), plus 2e-2 times the result's largest magnitude, about two bf16 ulps
of it: the kernels may round intermediates to bf16 for their matrix products (mlm_gather_loss's probabilities).
"""

from __future__ import annotations

import json
import os

import torch

import mtbert_fast.ops as ops
from mtbert_fast import _ext
from mtbert_fast.ops import reference


def _rand(shape, dtype, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(fn, inputs, dtype, upcast=False):
    """fn's output and the gradients of its floating inputs under a fixed random cotangent in dtype, all as fp64;
    with upcast, fn runs on the inputs cast to fp64 (the exact result)."""
    leaves = [t.double() if upcast and t.is_floating_point() else t for t in inputs]
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    out = fn(*leaves)
    if not out.requires_grad:  # an inference-only op
        return [out.double()]
    cotangent = _rand(out.shape, dtype, 99).to(out.dtype)
    (out * cotangent).sum().backward()
    return [out.detach().double()] + [t.grad.double() for t in leaves if t.is_floating_point()]


def check(name, dtype, kernel, ref, inputs):
    got = _run(kernel, inputs, dtype)
    want = _run(ref, inputs, dtype)
    if dtype == torch.float32:
        for i, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name} fp32 result {i}: {m}")
        return
    exact = _run(ref, inputs, dtype, upcast=True)
    for i, (g, w, e) in enumerate(zip(got, want, exact)):
        err = (g - e).abs().max().item() if e.numel() else 0.0
        base = (w - e).abs().max().item() if e.numel() else 0.0
        floor = 2e-2 * e.abs().max().item() if e.numel() else 0.0
        assert err <= 2 * base + floor, f"{name} bf16 result {i}: error {err:.3g}, the reference's {base:.3g}"


def bf16_probabilities() -> None:
    """In bf16, P V takes the probabilities rounded to bf16 on every build, with the CPU's bf16 dot products or on
    float products alike: the outputs match the reference's, which rounds them so, to an ulp and nearly all exactly."""
    lens = [1, 7, 33, 130]
    cu = torch.tensor([0, 1, 8, 41, 171], dtype=torch.int32)
    qkv = 2 * _rand((sum(lens), 3, 2, 20), torch.bfloat16, 24)
    with torch.inference_mode():
        out = ops.attention_varlen(qkv, cu, max(lens), backend="cpu").float()
        ref = reference.attention_varlen(qkv, cu, max(lens)).float()
    diff = (out - ref).abs()
    ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))))
    assert (diff <= ulp).all(), f"bf16 attention: {(diff / ulp).max().item():.1f} ulp from the reference"
    exact = (diff == 0).float().mean().item()
    assert exact >= 0.99, f"bf16 attention: only {exact:.3f} of the outputs exact"


def main() -> None:
    passed = []
    if _ext.loaded():
        for dtype in (torch.float32, torch.bfloat16):
            N, D = 7, 100  # a row length that is no multiple of any vector width
            x, bias, residual = _rand((N, D), dtype, 1), _rand((D,), dtype, 2), _rand((N, D), dtype, 3)
            weight, beta = 1 + 0.1 * _rand((D,), dtype, 4), _rand((D,), dtype, 5)
            cases = {}
            for approximate in ("none", "tanh"):
                cases[f"bias_gelu[{approximate}]"] = (
                    lambda x, b, a=approximate: ops.bias_gelu(x, b, a, backend="cpu"),
                    lambda x, b, a=approximate: reference.bias_gelu(x, b, a),
                    (x, bias),
                )
                cases[f"geglu[{approximate}]"] = (
                    lambda x, a=approximate: ops.geglu(x, a, backend="cpu"),
                    lambda x, a=approximate: reference.geglu(x, a),
                    (x,),
                )
                cases[f"bias_gelu_layer_norm[{approximate}]"] = (
                    lambda *t, a=approximate: ops.bias_gelu_layer_norm(*t, 1e-5, a, backend="cpu"),
                    lambda *t, a=approximate: reference.bias_gelu_layer_norm(*t, 1e-5, a),
                    (x, bias, weight, beta),
                )
            cases["bias_residual_layer_norm"] = (
                lambda *t: ops.bias_residual_layer_norm(*t, 1e-5, backend="cpu"),
                lambda *t: reference.bias_residual_layer_norm(*t, 1e-5),
                (x, bias, residual, weight, beta),
            )
            rows = torch.tensor([4, 0, 6, 2], dtype=torch.int64)
            cases["gather_rows"] = (
                lambda x, i: ops.gather_rows(x, i, backend="cpu"), reference.gather_rows, (x, rows))
            cases["scatter_rows"] = (
                lambda x, i: ops.scatter_rows(x, i, 9, backend="cpu"),
                lambda x, i: reference.scatter_rows(x, i, 9),
                (x[:4], rows),
            )
            # the embeddings of 11 real tokens of a [2, 9] batch, rows of D = 100
            ids = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(40))
            types = torch.randint(0, 2, (2, 9), generator=torch.Generator().manual_seed(41))
            slots = torch.tensor([0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 12])
            cases["token_embeddings"] = (
                lambda *t: ops.token_embeddings(ids, slots, types, *(a.detach() for a in t), 1e-5, backend="cpu"),
                lambda *t: reference.token_embeddings(ids, slots, types, *t, 1e-5),
                (_rand((37, D), dtype, 42), _rand((9, D), dtype, 43), _rand((2, D), dtype, 44), weight, beta),
            )
            V = 37
            labels = torch.tensor([3, -100, 0, 36, -100, 11, 5], dtype=torch.int64)
            cases["mlm_gather_loss"] = (
                lambda h, w, b, y: ops.mlm_gather_loss(h, w, b, y, backend="cpu"),
                reference.mlm_gather_loss,
                (x[:, :48], _rand((V, 48), dtype, 6), _rand((V,), dtype, 7), labels),
            )
            lens = [5, 1, 17, 9]
            cu = torch.tensor([0, 5, 6, 23, 32], dtype=torch.int32)
            qkv = _rand((sum(lens), 3, 2, 32), dtype, 8)
            for p in (0.0, 0.2):
                rng = torch.tensor([20240611, 4], dtype=torch.int64)
                cases[f"attention_varlen[dropout {p}]"] = (
                    lambda q, p=p, rng=rng: ops.attention_varlen(q, cu, max(lens), dropout_p=p, rng_state=rng,
                                                                 backend="cpu"),
                    lambda q, p=p, rng=rng: reference.attention_varlen(q, cu, max(lens), None, p, rng),
                    (qkv,),
                )
            # R = 3 inside a window of 8: pairs of the clamped distances 4..8 share the table's end buckets
            table = _rand((2, 7), torch.float32, 10)
            cases["attention_varlen[rel_bias, window]"] = (
                lambda q, b: ops.attention_varlen(q, cu, max(lens), rel_bias=b, window=8, backend="cpu"),
                lambda q, b: reference.attention_varlen(q, cu, max(lens), rel_bias=b, window=8),
                (qkv, table),
            )
            # Both tables with rel_bias and dropout: P = 4 clamps the longer sequences' distances, a shuffled index
            # keeps the columns from growing with the distance
            index = torch.tensor([3, 0, 1, 5, 2, 4, 6, 2, 5], dtype=torch.int32)
            pos_q, pos_k = _rand((2, sum(lens), 7), dtype, 11), _rand((2, sum(lens), 7), dtype, 12)
            rng = torch.tensor([20240611, 8], dtype=torch.int64)
            cases["attention_varlen[pos tables, rel_bias, dropout]"] = (
                lambda q, b, tq, tk: ops.attention_varlen(q, cu, max(lens), dropout_p=0.2, rng_state=rng, rel_bias=b,
                                                          pos_q=tq, pos_k=tk, pos_index=index, backend="cpu"),
                lambda q, b, tq, tk: reference.attention_varlen(q, cu, max(lens), None, 0.2, rng, b, pos_q=tq,
                                                                pos_k=tk, pos_index=index),
                (qkv, table, pos_q, pos_k),
            )
            cos, sin = ops.rotary_tables(34, 20, 10000.0)  # 17 pairs: no multiple of any vector width
            positions = torch.cat([torch.arange(n) for n in lens])
            cases["rotary_qk"] = (
                lambda q: ops.rotary_qk(q, cos, sin, positions, backend="cpu"),
                lambda q: reference.rotary_qk(q, cos, sin, positions),
                (_rand((sum(lens), 3, 2, 34), dtype, 9),),
            )
            # 40 columns: a whole panel and part of one; 100 rows of reduction, 7 rows of x
            for approximate in ("none", "tanh"):
                cases[f"panel_linear[{approximate}]"] = (
                    lambda x, w, b, a=approximate: ops.panel_linear(x.detach(), ops.pack_panels(w), b.detach(), 40,
                                                                    gelu=True, approximate=a, backend="cpu"),
                    lambda x, w, b, a=approximate: reference.bias_gelu(x.detach() @ w.detach().t(), b.detach(), a),
                    (x, 0.1 * _rand((40, D), dtype, 13), _rand((40,), dtype, 14)),
                )
            # int8 panels (integer sums, the same in both loops): 7 rows (tiles of 3 and 2), 98 columns (a part of the
            # last group of four), 40 outputs; rows of 255 against pairs of one sign at PAIR_LIMIT
            g = torch.Generator().manual_seed(15)
            q8 = torch.randint(0, 256, (7, 98), dtype=torch.uint8, generator=g)
            q8[0] = 255
            w8 = torch.randint(-64, 65, (40, 98), dtype=torch.int8, generator=g)
            w8[0, 0::2], w8[0, 1::2], w8[1, 0::2], w8[1, 1::2] = 127, 1, -1, -127
            cases["int8_panel_sums"] = (
                lambda q, w: ops.int8_panel_sums(q, ops.pack_int8_panels(w), 40, backend="cpu"),
                lambda q, w: reference.int8_sums(q, w),
                (q8, w8),
            )
            # int8 product epilogues on given integer sums: 7 rows, 40 outputs, two outlier channels; every float
            # input but the bias, residual and norm fp32 as the ops take them
            acc = torch.randint(-40000, 40000, (7, 40), dtype=torch.int32, generator=g)
            scale8, zero8 = 0.01 * _rand((7,), torch.float32, 16).abs(), torch.randint(0, 256, (7,), generator=g).float()
            wscale, wsum = 0.01 * _rand((40,), torch.float32, 17).abs(), torch.randint(-900, 900, (40,), generator=g)
            product = (acc, scale8, zero8, wscale, wsum.float(), _rand((40,), dtype, 18))

            def fp32(t):  # the references compute in fp32: their "exact" run gets fp32 for fp64
                return [u.float() if u.dtype == torch.float64 else u for u in t]

            outliers = (_rand((7, 2), torch.float32, 19), _rand((2, 40), torch.float32, 20))
            cases["int8_linear"] = (
                lambda *t: ops.int8_linear(*(u.detach() for u in t), outliers=outliers, backend="cpu"),
                lambda *t: reference.int8_linear(*fp32(t), *outliers),
                product,
            )
            norm = (_rand((7, 40), dtype, 21), 1 + 0.1 * _rand((40,), dtype, 22), _rand((40,), dtype, 23))
            cases["int8_linear_residual_layer_norm"] = (
                lambda *t: ops.int8_linear_residual_layer_norm(*(u.detach() for u in t), 1e-5, outliers=outliers,
                                                               backend="cpu"),
                lambda *t: reference.int8_linear_residual_layer_norm(*fp32(t[:6]), *outliers, *fp32(t[6:]), 1e-5),
                product + norm,
            )
            # two post-norm layers of hidden 64 (2 heads of 32) and 100 intermediate units on the ragged batch above
            hidden, inner = 64, 100
            shapes = [(3 * hidden, hidden), (3 * hidden,), (hidden, hidden), (hidden,), (hidden,), (hidden,),
                      (inner, hidden), (inner,), (hidden, inner), (hidden,), (hidden,), (hidden,)] * 2
            layer = [0.1 * _rand(shape, dtype, 30 + i) for i, shape in enumerate(shapes)]
            for i in (4, 10, 16, 22):
                layer[i] = layer[i] + 1  # the norms' weights
            packed = [ops.pack_panels(w) if w.dim() == 2 else w for w in layer]
            cases["post_norm_layers"] = (
                lambda x: ops.post_norm_layers(x.detach(), cu, max(lens), packed, 2, 32 ** -0.5, 1e-5, "none",
                                               backend="cpu"),
                lambda x: reference.post_norm_layers(x, cu, max(lens), [w.to(x.dtype) for w in packed], 2, 32 ** -0.5,
                                                     1e-5, "none"),
                (_rand((sum(lens), hidden), dtype, 29),),
            )
            for name, (kernel, ref, inputs) in cases.items():
                check(name, dtype, kernel, ref, inputs)
                passed.append(f"{name} {str(dtype).replace('torch.', '')}")
        bf16_probabilities()
        passed.append("attention_varlen[bf16 probabilities]")
    libs = sorted(os.path.basename(p).split(".")[0] for p in torch.ops.loaded_libraries if "mtbert_fast" in p)
    print(json.dumps({"isa": _ext.cpu_isa(), "libs": libs, "load_error": _ext.load_error, "passed": passed}))


if __name__ == "__main__":
    main()
