"""The encoder's post-norm layers in one post_norm_layers call against the same kernels called layer by layer from
Python, and the call with each thread on its own sequences against the call over the whole batch, on the CPU, in
inference.

    HF_HUB_OFFLINE=1 python benchmarks/layer_stack.py [--models minilm bert-base] [--dtypes float32 bfloat16]
                                                      [--batch 8] [--lengths 16 128] [--threads 2] [--repeats 15]

Per model, dtype and length, on B full sequences (every token real), in one process, interleaved round by round:
the layers as `encode` runs them in one call (the weights packed for the route the rows take: panels for few rows,
oneDNN's blocked layout for more) over the whole batch on every thread (`ops.stack_by_sequences(False)`), the same
call with each thread on its own group of sequences where `ops.stack_groups` forms groups (as the encoder runs it),
and `layer_forward` once per layer, which calls the same kernels from Python. The layer-by-layer result and the whole
call's must agree bit for bit, the grouped call's with the whole one within the dtype's rounding. Printed: each
route's median time, and the medians of the per-round ratios (layer by layer over the whole call, the whole call over
the grouped one; above 1 the latter is faster). The layers only: the embeddings and the pooler, the same on every
route, are left out.

Set MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 before the process starts (see
full_batch_profile.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtbert_fast import FastBertModel, ops  # noqa: E402
from mtbert_fast.bench import harness  # noqa: E402
from mtbert_fast.bench.measure import bert_base_config, default_model_dir, random_bert  # noqa: E402
from mtbert_fast.models import encoder  # noqa: E402


def _model(name: str, dtype: torch.dtype) -> FastBertModel:
    if name == "bert-base":
        return FastBertModel.from_hf(random_bert(bert_base_config())).to(dtype).eval()
    return FastBertModel.from_pretrained(default_model_dir()).to(dtype).eval()


def compare(model: FastBertModel, batch: int, length: int, repeats: int) -> dict:
    """Each route's median ms ("by_layer", "stacked", "grouped"), the per-round ratios ("loop_ratio": layer by layer
    over the whole call, "group_ratio": the whole call over the grouped one), the QKV product's "route" and the "groups"
    (ops.stack_groups: [] where the batch stays whole)."""
    config = model.config
    layers = [layer.weights() for layer in model.layers]
    packed = encoder.PackedBatch.dense(batch, length, torch.device("cpu"))
    x = torch.randn(batch * length, config.hidden_size).to(model.dtype)
    stack = encoder._post_norm_stack(config, layers, x, packed, None)
    if stack is None:
        raise SystemExit(f"{config.family} in {model.dtype} at {x.shape[0]} rows does not run in one call here")
    weights, packs = stack
    route = "oneDNN" if weights[0].is_mkldnn else "MKL" if packs else "panels"
    one_call = encoder.post_norm_layers_op.kernel("cpu")

    def call(by_sequences: bool):
        ops.stack_by_sequences(by_sequences)
        return one_call(x, packed.cu_seqlens, packed.max_seqlen, weights, config.num_attention_heads,
                        config.attention_scale, config.layer_norm_eps, config.gelu_approximate, None, packs)

    def stacked():
        return call(False)

    def grouped():
        return call(True)

    def by_layer():
        h = x
        for w in layers:
            h = encoder.layer_forward(config, w, h, packed, training=False)
        return h

    allowed = ops.stack_by_sequences()
    try:
        return _timed(by_layer, stacked, grouped, model.dtype, route, repeats,
                      ops.stack_groups(packed.cu_seqlens, torch.get_num_threads(), config.hidden_size,
                                       config.intermediate_size))
    finally:
        ops.stack_by_sequences(allowed)


def _timed(by_layer, stacked, grouped, dtype, route, repeats, groups) -> dict:
    whole = stacked()
    if not torch.equal(whole, by_layer()):
        raise SystemExit("the single call and the layer-by-layer kernels disagree")
    # panels give each row the same bits at any row count; oneDNN's blocking can move the last bits
    worst = (grouped().float() - whole.float()).abs().max().item()
    if worst > (0.0 if route == "panels" else 1e-4 if dtype == torch.float32 else 0.1):
        raise SystemExit(f"the grouped call differs from the whole one by {worst}")
    times = harness.time_interleaved({"by_layer": by_layer, "stacked": stacked, "grouped": grouped},
                                     repeats=repeats, warmup=2)
    return {**{k: t.median * 1e3 for k, t in times.items()}, "route": route, "groups": groups,
            "loop_ratio": harness.median_ratio(times["by_layer"].samples, times["stacked"].samples),
            "group_ratio": harness.median_ratio(times["stacked"].samples, times["grouped"].samples)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lengths", nargs="+", type=int, default=[128])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(harness.describe_device("cpu"))
    for name in args.models:
        for dtype_name in args.dtypes:
            # made outside inference mode: inference tensors are never packed (see mtbert_fast.models.weight_pack)
            model = _model(name, getattr(torch, dtype_name))
            with torch.inference_mode():
                for length in args.lengths:
                    r = compare(model, args.batch, length, args.repeats)
                    groups = f"groups {r['groups']}" if r["groups"] else "no groups"
                    print(f"{name:9s} {dtype_name:8s} B={args.batch} L={length:<4d} ({r['route']:6s}) layer by layer "
                          f"{r['by_layer']:8.2f} ms, one call {r['stacked']:8.2f} ms ({r['loop_ratio']:.3f}x per "
                          f"round), by sequences {r['grouped']:8.2f} ms ({r['group_ratio']:.3f}x per round, "
                          f"{groups})")


if __name__ == "__main__":
    main()
