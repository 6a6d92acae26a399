"""int8 products: our int8 panels (ops.int8_panel_sums) against oneDNN's int8 product.

    python benchmarks/int8_panels.py [--models minilm bert-base bert-large] [--rows 1,16,64,128,256,1024]
                                     [--shapes 1x16,1x128,8x128] [--threads 2] [--repeats 9] [--products-only]

On CPUs with AVX512-VNNI the panels multiply with vpdpbusd, exact for any weight, and the int8 model takes every
product's sums from them (ops.int8.panels_vnni); with AMX-INT8 too they multiply on its tiles
(ops.int8.panels_on_tiles), or, for a weight whose panels do not, the model takes those of at most
ops.int8.AMX_PANEL_ROWS rows from them and oneDNN's int8 product (on AMX tiles: ops.int8.onednn_amx) the others;
elsewhere (AVX2) they add int16 pairs, oneDNN's int8 product too, and both are exact only for pair-safe weights,
where the model takes the sums of at most ops.int8.PANEL_ROWS rows from the panels. Two parts, each in one process
with the routes interleaved round by round (medians of the per-round ratios):
  - products: the integer sums of random uint8 rows with random pair-safe weights at each model's four product
    shapes, in GOP/s, and oneDNN's time over the panels' (above 1: the panels are faster); where the panels run on
    AMX tiles, also the VNNI panels' time over the tiles' (ops.cpu_amx(False) for those calls);
  - forwards: the int8 model (float32 activations, quantized without calibration) on each --shapes input (B
    sequences of L tokens), on the route the model picks here against the same model with every product on the
    panels (where its weights have them) and with every product on oneDNN's int8 product (AVX2: pair-safe weights),
    and, where the panels run on AMX tiles, with the panels on VNNI instead (ops.cpu_amx(False)), and against the
    model's route with each product's sums taken by int8_panel_sums first and the epilogue op run on
    them after (models.int8.EPILOGUE_SUMS off; the model hands q and the panels to the epilogue op, which takes the
    sums a block of rows at a time), and with its layers run one at a time from Python (models.int8.LAYERS_IN_ONE_CALL
    off; the model runs them in one int8_layers call), each time over the model's route's. These figures are what the
    routes were set from.
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
from mtbert_fast.models import int8 as int8_model  # noqa: E402
from mtbert_fast.models.int8 import PRODUCTS  # noqa: E402
from mtbert_fast.ops import int8 as int8_ops  # noqa: E402

SHAPES = {"minilm": (384, 1536), "bert-base": (768, 3072), "bert-large": (1024, 4096)}


def bert_large_config():
    """A bert-large-sized BertConfig (24 layers, hidden 1024, 16 heads, FFN 4096): its FFN output reads rows of 4 KiB."""
    from transformers import BertConfig

    return BertConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)


def load_model(name: str) -> FastBertModel:
    """The bundled all-MiniLM-L6-v2, or a bert-base- or bert-large-sized BERT with random weights."""
    if name == "minilm":
        return FastBertModel.from_pretrained(default_model_dir())
    return FastBertModel.from_hf(random_bert(bert_base_config() if name == "bert-base" else bert_large_config()))


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
        tiles = int8_ops.panels_on_tiles(k)
        cells = []
        for m in rows:
            q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
            onednn = int8_ops._onednn_sums(q, packed, out_features)
            assert torch.equal(kernel(q, panels, out_features).float(), onednn)
            fns = {"onednn": lambda: int8_ops._onednn_sums(q, packed, out_features),
                   "panels": lambda: kernel(q, panels, out_features)}
            if tiles:
                fns["vnni"] = lambda: _on_vnni(lambda: kernel(q, panels, out_features))
            times = _interleaved(fns, repeats)
            rate = 2 * m * out_features * k / statistics.median(times["panels"]) / 1e9
            vnni = f" VNNI {_ratio(times, 'vnni', 'panels'):.2f}x" if tiles else ""
            cells.append(f"{m}: {rate:.0f} GOP/s {_ratio(times, 'onednn', 'panels'):.2f}x{vnni}")
        print(f"{name:9s} [{out_features:4d}, {k:4d}]  " + "  ".join(cells), flush=True)


def _on_vnni(fn):
    """fn() with the CPU kernels kept off the AMX tiles."""
    ops.cpu_amx(False)
    try:
        return fn()
    finally:
        ops.cpu_amx(True)


def _rerouted(packed: int8_ops.PackedInt8Weight, panels: torch.Tensor | None, tensor) -> int8_ops.PackedInt8Weight:
    """packed's weight with its products' sums on `panels` for every row count (given) or else on oneDNN's int8
    product on `tensor`."""
    alt = object.__new__(int8_ops.PackedInt8Weight)
    alt.weight, alt.all_rows, alt.amx, alt.float_sums = packed.weight, panels is not None, False, False
    alt.panels, alt.tensor = panels, tensor
    return alt


def _onednn_packed(packed: int8_ops.PackedInt8Weight) -> int8_ops.PackedInt8Weight:
    """The same weight packed for oneDNN's int8 product only (no panels); a weight on oneDNN's float32 product (not
    pair-safe where the int8 one needs that) stays there."""
    if packed.float_sums:
        return packed
    return _rerouted(packed, None, torch.ops.onednn.qlinear_prepack(packed.weight.contiguous(), None))


def _panels_packed(packed: int8_ops.PackedInt8Weight) -> int8_ops.PackedInt8Weight:
    """The same weight with every product's sums on its int8 panels, where it has them."""
    return packed if packed.panels is None else _rerouted(packed, packed.panels, None)


def _repacked(layers: list, repack) -> list:
    return [w._replace(**{p: getattr(w, p)._replace(packed=repack(getattr(w, p).packed))
                          for p in PRODUCTS if getattr(w, p).packed is not None}) for w in layers]


def forwards(name: str, shapes: list[tuple[int, int]], repeats: int) -> None:
    model = load_model(name)
    model.eval().quantize()
    own = model.int8.layers
    tiles = int8_ops.panels_on_tiles(model.config.hidden_size)
    routes = {"panels": _repacked(own, _panels_packed), "onednn": _repacked(own, _onednn_packed)}
    gen = torch.Generator().manual_seed(0)
    for batch, length in shapes:
        ids = torch.randint(1000, model.config.vocab_size, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)

        def run(layers, epilogue_sums=True, one_call=True, ids=ids, mask=mask):
            model.int8.layers = layers
            int8_model.EPILOGUE_SUMS, int8_model.LAYERS_IN_ONE_CALL = epilogue_sums, one_call
            try:
                return model(ids, mask).last_hidden_state
            finally:
                int8_model.EPILOGUE_SUMS = int8_model.LAYERS_IN_ONE_CALL = True

        with torch.inference_mode():
            # the same sums, so the same bits
            want = run(own)
            assert all(torch.equal(want, run(*route)) for route in ((routes["panels"],), (routes["onednn"],),
                                                                    (own, False), (own, True, False)))
            fns = {"panels": lambda: run(routes["panels"]), "onednn": lambda: run(routes["onednn"]),
                   "separate": lambda: run(own, False), "by-layer": lambda: run(own, True, False),
                   "model": lambda: run(own)}
            if tiles:
                fns["vnni"] = lambda: _on_vnni(lambda: run(routes["panels"]))
            times = _interleaved(fns, repeats)
        model.int8.layers = own
        vnni = f", every product on the VNNI panels {_ratio(times, 'vnni', 'model'):.2f}x" if tiles else ""
        print(f"{name:9s} B={batch} L={length:3d}: on the model's route {statistics.median(times['model']) * 1e3:7.2f} "
              f"ms; every product on the panels {_ratio(times, 'panels', 'model'):.2f}x that{vnni}, on oneDNN's "
              f"{_ratio(times, 'onednn', 'model'):.2f}x, with the sums stored before each epilogue "
              f"{_ratio(times, 'separate', 'model'):.2f}x, layer by layer {_ratio(times, 'by-layer', 'model'):.2f}x",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=list(SHAPES))
    p.add_argument("--rows", default="1,16,64,128,256,1024")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--shapes", default="1x16,1x128,8x128", help="the forwards' inputs, BxL each")
    p.add_argument("--products-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    route = ("every product on the int8 panels, on AMX-INT8 tiles where the reduction is whole steps of 64"
             if int8_ops.panels_on_tiles(64) else
             f"VNNI panels for at most {int8_ops.AMX_PANEL_ROWS} rows, oneDNN's int8 product on AMX tiles past that"
             if int8_ops.onednn_amx() else "every product on VNNI panels" if int8_ops.panels_vnni() else
             f"panels for at most {int8_ops.PANEL_ROWS} rows" if int8_ops.weight_pairs_limited() else "no panels")
    print(f"torch {torch.__version__}, {args.threads} threads, the model's route here: {route}")
    for name in args.models:
        products(name, [int(r) for r in args.rows.split(",")], args.repeats)
    if not args.products_only:
        for name in args.models:
            forwards(name, [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")], args.repeats)


if __name__ == "__main__":
    main()
