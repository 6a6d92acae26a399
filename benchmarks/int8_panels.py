"""int8 products of few rows: the int8 panels (ops.int8_panel_sums) against oneDNN's int8 product, where oneDNN's is
exact only for pair-safe weights (CPUs without VNNI, where the int8 model packs panels).

    python benchmarks/int8_panels.py [--models minilm bert-base] [--rows 1,16,64,128,256,1024] [--threads 2]
                                     [--repeats 9] [--products-only]

Two parts, each in one process with the two routes interleaved round by round (medians of the per-round ratios):
  - products: the integer sums of random uint8 rows with random pair-safe weights at each model's four product
    shapes, in GOP/s, and oneDNN's time over the panels' (above 1: the panels are faster);
  - forwards: the int8 model (float32 activations, quantized without calibration) on B=1 inputs of 16 and 128 tokens
    and a B=8 batch of 128, with the panels taking calls of at most ops.int8.PANEL_ROWS rows against none, the same
    ratio. The encoder picks the panels by PANEL_ROWS; these figures are what it was set from.
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

from mtbert_fast import FastBertModel, ops  # noqa: E402
from mtbert_fast.bench.measure import bert_base_config, default_model_dir, random_bert  # noqa: E402
from mtbert_fast.ops import int8 as int8_ops  # noqa: E402

SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072)}


def _interleaved(fns: dict, repeats: int) -> dict:
    """{name: [seconds per round]}, the functions called in turn each round after one untimed call each."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _ratio(times: dict, slow: str, fast: str) -> float:
    return statistics.median(s / f for s, f in zip(times[slow], times[fast]))


def products(name: str, rows: list[int], repeats: int) -> None:
    hidden, inner = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    for out_features, k in ((3 * hidden, hidden), (hidden, hidden), (inner, hidden), (hidden, inner)):
        w = torch.randint(-64, 65, (out_features, k), dtype=torch.int8, generator=gen)
        packed = torch.ops.onednn.qlinear_prepack(w, None)  # oneDNN's int8 product, exact on pair-safe weights
        panels = ops.pack_int8_panels(w)
        kernel = int8_ops.INT8_PANEL_SUMS.kernel("cpu")
        cells = []
        for m in rows:
            q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
            onednn = int8_ops._onednn_sums(q, packed, out_features)
            assert torch.equal(kernel(q, panels, out_features).float(), onednn)
            times = _interleaved({"onednn": lambda: int8_ops._onednn_sums(q, packed, out_features),
                                  "panels": lambda: kernel(q, panels, out_features)}, repeats)
            rate = 2 * m * out_features * k / statistics.median(times["panels"]) / 1e9
            cells.append(f"{m}: {rate:.0f} GOP/s {_ratio(times, 'onednn', 'panels'):.2f}x")
        print(f"{name:9s} [{out_features:4d}, {k:4d}]  " + "  ".join(cells), flush=True)


def forwards(name: str, repeats: int) -> None:
    model = FastBertModel.from_hf(random_bert(bert_base_config())) if name == "bert-base" else \
        FastBertModel.from_pretrained(default_model_dir())
    model.eval().quantize()
    limit = int8_ops.PANEL_ROWS
    gen = torch.Generator().manual_seed(0)
    for batch, length in ((1, 16), (1, 128), (8, 128)):
        ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)

        def run(rows, ids=ids, mask=mask):
            int8_ops.PANEL_ROWS = rows
            model(ids, mask)

        with torch.inference_mode():
            times = _interleaved({"onednn": lambda: run(0), "panels": lambda: run(limit)}, repeats)
        int8_ops.PANEL_ROWS = limit
        print(f"{name:9s} B={batch} L={length:3d}: with panels {statistics.median(times['panels']) * 1e3:7.2f} ms, "
              f"without {_ratio(times, 'onednn', 'panels'):.2f}x that", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=list(SHAPES))
    p.add_argument("--rows", default="1,16,64,128,256,1024")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--products-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not int8_ops.weight_pairs_limited():
        print("note: oneDNN's int8 product is exact on any weight here (VNNI): the int8 model packs no panels, and "
              "the forwards below run the same route twice")
    print(f"torch {torch.__version__}, {args.threads} threads, PANEL_ROWS {int8_ops.PANEL_ROWS}")
    for name in args.models:
        products(name, [int(r) for r in args.rows.split(",")], args.repeats)
    if not args.products_only:
        for name in args.models:
            forwards(name, args.repeats)


if __name__ == "__main__":
    main()
