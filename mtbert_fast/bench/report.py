"""The reporting half of `mtbert-fast bench`: measure.py's Result rows as the table printed to the terminal, rows
appended to a CSV, and the speed-up plot. Renders given rows; runs no model."""

from __future__ import annotations

import math
from pathlib import Path

from mtbert_fast.bench import harness
from mtbert_fast.bench.measure import BASELINE, FP32_TOLERANCE, MULTITASK_BASELINE, Result

CSV_NAME = "results.csv"
PLOT_NAME = "speedup.png"
CSV_FIELDS = harness.META_FIELDS + [
    "model", "task", "point", "batch", "max_length", "provider", "dtype", "sentences", "batches", "real_tokens",
    "padded_tokens", "repeats", "tokens_per_s_median", "tokens_per_s_p10", "tokens_per_s_p90", "latency_p50_ms",
    "latency_p90_ms", "peak_mem_mib", "speedup_vs_hf_sdpa", "roofline_fraction", "gemm_gflops", "max_abs_diff",
    "parity_limit", "parity", "backends",
]  # fmt: skip


def speedups(results: list[Result]) -> dict[int, float | None]:
    """id(result) -> median tokens/s over the baseline's (HF sdpa, or the three HF task models) at the same
    point and dtype; None where parity failed."""
    base = {r.key: r.median for r in results if r.provider in (BASELINE, MULTITASK_BASELINE)}
    return {id(r): (r.median / base[r.key] if r.parity_ok and r.key in base else None) for r in results}


def format_table(results: list[Result], meta: dict[str, str], skipped: dict[str, str] | None = None) -> str:
    ratio = speedups(results)
    lines = [
        f"{meta['device']}; measured GEMM rate: {meta['gemm']}",
        f"torch {meta['torch']}, transformers {meta['transformers']}, mtbert_fast {meta['mtbert_fast']}"
        + (f" ({meta['commit']})" if meta["commit"] else "") + f", {meta['time']}",
        f"sentence points: {meta['sentences']} sentences in ragged batches; L=n points: one batch, lengths "
        f"uniform in [n/8, n]; median of {meta['repeats']} timed repetitions after one untimed pass",
        "",
    ]
    headers = ["model", "task", "point", "B", "provider", "dtype", "real tok/s", "p10-p90", "p50 ms", "p90 ms",
               "peak MiB", "vs base", "roofline", "max|diff|", "parity"]  # fmt: skip
    rows = []
    for r in results:
        x = ratio[id(r)]
        t = harness.Timing(r.tokens_per_s)
        rows.append([
            r.model, r.task, r.point, str(r.batch), r.provider, r.dtype, f"{r.median:,.0f}",
            f"{t.p10:,.0f}-{t.p90:,.0f}", f"{r.latency_ms(50):.1f}", f"{r.latency_ms(90):.1f}",
            f"{r.peak_mem_bytes / 2**20:.1f}", f"{x:.2f}x" if x is not None else "-",
            f"{100 * r.roofline:.0f}%" if math.isfinite(r.roofline) else "-", f"{r.max_abs_diff:.1e}",
            "ok" if r.parity_ok else "FAIL",
        ])  # fmt: skip
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    right = set(range(6, 14))
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    lines += [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines += [
        "",
        "vs base: median real tokens/s over HF sdpa's in the same dtype at the same point (multitask: over the three "
        "HF task models run one after the other); a provider failing parity is marked as such and gets no ratio",
        "roofline: encoder FLOPs on the real tokens per second over the measured GEMM rate in that dtype; peak MiB: "
        "memory a call added at its peak (RSS on cpu)",
        f"max|diff|: largest difference from HF eager float32 at the real tokens; limit float32 {FP32_TOLERANCE:.0e}, "
        "other dtypes twice HF's own error in that dtype",
    ]
    for name, why in (skipped or {}).items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def append_csv(results: list[Result], meta: dict[str, str], out_dir: Path) -> Path:
    """Appends one row per result to out_dir/results.csv (header written when the file is new)."""
    ratio = speedups(results)
    rows = []
    for r in results:
        x = ratio[id(r)]
        t = harness.Timing(r.tokens_per_s)
        rows.append({
            **meta, "model": r.model, "task": r.task, "point": r.point, "batch": r.batch,
            "max_length": r.max_length, "provider": r.provider, "dtype": r.dtype, "batches": r.batches,
            "real_tokens": r.real_tokens, "padded_tokens": r.padded_tokens,
            "tokens_per_s_median": f"{r.median:.1f}", "tokens_per_s_p10": f"{t.p10:.1f}",
            "tokens_per_s_p90": f"{t.p90:.1f}", "latency_p50_ms": f"{r.latency_ms(50):.3f}",
            "latency_p90_ms": f"{r.latency_ms(90):.3f}", "peak_mem_mib": f"{r.peak_mem_bytes / 2**20:.2f}",
            "speedup_vs_hf_sdpa": f"{x:.4f}" if x is not None else "",
            "roofline_fraction": f"{r.roofline:.4f}" if math.isfinite(r.roofline) else "",
            "gemm_gflops": f"{r.gemm_flops_per_s / 1e9:.1f}" if math.isfinite(r.gemm_flops_per_s) else "",
            "max_abs_diff": f"{r.max_abs_diff:.3e}", "parity_limit": f"{r.parity_limit:.3e}",
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
            ax.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / PLOT_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
