"""The CPU attention kernel alone against the GEMM rate, measured in the same process.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/attention_rate.py [--threads 1 2] [--dtypes float32 bfloat16]
                                                               [--head-dims 64 32] [--lengths 32 64 128 256 512]
                                                               [--repeats 21] [--rel-bias R]
                                                               [--window W] [--pos W]

Per thread count and dtype, every case runs in turn in one process (interleaved rounds, medians): the forward of
attention_varlen on the cpu backend (inference: no gradient, no dropout) over about 1024 packed tokens of 12 heads
(B = 1024 / L full sequences of length L, and a ragged batch of lengths drawn in 16..256), and the GEMM
[1024, 768] x [768, 3072] in the same dtype by F.linear and by oneDNN's linear (harness.gemm_routes); the faster
route's rate is the roofline (on the AMD EPYC of docs/cpu-full-batch.md, F.linear reaches under half of oneDNN's
rate in fp32). Attention FLOPs are its two products, Q K^T and P V: 4 L^2 head_dim per head per sequence; the
softmax is not counted. --rel-bias R adds a relative position bias table [heads, 2R+1]; --window W attends to the
keys within W positions only, and the FLOPs count only the pairs attended. --pos W adds per-token position tables
pos_q and pos_k [heads, T, W] (DeBERTa's disentangled attention) over the distances up to W / 2, clamped. In bf16 on a
CPU with AMX-BF16 each case runs twice, on the tiles (amx) and on the AVX512-BF16 dot products (dots). The
fraction is the attention rate over the GEMM rate, of medians and as the median of per-round fractions against that
round's fastest route (robust to a load that moves between rounds). One thread is timed by the thread's CPU time
(time.thread_time), which other jobs on a shared machine do not inflate by descheduling it; more threads by wall
time.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mtbert_fast.bench import harness  # noqa: E402
from mtbert_fast.ops import attention_varlen, cpu_amx  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEADS = 12
TOKENS = 1024


def ragged_lengths(seed: int = 0, tokens: int = TOKENS) -> list[int]:
    """Lengths drawn uniformly in 16..256 until about `tokens` tokens."""
    g = torch.Generator().manual_seed(seed)
    lens: list[int] = []
    while sum(lens) < tokens:
        lens.append(int(torch.randint(16, 257, (1,), generator=g)))
    return lens


def attended_pairs(n: int, window: int) -> int:
    """(query, key) pairs of a sequence of n that attention computes: all, or those within the window."""
    if window < 0 or window >= n - 1:
        return n * n
    return n * n - (n - window - 1) * (n - window)


def attention_case(lens: list[int], head_dim: int, dtype: torch.dtype, rel_r: int | None = None, window: int = -1,
                   pos_w: int | None = None):
    """(call, FLOPs) of the attention forward over packed sequences of these lengths, with a relative position bias
    table of 2 rel_r + 1 buckets, a local window and position tables of pos_w columns where given."""
    cu = torch.tensor([0] + np.cumsum(lens).tolist(), dtype=torch.int32)
    g = torch.Generator().manual_seed(len(lens) + head_dim)
    qkv = torch.randn(sum(lens), 3, HEADS, head_dim, generator=g).to(dtype)
    rel_bias = None if rel_r is None else torch.randn(HEADS, 2 * rel_r + 1, generator=g)
    tables = {}
    if pos_w is not None:
        p = pos_w // 2
        index = torch.arange(-p, p + 1).clamp(-p, pos_w - p - 1) + p
        tables = dict(pos_q=torch.randn(HEADS, sum(lens), pos_w, generator=g).to(dtype),
                      pos_k=torch.randn(HEADS, sum(lens), pos_w, generator=g).to(dtype),
                      pos_index=index.to(torch.int32))
    flops = sum(4 * attended_pairs(n, window) * head_dim * HEADS for n in lens)
    return (lambda: attention_varlen(qkv, cu, max(lens), rel_bias=rel_bias, window=window, backend="cpu",
                                     **tables)), flops


def routed(call, allow_amx: bool):
    """call, run with the CPU forward's AMX tiles allowed or not (cpu_amx), set before every call."""

    def run_routed():
        cpu_amx(allow_amx)
        return call()

    return run_routed


def run(threads: int, dtype_name: str, args) -> None:
    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    m, k, n = harness.GEMM_SHAPE
    routes = {f"gemm {r}": fn for r, fn in harness.gemm_routes(dtype, torch.device("cpu"), harness.GEMM_SHAPE).items()}
    fns = dict(routes)
    flops = dict.fromkeys(routes, 2.0 * m * k * n)
    # bf16 on a CPU with AMX: each case on the tiles and on the AVX512-BF16 dot products (the route set per call)
    amx_routes = {"amx": True, "dots": False} if dtype == torch.bfloat16 and cpu_amx() else {"": True}
    for head_dim in args.head_dims:
        cases = {f"L={length}": [length] * max(1, TOKENS // length) for length in args.lengths}
        cases["ragged"] = ragged_lengths()
        for label, lens in cases.items():
            call, case_flops = attention_case(lens, head_dim, dtype, args.rel_bias, args.window, args.pos)
            for suffix, allow in amx_routes.items():
                name = f"d={head_dim} {label} {suffix}".rstrip()
                fns[name], flops[name] = routed(call, allow), case_flops
    # one thread: its CPU time, which other jobs on a busy machine do not inflate; more: wall time
    clock = time.thread_time if threads == 1 else time.perf_counter
    with torch.inference_mode():
        timing = harness.time_interleaved(fns, repeats=args.repeats, warmup=2, clock=clock)
    rates = {r: flops[r] / timing[r].median for r in routes}
    gemm_rate = max(rates.values())
    rounds = range(args.repeats)
    round_gemm = [max(flops[r] / timing[r].samples[i] for r in routes) for i in rounds]
    print(f"\n{dtype_name}, {threads} thread(s), {'thread CPU' if threads == 1 else 'wall'} time: GEMM {gemm_rate / 1e9:.0f} GFLOP/s ("
          + ", ".join(f"{r} {v / 1e9:.0f}" for r, v in rates.items()) + ")")
    print(f"    {'case':21s} {'us':>9s} {'GFLOP/s':>8s}  fraction of GEMM rate (of medians / per round)")
    for name, t in timing.items():
        if name in routes:
            continue
        rate = flops[name] / t.median
        per_round = np.median([flops[name] / t.samples[i] / round_gemm[i] for i in rounds])
        print(f"    {name:21s} {t.median * 1e6:9.0f} {rate / 1e9:8.1f}  {rate / gemm_rate:.3f} / {per_round:.3f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 32])
    parser.add_argument("--lengths", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--rel-bias", type=int, default=None, metavar="R",
                        help="a relative position bias table of 2R+1 buckets per head")
    parser.add_argument("--window", type=int, default=-1, help="local attention: keys within this many positions")
    parser.add_argument("--pos", type=int, default=None, metavar="W",
                        help="per-token position tables pos_q and pos_k of W columns")
    args = parser.parse_args(argv)
    print(harness.describe_device("cpu"), f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
          f"load average {os.getloadavg()[0]:.1f}", f"commit {harness.git_commit()}",
          f"rel_bias R={args.rel_bias} window={args.window} pos W={args.pos}")
    for threads in args.threads:
        for dtype_name in args.dtypes:
            run(threads, dtype_name, args)


if __name__ == "__main__":
    main()
