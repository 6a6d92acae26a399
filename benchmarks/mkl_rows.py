"""MKL's packed sgemm (mkl_linear) against oneDNN's linear for the encoder's float32 products of many rows, measured
on this CPU: what `mtbert_fast.ops.mkl_linear.route` and `MAX_ROWS` decide.

    HF_HUB_OFFLINE=1 python benchmarks/mkl_rows.py [--threads 2] [--rows 256 1024 2048] [--batches 2 8]
        [--repeats 7]

Two measurements, each interleaved round by round in one process (medians; ratios above 1 favour MKL):

- products: one layer's four products (QKV, attention output, FFN input with its GELU, FFN output) of
  all-MiniLM-L6-v2's and bert-base's sizes at each --rows, each on its own packed weights (random weights; 12 calls a
  timing, each on another layer's weight, so that they come from memory as in a forward; biases where the encoder
  hands them to the product): GFLOP/s of oneDNN's linear on a weight in its blocked layout and of mkl_linear on an
  MKL pack;
- forwards: FastBertModel (the bundled all-MiniLM-L6-v2 and a random bert-base) on full batches of each --batches
  sequences of 128 tokens, on oneDNN's linear and on mkl_linear (oneDNN's time over MKL's, of medians and per round).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from mtbert_fast import FastBertModel
from mtbert_fast.bench import harness
from mtbert_fast.models import encoder
from mtbert_fast.models.weight_pack import pack_onednn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_batch_profile as fbp  # noqa: E402

# the module (mtbert_fast.ops.mkl_linear is the wrapper function)
mkl_module = importlib.import_module("mtbert_fast.ops.mkl_linear")
SIZES = {"minilm": 384, "bert-base": 768}  # hidden size; the FFN is 4x
CALLS = 12


def products(hidden: int, rows: int, repeats: int) -> dict[str, tuple[float, float]]:
    """product -> (oneDNN's GFLOP/s, MKL's GFLOP/s) at `rows` rows, each timing CALLS calls on weights of their own."""
    g = torch.Generator().manual_seed(0)
    shapes = {"qkv": (hidden, 3 * hidden), "attn_out": (hidden, hidden), "ffn_in": (hidden, 4 * hidden),
              "ffn_out": (4 * hidden, hidden)}
    mkl = mkl_module.OP.kernel("cpu")
    out = {}
    for name, (k, n) in shapes.items():
        gelu = name == "ffn_in"
        # packed outside inference mode, as the encoder's weights are
        ws = [torch.randn(n, k, generator=g) * k**-0.5 for _ in range(CALLS)]
        # as the encoder runs them: the attention output's and FFN output's biases join their LayerNorm
        bias = torch.randn(n, generator=g) if name in ("qkv", "ffn_in") else None
        x = torch.randn(rows, k, generator=g)
        onednn_packs = [pack_onednn(w) for w in ws]
        mkl_packs = [mkl_module.pack_mkl(w) for w in ws]
        attr = ("gelu", "none") if gelu else ("none", "")
        fns = {
            "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x, p, bias, attr[0], [], attr[1])
                               for p in onednn_packs],
            "mkl": lambda: [mkl(x, p, w, bias, gelu, "none") for p, w in zip(mkl_packs, ws)],
        }
        with torch.inference_mode():
            t = harness.time_interleaved(fns, repeats=repeats, warmup=1, settle=0.02)
        flops = 2 * rows * k * n * CALLS
        out[name] = (flops / t["onednn"].median / 1e9, flops / t["mkl"].median / 1e9)
    return out


def forwards(fast: FastBertModel, batch: int, repeats: int) -> tuple[float, float]:
    """oneDNN's time over MKL's for a full batch of `batch` sequences of 128 tokens, of medians and per round."""
    inputs = fbp.full_batch(fast.config, batch, 128)
    saved = encoder.mkl_rows

    def on(route: bool):
        def run():
            encoder.mkl_rows = lambda dtype: 1 << 30 if route else 0
            fast(**inputs)
        return run

    try:
        with torch.inference_mode():
            t = harness.time_interleaved({"onednn": on(False), "mkl": on(True)}, repeats=repeats, warmup=2,
                                         settle=0.02)
    finally:
        encoder.mkl_rows = saved
    return t["onednn"].median / t["mkl"].median, harness.median_ratio(t["onednn"].samples, t["mkl"].samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", nargs="+", type=int, default=[256, 1024, 2048])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; {harness.describe_device('cpu')}; torch {torch.__version__}; "
          f"the encoder takes MKL here: {mkl_module.route()}")
    if not mkl_module.available():
        print("MKL's packed sgemm is not available here (a PyTorch without MKL, or no CPU kernels)")
        return 1
    print("\nproducts, GFLOP/s: oneDNN's linear (packed) / mkl_linear (packed), MKL over oneDNN")
    for model, hidden in SIZES.items():
        for rows in args.rows:
            r = products(hidden, rows, args.repeats)
            print(f"  {model} {rows} rows: " + ", ".join(f"{k} {a:.0f} / {m:.0f} ({m / a:.2f}x)"
                                                        for k, (a, m) in r.items()))
    print("\nforwards, B x 128 tokens: oneDNN's time over MKL's (of medians / per round)")
    for model in SIZES:
        fast = FastBertModel.from_hf(fbp.load_model(model))
        for batch in args.batches:
            of_medians, per_round = forwards(fast, batch, args.repeats)
            print(f"  {model} B={batch}: {of_medians:.3f}x / {per_round:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
