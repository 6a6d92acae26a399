"""The shared benchmark harness: timing, peak memory, the machine's GEMM rate, encoder FLOPs, run metadata, CSV.

Used by `mtbert-fast bench` (runner.py) and by the pytest-benchmark suites in benchmarks/. Every figure is meant
to be a ratio to a baseline timed in the same call: `time_interleaved` runs the providers in a rotating order,
so that a slow moment of a shared machine hits all of them alike.
"""

from __future__ import annotations

import csv
import ctypes
import dataclasses
import datetime
import gc
import platform
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import mtbert_fast
from mtbert_fast.models import weight_pack
from mtbert_fast.ops.mkl_linear import OP as mkl_linear_op
from mtbert_fast.ops.mkl_linear import available as mkl_available
from mtbert_fast.ops.mkl_linear import pack_mkl

GEMM_SHAPE = (1024, 768, 3072)  # [M, K] @ [K, N]: a bert-base FFN matrix product on 1024 tokens


@dataclasses.dataclass
class Timing:
    """Seconds per call, one sample per timed repetition."""

    samples: list[float]

    @property
    def median(self) -> float:
        return float(np.median(self.samples))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples, q))

    @property
    def p10(self) -> float:
        return self.percentile(10)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def spread(self) -> float:
        """(p90 - p10) / 2 relative to the median."""
        return (self.p90 - self.p10) / 2 / self.median if self.median > 0 else 0.0


def median_ratio(a: list[float], b: list[float]) -> float | None:
    """The median over rounds of a[i] / b[i], for samples taken round by round (each round runs both, seconds
    apart, so a load that changes from minute to minute moves this less than the ratio of the medians); None where
    the samples do not pair up."""
    if not a or len(a) != len(b):
        return None
    return float(np.median(np.asarray(a) / np.asarray(b)))


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_round(fns: Mapping[str, Callable[[], object]], samples: dict[str, list[float]], turn: int,
                      device: torch.device | str = "cpu", block: int = 1,
                      clock: Callable[[], float] = time.perf_counter, settle: float = 0.0) -> None:
    """Runs every fn in turn, starting with the `turn`-th (mod len), appending its seconds by `clock` to
    samples[name].

    block > 1: each fn runs once untimed, then `block` timed calls in a row. Short calls need this: a runtime's
    thread pool spins for a while after its call (OpenMP's default wait policy, ONNX Runtime, OpenVINO's TBB), and
    the next provider's call would pay for it, where a user's loop of calls to one engine never does; `settle`
    seconds of pause before each fn's turn let the previous pool stop spinning (ONNX Runtime's spins for 10-30 ms)."""
    names = list(fns)
    turn %= len(names)
    for name in names[turn:] + names[:turn]:
        if settle:
            time.sleep(settle)
        if block > 1:
            fns[name]()
        for _ in range(block):
            sync(device)
            start = clock()
            fns[name]()
            sync(device)
            samples.setdefault(name, []).append(clock() - start)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    block: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    settle: float = 0.0,
) -> dict[str, Timing]:
    """name -> Timing of fn(); each repetition runs every fn once (block > 1: `block` times in a row after an
    untimed call, see interleaved_round), the first one rotating, after `warmup` untimed rounds. Each Timing
    holds repeats * block samples; `settle`: see interleaved_round. `clock` defaults to wall time; time.thread_time
    counts only the calling thread's CPU time, which a busy machine does not inflate by descheduling it (meaningful
    where all the work runs on that thread)."""
    if repeats <= 0:
        raise ValueError(f"repeats must be positive, got {repeats}")
    if block <= 0:
        raise ValueError(f"block must be positive, got {block}")
    samples: dict[str, list[float]] = {n: [] for n in fns}
    for rep in range(warmup + repeats):
        interleaved_round(fns, samples, rep, device, block, clock, settle)
    return {n: Timing(s[warmup * block:]) for n, s in samples.items()}


# --- memory ----------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _release_free_memory() -> None:
    """Hands freed heap pages back to the OS (glibc malloc_trim), so that memory a call reuses from earlier calls
    counts in its peak instead of hiding in the RSS before it."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, int]:
    """(fn(), bytes of memory fn added at its peak above what was in use before the call).

    CPU: the process's peak RSS is reset to the current RSS (writing "5" to /proc/self/clear_refs), then VmHWM
    is read after the call; the figure is VmHWM - VmRSS before. CUDA: torch.cuda.max_memory_allocated above the
    memory allocated before. Raises OSError where /proc cannot reset the peak (not Linux).
    """
    device = torch.device(device)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - before
    _release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_bytes()
    out = fn()
    return out, max(0, _status_kib("VmHWM") * 1024 - before)


# --- FLOPs and the roofline ------------------------------------------------------------------------------------


INT8_DTYPES = (torch.int8, torch.qint8)


def gemm_routes(dtype: torch.dtype, device: torch.device, shape) -> dict[str, Callable[[], object]]:
    """name -> call of one [M, K] x [K, N] product in `dtype` (int8: int8 operands, int32 result)."""
    m, k, n = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    if dtype in INT8_DTYPES:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
        b = torch.randint(-128, 128, (k, n), generator=gen, dtype=torch.int8).to(device)
        routes = {"torch._int_mm": lambda: torch._int_mm(a, b)}
        if device.type == "cpu" and hasattr(torch.ops.onednn, "qlinear_pointwise"):
            routes.update(_onednn_int8_route(a.to(torch.uint8), b.t().contiguous()))
        return routes
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen).to(device=device, dtype=dtype)
    routes = {"F.linear": lambda: F.linear(x, w)}
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        # bf16 where oneDNN has no bf16 product: the encoder's route, float32 products on a float32 weight
        op_dtype = weight_pack.onednn_dtype(dtype)
        xo, wo = x.to(op_dtype), w.to(op_dtype)
        suffix = ", float32 products" if op_dtype != dtype else ""
        routes[f"onednn{suffix}"] = lambda: torch.ops.mkldnn._linear_pointwise(xo, wo, None, "none", [], "").to(dtype)
        if weight_pack.AVAILABLE:  # the weight in oneDNN's blocked layout, packed once, as the encoder runs it
            packed = weight_pack.pack_onednn(w)
            routes[f"onednn, packed weight{suffix}"] = lambda: torch.ops.mkldnn._linear_pointwise(
                xo, packed, None, "none", [], "").to(dtype)
    bf16_on_float32 = dtype == torch.bfloat16 and weight_pack.onednn_dtype(dtype) != dtype
    if device.type == "cpu" and (dtype == torch.float32 or bf16_on_float32) and mkl_available():
        # MKL's packed sgemm on a weight packed once, as the encoder runs float32 on Intel CPUs with AVX-512, and bf16
        # there where the CPU has no bf16 arithmetic (float32 products of x widened a block at a time)
        mkl_pack, mkl = pack_mkl(w), mkl_linear_op.kernel("cpu")
        suffix = ", float32 products" if bf16_on_float32 else ""
        routes[f"mkl, packed weight{suffix}"] = lambda: mkl(x, mkl_pack, w, None, False, "none")
    return routes


def _onednn_int8_route(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], object]]:
    """{"onednn": oneDNN's int8 linear (uint8 activations, int8 weights [N, K], the route of torch's x86 int8
    inference)}, or {} where this torch's oneDNN op does not take these arguments."""
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, list(x.shape))
        scales, zeros = torch.ones(w.shape[0]), torch.zeros(w.shape[0], dtype=torch.int32)

        def call():
            return torch.ops.onednn.qlinear_pointwise(x, 1.0, 0, packed, scales, zeros, None, 1.0, 0, torch.float32,
                                                      "none", [], "")  # fmt: skip

        call()
    except (RuntimeError, TypeError, AttributeError):
        return {}
    return {"onednn": call}


def gemm_flops(shape=GEMM_SHAPE) -> float:
    """FLOPs of one [M, K] x [K, N] product."""
    m, k, n = shape
    return 2.0 * m * k * n


def fastest_gemm(
    dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 10, shape=GEMM_SHAPE
) -> tuple[float, str, Callable[[], object]]:
    """(rate in FLOP/s, route, call) of the fastest route PyTorch offers for the [M, K] x [K, N] product in `dtype`,
    each route timed `repeats` times in interleaved rounds (medians): F.linear, and on the CPU also oneDNN's linear
    (which the encoder uses) on a plain weight and on one packed in oneDNN's layout, on float32 products for bf16
    where oneDNN has none in bf16, and MKL's packed sgemm where PyTorch carries MKL (for float32, and for bf16 where it
    runs on float32 products); int8 or qint8: torch._int_mm, and on the CPU also oneDNN's int8 linear."""
    device = torch.device(device)
    routes = gemm_routes(dtype, device, shape)
    with torch.inference_mode():
        timing = time_interleaved(routes, repeats=repeats, warmup=2, device=device)
    best = min(timing, key=lambda r: timing[r].median)
    return gemm_flops(shape) / timing[best].median, best, routes[best]


def gemm_flops_per_s(
    dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 10, shape=GEMM_SHAPE
) -> float:
    """The machine's measured matrix-product rate in `dtype`: [M, K] x [K, N], median of `repeats`, by the
    fastest route PyTorch offers (see fastest_gemm)."""
    return fastest_gemm(dtype, device, repeats, shape)[0]


def encoder_flops(config, lengths, *, pooler: bool = False) -> float:
    """Forward FLOPs of an encoder on sequences of the given real lengths (no padding counted).

    Per layer: every linear layer, 2 * T * (4 H^2 + 2 H I) over the T real tokens (Q, K and V, the attention
    output, FFN up and down; a GeGLU feed-forward's up-projection is 2I wide: 2 * T * (4 H^2 + 3 H I)), and
    attention's two products per sequence, 2 * 2 * P_i * H over the P_i = L_i^2 query-key pairs (fewer in a
    sliding-window layer: those within the window). DeBERTa's position terms add, per term and layer, the
    projection of the W relative-position rows the batch reaches, 2 * W * H^2, and the product of every token with
    them, 2 * T * W * H. With `pooler`, the pooler's linear on each sequence's first token, 2 * H^2 per sequence.
    Embeddings narrower than H (ELECTRA's embedding_size E) add their projection, 2 * T * E * H. Elementwise work, embeddings, biases and softmax are left out. config: anything with hidden_size,
    intermediate_size, num_hidden_layers (an HF config or an EncoderConfig; an EncoderConfig's pre_norm, layer_types
    and window describe ModernBERT's layers, its disentangled and pos_att_type DeBERTa's).
    """
    lengths = [int(n) for n in lengths]
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    tokens = sum(lengths)
    gated = getattr(config, "pre_norm", False)
    linears = 2 * tokens * (4 * h * h + (3 if gated else 2) * h * inter)
    if getattr(config, "disentangled", False) and lengths:
        from mtbert_fast.models.encoder import disentangled_index

        _, lo, hi = disentangled_index(config, max(lengths), "cpu")
        terms = len(set(config.pos_att_type) & {"c2p", "p2c"})
        linears += terms * (2 * (hi - lo) * h * h + 2 * tokens * (hi - lo) * h)
    kinds = config.layer_types if gated else ("full_attention",) * layers
    total = 0
    for kind in kinds:
        window = config.window if kind == "sliding_attention" else -1
        total += linears + 2 * 2 * sum(attended_pairs(n, window) for n in lengths) * h
    width = getattr(config, "embedding_width", None) or getattr(config, "embedding_size", None) or h
    if width != h:
        total += 2 * tokens * width * h
    if pooler:
        total += 2 * len(lengths) * h * h
    return float(total)


def attended_pairs(n: int, window: int = -1) -> int:
    """Query-key pairs of a sequence of n tokens: all n^2, or with window >= 0 those with |i - j| <= window."""
    if window < 0 or window >= n - 1:
        return n * n
    return n * (2 * window + 1) - window * (window + 1)


def roofline_fraction(flops: float, seconds: float, peak_flops_per_s: float) -> float:
    return flops / seconds / peak_flops_per_s


# --- run metadata and results ----------------------------------------------------------------------------------


def describe_device(device: torch.device | str) -> str:
    device = torch.device(device)
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


def run_metadata(device: torch.device | str) -> dict[str, str]:
    """time, device, versions and commit: the columns every results CSV starts with."""
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = ""
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": describe_device(device),
        "torch": torch.__version__,
        "transformers": tf_version,
        "mtbert_fast": mtbert_fast.__version__,
        "commit": git_commit(),
    }


META_FIELDS = ["time", "device", "torch", "transformers", "mtbert_fast", "commit"]


def _header(path: Path) -> list[str] | None:
    """The CSV's column names; None for a missing or empty file."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with path.open(newline="") as f:
        return next(csv.reader(f), None)


def append_csv(path: Path, rows: list[dict[str, object]], fields: list[str]) -> Path:
    """Appends rows to the CSV at `path` (header written when the file is new; unknown keys ignored); returns the
    path written. A file there with other columns (from an older version) is left alone: the rows go to the first
    `<stem>-<n>.csv` beside it that is new or has these columns."""
    base = path = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while (header := _header(path)) is not None and header != fields:
        n += 1
        path = base.with_name(f"{base.stem}-{n}{base.suffix}")
    new = header is None
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path
