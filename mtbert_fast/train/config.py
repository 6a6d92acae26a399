"""The training configuration: model, tasks with their data, and the loop's settings, read from JSON (or YAML).

Everything is checked before any work starts: `load_config` checks the file itself (keys, types, task kinds,
paths), and `mtbert_fast.train.data.load_records` then reads every data file and checks its columns and labels.
A problem raises `ConfigError` naming the task, the file, the column or value and what was expected; all the
problems found in one pass are reported together.

    {
      "model": {"config": "bert-mini", "tokenizer": "path/to/tokenizer_dir", "max_length": 128},
      "tasks": [
        {"name": "sentiment", "kind": "sequence_classification", "train_file": "sst.jsonl",
         "columns": {"text": "sentence", "label": "label"}, "labels": ["neg", "pos"], "loss_weight": 1.0},
        {"name": "ner", "kind": "token_classification", "train_file": "ner.csv", "labels": ["O", "B-PER", "I-PER"]}
      ],
      "training": {"batch_size": 16, "lr": 5e-5, "max_steps": 1000, "sampler": "temperature", "temperature": 2}
    }

Relative paths are relative to the configuration file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch.nn as nn

from mtbert_fast.train.samplers import SAMPLERS


class ConfigError(ValueError):
    """The training configuration or its data is wrong; the message says where and what was expected."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            super().__init__(self.problems[0])
        else:
            super().__init__(f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems))


# kind -> (required column roles, optional column roles)
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sequence_classification": (("text", "label"), ("text_pair",)),
    "token_classification": (("tokens", "tags"), ()),
    "masked_lm": (("text",), ()),
    "next_sentence": (("text", "text_pair", "label"), ()),
    "span_extraction": (("question", "context", "answer_start", "answer"), ()),
    "pretraining": (("text",), ()),
}
COLUMN_HELP = {
    "text": "the text",
    "text_pair": "the second text of a pair",
    "label": "the label",
    "tokens": "a list of words (or one string of space-separated words)",
    "tags": "one tag per word (a list, or one string of space-separated tags)",
    "question": "the question",
    "context": "the passage the answer is in",
    "answer_start": "the answer's first character in the context",
    "answer": "the answer's text",
}
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
# named encoder sizes for training from scratch; vocab_size comes from the tokenizer
NAMED_CONFIGS: dict[str, dict[str, int]] = {
    "bert-tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "bert-mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "bert-small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "bert-medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "bert-base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
    "minilm-l6": dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536),
}


@dataclasses.dataclass
class ModelSpec:
    """pretrained: an HF model directory (config.json + safetensors) whose encoder is trained further; or
    config: a name in NAMED_CONFIGS, a dict of EncoderConfig fields, or a path to a config.json, for random
    weights.  tokenizer: a tokenizer directory (default: the pretrained directory)."""

    pretrained: str | None = None
    config: str | dict | None = None
    tokenizer: str | None = None
    max_length: int = 128
    backend: str | None = None


@dataclasses.dataclass
class TaskSpec:
    """One task: its head kind, its data files and columns, and its labels.

    columns maps a role of KINDS[kind] to the column holding it (default: the role's own name); in JSONL a dotted
    name reaches into nested objects, as SQuAD's {"answer": "answers.text", "answer_start": "answers.answer_start"}.
    labels: the label (tag) names in head-output order; or num_labels for integer labels 0..num_labels-1; problem_type
    "regression" takes float labels.  next_sentence labels: labels[0] means "B follows A" (default [0, 1]).
    eval_file: held-out data; without it training.eval_split of train_file is held out.
    """

    name: str
    kind: str
    train_file: str
    eval_file: str | None = None
    format: str | None = None
    columns: dict[str, str] = dataclasses.field(default_factory=dict)
    labels: list | None = None
    num_labels: int | None = None
    problem_type: str = "single_label_classification"
    loss_weight: float = 1.0
    mlm_probability: float = 0.15
    max_length: int | None = None

    def column(self, role: str) -> str:
        return self.columns.get(role, role)

    def file_format(self, path: str) -> str:
        return self.format or FORMATS[os.path.splitext(path)[1].lower()]


@dataclasses.dataclass
class TrainingSpec:
    """The loop's settings.  Steps are optimizer steps; each step's batches (grad_accum_steps of them, of
    batch_size rows per process) come from the one task the sampler draws for that step."""

    batch_size: int = 16
    eval_batch_size: int | None = None
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    max_steps: int | None = None
    epochs: float | None = None
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    sampler: str = "proportional"
    temperature: float = 1.0
    seed: int = 0
    eval_split: float = 0.1
    eval_every: int | None = None
    log_every: int = 10
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = None
    resume_from: str | None = None
    output_dir: str | None = None
    device: str = "auto"
    progress: bool = True


@dataclasses.dataclass
class TrainConfig:
    model: ModelSpec
    tasks: list[TaskSpec]
    training: TrainingSpec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"configuration file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as exc:
            raise ConfigError(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or use JSON") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold an object with model, tasks and training, got {type(data).__name__}")
    return data


_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
          list: "a list"}


def _fields(cls, where: str, raw: Any, problems: list[str]) -> dict:
    """raw's keys checked against cls's fields (unknown keys and simple types), as constructor arguments."""
    if not isinstance(raw, dict):
        problems.append(f"{where} must be an object, got {type(raw).__name__}")
        return {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        if key not in fields:
            problems.append(f"{where}: unknown key {key!r}; known keys: {', '.join(fields)}")
            continue
        expected = _expected_types(fields[key].type)
        if value is not None and expected and not _is_instance(value, expected):
            names = " or ".join(_TYPES[t] for t in expected)
            problems.append(f"{where}.{key} must be {names}, got {value!r}")
            continue
        out[key] = float(value) if expected == (float,) and value is not None else value
    return out


def _expected_types(annotation: str) -> tuple[type, ...]:
    names = [a.strip() for a in str(annotation).split("|")]
    return tuple(t for t in _TYPES if t.__name__ in names or any(n.startswith(t.__name__ + "[") for n in names))


def _is_instance(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, int) and float in types:
        return True
    return isinstance(value, types)


def _resolve(base_dir: str, path: str | None) -> str | None:
    if path is None:
        return None
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def parse_config(data: dict, base_dir: str = ".") -> TrainConfig:
    """A TrainConfig from the parsed file; every problem found is raised together as one ConfigError."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(f"the configuration must be an object with model, tasks and training, got {data!r}")
    for key in data:
        if key not in ("model", "tasks", "training"):
            problems.append(f"unknown top-level key {key!r}; known keys: model, tasks, training")
    model = ModelSpec(**_fields(ModelSpec, "model", data.get("model", {}), problems))
    training = TrainingSpec(**_fields(TrainingSpec, "training", data.get("training", {}), problems))
    tasks = []
    raw_tasks = data.get("tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        problems.append("tasks must be a non-empty list of tasks")
        raw_tasks = []
    for i, raw in enumerate(raw_tasks):
        where = f"tasks[{i}]" + (f" ({raw['name']!r})" if isinstance(raw, dict) and "name" in raw else "")
        kwargs = _fields(TaskSpec, where, raw, problems)
        missing = [k for k in ("name", "kind", "train_file") if k not in kwargs]
        if missing:
            if not any(p.startswith(where) for p in problems):
                problems.append(f"{where} lacks {', '.join(missing)}")
            continue
        tasks.append(TaskSpec(**kwargs))

    base_dir = os.path.abspath(base_dir)
    _check_model(model, base_dir, problems)
    _check_training(training, base_dir, problems)
    names = [t.name for t in tasks]
    for t in tasks:
        _check_task(t, base_dir, problems)
        if names.count(t.name) > 1 and names.index(t.name) == tasks.index(t):
            problems.append(f"task name {t.name!r} is used {names.count(t.name)} times; task names must be unique")
    weights = [t.loss_weight for t in tasks]
    if tasks and all(isinstance(w, (int, float)) and w == 0 for w in weights):
        problems.append("every task has loss_weight 0: nothing would train (a task of weight 0 is held out of "
                        "training and only evaluated)")
    if problems:
        raise ConfigError(problems)
    return TrainConfig(model=model, tasks=tasks, training=training)


def _check_model(m: ModelSpec, base_dir: str, problems: list[str]) -> None:
    if (m.pretrained is None) == (m.config is None):
        problems.append("model needs exactly one of 'pretrained' (an HF model directory) and 'config' "
                        f"(one of {', '.join(NAMED_CONFIGS)}, a dict of encoder sizes, or a config.json path)")
    m.pretrained = _resolve(base_dir, m.pretrained)
    if m.pretrained is not None and not os.path.isfile(os.path.join(m.pretrained, "config.json")):
        problems.append(f"model.pretrained: {m.pretrained} is not a model directory (it has no config.json)")
    if isinstance(m.config, str) and m.config not in NAMED_CONFIGS:
        path = _resolve(base_dir, m.config)
        if not os.path.isfile(path):
            problems.append(f"model.config {m.config!r} is neither a named config ({', '.join(NAMED_CONFIGS)}) "
                            f"nor an existing config.json ({path})")
        m.config = path
    m.tokenizer = _resolve(base_dir, m.tokenizer) or m.pretrained
    if m.tokenizer is None and m.pretrained is None:
        problems.append("model.tokenizer is needed with model.config (a directory with tokenizer.json or vocab.txt)")
    elif m.tokenizer is not None and not os.path.isdir(m.tokenizer):
        problems.append(f"model.tokenizer: directory {m.tokenizer} does not exist")
    if m.max_length < 8:
        problems.append(f"model.max_length must be at least 8, got {m.max_length}")


def _check_training(t: TrainingSpec, base_dir: str, problems: list[str]) -> None:
    positive = ("batch_size", "grad_accum_steps", "log_every")
    for key in positive:
        if getattr(t, key) < 1:
            problems.append(f"training.{key} must be at least 1, got {getattr(t, key)}")
    for key in ("eval_batch_size", "max_steps", "eval_every", "checkpoint_every", "keep_checkpoints"):
        value = getattr(t, key)
        if value is not None and value < 1:
            problems.append(f"training.{key} must be at least 1 (or absent), got {value}")
    if t.max_steps is None and t.epochs is None:
        problems.append("training needs max_steps or epochs")
    if t.max_steps is not None and t.epochs is not None:
        problems.append("training takes max_steps or epochs, not both")
    # JSON's parser takes NaN and Infinity: every number must be finite, and NaN fails every comparison below
    if t.epochs is not None and not (math.isfinite(t.epochs) and t.epochs > 0):
        problems.append(f"training.epochs must be a finite number > 0, got {t.epochs}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        problems.append(f"training.lr must be a finite number > 0, got {t.lr}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        problems.append(f"training.weight_decay must be a finite number >= 0, got {t.weight_decay}")
    if t.max_grad_norm is not None and not (math.isfinite(t.max_grad_norm) and t.max_grad_norm > 0):
        problems.append(f"training.max_grad_norm must be a finite number > 0 (or null for no clipping), got "
                        f"{t.max_grad_norm}: 0 would zero every gradient and a negative one reverse them")
    if not 0.0 <= t.warmup_ratio < 1.0:
        problems.append(f"training.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if t.warmup_steps is not None:
        if t.warmup_steps < 0:
            problems.append(f"training.warmup_steps must be >= 0, got {t.warmup_steps}")
        if t.warmup_ratio:
            problems.append("training takes warmup_steps or warmup_ratio, not both")
    if not 0.0 <= t.eval_split < 1.0:
        problems.append(f"training.eval_split must be in [0, 1), got {t.eval_split}")
    if t.sampler not in SAMPLERS:
        problems.append(f"training.sampler {t.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
    if not (math.isfinite(t.temperature) and t.temperature > 0):
        problems.append(f"training.temperature must be a finite number > 0, got {t.temperature}")
    if t.device not in ("auto", "cpu", "cuda") and not t.device.startswith("cuda:"):
        problems.append(f"training.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.checkpoint_every is not None and t.checkpoint_dir is None:
        problems.append("training.checkpoint_every needs training.checkpoint_dir")
    if t.resume_from not in (None, "latest"):
        t.resume_from = _resolve(base_dir, t.resume_from)
    if t.resume_from == "latest" and t.checkpoint_dir is None:
        problems.append("training.resume_from 'latest' needs training.checkpoint_dir")
    t.checkpoint_dir = _resolve(base_dir, t.checkpoint_dir)
    t.output_dir = _resolve(base_dir, t.output_dir)


def _check_task(t: TaskSpec, base_dir: str, problems: list[str]) -> None:
    where = f"task {t.name!r}"
    if not t.name or not t.name.replace("_", "").replace("-", "").isalnum():
        problems.append(f"{where}: a task name must be letters, digits, '_' or '-'")
    elif hasattr(nn.ModuleDict(), t.name):
        problems.append(f"{where}: the name of an nn.ModuleDict attribute, which the model's heads are kept in; "
                        "choose another name")
    if t.kind not in KINDS:
        problems.append(f"{where}: unknown kind {t.kind!r}; known kinds: {', '.join(KINDS)}")
        return
    required, optional = KINDS[t.kind]
    for role, column in t.columns.items():
        if not isinstance(column, str) or not column:
            problems.append(f"{where}: columns[{role!r}] must name a column (a non-empty string), got {column!r}")
        if role not in required + optional:
            problems.append(f"{where}: columns names the role {role!r}, which a {t.kind} task does not use; "
                            f"its roles: {', '.join(required + optional)}")
    for key in ("train_file", "eval_file"):
        path = _resolve(base_dir, getattr(t, key))
        setattr(t, key, path)
        if path is None:
            continue
        if t.format is None and os.path.splitext(path)[1].lower() not in FORMATS:
            problems.append(f"{where}: cannot tell the format of {path} from its extension; "
                            f"set format to jsonl, csv or tsv")
        if os.path.isdir(path):
            problems.append(f"{where}: {key} {path} is a directory; name the file")
        elif not os.path.isfile(path):
            problems.append(f"{where}: {key} {path} does not exist")
    if t.format is not None and t.format not in ("jsonl", "csv", "tsv"):
        problems.append(f"{where}: format {t.format!r} is unknown; choose jsonl, csv or tsv")
    w = t.loss_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        problems.append(f"{where}: loss_weight must be a finite number >= 0, got {t.loss_weight}")
    if not 0.0 < t.mlm_probability < 1.0:
        problems.append(f"{where}: mlm_probability must be in (0, 1), got {t.mlm_probability}")
    if t.max_length is not None and t.max_length < 8:
        problems.append(f"{where}: max_length must be at least 8, got {t.max_length}")
    _check_labels(t, where, problems)


def _check_labels(t: TaskSpec, where: str, problems: list[str]) -> None:
    labelled = t.kind in ("sequence_classification", "token_classification", "next_sentence")
    if not labelled:
        if t.labels is not None or t.num_labels is not None:
            problems.append(f"{where}: a {t.kind} task takes no labels or num_labels")
        return
    if t.problem_type not in ("single_label_classification", "regression"):
        problems.append(f"{where}: problem_type must be single_label_classification or regression, "
                        f"got {t.problem_type!r}")
    if t.problem_type == "regression":
        if t.kind != "sequence_classification":
            problems.append(f"{where}: only sequence_classification takes problem_type regression")
        if t.labels is not None:
            problems.append(f"{where}: a regression task takes no label list")
        if t.num_labels not in (None, 1):
            problems.append(f"{where}: a regression task has num_labels 1, got {t.num_labels}")
        t.num_labels = 1
        return
    if t.kind == "next_sentence":
        t.labels = [0, 1] if t.labels is None else t.labels
        if len(t.labels) != 2:
            problems.append(f"{where}: next_sentence labels are two values, 'B follows A' first; got {t.labels}")
        t.num_labels = 2
        return
    if t.labels is not None:
        if not t.labels or len({json.dumps(v) for v in t.labels}) != len(t.labels):
            problems.append(f"{where}: labels must be a non-empty list of distinct values, got {t.labels}")
        if t.num_labels is not None and t.num_labels != len(t.labels):
            problems.append(f"{where}: num_labels {t.num_labels} disagrees with the {len(t.labels)} labels given")
        t.num_labels = len(t.labels)
    elif t.num_labels is None or t.num_labels < 2:
        problems.append(f"{where}: give the label list (labels: [...]) or num_labels >= 2 for integer labels")


def load_config(path: str | os.PathLike | dict, base_dir: str | None = None) -> TrainConfig:
    """A TrainConfig from a .json / .yaml file (or an already parsed dict; relative paths then resolve against
    base_dir, default the working directory).  Raises ConfigError listing every problem found."""
    if isinstance(path, dict):
        return parse_config(path, base_dir or os.getcwd())
    path = os.fspath(path)
    return parse_config(read_config_file(path), base_dir or os.path.dirname(os.path.abspath(path)))
