"""Batch-1 latency of mtbert_fast against OpenVINO and ONNX Runtime, and where mtbert_fast's time goes.

    HF_HUB_OFFLINE=1 python benchmarks/latency_profile.py [--threads 2] [--lengths 16 128] [--per-op] [--profile]

For each model (all-MiniLM-L6-v2, a random bert-base), dtype (fp32, bf16) and length (one sequence, every token
real), every engine runs in turn in one process (rounds of BLOCK calls in a row per engine after a 0.3 s pause and
an untimed call, the first engine rotating; medians), so the ratios hold on a loaded machine even where the absolute
numbers do not. Engines:

- hf: the HF model (sdpa) in the dtype;
- swap: the same model after mtbert_fast.swap; fast: FastBertModel.from_hf;
- ort: ONNX Runtime on the model exported in fp32 (its CPU provider has no bf16 kernels for these ops);
- ov: OpenVINO with INFERENCE_PRECISION_HINT f32 or bf16.

A peer that is not installed (or fails to convert) is skipped with the reason. The breakdown splits FastBertModel's
time into the whole forward, its layers (the Python layer code), the same layers' kernels called directly (no
wrapper, check or dispatch), and the rest (input checks, packing, embeddings, output); --per-op times each of those
kernels inside the sequence (ms per layer, and the products' and attention's rate against the GEMM rate measured in
the same process; attention also once more on the same input, in cache, which shows what its first reads cost);
--profile adds torch.profiler's table of ops. Last, what keeping the layer weights between calls saves
(encoder.LayerCache): the swapped model against a copy that gathers them from its modules on every call, one call
each in turn (the order alternating), as the median of the pairs' ratios; `--kept-only` runs that comparison alone,
with no peer loaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np
import torch

from mtbert_fast import FastBertModel, swap
from mtbert_fast.bench import harness, measure
from mtbert_fast.integrations import hf as hf_integration
from mtbert_fast.models import encoder
from mtbert_fast.models.weight_pack import onednn_weight, panel_weight
from mtbert_fast.ops.panel_linear import encoder_rows as panel_rows

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# calls in a row per engine and round: a call of a few milliseconds must not pay for the previous engine's thread
# pool still spinning (see harness.interleaved_round)
BLOCK = 10


def minilm():
    from transformers import BertModel

    return BertModel.from_pretrained(str(measure.default_model_dir()), attn_implementation="sdpa").eval()


def bert_base():
    return measure.random_bert(measure.bert_base_config())


MODELS = {"minilm": minilm, "bert-base": bert_base}


def inputs(vocab: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(1000, vocab, (1, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _LastHidden(torch.nn.Module):
    """forward(input_ids, attention_mask) -> last_hidden_state: BertModel.forward's positional arguments after
    these two differ between transformers versions, which the exporter's tracing trips over."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def ort_engine(hf32, sample, workdir, threads):
    """(run, None) or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    eager = _LastHidden(measure.with_attention(hf32, "eager"))
    path = os.path.join(workdir, f"{id(hf32)}.onnx")
    names = list(sample)
    try:
        torch.onnx.export(eager, tuple(sample[n] for n in names), path, dynamo=False, input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "length"} for n in names})  # fmt: skip
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # export fails in version-specific ways: say why, run the rest
        return None, f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def run(batch):
        return session.run(["last_hidden_state"], {n: batch[n].numpy() for n in names})[0].copy()

    return run, None


def ov_engine(hf32, sample, dtype_name, threads):
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino is not installed"
    try:
        model = ov.convert_model(measure.with_attention(hf32, "eager"), example_input=dict(sample))
        compiled = ov.Core().compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32" if dtype_name == "fp32" else "bf16",
            "PERFORMANCE_HINT": "LATENCY",
        })
    except Exception as exc:
        return None, f"OpenVINO conversion failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    request = compiled.create_infer_request()

    def run(batch):
        request.infer({n: t.numpy() for n, t in batch.items()})
        return request.get_output_tensor(0).data.copy()

    return run, None


class GatherEveryCall(encoder.LayerCache):
    """A LayerCache that keeps nothing: the layer weights gathered, and their stack built, on every call."""

    def current(self, root, gather):
        return gather(), None


def kept_against_gathered(swapped, gathering, batch: dict, rounds: int) -> tuple[float, float, float]:
    """(ms kept, ms gathered, gathered / kept): `swapped` against `gathering`, the same model swapped again, made to
    gather its layer weights on every call; alternating call by call (`rounds` pairs)."""
    getattr(gathering, hf_integration._STATE).layer_cache = GatherEveryCall()
    times = {"kept": [], "gathered": []}
    models = [("kept", swapped), ("gathered", gathering)]
    with torch.inference_mode():
        for _, model in models:
            model(**batch)
        for i in range(rounds):
            for name, model in models if i % 2 == 0 else models[::-1]:
                start = time.perf_counter()
                model(**batch)
                times[name].append(time.perf_counter() - start)
    kept, gathered = (float(np.median(times[k])) * 1e3 for k in ("kept", "gathered"))
    return kept, gathered, harness.median_ratio(times["gathered"], times["kept"])


def kernels_only(fast: FastBertModel, batch: dict):
    """The layers' kernels on the packed input, called directly: what the layers would cost with no Python
    between kernels beyond the calls themselves. Returns (run, layers): run(times=None) runs the kernels, and with a
    dict adds each kernel's seconds to times[its step's name]; layers() runs the Python layer code."""
    cfg = fast.config
    with torch.inference_mode():
        out = fast(**batch, output_hidden_states=True)
    x0, packed = out.packed_hidden_states[0], out.packed
    ws = [layer.weights() for layer in fast.layers]
    t, h = x0.shape
    C = torch.ops.mtbert_fast_C
    # the route the layers take: panel_linear for few rows (more for some weights and for GELU's product,
    # panel_rows(dtype, out_features, in_features, gelu)), else oneDNN's linear (packed where autograd is off); each
    # weight as (its pack, its out_features, on panels)
    def pack(m, gelu=False):
        panels = t <= panel_rows(x0.dtype, m.shape[0], m.shape[1], gelu)
        return (panel_weight(m) if panels else onednn_weight(m)), m.shape[0], panels

    def lin(x, packed_weight, bias, act, approximate):
        weight, out_features, panels = packed_weight
        if panels:
            return C.panel_linear(x, weight, bias, out_features, act == "gelu", approximate or "none")
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act, [], approximate)

    with torch.inference_mode():
        packs = [[pack(w.qkv_weight), pack(w.attn_out_weight), pack(w.ffn_in_weight, True), pack(w.ffn_out_weight)]
                 for w in ws]
    scale = cfg.head_dim ** -0.5
    eps = cfg.layer_norm_eps

    def attention(qkv):
        qkv = qkv.view(t, 3, cfg.num_attention_heads, cfg.head_dim)
        return C.attention_varlen(qkv, packed.cu_seqlens, packed.max_seqlen, scale, 0.0, None)[0].reshape(t, h)

    def run(times=None):
        clock = time.perf_counter

        def step(name, f, *a):
            if times is None:
                return f(*a)
            start = clock()
            y = f(*a)
            times[name] = times.get(name, 0.0) + clock() - start
            return y

        x = x0
        for w, (qkv_w, out_w, in_w, ffn_out_w) in zip(ws, packs):
            qkv = step("qkv", lin, x, qkv_w, w.qkv_bias, "none", "")
            ctx = step("attention", attention, qkv)
            if times is not None:  # again on the same input, now in cache: what its first reads cost
                step("attention again", attention, qkv)
            y = step("attention output", lin, ctx, out_w, None, "none", "")
            x = step("layernorm 1", C.bias_residual_layer_norm, y, w.attn_out_bias, x, w.attn_norm_weight,
                     w.attn_norm_bias, eps)[0]
            inner = step("ffn in + gelu", lin, x, in_w, w.ffn_in_bias, "gelu", cfg.gelu_approximate)
            y = step("ffn out", lin, inner, ffn_out_w, None, "none", "")
            x = step("layernorm 2", C.bias_residual_layer_norm, y, w.ffn_out_bias, x, w.ffn_norm_weight,
                     w.ffn_norm_bias, eps)[0]
        return x

    def layers():
        x = x0
        for w in [layer.weights() for layer in fast.layers]:
            x = encoder.layer_forward(cfg, w, x, packed, False, fast.backend)
        return x

    return run, layers


def per_op(fast: FastBertModel, batch: dict, repeats: int) -> None:
    """Each layer kernel's time inside the kernel sequence (ms per layer), and for the products and attention their
    rate and its fraction of the GEMM rate measured here in the dtype."""
    run, _ = kernels_only(fast, batch)
    cfg = fast.config
    t = int(batch["attention_mask"].sum())
    h, inter = cfg.hidden_size, cfg.intermediate_size
    flops = {"qkv": 6 * t * h * h, "attention": 4 * t * t * h, "attention again": 4 * t * t * h,
             "attention output": 2 * t * h * h, "ffn in + gelu": 2 * t * h * inter, "ffn out": 2 * t * inter * h}
    times: dict[str, float] = {}
    with torch.inference_mode():
        run()
        for _ in range(repeats):
            run(times)
        rate = harness.gemm_flops_per_s(next(fast.parameters()).dtype)
    calls = repeats * cfg.num_hidden_layers
    print(f"  per layer kernel inside the sequence (GEMM rate {rate / 1e9:.0f} GFLOP/s):")
    for name, seconds in times.items():
        each = seconds / calls
        extra = f"  {flops[name] / each / 1e9:.0f} GFLOP/s ({flops[name] / each / rate:.2f})" if name in flops else ""
        print(f"    {name:18s} {each * 1e3:.3f} ms{extra}")
    kernels = sum(v for k, v in times.items() if k != "attention again") / repeats
    print(f"    sum per forward   {kernels * 1e3:.2f} ms")


def breakdown(fast, batch, repeats):
    kernels, layers = kernels_only(fast, batch)
    with torch.inference_mode():
        t = harness.time_interleaved({"forward": lambda: fast(**batch), "layers": layers, "kernels": kernels},
                                     repeats=max(1, repeats // BLOCK), warmup=1, block=BLOCK)
    fwd, lay, ker = (t[k].median * 1e3 for k in ("forward", "layers", "kernels"))
    return {"forward": fwd, "layers": lay, "layer kernels": ker, "layer Python": lay - ker,
            "outside the layers": fwd - lay}


def profile(fast, batch, rows: int = 15):
    from torch.profiler import ProfilerActivity, profile as prof

    with torch.inference_mode():
        for _ in range(3):
            fast(**batch)
        with prof(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(20):
                fast(**batch)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 128])
    ap.add_argument("--repeats", type=int, default=60, help="timed calls per engine and case")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's table for each case")
    ap.add_argument("--per-op", action="store_true",
                    help="time each layer kernel inside the kernel sequence, with its fraction of the GEMM rate")
    ap.add_argument("--kept-only", action="store_true",
                    help="only the layer weights kept against gathered, 10x --repeats pairs a case, no peers loaded")
    args = ap.parse_args(argv)
    rounds = max(1, args.repeats // BLOCK)
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; {harness.describe_device('cpu')}; torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models:
            hf32 = MODELS[model_name]()
            for length in args.lengths:
                batch = inputs(hf32.config.vocab_size, length)
                if args.kept_only:
                    for dtype_name in args.dtypes:
                        dtype = DTYPES[dtype_name]
                        kept = kept_against_gathered(swap(copy.deepcopy(hf32), dtype=dtype),
                                                     swap(copy.deepcopy(hf32), dtype=dtype), batch, 10 * args.repeats)
                        print(f"{model_name} {dtype_name} B=1 L={length}: swap, layer weights kept {kept[0]:.3f} ms, "
                              f"gathered every call {kept[1]:.3f} ms: {kept[2]:.3f}x")
                    continue
                ort_run, ort_why = ort_engine(hf32, batch, workdir, args.threads)
                for dtype_name in args.dtypes:
                    dtype = DTYPES[dtype_name]
                    hf = hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype)
                    swapped = swap(copy.deepcopy(hf32), dtype=dtype)
                    fast = FastBertModel.from_hf(hf32, dtype=dtype)
                    ov_run, ov_why = ov_engine(hf32, batch, dtype_name, args.threads)
                    engines = {"hf": lambda: hf(**batch), "swap": lambda: swapped(**batch),
                               "fast": lambda: fast(**batch).last_hidden_state}
                    if ort_run is not None:
                        engines["ort"] = lambda: ort_run(batch)
                    if ov_run is not None:
                        engines["ov"] = lambda: ov_run(batch)
                    with torch.inference_mode():
                        t = harness.time_interleaved(engines, repeats=rounds, warmup=1, block=BLOCK, settle=0.3)
                    ms = {k: v.median * 1e3 for k, v in t.items()}
                    peers = {k: ms[k] for k in ("ort", "ov") if k in ms}
                    best = min(peers.values()) if peers else float("nan")
                    case = f"{model_name} {dtype_name} B=1 L={length}"
                    print(f"\n{case}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in ms.items()))
                    for why, name in ((ort_why, "ort"), (ov_why, "ov")):
                        if why:
                            print(f"  {name} skipped: {why}")
                    ratios = {k: ms[k] / best for k in ("fast", "swap")}
                    print("  ratio to the fastest peer: " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
                    parts = breakdown(fast, batch, args.repeats)
                    print("  fast breakdown (ms): " + "  ".join(f"{k} {v:.3f}" for k, v in parts.items()))
                    if args.per_op:
                        per_op(fast, batch, max(3, args.repeats // 4))
                    if args.profile:
                        profile(fast, batch)
                    kept = kept_against_gathered(swapped, swap(copy.deepcopy(hf32), dtype=dtype), batch,
                                                 2 * args.repeats)
                    print(f"  swap, layer weights kept {kept[0]:.3f} ms, gathered every call {kept[1]:.3f} ms: "
                          f"{kept[2]:.3f}x")
                    rows.append((case, ratios["fast"], ratios["swap"], kept[2]))
    if args.kept_only:
        return 0
    print("\nsummary: latency / fastest peer (target <= 0.90)")
    for case, f, s, kept in rows:
        print(f"  {case:28s} fast {f:.2f}x  swap {s:.2f}x  (swap gathering its layer weights every call: {kept:.3f}x "
              "swap's latency)")
    print(f"  geomean: fast {np.exp(np.mean([np.log(r[1]) for r in rows])):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
