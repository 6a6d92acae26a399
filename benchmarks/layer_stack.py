"""The encoder's post-norm layers in one post_norm_layers call against the same kernels called layer by layer from
Python, on the CPU, in inference.

    HF_HUB_OFFLINE=1 python benchmarks/layer_stack.py [--models minilm bert-base] [--dtypes float32 bfloat16]
                                                      [--batch 8] [--lengths 16 128] [--threads 2] [--repeats 15]

Per model, dtype and length, on B full sequences (every token real), in one process, interleaved round by round:
the layers as `encode` runs them in one call (the weights packed for the route the rows take: panels for few rows,
oneDNN's blocked layout for more), and `layer_forward` once per layer, which calls the same kernels from Python. The
two results must agree bit for bit. Printed: each route's median time, and the median of the per-round ratios
(layer by layer over one call; above 1 the single call is faster). The layers only: the embeddings and the pooler,
the same on both routes, are left out.

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

from mtbert_fast import FastBertModel  # noqa: E402
from mtbert_fast.bench import harness  # noqa: E402
from mtbert_fast.bench.measure import bert_base_config, default_model_dir, random_bert  # noqa: E402
from mtbert_fast.models import encoder  # noqa: E402


def _model(name: str, dtype: torch.dtype) -> FastBertModel:
    if name == "bert-base":
        return FastBertModel.from_hf(random_bert(bert_base_config())).to(dtype).eval()
    return FastBertModel.from_pretrained(default_model_dir()).to(dtype).eval()


def compare(model: FastBertModel, batch: int, length: int, repeats: int) -> tuple[float, float, float, str]:
    """(layer-by-layer ms, one-call ms, median per-round ratio, the one call's route)."""
    config = model.config
    layers = [layer.weights() for layer in model.layers]
    packed = encoder.PackedBatch.dense(batch, length, torch.device("cpu"))
    x = torch.randn(batch * length, config.hidden_size).to(model.dtype)
    stack = encoder._post_norm_stack(config, layers, x, packed, None)
    if stack is None:
        raise SystemExit(f"{config.family} in {model.dtype} at {x.shape[0]} rows does not run in one call here")
    route = "oneDNN" if stack[0].is_mkldnn else "panels"
    one_call = encoder.post_norm_layers_op.kernel("cpu")

    def stacked():
        return one_call(x, packed.cu_seqlens, packed.max_seqlen, stack, config.num_attention_heads,
                        config.attention_scale, config.layer_norm_eps, config.gelu_approximate, None)

    def by_layer():
        h = x
        for w in layers:
            h = encoder.layer_forward(config, w, h, packed, training=False)
        return h

    if not torch.equal(stacked(), by_layer()):
        raise SystemExit("the single call and the layer-by-layer kernels disagree")
    times = harness.time_interleaved({"by_layer": by_layer, "stacked": stacked}, repeats=repeats, warmup=2)
    ratio = harness.median_ratio(times["by_layer"].samples, times["stacked"].samples)
    return times["by_layer"].median * 1e3, times["stacked"].median * 1e3, ratio, route


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
                    loop, one, ratio, route = compare(model, args.batch, length, args.repeats)
                    print(f"{name:9s} {dtype_name:8s} B={args.batch} L={length:<4d} ({route:6s}) layer by layer "
                          f"{loop:8.2f} ms, one call {one:8.2f} ms: {loop / one:.3f}x of medians, {ratio:.3f}x per "
                          "round")


if __name__ == "__main__":
    main()
