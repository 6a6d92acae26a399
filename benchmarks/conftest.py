"""Shared glue for the pytest-benchmark suites (run: pytest benchmarks --benchmark-only; not part of make test).

`compare` times several providers interleaved round by round inside one pytest-benchmark measurement (the
benchmark's own stats are for a whole round), and `report` records a figure with its target in extra_info, prints
a summary line and appends a row to benchmarks/results/<subject>.csv with device, versions and commit. Targets are
reported, never asserted; parity of outputs is asserted by each benchmark.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from mtbert_fast.bench import harness  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FIELDS = harness.META_FIELDS + ["subject", "case", "dtype", "figure", "value", "target", "detail"]
ROUNDS = int(os.environ.get("MTBERT_BENCH_ROUNDS", "3"))


@pytest.fixture(scope="session")
def meta():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return harness.run_metadata(device)


@pytest.fixture
def compare(benchmark):
    def run(fns, rounds=ROUNDS, warmup=1, device="cpu"):
        samples: dict[str, list[float]] = {n: [] for n in fns}
        turn = iter(range(10**9))
        benchmark.pedantic(lambda: harness.interleaved_round(fns, samples, next(turn), device),
                           rounds=rounds, warmup_rounds=warmup, iterations=1)  # fmt: skip
        return {n: harness.Timing(s[warmup:] or s) for n, s in samples.items()}

    return run


@pytest.fixture
def report(benchmark, meta, request):
    subject = Path(request.node.fspath).stem.removeprefix("test_")

    def record(case: str, dtype: str, figure: str, value: float, target: str, detail: str = ""):
        benchmark.extra_info[f"{figure}"] = round(value, 4)
        benchmark.extra_info[f"{figure} target"] = target
        if detail:
            benchmark.extra_info[f"{figure} detail"] = detail
        line = f"[{subject}] {case} {dtype}: {figure} = {value:.3f} (target {target}){'; ' + detail if detail else ''}"
        print("\n" + line)
        harness.append_csv(RESULTS / f"{subject}.csv", [{**meta, "subject": subject, "case": case, "dtype": dtype,
                           "figure": figure, "value": f"{value:.4f}", "target": target, "detail": detail}], FIELDS)

    return record


def real_rows(out, mask):
    hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
    return hidden[mask.bool()].float()


def assert_parity(fast, hf_low, ref, dtype, what="output"):
    """fp32: within 1e-4 of the fp32 reference; lower precision: at most twice HF's own error in that dtype
    (plus a small floor), as in tests/."""
    err = float((fast - ref).abs().max())
    if dtype == torch.float32:
        assert err <= 1e-4 * max(1.0, float(ref.abs().max())), f"{what}: fp32 error {err:.2e}"
    else:
        own = float((hf_low - ref).abs().max())
        assert err <= 2 * own + 1e-3, f"{what}: {dtype} error {err:.2e} vs HF's own {own:.2e}"
    return err
