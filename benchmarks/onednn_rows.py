"""oneDNN's linear by row count, in one call and in the row blocks the encoder hands it (onednn_row_block), measured
on this CPU: what the blocks gain where they apply, and what they would cost where they do not.

    python benchmarks/onednn_rows.py [--threads 2] [--dtype bfloat16] [--rows 256 512 768 1024 1280 1536 2048]
        [--block 384] [--repeats 7]

Per product shape of all-MiniLM-L6-v2, bert-base and bert-large (QKV, attention output, FFN input, FFN output; random
weights in oneDNN's blocked layout, bias included) and per row count, interleaved round by round in one process
(medians): the GFLOP/s of one oneDNN call on all the rows, and the rate in equal blocks of at most --block rows, as
a ratio (above 1: the blocks are faster). A star marks the shapes and rows that onednn_row_block blocks in --dtype.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtbert_fast.ops  # noqa: E402,F401  (loads the CPU kernels and their queries)
from mtbert_fast.bench import harness  # noqa: E402
from mtbert_fast.models.weight_pack import onednn_dtype, pack_onednn  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SIZES = {"minilm": 384, "bert-base": 768, "bert-large": 1024}  # hidden size; the FFN is 4x


def blocks(rows: int, most: int) -> int:
    """Rows of each of the equal blocks of at most `most` rows that `rows` rows split into."""
    count = -(-rows // most)
    return -(-rows // count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[256, 512, 768, 1024, 1280, 1536, 2048])
    parser.add_argument("--block", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if onednn_dtype(dtype) != dtype:
        sys.exit(f"oneDNN does not multiply {args.dtype} on this CPU (the encoder widens such products)")
    print(harness.describe_device("cpu"), f"{args.threads} threads, {args.dtype}, blocks of at most {args.block} rows")
    print(f"{'product':22s}" + "".join(f"{rows:>16d}" for rows in args.rows))
    g = torch.Generator().manual_seed(0)
    row_block = torch.ops.mtbert_fast_C.onednn_row_block
    for model, hidden in SIZES.items():
        for name, (k, n) in {"qkv": (hidden, 3 * hidden), "attn_out": (hidden, hidden),
                             "ffn_in": (hidden, 4 * hidden), "ffn_out": (4 * hidden, hidden)}.items():
            packed = pack_onednn((torch.randn(n, k, generator=g) * k**-0.5).to(dtype))
            bias = torch.randn(n, generator=g).to(dtype)
            fns, flops = {}, {}
            for rows in args.rows:
                x = torch.randn(rows, k, generator=g).to(dtype)
                parts = x.split(blocks(rows, args.block))
                fns[f"one {rows}"] = lambda x=x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
                fns[f"blocks {rows}"] = lambda parts=parts: [
                    torch.ops.mkldnn._linear_pointwise(p, packed, bias, "none", [], "") for p in parts]
                flops[rows] = 2.0 * rows * k * n
            with torch.inference_mode():
                timing = harness.time_interleaved(fns, repeats=args.repeats, warmup=2)
            cells = []
            for rows in args.rows:
                one, split = timing[f"one {rows}"].median, timing[f"blocks {rows}"].median
                star = "*" if row_block(rows, n, dtype) < rows else " "
                cells.append(f"{flops[rows] / one / 1e9:7.0f} {one / split:5.2f}x{star}")
            print(f"{model + ' ' + name:22s}" + "".join(f"{c:>16s}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
