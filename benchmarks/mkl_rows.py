"""MKL's packed sgemm (mkl_linear) against oneDNN's linear and the panels for the encoder's products of 16 rows and more,
float32 and bfloat16, measured on this CPU: what `mtbert_fast.ops.mkl_linear.route`, its `MAX_ROWS` and the panel
limits of `mtbert_fast.ops.panel_linear` decide.

    HF_HUB_OFFLINE=1 python benchmarks/mkl_rows.py [--threads 2] [--dtypes float32 bfloat16] [--rows 256 1024 2048]
        [--batches 2 8] [--length 128] [--repeats 7]

Two measurements, each interleaved round by round in one process (medians):

- products: one layer's four products (QKV, attention output, FFN input with its GELU, FFN output) of
  all-MiniLM-L6-v2's and bert-base's sizes at each --rows, each on its own packed weights (random weights; 12 calls a
  timing, each on another layer's weight, so that they come from memory as in a forward; biases where the encoder
  hands them to the product): GFLOP/s of oneDNN's linear on a weight in its blocked layout, of mkl_linear on an MKL
  pack and of panel_linear on its panels. bf16 runs as the encoder runs it where the CPU has no bf16
  arithmetic: float32 products of the widened values (oneDNN: x widened for each call, on a float32 pack);
- forwards: FastBertModel (the bundled all-MiniLM-L6-v2 and a random bert-base, in each dtype) on full batches of
  each --batches sequences of --length tokens, each route's time over MKL's (of medians / per round; above 1 favours
  MKL): oneDNN's linear and the panels.
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
from mtbert_fast.models.weight_pack import onednn_dtype, pack_onednn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_batch_profile as fbp  # noqa: E402

# the modules (mtbert_fast.ops.mkl_linear and .panel_linear are the wrapper functions)
mkl_module = importlib.import_module("mtbert_fast.ops.mkl_linear")
panel_module = importlib.import_module("mtbert_fast.ops.panel_linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = {"minilm": 384, "bert-base": 768}  # hidden size; the FFN is 4x
CALLS = 12


def products(hidden: int, rows: int, dtype: torch.dtype, repeats: int) -> dict[str, dict[str, float]]:
    """product -> route (onednn, mkl, panels) -> GFLOP/s at `rows` rows of `dtype`, each timing CALLS calls on
    weights of their own."""
    g = torch.Generator().manual_seed(0)
    shapes = {"qkv": (hidden, 3 * hidden), "attn_out": (hidden, hidden), "ffn_in": (hidden, 4 * hidden),
              "ffn_out": (4 * hidden, hidden)}
    mkl, panel = mkl_module.OP.kernel("cpu"), panel_module.OP.kernel("cpu")
    op_dtype = onednn_dtype(dtype)
    out = {}
    for name, (k, n) in shapes.items():
        gelu = name == "ffn_in"
        # packed outside inference mode, as the encoder's weights are
        ws = [(torch.randn(n, k, generator=g) * k**-0.5).to(dtype) for _ in range(CALLS)]
        # as the encoder runs them: the attention output's and FFN output's biases join their LayerNorm
        bias = torch.randn(n, generator=g).to(dtype) if name in ("qkv", "ffn_in") else None
        x = torch.randn(rows, k, generator=g).to(dtype)
        onednn_packs = [pack_onednn(w) for w in ws]
        mkl_packs = [mkl_module.pack_mkl(w) for w in ws]
        attr = ("gelu", "none") if gelu else ("none", "")
        op_bias = None if bias is None else bias.to(op_dtype)
        fns = {
            "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(x.to(op_dtype), p, op_bias, attr[0], [],
                                                                  attr[1]).to(dtype) for p in onednn_packs],
            "mkl": lambda: [mkl(x, p, w, bias, gelu, "none") for p, w in zip(mkl_packs, ws)],
        }
        panels = [panel_module.pack_panels(w) for w in ws]
        fns["panels"] = lambda: [panel(x, p, bias, n, gelu, "none") for p in panels]
        with torch.inference_mode():
            t = harness.time_interleaved(fns, repeats=repeats, warmup=1, settle=0.02)
        flops = 2 * rows * k * n * CALLS
        out[name] = {route: flops / timing.median / 1e9 for route, timing in t.items()}
    return out


def forwards(fast: FastBertModel, batch: int, length: int, repeats: int) -> dict[str, tuple[float, float]]:
    """route -> its time over MKL's for a full batch of `batch` sequences of `length` tokens, of medians and per
    round: oneDNN's linear and the panels."""
    inputs = fbp.full_batch(fast.config, batch, length)
    saved = encoder.panel_rows, encoder.mkl_rows
    everything = 1 << 30
    limits = {"onednn": (0, 0), "panels": (everything, 0), "mkl": (0, everything)}

    def on(route: str):
        panels, mkl_rows = limits[route]

        def run():
            encoder.panel_rows, encoder.mkl_rows = (lambda dtype, *weight: panels), (lambda dtype, *weight: mkl_rows)
            fast(**inputs)
        return run

    try:
        with torch.inference_mode():
            t = harness.time_interleaved({route: on(route) for route in limits}, repeats=repeats, warmup=2,
                                         settle=0.02)
    finally:
        encoder.panel_rows, encoder.mkl_rows = saved
    return {route: (t[route].median / t["mkl"].median, harness.median_ratio(t[route].samples, t["mkl"].samples))
            for route in limits if route != "mkl"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=sorted(DTYPES, reverse=True))
    ap.add_argument("--rows", nargs="+", type=int, default=[256, 1024, 2048])
    ap.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    takes = ", ".join(f"{name} up to {mkl_module.encoder_rows(DTYPES[name])}" for name in args.dtypes)
    print(f"threads {args.threads}; {harness.describe_device('cpu')}; torch {torch.__version__}; "
          f"the encoder's rows on MKL here: {takes}")
    if not mkl_module.available():
        print("MKL's packed sgemm is not available here (a PyTorch without MKL, or no CPU kernels)")
        return 1
    for name in args.dtypes:
        dtype = DTYPES[name]
        print(f"\n{name} products, GFLOP/s by route, MKL over the fastest other")
        for model, hidden in SIZES.items():
            for rows in args.rows:
                r = products(hidden, rows, dtype, args.repeats)
                cells = []
                for product, rates in r.items():
                    best_other = max(rate for route, rate in rates.items() if route != "mkl")
                    routes = " / ".join(f"{route} {rate:.0f}" for route, rate in rates.items())
                    cells.append(f"{product} {routes} ({rates['mkl'] / best_other:.2f}x)")
                print(f"  {model} {rows} rows: " + ", ".join(cells))
        print(f"\n{name} forwards, B x {args.length} tokens: each route's time over MKL's (of medians / per round)")
        for model in SIZES:
            fast = FastBertModel.from_hf(fbp.load_model(model)).to(dtype)
            for batch in args.batches:
                ratios = forwards(fast, batch, args.length, args.repeats)
                print(f"  {model} B={batch}: " + ", ".join(f"{route} {a:.3f}x / {b:.3f}x"
                                                           for route, (a, b) in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
