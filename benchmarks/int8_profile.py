"""int8 inference on the CPU: what each part of the int8 layer costs, and what each of its routes buys.

    python benchmarks/int8_profile.py [--models minilm bert-base] [--batch 8] [--length 128] [--threads 2]
                                      [--repeats 15] [--profile] [--sentences 16]

In one process, interleaved round by round (medians of the per-round ratios), on full batches (every token real)
and on ragged ones (lengths uniform in [length / 8, length]), the int8 model with bfloat16 activations:
  - int8: the encoder's layers as the model runs them (the int8 panels with AVX512-VNNI, else oneDNN's int8 linear,
    on weights packed once; each LayerNorm's output quantized in the LayerNorm's pass);
  - unpacked: the same layers with the integer sums from torch._int_mm (the route of weights that are not packed);
  - unfused: the same layers, each product's input quantized by its own quantize_rows pass;
  - no-outliers: the same layers without the outlier channels' fp32 part (for its cost only: those channels are
    then dropped, not computed);
  - bf16: the model's own bfloat16 layers (oneDNN's bf16 linear on packed weights).
Each row gives the time of `int8` and every other route's time over it (above 1: int8 is faster). `--profile` adds a
torch.profiler breakdown of the int8 layers by op. `--sentences N` adds whole forwards on real text, as users call
them: the bundled all-MiniLM-L6-v2 swapped (mtbert_fast.swap) in bfloat16 and in int8 with bfloat16 activations, on N
of the bundled sentences in batches of --batch (each padded to its longest), interleaved round by round, with the
median of the per-round ratios bf16 / int8.

Run with OMP_WAIT_POLICY=PASSIVE set before the process starts on a machine that other jobs keep busy
(docs/cpu-full-batch.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtbert_fast import FastBertModel  # noqa: E402
from mtbert_fast.bench.measure import bert_base_config, default_model_dir, random_bert, ragged_lengths  # noqa: E402
from mtbert_fast.models.encoder import PackedBatch, embed_packed, layer_forward  # noqa: E402
from mtbert_fast.models.int8 import PRODUCTS, int8_layer_forward  # noqa: E402
from mtbert_fast.ops import unpad_indices  # noqa: E402


def _model(name: str) -> FastBertModel:
    if name == "bert-base":
        return FastBertModel.from_hf(random_bert(bert_base_config())).to(torch.bfloat16)
    return FastBertModel.from_pretrained(default_model_dir()).to(torch.bfloat16)


def _int8_stack(config, layers, packed, fused: bool):
    def run(x):
        for i, w in enumerate(layers):
            following = layers[i + 1].qkv.smooth if fused and i + 1 < len(layers) else None
            x = int8_layer_forward(config, w, x, packed, None, following)
        return x

    return run


def _routes(model: FastBertModel, batch: int, length: int, ragged: bool):
    """{route: (fn, x)}: each route's layer stack on the same embedded batch."""
    config = model.config
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    if ragged:
        for row, n in enumerate(ragged_lengths(batch, max(2, length // 8), length)):
            mask[row, n:] = 0
    packed = PackedBatch(*unpad_indices(mask), batch=batch, seqlen=length)
    with torch.inference_mode():
        x = embed_packed(config, model.embeddings.weights(), packed, ids, None, None, None, False)
    float_layers = [layer.weights() for layer in model.layers]
    model.quantize()
    layers = model.int8.layers
    unpacked = [w._replace(**{p: getattr(w, p)._replace(packed=None) for p in PRODUCTS}) for w in layers]
    no_outliers = [w._replace(**{p: getattr(w, p)._replace(
        outlier_index=getattr(w, p).outlier_index[:0], outlier_weight=getattr(w, p).outlier_weight[:0])
        for p in PRODUCTS}) for w in layers]

    def bf16(x):
        for w in float_layers:
            x = layer_forward(config, w, x, packed, False)
        return x

    routes = {"int8": _int8_stack(config, layers, packed, True),
              "unpacked": _int8_stack(config, unpacked, packed, True),
              "unfused": _int8_stack(config, layers, packed, False),
              "no-outliers": _int8_stack(config, no_outliers, packed, True),
              "bf16": bf16}
    model.dequantize()
    return routes, x, int(mask.sum())


def _time(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def sentences(count: int, batch: int, repeats: int) -> None:
    """Whole forwards of the swapped MiniLM on real sentences: bf16 against int8 with bf16 activations."""
    import copy

    from transformers import AutoModel, AutoTokenizer

    from mtbert_fast import swap
    from mtbert_fast.bench.measure import load_sentences, make_batches

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    batches = make_batches(tokenizer, load_sentences(None, count), batch, 128, torch.device("cpu"))
    hf = AutoModel.from_pretrained(default_model_dir()).eval().to(torch.bfloat16)
    models = {"bf16": swap(copy.deepcopy(hf)), "int8": swap(copy.deepcopy(hf), dtype=torch.qint8)}

    def run(model):
        for b in batches:
            model(**b)

    with torch.inference_mode():
        for model in models.values():
            run(model)
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                run(model)
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(b / i for b, i in zip(times["bf16"], times["int8"]))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"minilm    {count} sentences, B={batch} ({len(batches)} batches, {tokens} tokens): int8 "
          f"{statistics.median(times['int8']) * 1e3:.2f} ms, bf16 {statistics.median(times['bf16']) * 1e3:.2f} ms, "
          f"bf16 / int8 {ratio:.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sentences", type=int, default=0, help="also time whole forwards on this many real sentences")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')}, load {os.getloadavg()[0]:.1f}")
    for name in args.models:
        model = _model(name)
        for ragged in (False, True):
            routes, x, tokens = _routes(model, args.batch, args.length, ragged)
            with torch.inference_mode():
                for fn in routes.values():
                    fn(x)
                times = {r: [] for r in routes}
                for _ in range(args.repeats):
                    for r, fn in routes.items():
                        times[r].append(_time(fn, x))
                ratios = {r: statistics.median(t / i for t, i in zip(times[r], times["int8"]))
                          for r in routes if r != "int8"}
                point = f"B={args.batch}, L<={args.length} ragged" if ragged else f"B={args.batch}, L={args.length}"
                int8_ms = statistics.median(times["int8"]) * 1e3
                print(f"{name:9s} {point:22s} {tokens:5d} tokens  int8 {int8_ms:7.1f} ms  "
                      + "  ".join(f"{r} {v:.3f}x" for r, v in ratios.items()))
                if args.profile and not ragged:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                        for _ in range(3):
                            routes["int8"](x)
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    if args.sentences:
        sentences(args.sentences, args.batch, args.repeats)


if __name__ == "__main__":
    main()
