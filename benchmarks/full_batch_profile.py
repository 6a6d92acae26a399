"""Full batches on the CPU: mtbert_fast against OpenVINO, and where mtbert_fast's time goes.

    python benchmarks/full_batch_profile.py [--models minilm bert-base] [--dtypes float32 bfloat16]
                                            [--batch 8] [--length 128] [--threads 2] [--repeats 15]
                                            [--no-openvino] [--profile] [--products]

Every token is real (no padding). Per model and dtype, in one process, interleaved round by round (medians):
  - mtbert_fast: FastBertModel from the HF model in that dtype;
  - OpenVINO: the HF model converted once, compiled with INFERENCE_PRECISION_HINT=f32 for the float32 rows and
    with the plugin's default precision (bf16 on CPUs with AVX512-BF16) for the bfloat16 rows; skipped, with the
    reason, where openvino is not installed;
  - gemm: [1024, 768] x [768, 3072] by oneDNN with the weight packed as the encoder packs it, and the same product
    with a plain weight and with F.linear, 8 products per timed call; the fastest route is the GEMM rate of the
    roofline;
  - linears alone: the encoder's four products of one layer (QKV, output, FFN up with GELU, FFN down) on the
    kernel the encoder runs them on at this many rows (panel_linear or oneDNN's linear) and its packed weights, times
    the layers: what the linears cost with nothing around them;
  - attention alone: attention_varlen on one layer's [T, 3, heads, head_dim], times the layers.
FLOPs are exact (harness.encoder_flops): every linear including the pooler, and attention's two products Q K^T
and P V, 4 L^2 H per layer per sequence; elementwise work is not counted. The roofline fraction is FLOPs / time /
GEMM rate, also taken per round against that round's GEMM rate (robust to a load that changes between rounds), and
the ratio to OpenVINO likewise. The attainable fraction is what the model would reach with its linears at the GEMM
rate and attention at the rate its own kernel reaches. `--products` adds each of one layer's products alone (on the
encoder's route and packed weights, interleaved with the GEMM) as a fraction of the GEMM rate, the FFN's input
product with and without its GELU epilogue, and what that epilogue adds to a forward. `--profile` adds a
torch.profiler breakdown of mtbert_fast's forward by part (linears, attention, LayerNorm, the rest) with the GFLOP/s
of each, and OpenVINO's own per-node timers by the same parts, with the kernels its linears ran on.

Every timed call follows a pause of SETTLE seconds, so that no call pays for the previous one's spinning threads.
On a machine that other jobs keep busy, run with OMP_WAIT_POLICY=PASSIVE (it must be set before the process
starts): PyTorch's OpenMP threads otherwise spin after every parallel region and take the core the next step needs.
On a quiet machine leave the default: under PASSIVE the forward after a pause ran up to 45 % slower (MiniLM) while
the scheduler placed the threads anew. Set MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_MMAP_THRESHOLD_=33554432 as
well: in some processes glibc otherwise returns the top of its heap to the OS after every forward, and the next one
faults its activations in again; the faults per forward are printed (docs/cpu-full-batch.md). The header prints the
policy in force and the load average. Last, the cores each engine's forward keeps busy (CPU time over wall time):
under its thread count by the time its threads wait, on a part that runs on one thread or on a thread that wakes late.
Do not bind the OpenMP threads (OMP_PROC_BIND) here: the binding pins the main thread, OpenVINO's TBB workers
inherit it and share one core (its cores busy then read 1.00).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mtbert_fast import FastBertModel  # noqa: E402
from mtbert_fast.bench import harness, measure  # noqa: E402
from mtbert_fast.models import encoder  # noqa: E402
from mtbert_fast.ops import attention_varlen  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
OV_PRECISION = {"float32": "f32", "bfloat16": None}  # None: the plugin's default
PARTS = {  # profiler event name -> part
    "mkldnn::_linear_pointwise": "linears",
    "aten::addmm": "linears",
    "mtbert_fast_C::panel_linear": "linears",
    "mtbert_fast_C::mkl_linear": "linears",
    "mtbert_fast_C::attention_varlen": "attention",
    "mtbert_fast_C::bias_residual_layer_norm": "layernorm",
    "aten::native_layer_norm": "layernorm",
}


def load_model(name: str):
    if name == "bert-base":
        return measure.random_bert(measure.bert_base_config())
    from transformers import AutoModel

    path = measure.default_model_dir() if name == "minilm" else name
    return AutoModel.from_pretrained(path).eval()


def full_batch(config, batch: int, length: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1000, config.vocab_size, (batch, length), generator=g),
        "attention_mask": torch.ones(batch, length, dtype=torch.int64),
        "token_type_ids": torch.zeros(batch, length, dtype=torch.int64),
    }


def openvino_config(threads: int, precision: str | None, **extra: str) -> dict[str, str]:
    """OpenVINO's CPU plugin settings for this benchmark: `threads` threads, latency mode, `precision` (None: the
    plugin's default), and any further properties."""
    config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", **extra}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return config


def openvino_runner(hf, inputs: dict, threads: int, precision: str | None):
    """(callable, precision it runs in) or (None, why not)."""
    try:
        import openvino as ov
    except ImportError:
        return None, "openvino is not installed (pip install openvino)"
    with torch.no_grad():
        model = ov.convert_model(hf, example_input=inputs)
    compiled = ov.Core().compile_model(model, "CPU", openvino_config(threads, precision))
    request = compiled.create_infer_request()
    feeds = {k: v.numpy() for k, v in inputs.items()}

    def run():
        request.infer(feeds)
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run, str(compiled.get_property("INFERENCE_PRECISION_HINT"))


# seconds of pause before each timed call: OpenVINO's TBB workers spin for a while after its call and slowed whatever
# came next (the GEMM timed after it read ~10% low)
SETTLE = 0.1
GEMM_CALLS = 8  # products per timed call, so that one call lasts as long as several of the model's linears


def gemm_routes(dtype: torch.dtype, shape=harness.GEMM_SHAPE) -> dict:
    """harness.gemm_routes (F.linear, oneDNN's linear on a plain and on a packed weight), GEMM_CALLS products per
    call, each named "gemm <route>"."""
    routes = harness.gemm_routes(dtype, torch.device("cpu"), shape)
    return {f"gemm {name}": (lambda f=f: [f() for _ in range(GEMM_CALLS)]) for name, f in routes.items()}


def gemm_rates(timing: dict, repeats: int) -> tuple[dict[str, float], float, list[float]]:
    """From a timing that holds gemm_routes' calls: each route's rate (of medians), the fastest of them (the GEMM
    rate of the roofline) and, per round, the fastest route's rate in that round."""
    gemm_flops = GEMM_CALLS * harness.gemm_flops()
    routes = {r: gemm_flops / t.median for r, t in timing.items() if r.startswith("gemm")}
    round_gemm = [max(gemm_flops / timing[r].samples[i] for r in routes) for i in range(repeats)]
    return routes, max(routes.values()), round_gemm


def layer_products(fast: FastBertModel, tokens: int) -> dict[str, tuple]:
    """One layer's products on random inputs of `tokens` rows, each on the encoder's own inference route for that
    many rows (panel_linear, oneDNN's linear or MKL's packed sgemm, on its packed weight): name -> (callable,
    multiply-adds per row). The FFN's input product is there twice: with its GELU epilogue, as the encoder runs it,
    and with the bias alone."""
    layer = fast.layers[0]
    g = torch.Generator().manual_seed(0)
    h, i = fast.config.hidden_size, fast.config.intermediate_size
    x = torch.randn(tokens, h, generator=g).to(fast.dtype)
    inner = torch.randn(tokens, i, generator=g).to(fast.dtype)
    approximate = fast.config.gelu_approximate
    linear = encoder._Linear(True, None)
    return {
        "QKV": (lambda: linear(x, layer.qkv.weight, layer.qkv.bias), 3 * h * h),
        "attention output": (lambda: linear(x, layer.attn_out.weight, layer.attn_out.bias), h * h),
        "FFN in + GELU": (lambda: linear.gelu(x, layer.ffn_in.weight, layer.ffn_in.bias, approximate), h * i),
        "FFN in, bias only": (lambda: linear(x, layer.ffn_in.weight, layer.ffn_in.bias), h * i),
        "FFN out": (lambda: linear(inner, layer.ffn_out.weight, layer.ffn_out.bias), h * i),
    }


def linears_alone(fast: FastBertModel, tokens: int):
    """One layer's four products (the FFN's input with its GELU) with nothing around them, as the encoder runs them
    for `tokens` rows."""
    products = layer_products(fast, tokens)
    calls = [products[name][0] for name in ("QKV", "attention output", "FFN in + GELU", "FFN out")]

    def run():
        for call in calls:
            call()

    return run


PRODUCT_CALLS = 4  # products per timed call in products_alone


def products_alone(fast: FastBertModel, tokens: int) -> dict[str, tuple]:
    """layer_products, each PRODUCT_CALLS times per call: name -> (callable, FLOPs per call). The FFN's input
    product with its GELU less the same product with the bias alone is what the GELU costs."""
    return {name: (lambda f=f: [f() for _ in range(PRODUCT_CALLS)], PRODUCT_CALLS * 2 * tokens * macs)
            for name, (f, macs) in layer_products(fast, tokens).items()}


def report_products(fast: FastBertModel, tokens: int, dtype: torch.dtype, forward_ms: float, repeats: int) -> None:
    """Times products_alone against the GEMM routes, interleaved, and prints each product's fraction of the GEMM
    rate (of medians / per round) and what the GELU epilogue adds to a forward."""
    products = products_alone(fast, tokens)
    fns = {name: f for name, (f, _) in products.items()}
    fns.update(gemm_routes(dtype))
    with torch.inference_mode():
        timing = harness.time_interleaved(fns, repeats=repeats, warmup=2, settle=0.02)
    _, gemm_rate, round_gemm = gemm_rates(timing, repeats)
    print(f"    products alone at {tokens} rows (GEMM rate {gemm_rate / 1e9:.1f} GFLOP/s): fraction of it, of medians"
          " / per round")
    for name, (_, flops) in products.items():
        t = timing[name]
        per_round = np.median([flops / t.samples[i] / round_gemm[i] for i in range(repeats)])
        print(f"      {name:18s} {t.median / PRODUCT_CALLS * 1e3:7.3f} ms  {flops / t.median / gemm_rate:.3f} /"
              f" {per_round:.3f}")
    gelu_ms = (timing["FFN in + GELU"].median - timing["FFN in, bias only"].median) / PRODUCT_CALLS * 1e3
    layers = fast.config.num_hidden_layers
    print(f"      the GELU epilogue: {gelu_ms:.3f} ms a layer, {gelu_ms * layers:.2f} ms a forward"
          f" ({100 * gelu_ms * layers / forward_ms:.1f} % of mtbert_fast's median forward)")


def attention_alone(fast: FastBertModel, batch: int, length: int):
    """One layer's attention (packed, every token real) on its own."""
    c = fast.config
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch * length, 3, c.num_attention_heads, c.head_dim, generator=g).to(fast.dtype)
    cu_seqlens = torch.arange(0, batch * length + 1, length, dtype=torch.int32)
    return lambda: attention_varlen(qkv, cu_seqlens, length)


def linear_flops(config, tokens: int, batch: int) -> float:
    h, i = config.hidden_size, config.intermediate_size
    return config.num_hidden_layers * 2 * tokens * (4 * h * h + 2 * h * i) + 2 * batch * h * h


def part_times(fast: FastBertModel, inputs: dict, runs: int = 3) -> dict[str, float]:
    """torch.profiler's self CPU time per forward, ms, summed by part (PARTS; "rest" for any other event)."""
    with torch.inference_mode():
        fast(**inputs)
        with torch.profiler.profile() as prof:
            for _ in range(runs):
                fast(**inputs)
    ms: dict[str, float] = {}
    for event in prof.key_averages():
        part = PARTS.get(event.key, "rest")
        ms[part] = ms.get(part, 0.0) + event.self_cpu_time_total / 1e3 / runs
    return ms


def profile_parts(fast: FastBertModel, inputs: dict, flops: dict[str, float], runs: int = 3) -> None:
    print_parts("profile (self CPU time per forward)", part_times(fast, inputs, runs), flops)


def print_parts(title: str, ms: dict[str, float], flops: dict[str, float]) -> None:
    total = sum(ms.values())
    print(f"    {title}:")
    for part in ("linears", "attention", "layernorm", "rest"):
        t = ms.get(part, 0.0)
        rate = f"{flops[part] / t / 1e6:7.1f} GFLOP/s" if part in flops and t > 0 else ""
        print(f"      {part:10s} {t:8.2f} ms {100 * t / total:5.1f} %  {rate}")


# OpenVINO node type -> part. The attention's head split and merge are Transposes there (the encoder reads the
# packed [T, 3, heads, head_dim] in place); the residual Add stays in "rest" (the encoder fuses it into its LayerNorm).
OV_PARTS = {"FullyConnected": "linears", "ScaledDotProductAttention": "attention", "Softmax": "attention",
            "MatMul": "attention", "Transpose": "attention", "MVN": "layernorm", "MulAdd": "layernorm"}


def openvino_part(node_type: str, node_name: str) -> str:
    if node_type == "Subgraph":  # a fused kernel: the attention's when it stands for scaled_dot_product_attention
        return "attention" if "scaled_dot_product_attention" in node_name.lower() else "rest"
    return OV_PARTS.get(node_type, "rest")


def openvino_part_times(runs: list) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
    """Per forward, from OpenVINO's per-node timers of each run (lists of (node type, node name, kernel, ms) of the
    nodes that executed): ms per part, and per kernel of the linears (FullyConnected) how many nodes and ms."""
    parts: dict[str, float] = {}
    kernels: dict[str, tuple[int, float]] = {}
    for nodes in runs:
        for node_type, node_name, kernel, ms in nodes:
            part = openvino_part(node_type, node_name)
            parts[part] = parts.get(part, 0.0) + ms / len(runs)
            if part == "linears":
                count, total = kernels.get(kernel, (0, 0.0))
                kernels[kernel] = (count + 1, total + ms / len(runs))
    return parts, {k: (count // len(runs), ms) for k, (count, ms) in kernels.items()}


def openvino_profile(hf, inputs: dict, threads: int, precision: str | None, flops: dict[str, float],
                     runs: int = 5) -> None:
    """OpenVINO's own per-node timers (PERF_COUNT) by the parts of profile_parts, on a second compiled copy so that
    the timed one runs without them."""
    import openvino as ov

    with torch.no_grad():
        model = ov.convert_model(hf, example_input=inputs)
    compiled = ov.Core().compile_model(model, "CPU", openvino_config(threads, precision, PERF_COUNT="YES"))
    request = compiled.create_infer_request()
    feeds = {k: v.numpy() for k, v in inputs.items()}
    request.infer(feeds)
    measured = []
    for _ in range(runs):
        request.infer(feeds)
        measured.append([(p.node_type, p.node_name, p.exec_type, p.real_time.total_seconds() * 1e3)
                         for p in request.profiling_info if p.status == p.Status.EXECUTED])
    parts, kernels = openvino_part_times(measured)
    print_parts("OpenVINO's profile (its per-node timers, per forward)", parts, flops)
    print("      linears by kernel: " + ", ".join(f"{k} x{n} {ms:.2f} ms" for k, (n, ms) in kernels.items()))


def cores_busy(fn, calls: int = 5, wall=time.perf_counter, cpu=time.process_time) -> float:
    """The cores a call of fn keeps busy on average: the process's CPU time over the wall time of back-to-back calls.
    Below the thread count by the time its threads wait: a part that runs on one thread, a thread that wakes late, a
    share of the work that ends early. Threads that spin while they wait count as busy."""
    with torch.inference_mode():
        fn()
        wall0, cpu0 = wall(), cpu()
        for _ in range(calls):
            fn()
        return (cpu() - cpu0) / (wall() - wall0)


def page_faults(fn, calls: int = 3) -> float:
    """Page faults per call of fn: memory that the C library handed back to the OS after one call and the next
    call touched again (glibc trims the top of its heap once more than its trim threshold lies free there)."""
    with torch.inference_mode():
        fn()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def run_point(name: str, hf, dtype_name: str, args) -> None:
    dtype = DTYPES[dtype_name]
    config = hf.config
    inputs = full_batch(config, args.batch, args.length)
    tokens = args.batch * args.length
    flops = harness.encoder_flops(config, [args.length] * args.batch, pooler=True)
    part_flops = {"linears": linear_flops(config, tokens, args.batch)}
    part_flops["attention"] = flops - part_flops["linears"]

    fast = FastBertModel.from_hf(hf, dtype=dtype)
    with torch.inference_mode():
        reference = hf(**inputs).last_hidden_state
        diff = (fast(**inputs).last_hidden_state.float() - reference).abs().max().item()
    fns = {"mtbert_fast": lambda: fast(**inputs)}
    ov_note = ""
    if not args.no_openvino:
        run_ov, ov_note = openvino_runner(hf, inputs, args.threads, OV_PRECISION[dtype_name])
        if run_ov is None:
            ov_note = f"OpenVINO skipped: {ov_note}"
        else:
            ov_diff = (run_ov() - reference).abs().max().item()
            fns["openvino"] = run_ov
            ov_note = f"OpenVINO in {ov_note}, max |diff| vs HF fp32 {ov_diff:.2e}"
    fns.update(gemm_routes(dtype))
    layers = config.num_hidden_layers
    one_layer = linears_alone(fast, tokens)
    fns["linears alone"] = lambda: [one_layer() for _ in range(layers)]
    one_attention = attention_alone(fast, args.batch, args.length)
    fns["attention alone"] = lambda: [one_attention() for _ in range(layers)]

    with torch.inference_mode():
        timing = harness.time_interleaved(fns, repeats=args.repeats, warmup=2, settle=SETTLE)
    # per round: the GEMM rate of that round, and ratios of calls made seconds apart, which a load that changes
    # from round to round moves less than it moves the medians
    routes, gemm_rate, round_gemm = gemm_rates(timing, args.repeats)
    rounds = range(args.repeats)
    work = {"mtbert_fast": flops, "openvino": flops,
            "linears alone": part_flops["linears"] - 2 * args.batch * config.hidden_size ** 2,
            "attention alone": part_flops["attention"]}
    print(f"\n{name} {dtype_name}  B={args.batch} L={args.length}  {flops / 1e9:.1f} GFLOP per forward"
          f"  (attention {100 * part_flops['attention'] / flops:.1f} %)  max |diff| vs HF fp32 {diff:.2e}")
    if ov_note:
        print(f"    {ov_note}")
    print("    GEMM routes: " + ", ".join(f"{r[5:]} {v / 1e9:.1f}" for r, v in routes.items()) + " GFLOP/s")
    print("    provider         median ms  GFLOP/s  roofline (of medians / per round)  p10-p90 ms")
    for provider, f in work.items():
        if provider not in timing:
            continue
        t = timing[provider]
        per_round = np.median([f / t.samples[i] / round_gemm[i] for i in rounds])
        print(f"    {provider:15s} {t.median * 1e3:9.1f} {f / t.median / 1e9:8.1f}  {f / t.median / gemm_rate:.3f} /"
              f" {per_round:.3f}  {t.p10 * 1e3:.1f}-{t.p90 * 1e3:.1f}")
    # the best this encoder can do: linears at the GEMM rate, attention at its kernel's rate, nothing else
    limits = [part_flops["linears"] / round_gemm[i] + timing["attention alone"].samples[i] for i in rounds]
    fast_t = timing["mtbert_fast"].samples
    print(f"    attainable roofline (per round) {np.median([flops / limits[i] / round_gemm[i] for i in rounds]):.3f};"
          f" mtbert_fast reaches {np.median([limits[i] / fast_t[i] for i in rounds]):.3f} of it")
    if "openvino" in timing:
        ov = timing["openvino"].samples
        print(f"    speed vs OpenVINO: {timing['openvino'].median / timing['mtbert_fast'].median:.3f}x of medians,"
              f" {np.median([ov[i] / fast_t[i] for i in rounds]):.3f}x per round (median),"
              f" {min(ov) / min(fast_t):.3f}x of the fastest calls")
    print(f"    page faults per mtbert_fast forward: {page_faults(fns['mtbert_fast']):.0f}")
    print("    cores busy per forward (CPU time / wall time, back to back): "
          + ", ".join(f"{p} {cores_busy(fns[p]):.2f}" for p in ("mtbert_fast", "openvino") if p in fns))
    if args.products:
        report_products(fast, tokens, dtype, timing["mtbert_fast"].median * 1e3, args.repeats)
    if args.profile:
        profile_parts(fast, inputs, part_flops)
        if "openvino" in timing:
            openvino_profile(hf, inputs, args.threads, OV_PRECISION[dtype_name], part_flops)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"],
                        help="minilm (bundled all-MiniLM-L6-v2), bert-base (random weights) or an HF model directory")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out")
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler breakdown by part")
    parser.add_argument("--products", action="store_true",
                        help="add each product alone as a fraction of the GEMM rate, and the GELU epilogue's cost")
    args = parser.parse_args(argv)

    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    print(harness.describe_device("cpu"), f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
          f"load average {os.getloadavg()[0]:.1f}")
    for name in args.models:
        hf = load_model(name)
        for dtype_name in args.dtypes:
            run_point(name, hf, dtype_name, args)


if __name__ == "__main__":
    main()
