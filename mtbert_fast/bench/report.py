"""The reporting half of `mtbert-fast bench`: measure.py's Result rows as the table printed to the terminal, rows
appended to a CSV, and the speed-up plot. Renders given rows; runs no model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from mtbert_fast.bench import harness
from mtbert_fast.bench.measure import (BASELINE, FP32_TOLERANCE, FULL_POINT, INT8_MIN_COSINE, MULTITASK_BASELINE,
                                      Result, is_peer)  # fmt: skip

CSV_NAME = "results.csv"
PLOT_NAME = "speedup.png"
CSV_FIELDS = harness.META_FIELDS + [
    "model", "task", "point", "batch", "max_length", "provider", "dtype", "sentences", "batches", "real_tokens",
    "padded_tokens", "repeats", "threads", "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90",
    "latency_p50_ms", "latency_p90_ms", "peak_mem_mib", "speedup_vs_hf_sdpa", "speedup_vs_fastest_peer",
    "speedup_vs_fastest_peer_per_round", "fastest_peer", "own_bf16_tokens_per_s_median", "speedup_vs_own_bf16",
    "speedup_vs_own_bf16_per_round", "roofline_fraction", "gemm_gflops", "max_abs_diff",
    "min_cosine", "parity_limit", "parity", "backends",
]  # fmt: skip


def speedups(results: list[Result]) -> dict[int, float | None]:
    """id(result) -> median tokens/s over the baseline's (HF sdpa; HF eager for a model transformers runs without
    sdpa, such as MPNet; or the three HF task models) at the same point in the same dtype (int8 rows: the baseline in
    float32; HF eager where the baseline failed parity); None where parity failed."""
    base = {r.key: r.median for r in results if r.provider == "hf-eager" and r.parity_ok}
    base.update({r.key: r.median for r in results if r.provider in (BASELINE, MULTITASK_BASELINE) and r.parity_ok})
    return {id(r): (r.median / base[r.base_key] if r.parity_ok and r.base_key in base else None) for r in results}


class PeerRatio(NamedTuple):
    of_medians: float | None  # median tokens/s over the peer's (None only in the placeholder of rows without one)
    per_round: float | None  # the median over repetitions of the two rows' tokens/s ratio in that repetition
    peer: str


def per_round_ratio(a: Result, b: Result) -> float | None:
    """The median over repetitions of a's tokens/s over b's in the same repetition (each repetition runs every
    provider of a point one after the other); None where the rows' repetitions do not pair up."""
    return harness.median_ratio(a.tokens_per_s, b.tokens_per_s)


def versus_fastest_peer(results: list[Result]) -> dict[int, PeerRatio]:
    """id(mtbert_fast result) -> its speed over the fastest peer's (the fastest by median tokens/s that passed parity
    at the same point in the same dtype): of medians and per round. No entry where there is none, or the row failed
    parity."""
    fastest: dict[tuple, Result] = {}
    for r in results:
        if is_peer(r.provider) and r.parity_ok and (r.key not in fastest or r.median > fastest[r.key].median):
            fastest[r.key] = r
    return {id(r): PeerRatio(r.median / fastest[r.key].median, per_round_ratio(r, fastest[r.key]),
                             fastest[r.key].provider)
            for r in results if r.provider.startswith("mtbert_fast") and r.parity_ok and r.key in fastest}


def format_table(results: list[Result], meta: dict[str, str], skipped: dict[str, str] | None = None) -> str:
    ratio, peer = speedups(results), versus_fastest_peer(results)
    lines = [
        f"{meta['device']}; measured GEMM rate: {meta['gemm']}",
        f"torch {meta['torch']}, transformers {meta['transformers']}, mtbert_fast {meta['mtbert_fast']}"
        + (f" ({meta['commit']})" if meta["commit"] else "") + f", {meta['time']}",
        f"sentence points: {meta['sentences']} sentences in ragged batches; L=n points: one batch, lengths "
        f"uniform in [n/8, n]; full: B={FULL_POINT[0]}, L={FULL_POINT[1]}, no padding; latency: B=1, no padding; "
        f"median of {meta['repeats']} timed repetitions after one untimed pass; {meta['threads']} threads for every "
        "provider",
        "",
    ]
    headers = ["model", "task", "point", "B", "provider", "dtype", "real tok/s", "p10-p90", "p50 ms", "p90 ms",
               "peak MiB", "vs base", "vs peer", "per round", "fastest peer", "vs bf16", "roofline", "max|diff|",
               "cos", "parity"]  # fmt: skip
    rows = []
    for r in results:
        x = ratio[id(r)]
        vs_peer = peer.get(id(r), PeerRatio(None, None, "-"))
        t = harness.Timing(r.tokens_per_s)
        rows.append([
            r.model, r.task, r.point, str(r.batch), r.provider, r.dtype, f"{r.median:,.0f}",
            f"{t.p10:,.0f}-{t.p90:,.0f}", f"{r.latency_ms(50):.1f}", f"{r.latency_ms(90):.1f}",
            f"{r.peak_mem_bytes / 2**20:.1f}", _ratio(x), _ratio(vs_peer.of_medians), _ratio(vs_peer.per_round),
            vs_peer.peer, _ratio(own[1]) if (own := r.over_own_bf16) else "-",
            f"{100 * r.roofline:.0f}%" if math.isfinite(r.roofline) else "-", f"{r.max_abs_diff:.1e}",
            f"{r.min_cosine:.4f}" if math.isfinite(r.min_cosine) else "-", "ok" if r.parity_ok else "FAIL",
        ])  # fmt: skip
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    right = set(range(6, 14)) | {15, 16, 17, 18}
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    lines += [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines += [
        "",
        "vs base: median real tokens/s over HF sdpa's in the same dtype at the same point (HF eager's for a model "
        "transformers runs without sdpa, such as MPNet, or where sdpa failed parity; int8 rows: over that baseline in float32; multitask: over the "
        "three HF task models run one after the other); a provider failing parity is marked as such and gets no "
        "ratio",
        "vs peer: an mtbert_fast row's median real tokens/s over the fastest peer (torch.compile, ONNX Runtime, "
        "OpenVINO, CTranslate2, torch int8: neither HF eager/sdpa nor mtbert_fast) that passed parity in the same "
        "dtype at the same point; per round: the median over the timed repetitions of the same ratio within one "
        "repetition (each runs every provider of the point, seconds apart), which a changing machine load moves "
        "less; fastest peer: which one",
        "vs bf16: an mtbert_fast int8 row's real tokens/s over mtbert_fast's own bfloat16 model, which runs in the "
        "int8 point's repetitions for this, the median of the per-repetition ratios",
        "roofline: encoder FLOPs on the real tokens per second over the GEMM rate in that dtype measured at that "
        "point, in its repetitions (the fastest route, int8: of torch._int_mm and oneDNN's int8 linear); peak MiB: "
        "memory a call on the point's largest batch added at its peak in this process, after the untimed pass (RSS on "
        "cpu): what a runtime's pools kept from earlier calls is not counted, nor CTranslate2's, whose calls run in a "
        "worker process",
        f"max|diff|: largest difference from HF eager float32 at the real tokens; limit float32 {FP32_TOLERANCE:.0e}, "
        "bfloat16/float16 twice HF's own error in that dtype; cos: lowest cosine, over the sequences, between the "
        f"output mean-pooled over real tokens and HF float32's; int8 rows pass with cos >= {INT8_MIN_COSINE}",
    ]
    for name, why in (skipped or {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def _fixed(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else ""


def append_csv(results: list[Result], meta: dict[str, str], out_dir: Path) -> Path:
    """Appends one row per result to out_dir/results.csv (header written when the file is new; a file with other
    columns is left alone, see harness.append_csv); returns the path written."""
    ratio, peer = speedups(results), versus_fastest_peer(results)
    rows = []
    for r in results:
        x = ratio[id(r)]
        vs_peer = peer.get(id(r), PeerRatio(None, None, ""))
        t = harness.Timing(r.tokens_per_s)
        own = r.over_own_bf16
        rows.append({
            **meta, "model": r.model, "task": r.task, "point": r.point, "batch": r.batch,
            "max_length": r.max_length, "provider": r.provider, "dtype": r.dtype, "batches": r.batches,
            "real_tokens": r.real_tokens, "padded_tokens": r.padded_tokens,
            "tokens_per_s_median": f"{r.median:.1f}", "tokens_per_s_p10": f"{t.p10:.1f}",
            "tokens_per_s_p90": f"{t.p90:.1f}", "latency_p50_ms": f"{r.latency_ms(50):.3f}",
            "latency_p90_ms": f"{r.latency_ms(90):.3f}", "peak_mem_mib": f"{r.peak_mem_bytes / 2**20:.2f}",
            "speedup_vs_hf_sdpa": _fixed(x),
            "speedup_vs_fastest_peer": _fixed(vs_peer.of_medians),
            "speedup_vs_fastest_peer_per_round": _fixed(vs_peer.per_round), "fastest_peer": vs_peer.peer,
            "own_bf16_tokens_per_s_median": f"{r.own_bf16_median:.1f}" if own else "",
            "speedup_vs_own_bf16": _fixed(own[0] if own else None),
            "speedup_vs_own_bf16_per_round": _fixed(own[1] if own else None),
            "roofline_fraction": f"{r.roofline:.4f}" if math.isfinite(r.roofline) else "",
            "gemm_gflops": f"{r.gemm_flops_per_s / 1e9:.1f}" if math.isfinite(r.gemm_flops_per_s) else "",
            "max_abs_diff": f"{r.max_abs_diff:.3e}", "parity_limit": f"{r.parity_limit:.3e}",
            "min_cosine": f"{r.min_cosine:.6f}" if math.isfinite(r.min_cosine) else "",
            "parity": "ok" if r.parity_ok else "FAIL", "backends": r.backends,
        })  # fmt: skip
    return harness.append_csv(Path(out_dir) / CSV_NAME, rows, CSV_FIELDS)


def plot(results: list[Result], out_dir: Path) -> Path:
    """out_dir/speedup.png: speed-up over HF sdpa against sequence length and against batch size, one row of
    panels per (model, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = speedups(results)
    enc = [r for r in results if r.task == "encoder"]
    groups = list(dict.fromkeys((r.model, r.dtype) for r in enc)) or [("", "")]
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 3.6 * len(groups)), squeeze=False)
    for row, (model, dtype) in zip(axes, groups):
        for ax, kind, xlabel in ((row[0], "L=", "max sequence length (lengths uniform in [L/8, L])"),
                                 (row[1], "sentences", "batch size (real sentences)")):  # fmt: skip
            sel = [r for r in enc if (r.model, r.dtype) == (model, dtype) and r.point.startswith(kind)]
            for prov in dict.fromkeys(r.provider for r in sel):
                pts = sorted((r.max_length if kind == "L=" else r.batch, ratio[id(r)]) for r in sel
                             if r.provider == prov and ratio[id(r)] is not None)  # fmt: skip
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("speed-up vs HF sdpa (real tok/s)")
            ax.set_title(f"{model}, {dtype}", fontsize=10)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
