"""bf16 products on a CPU with AMX: oneDNN's linear, as the encoder calls it, against panel_linear's tile panels, by
row count and weight shape, measured on this CPU.

    python benchmarks/tile_rows.py [--threads 2] [--rows 128 160 192 256 384 512 640 768 896 1024 1536 2048]
        [--repeats 21] [--models minilm bert-base bert-large] [--forwards 2x128 4x128 5x128 8x128]

Per product shape of the models' layers (QKV, attention output, FFN input with its GELU, FFN output; random weights,
bias included) and per row count, both routes in turn in each of --repeats rounds (one process): oneDNN's time over
panel_linear's, the median of the rounds' ratios (above 1: the panels are faster). oneDNN runs on its packed weight
and in the row blocks the encoder hands it (onednn_row_block), panel_linear on its panels. A star marks the rows
the encoder hands panel_linear for that product (panel_linear.encoder_rows(bfloat16, n, k, gelu)). Without AMX-BF16
panel_linear multiplies bf16 on dot products, far slower than oneDNN's tiles: the script says so and stops.

--forwards BxL ... adds whole bf16 forwards of all-MiniLM-L6-v2 (bundled) and bert-base (random weights) on B full
sequences of L tokens: with the limits that keep some products on the panels past AMX_BF16_ROWS as they are (narrow
weights, weights of no more output than input features, products with GELU) against the same model with all of them
at AMX_BF16_ROWS (every product on oneDNN above it), interleaved; the time at the lower limits over the time at
these, of medians and per round.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import full_batch_profile as fbp  # noqa: E402

import mtbert_fast.ops  # noqa: E402,F401  (loads the CPU kernels and their queries)
from mtbert_fast import FastBertModel, _ext  # noqa: E402
from mtbert_fast.bench import harness  # noqa: E402
from mtbert_fast.models import encoder  # noqa: E402
from mtbert_fast.models.weight_pack import onednn_dtype, onednn_weight, panel_weight  # noqa: E402

panel_module = importlib.import_module("mtbert_fast.ops.panel_linear")

SIZES = {"minilm": 384, "bert-base": 768, "bert-large": 1024}  # hidden size; the FFN is 4x


def products(hidden: int) -> dict[str, tuple[int, int, bool]]:
    """A layer's products for `hidden`: name -> (in_features, out_features, with GELU)."""
    return {"qkv": (hidden, 3 * hidden, False), "attn_out": (hidden, hidden, False),
            "ffn_in": (hidden, 4 * hidden, True), "ffn_out": (4 * hidden, hidden, False)}


def ratios(k: int, n: int, gelu: bool, rows: list[int], repeats: int, g: torch.Generator) -> dict[int, float]:
    """oneDNN's time over panel_linear's for x [rows, k] @ W [n, k]^T + bias (then GELU), per row count."""
    weight = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    panels = panel_weight(weight)
    onednn_weight(weight)  # packed before the clock starts
    kernel = panel_module.OP.kernel("cpu")
    approximate = "none" if gelu else None
    fns = {}
    for m in rows:
        x = torch.randn(m, k, generator=g).bfloat16()
        # the encoder's oneDNN route, its row blocks included
        fns[f"onednn {m}"] = lambda x=x: encoder._Linear._onednn(x, weight, bias, approximate)
        fns[f"panels {m}"] = lambda x=x: kernel(x, panels, bias, n, gelu, "none")
    with torch.inference_mode():
        timing = harness.time_interleaved(fns, repeats=repeats, warmup=2)
    return {m: harness.median_ratio(timing[f"onednn {m}"].samples, timing[f"panels {m}"].samples) for m in rows}


WIDER_LIMITS = ("AMX_BF16_NARROW_ROWS", "AMX_BF16_CONTRACTING_ROWS", "AMX_BF16_GELU_ROWS")


def forwards(fast: FastBertModel, batch: int, length: int, repeats: int) -> tuple[float, float]:
    """A whole forward on `batch` full sequences of `length` tokens with the wider limits (WIDER_LIMITS) at
    AMX_BF16_ROWS, its time over the same forward with them as they are: (of medians, per round). Puts the limits
    back."""
    inputs = fbp.full_batch(fast.config, batch, length)
    saved = {name: getattr(panel_module, name) for name in WIDER_LIMITS}

    def with_limits(limits: dict):
        def run():
            for name, limit in limits.items():
                setattr(panel_module, name, limit)
            panel_module.encoder_rows.cache_clear()
            fast(**inputs)
        return run

    lower = {name: panel_module.AMX_BF16_ROWS for name in WIDER_LIMITS}
    try:
        with torch.inference_mode():
            t = harness.time_interleaved({"lower": with_limits(lower), "wider": with_limits(saved)},
                                         repeats=repeats, warmup=2, settle=0.02)
    finally:
        for name, limit in saved.items():
            setattr(panel_module, name, limit)
        panel_module.encoder_rows.cache_clear()
    return t["lower"].median / t["wider"].median, harness.median_ratio(t["lower"].samples, t["wider"].samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", type=int,
                        default=[128, 160, 192, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--models", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--forwards", nargs="*", default=[], metavar="BxL",
                        help="also time whole forwards on B full sequences of L tokens (see above)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if "amx_bf16" not in (_ext._cpu_flags() or set()) or not panel_module.bf16_pairs():
        print("this CPU has no AMX-BF16 (or the AVX-512 kernels are not loaded): panel_linear multiplies bf16 on dot "
              "products here, not on tiles")
        return 1
    if onednn_dtype(torch.bfloat16) != torch.bfloat16:
        print("oneDNN does not multiply bfloat16 on this CPU")
        return 1
    print(f"{harness.describe_device('cpu')}; oneDNN's time over panel_linear's (median of the rounds' ratios); * the "
          "rows the encoder hands panel_linear")
    print(f"{'product':34s}" + "".join(f"{m:>8d}" for m in args.rows))
    g = torch.Generator().manual_seed(0)
    for model in args.models:
        for name, (k, n, gelu) in products(SIZES[model]).items():
            r = ratios(k, n, gelu, args.rows, args.repeats, g)
            limit = panel_module.encoder_rows(torch.bfloat16, n, k, gelu)
            cells = [f"{r[m]:.2f}{'*' if m <= limit else ' '}" for m in args.rows]
            print(f"{model + ' ' + name + f' [{n}, {k}]':34s}" + "".join(f"{c:>8s}" for c in cells), flush=True)
    if args.forwards:
        print(f"\nwhole bf16 forwards: the time with every product on oneDNN above {panel_module.AMX_BF16_ROWS} rows "
              "over the time with the wider limits (" + ", ".join(f"{name} {getattr(panel_module, name)}"
                                                         for name in WIDER_LIMITS) + ") (of medians / per round)")
        for model in ("minilm", "bert-base"):
            fast = FastBertModel.from_hf(fbp.load_model(model), dtype=torch.bfloat16)
            for shape in args.forwards:
                batch, length = (int(v) for v in shape.lower().split("x"))
                of_medians, per_round = forwards(fast, batch, length, args.repeats)
                print(f"  {model} B={batch} L={length}: {of_medians:.3f}x / {per_round:.3f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
