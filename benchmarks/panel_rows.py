"""Where the encoder's inference linears should move from panel_linear to oneDNN's linear: the row limit of
`mtbert_fast.ops.panel_linear.MAX_ROWS`, measured on this CPU.

    HF_HUB_OFFLINE=1 python benchmarks/panel_rows.py [--threads 2] [--dtypes fp32 bf16] [--rows 16 48 128 256]
        [--limits 0 48 128 256] [--repeats 9] [--batch 1] [--walks]

Two measurements, each interleaved round by round in one process (medians; ratios above 1 favour panel_linear):

- products: one layer's four products (QKV, attention output, FFN input with its GELU, FFN output) of
  all-MiniLM-L6-v2's and bert-base's sizes at each --rows, panel_linear over oneDNN's linear, each on its own packed
  weights (random weights; 12 calls a timing, each on another layer's weight, so that they come from memory as in a
  forward, and the FFN output's x strided as panel_linear's GELU output is);
- forwards: FastBertModel (the bundled all-MiniLM-L6-v2 and a random bert-base) on --batch sequences of each --rows
  tokens, with the encoder's row limit set to each pair of neighbouring --limits that the batch's token count falls
  between (oneDNN's time over panel_linear's for that batch, of medians and per round).

The first shows which product shapes a kernel handles well; the second is what the limit decides. Weights are
packed before the timing, so neither includes the first call's packing.

With --walks, only a third: the same forwards at each --rows under the encoder's own limits, with panel_linear
walking its panels in chunks fetched ahead and walking whole panels (`ops.panel_fetch(True)` and `(False)`): whole
panels' time over the chunks' (above 1 favours the chunks; the kernel's default on this CPU is printed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from mtbert_fast import FastBertModel
from mtbert_fast.bench import harness
from mtbert_fast.models.weight_pack import onednn_weight, panel_weight

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_batch_profile as fbp  # noqa: E402

# the module (mtbert_fast.ops.panel_linear is the wrapper function)
panel_module = importlib.import_module("mtbert_fast.ops.panel_linear")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {"minilm": 384, "bert-base": 768}  # hidden size; the FFN is 4x
CALLS = 12


def products(dtype: torch.dtype, hidden: int, rows: int, repeats: int) -> dict[str, float]:
    """Each product's panel_linear speed over oneDNN's at `rows` rows, and the layer's (the four summed). As in a
    forward: each of a timing's CALLS calls multiplies a weight of its own (a layer's), so that bert-base's weights
    come from memory, and the FFN output product's x has the row stride that panel_linear's GELU output gives it
    (oneDNN's output, which oneDNN's product reads, is contiguous)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"qkv": (hidden, 3 * hidden), "attn_out": (hidden, hidden), "ffn_in": (hidden, 4 * hidden),
              "ffn_out": (4 * hidden, hidden)}
    C = torch.ops.mtbert_fast_C
    fns = {}
    for name, (k, n) in shapes.items():
        # packed outside inference mode: weights made under it have no version counter and are never packed
        ws = [(torch.randn(n, k, generator=g) * k**-0.5).to(dtype) for _ in range(CALLS)]
        b = torch.randn(n, generator=g).to(dtype)
        x = torch.randn(rows, k, generator=g).to(dtype)
        stride = panel_module.output_row_stride(rows, k, dtype, gelu=name == "ffn_out")
        x_panel = torch.empty_strided((rows, k), (stride, 1), dtype=dtype).copy_(x)
        panels, packed = [panel_weight(w) for w in ws], [onednn_weight(w) for w in ws]
        gelu = name == "ffn_in"
        act = ("gelu", "none") if gelu else ("none", "")
        fns[f"panel {name}"] = lambda x=x_panel, ps=panels, b=b, n=n, gelu=gelu: [
            C.panel_linear(x, p, b, n, gelu, "none") for p in ps]
        # where oneDNN has no bf16 product, the encoder's route: x and the bias widened, the result rounded back
        fns[f"onednn {name}"] = lambda x=x, ps=packed, b=b.to(packed[0].dtype), act=act: [
            torch.ops.mkldnn._linear_pointwise(x.to(p.dtype), p, b, act[0], [], act[1]).to(x.dtype) for p in ps]
    with torch.inference_mode():
        t = harness.time_interleaved(fns, repeats=repeats, warmup=1, settle=0.02)
    out = {name: t[f"onednn {name}"].median / t[f"panel {name}"].median for name in shapes}
    out["layer"] = (sum(t[f"onednn {n}"].median for n in shapes) / sum(t[f"panel {n}"].median for n in shapes))
    return out


def forwards(fast: FastBertModel, dtype: torch.dtype, length: int, limits: tuple[int, int], repeats: int,
             sequences: int = 1):
    """oneDNN's time over panel_linear's for `sequences` sequences of `length` tokens: the encoder's row limit at
    limits[0] (below their token count: oneDNN) and at limits[1] (panel_linear); of medians and per round."""
    batch = fbp.full_batch(fast.config, sequences, length)
    key = panel_module.limit_key(dtype)
    saved = dict(panel_module.MAX_ROWS[key]), panel_module.AMX_BF16_ROWS, panel_module.AMX_BF16_NARROW_ROWS

    def with_limit(limit: int):
        def run():
            # every limit: on a CPU with AMX the encoder takes the lower of the first two for bf16, and the third for
            # narrow weights
            panel_module.MAX_ROWS[key][dtype] = panel_module.AMX_BF16_ROWS = limit
            panel_module.AMX_BF16_NARROW_ROWS = limit
            panel_module.encoder_rows.cache_clear()
            fast(**batch)
        return run

    try:
        with torch.inference_mode():
            t = harness.time_interleaved({"onednn": with_limit(limits[0]), "panels": with_limit(limits[1])},
                                         repeats=repeats, warmup=2, settle=0.02)
    finally:
        panel_module.MAX_ROWS[key].update(saved[0])
        panel_module.AMX_BF16_ROWS, panel_module.AMX_BF16_NARROW_ROWS = saved[1:]
        panel_module.encoder_rows.cache_clear()
    return t["onednn"].median / t["panels"].median, harness.median_ratio(t["onednn"].samples, t["panels"].samples)


def walks(fast: FastBertModel, length: int, repeats: int) -> tuple[float, float]:
    """Whole panels' time over chunks fetched ahead (ops.panel_fetch False / True) for one sequence of `length`
    tokens, of medians and per round; each sample three forwards after an untimed one. The switch is put back."""
    batch = fbp.full_batch(fast.config, 1, length)
    saved = panel_module.panel_fetch()

    def walk(fetch: bool):
        def run():
            panel_module.panel_fetch(fetch)
            fast(**batch)
        return run

    try:
        with torch.inference_mode():
            t = harness.time_interleaved({"whole": walk(False), "chunks": walk(True)}, repeats=repeats, warmup=1,
                                         block=3, settle=0.02)
    finally:
        panel_module.panel_fetch(saved)
    return t["whole"].median / t["chunks"].median, harness.median_ratio(t["whole"].samples, t["chunks"].samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rows", nargs="+", type=int, default=[16, 48, 128, 256])
    ap.add_argument("--limits", nargs="+", type=int, default=[0, 48, 128, 256])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--batch", type=int, default=1, help="sequences of --rows tokens in each forward (default 1)")
    ap.add_argument("--walks", action="store_true",
                    help="only the forwards with the panels walked in chunks fetched ahead against whole panels")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    isa = panel_module._ext.cpu_isa()
    print(f"threads {args.threads}; {harness.describe_device('cpu')}; torch {torch.__version__}; CPU kernels {isa}")
    if isa not in panel_module.MAX_ROWS:
        print("panel_linear does not run here: no AVX-512 or AVX2 CPU kernels loaded")
        return 1
    if args.walks:
        print(f"\nforwards, one sequence: whole panels' time over chunks fetched ahead (of medians / per round);"
              f" this CPU's default: {'chunks' if panel_module.panel_fetch() else 'whole panels'}")
        for model in SIZES:
            hf = fbp.load_model(model)
            for dtype_name in args.dtypes:
                fast = FastBertModel.from_hf(hf, dtype=DTYPES[dtype_name])
                limit = panel_module.encoder_rows(DTYPES[dtype_name])
                for rows in args.rows:
                    if rows > limit:
                        print(f"  {model} {dtype_name} L={rows}: above the encoder's panel limit ({limit})")
                        continue
                    of_medians, per_round = walks(fast, rows, args.repeats)
                    print(f"  {model} {dtype_name} L={rows}: {of_medians:.3f}x / {per_round:.3f}x")
        return 0
    limits = sorted(set(args.limits))
    print("\nproducts: panel_linear's speed over oneDNN's linear")
    for dtype_name in args.dtypes:
        for model, hidden in SIZES.items():
            for rows in args.rows:
                r = products(DTYPES[dtype_name], hidden, rows, args.repeats)
                print(f"  {model} {dtype_name} {rows} rows: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    print(f"\nforwards, {args.batch} sequence(s) of L tokens: oneDNN's time over panel_linear's (of medians / per"
          " round)")
    for model in SIZES:
        hf = fbp.load_model(model)
        for dtype_name in args.dtypes:
            fast = FastBertModel.from_hf(hf, dtype=DTYPES[dtype_name])
            for rows in args.rows:
                tokens = args.batch * rows
                below = [lim for lim in limits if lim < tokens]
                above = [lim for lim in limits if lim >= tokens]
                if not below or not above:
                    print(f"  {model} {dtype_name} L={rows}: no pair of --limits around it")
                    continue
                pair = (below[-1], above[0])
                of_medians, per_round = forwards(fast, DTYPES[dtype_name], rows, pair, args.repeats, args.batch)
                print(f"  {model} {dtype_name} L={rows} (limit {pair[0]} -> {pair[1]}): {of_medians:.3f}x /"
                      f" {per_round:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
