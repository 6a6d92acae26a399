"""One encoder pass, many task heads: MultiTaskBert, its routing of batch rows to tasks, HF import/export and
its own safetensors + JSON checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from mtbert_fast.models.config import EncoderConfig
from mtbert_fast.models.encoder import FastBertModel, weights_dtype
from mtbert_fast.models.heads import HEAD_KINDS, Head, HeadInput
from mtbert_fast.models.hf_mapping import MissingWeightError, encoder_and_heads_from_hf, save_hf_task
from mtbert_fast.models.int8 import DEFAULT_SMOOTHING, check_model_dtype

CONFIG_NAME = "multitask_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "mtbert_fast.multitask"
FORMAT_VERSION = 1

TaskSpec = str | Sequence[str] | Sequence[str | Sequence[str] | None] | None


@dataclasses.dataclass
class MultiTaskOutput:
    """outputs: task -> {name: tensor} (each has `rows`, int64 [B_t], the batch rows it covers);
    losses: task -> scalar fp32, for the tasks given labels (NaN, as HF's, for a task whose labels in the batch are
    all ignored); loss: sum of loss_weights[task] * losses[task] (a task of weight 0 adds a zero, even where its loss
    is NaN, that keeps the graph for backward), None when no task had labels."""

    outputs: dict[str, dict[str, torch.Tensor]]
    losses: dict[str, torch.Tensor]
    loss: torch.Tensor | None


class MultiTaskBert(nn.Module):
    """A FastBertModel and named task heads that all read one encoder pass.

    heads: task name -> Head (see mtbert_fast.models.heads); loss_weights: task -> weight of its loss in the
    total (default 1.0 each). Heads are moved to the encoder's device and dtype; masked-LM decoders are tied to
    the encoder's word embeddings.
    """

    def __init__(
        self, encoder: FastBertModel, heads: Mapping[str, Head], loss_weights: Mapping[str, float] | None = None
    ):
        super().__init__()
        if not heads:
            raise ValueError("a MultiTaskBert needs at least one head")
        config = encoder.config
        for task, head in heads.items():
            if not isinstance(task, str) or not task or "." in task:
                raise ValueError(f"task names must be non-empty strings without '.', got {task!r}")
            if hasattr(nn.ModuleDict(), task):
                raise ValueError(f"task name {task!r} is the name of an nn.ModuleDict attribute, which the heads are "
                                 "kept in: choose another name")
            if not isinstance(head, Head):
                raise TypeError(f"head for task {task!r} is a {type(head).__name__}, not a mtbert_fast Head")
            if head.hidden_size is not None and head.hidden_size != config.hidden_size:
                raise ValueError(f"head for task {task!r} expects hidden size {head.hidden_size}, "
                                 f"the encoder has {config.hidden_size}")
            if head.needs_pooler and encoder.pooler is None:
                raise ValueError(f"head for task {task!r} ({head.kind}) reads the pooler output, "
                                 "but the encoder has no pooler")
        unknown = set(loss_weights or {}) - set(heads)
        if unknown:
            raise ValueError(f"loss_weights name unknown tasks {sorted(unknown)}; known tasks: {', '.join(heads)}")
        weights = {task: (loss_weights or {}).get(task, 1.0) for task in heads}
        for task, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"loss_weights[{task!r}] must be a finite number >= 0, got {w!r}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.heads.to(device=encoder.device, dtype=encoder.dtype)
        self.loss_weights = {task: float(w) for task, w in weights.items()}
        self.tie_weights()

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def tie_weights(self) -> None:
        """(Re-)share the encoder's word embeddings with every tied head decoder."""
        for head in self.heads.values():
            head.tie_weights(self.encoder.embeddings.word_embeddings.weight)

    def tied_keys(self) -> list[str]:
        """state_dict keys that are the encoder's word embeddings under another name (saved once)."""
        return [f"heads.{task}.{name}" for task, head in self.heads.items() for name in head.tied_parameters()]

    # --- forward ---------------------------------------------------------------------------------------------

    def _unknown(self, what: str, task: Any) -> ValueError:
        return ValueError(f"unknown task {task!r}{what}; known tasks: {', '.join(self.heads)}")

    def route(self, tasks: TaskSpec, batch: int, device: torch.device) -> dict[str, torch.Tensor | None]:
        """Which rows run which task: task -> int64 [B_t] batch rows, or None for the whole batch.

        tasks: None = every head on every row; a task name, or a tuple/set of names (or a list whose length is not
        the batch size) = those tasks on every row; a list of length `batch` = per row, each entry a task name,
        a collection of names, or None (the row runs nothing). To run several tasks on the whole batch when
        their count equals the batch size, pass a tuple.
        """
        def check(name: Any) -> str:
            if not isinstance(name, str) or name not in self.heads:
                raise self._unknown("", name)
            return name

        if tasks is None:
            return {task: None for task in self.heads}
        if isinstance(tasks, str):
            return {check(tasks): None}
        if isinstance(tasks, list) and len(tasks) == batch:
            rows: dict[str, list[int]] = {task: [] for task in self.heads}
            for i, entry in enumerate(tasks):
                names = () if entry is None else (entry,) if isinstance(entry, str) else entry
                if not isinstance(names, (Sequence, set, frozenset)):
                    raise TypeError(f"tasks[{i}] must be a task name, a collection of names or None, "
                                    f"got {type(entry).__name__}")
                for name in dict.fromkeys(names):
                    rows[check(name)].append(i)
            return {
                task: None if len(r) == batch else torch.tensor(r, dtype=torch.long, device=device)
                for task, r in rows.items() if r
            }
        if isinstance(tasks, (list, tuple, set, frozenset)):
            return {check(name): None for name in dict.fromkeys(tasks)}
        raise TypeError(f"tasks must be None, a task name, or a list/tuple of task names, got {type(tasks).__name__}")

    def _per_task(self, what: str, given: Any, routes: dict[str, torch.Tensor | None]) -> dict[str, Any]:
        if given is None:
            return {}
        if not isinstance(given, Mapping):
            raise TypeError(f"{what} must be a dict task -> {what}, got {type(given).__name__}")
        for task in given:
            if task not in self.heads:
                raise self._unknown(f" in {what}", task)
            if task not in routes:
                raise ValueError(f"{what} given for task {task!r}, which does not run on this batch "
                                 f"(running: {', '.join(routes) or 'none'})")
        return dict(given)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        tasks: TaskSpec = None,
        labels: Mapping[str, Any] | None = None,
        *,
        positions: Mapping[str, torch.Tensor] | None = None,
        mlm_logits: bool | None = None,
    ) -> MultiTaskOutput:
        """Run the encoder once and every requested head on its rows.

        input_ids, attention_mask, token_type_ids [B, L] as for the encoder; tasks: see `route`.
        labels: task -> labels for the B_t rows that run the task, in batch order:
          sequence_classification  int64 [B_t] (single_label, -100 ignored); float [B_t, C] (multi_label);
                                   float [B_t] if C == 1 else [B_t, C] (regression)
          token_classification     int64 [B_t, L], -100 at ignored tokens and at padding
          masked_lm                int64 [B_t, L], token ids at masked positions, -100 elsewhere and at padding
          next_sentence            int64 [B_t] in {0, 1}
          span_extraction          (start_positions [B_t], end_positions [B_t]) or a dict with those keys
          pretraining              (mlm_labels [B_t, L], next_sentence_labels [B_t]) or {"mlm": .., "nsp": ..}
          sentence_embedding       none (no loss)
        positions: masked-LM / pretraining task -> bool [B_t, L]: where to predict (logits only there).
        mlm_logits: whether masked-LM heads given labels also return logits at the labelled positions
          (default: in eval mode only; the loss never needs them).
        Every check runs once, before any compute: the encoder's on the inputs, routing's on the task names, each
        head's on its labels and positions.
        """
        device = self.encoder.device
        batch, seqlen = self.encoder.check_inputs(input_ids, attention_mask, token_type_ids)
        routes = self.route(tasks, batch, device)
        labels = self._per_task("labels", labels, routes)
        positions = self._per_task("positions", positions, routes)
        real = (torch.ones((batch, seqlen), dtype=torch.bool, device=device) if attention_mask is None
                else attention_mask.bool())
        checked_labels, checked_positions = {}, {}
        for task, rows in routes.items():
            head = self.heads[task]
            real_rows = real if rows is None else real[rows]
            if task in labels:
                checked_labels[task] = head.check_labels(task, _to(labels[task], device), real_rows)
            if task in positions:
                checked_positions[task] = head.check_positions(task, _to(positions[task], device), real_rows)
        if mlm_logits is None:
            mlm_logits = not self.training
        if not routes:
            return MultiTaskOutput({}, {}, None)

        encoded = self.encoder(input_ids, attention_mask, token_type_ids, inputs_checked=True)
        outputs, losses = {}, {}
        for task, rows in routes.items():
            out, loss = self.heads[task](HeadInput(encoded, rows), checked_labels.get(task),
                                         checked_positions.get(task), mlm_logits)
            out["rows"] = torch.arange(batch, device=device) if rows is None else rows
            outputs[task] = out
            if loss is not None:
                losses[task] = loss
        total = None
        for task, loss in losses.items():
            w = self.loss_weights[task]
            # weight 0: a zero that keeps the graph (a step on that task alone can still call backward), never NaN
            weighted = w * loss if w != 0.0 else torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
            total = weighted if total is None else total + weighted
        return MultiTaskOutput(outputs, losses, total)

    def quantize(self, calibration=None, *, smoothing: float = DEFAULT_SMOOTHING) -> MultiTaskBert:
        """int8 inference for the shared encoder (FastBertModel.quantize); the heads stay in the float dtype and
        read the int8 encoder's output. Returns the model; `dequantize` undoes it."""
        self.encoder.quantize(calibration, smoothing=smoothing)
        return self

    def dequantize(self) -> MultiTaskBert:
        self.encoder.dequantize()
        return self

    # --- Hugging Face import / export --------------------------------------------------------------------------

    @classmethod
    def from_hf_heads(
        cls,
        models: Mapping[str, nn.Module],
        loss_weights: Mapping[str, float] | None = None,
        *,
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> MultiTaskBert:
        """One model from HF Bert*/Roberta* task models (For SequenceClassification, TokenClassification, MaskedLM,
        NextSentencePrediction, QuestionAnswering; ForPreTraining gives one `pretraining` task with both heads).

        Their encoders must be identical: equal config and every encoder weight equal (else a ValueError names the
        first differing one). Models built without a pooler (MaskedLM, TokenClassification, QA) share all the
        other weights; the pooler comes from the models that have one, which must agree among themselves.
        """
        encoder, heads = encoder_and_heads_from_hf(models, dtype=dtype, backend=backend)
        return cls(encoder, heads, loss_weights).eval()

    def export_hf(self, task: str, path: str | os.PathLike) -> None:
        """Save one task as an ordinary transformers checkpoint (e.g. BertForSequenceClassification; a
        sentence-embedding task as a plain BertModel/RobertaModel) that `from_pretrained` loads."""
        if task not in self.heads:
            raise self._unknown("", task)
        save_hf_task(self.encoder, self.heads[task], path)

    # --- own checkpoint --------------------------------------------------------------------------------------

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """model.safetensors (tied decoders saved once, as the word embeddings) and multitask_config.json. The float
        weights only: a quantized model is saved as the float model it was made from (with a warning)."""
        from safetensors.torch import save_file

        if self.encoder.int8 is not None:
            warnings.warn("this model runs int8, and its checkpoint holds the float weights it was quantized from: "
                          "load it with MultiTaskBert.from_pretrained(path, dtype=torch.qint8, calibration=...) to run "
                          "int8 again", stacklevel=2)
        os.makedirs(path, exist_ok=True)
        tied = set(self.tied_keys())
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in tied}
        save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.config.to_dict(),
            "encoder_pooler": self.encoder.pooler is not None,
            "tasks": {task: {"kind": head.kind, "config": head.config()} for task, head in self.heads.items()},
            "loss_weights": self.loss_weights,
        }
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=False)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        calibration=None,
    ) -> MultiTaskBert:
        """From a directory written by save_pretrained; reads JSON and safetensors only (never unpickles).
        dtype=torch.qint8: int8 inference for the encoder with float32 activations (see `quantize`, which reads
        `calibration`)."""
        from safetensors.torch import load_file

        config_file, weights_file = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
        for f in (config_file, weights_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"no {os.path.basename(f)} in {path}: not a MultiTaskBert checkpoint")
        with open(config_file) as f:
            saved = json.load(f)
        if saved.get("format") != FORMAT or saved.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_file} is not a {FORMAT} v{FORMAT_VERSION} config (format "
                             f"{saved.get('format')!r}, version {saved.get('format_version')!r})")
        def field(section: Any, key: str, where: str) -> Any:
            if not isinstance(section, dict) or key not in section:
                raise ValueError(f"{config_file}: {where} lacks {key!r}")
            return section[key]

        encoder_config = EncoderConfig.from_dict(field(saved, "encoder", "the file"))
        with torch.device("meta"):
            encoder = FastBertModel(encoder_config, add_pooling_layer=field(saved, "encoder_pooler", "the file"),
                                    backend=backend)
            heads = {}
            for task, spec in field(saved, "tasks", "the file").items():
                kind, config = field(spec, "kind", f"task {task!r}"), field(spec, "config", f"task {task!r}")
                if kind not in HEAD_KINDS:
                    raise ValueError(f"task {task!r} has unknown head kind {kind!r}; known kinds: "
                                     f"{', '.join(HEAD_KINDS)}")
                try:
                    heads[task] = HEAD_KINDS[kind].from_config(config, encoder_config)
                except (TypeError, ValueError) as exc:  # a field missing, one the head does not take, a bad value
                    raise ValueError(f"{config_file}: the config of task {task!r} does not fit a {kind} head: "
                                     f"{exc}") from exc
            model = cls(encoder, heads, field(saved, "loss_weights", "the file"))

        state = load_file(weights_file)
        tied = set(model.tied_keys())
        expected = [k for k in model.state_dict() if k not in tied]
        missing = [k for k in expected if k not in state]
        if missing:
            owner = f"task {missing[0].split('.')[1]!r}" if missing[0].startswith("heads.") else "the encoder"
            raise MissingWeightError(f"{weights_file} lacks weight {missing[0]!r} (of {owner})")
        unexpected = sorted(set(state) - set(expected))
        if unexpected:
            raise ValueError(f"{weights_file} holds weights the model does not have: {', '.join(unexpected[:5])}")
        check_model_dtype(dtype)
        if dtype is None:  # one dtype for the model: the weights' own, mixed refused
            dtype = weights_dtype(state)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        if calibration is not None and dtype != torch.qint8:
            raise ValueError("calibration is read by int8 models only: pass dtype=torch.qint8 with it")
        if dtype == torch.qint8:
            return model.to(device=device, dtype=torch.float32).eval().quantize(calibration)
        return model.to(device=device, dtype=dtype).eval()


def _to(labels: Any, device: torch.device) -> Any:
    """Labels (a tensor, or a tuple/list/dict of them) on the model's device."""
    if isinstance(labels, torch.Tensor):
        return labels.to(device)
    if isinstance(labels, (tuple, list)):
        return type(labels)(_to(t, device) for t in labels)
    if isinstance(labels, Mapping):
        return {k: _to(v, device) for k, v in labels.items()}
    return labels
