"""`mtbert-fast bench`: measure (measure.py), then print the table, append the CSV and draw the plot (report.py)."""

from __future__ import annotations

from mtbert_fast.bench import measure, report


def main(cfg: measure.BenchConfig) -> int:
    """Runs, prints the table, appends the CSV, draws the plot; returns the exit status (1 when HF or mtbert_fast
    fails parity; a peer that fails it is shown as such, and not ranked)."""
    results, meta, skipped = measure.run(cfg)
    print(report.format_table(results, meta, skipped))
    if cfg.out is not None:
        print(f"results appended to {report.append_csv(results, meta, cfg.out)}")
        try:
            print(f"plot written to {report.plot(results, cfg.out)}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install matplotlib)")
    return 0 if all(r.parity_ok for r in results if not measure.is_peer(r.provider)) else 1
