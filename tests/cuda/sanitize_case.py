"""A small, complete workload for compute-sanitizer: attention forward and backward (dropout off and on, ragged
lengths with 1 and a multi-tile sequence, fp16 and bf16 and fp32; on the CUDA kernels also with a relative position
bias table and a window, and with DeBERTa's per-token position tables) and both LayerNorm ops with their backward, on
one GPU backend.
`python tests/cuda/sanitize_case.py --backend cuda|triton`; `--check` only imports and exits."""

from __future__ import annotations

import argparse
import sys

import torch


def run(backend: str) -> None:
    from mtbert_fast import ops
    from mtbert_fast.ops import dispatch, dropout

    dev = torch.device("cuda")
    lengths = [1, 77, 5, 130]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 80):
            qkv = torch.randn(sum(lengths), 3, 2, head_dim, generator=g, device=dev).to(dtype).requires_grad_()
            why = dispatch.reason(backend, "attention_varlen", dev, dtype)
            if why:
                sys.exit(f"{backend} cannot run attention_varlen in {dtype}: {why}")
            # a table narrower than the longest distance (its last entries shared by the far keys), and a window
            positions = [{}]
            if backend == "cuda":
                table = torch.randn(2, 2 * 40 + 1, generator=g, device=dev).requires_grad_()
                positions.append(dict(rel_bias=table, window=20))
                # pos_q and pos_k of 17 columns, the distances past 8 sharing the end ones, P = 40 below the longest
                index = (torch.arange(-40, 41, device=dev).clamp(-8, 8) + 8).to(torch.int32)
                pos_q, pos_k = (torch.randn(2, sum(lengths), 17, generator=g, device=dev).to(dtype).requires_grad_()
                                for _ in range(2))
                positions.append(dict(pos_q=pos_q, pos_k=pos_k, pos_index=index))
            for p in (0.0, 0.1):
                for position in positions:
                    rng = dropout.new_rng_state() if p else None
                    out = ops.attention_varlen(qkv, cu, max(lengths), dropout_p=p, rng_state=rng, backend=backend,
                                               **position)
                    out.float().square().sum().backward()
        x = torch.randn(300, 96, generator=g, device=dev).to(dtype).requires_grad_()
        b, r = torch.randn(96, device=dev).to(dtype), torch.randn(300, 96, device=dev).to(dtype)
        w, beta = torch.ones(96, device=dev).requires_grad_(), torch.zeros(96, device=dev).requires_grad_()
        params = (w, beta) if dtype == torch.float32 else (w.to(dtype), beta.to(dtype))
        y = ops.bias_residual_layer_norm(x, b, r, *params, 1e-12, backend=backend)
        z = ops.bias_gelu_layer_norm(y, b, *params, 1e-12, backend=backend)
        ops.bias_gelu(z, b, backend=backend).float().sum().backward()
    torch.cuda.synchronize()
    print(f"sanitize_case: {backend} done")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["cuda", "triton"], required=True)
    parser.add_argument("--check", action="store_true", help="import only (for a dry run without a GPU)")
    args = parser.parse_args()
    if args.check:
        import mtbert_fast.ops  # noqa: F401
    else:
        run(args.backend)
