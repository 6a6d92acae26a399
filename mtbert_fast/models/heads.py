"""Task heads of the multi-task model. Each reads the packed [T, H] encoder output of the rows of its task.

A head is an nn.Module with a `kind` (its name in saved configs), a JSON-able `config()`, a `check_labels` that
refuses bad labels before any compute, and a `forward(view, labels, positions, mlm_logits)` returning
(outputs dict, loss or None). Conversion to and from the heads of HF's `*For*` task models lives in hf_mapping.

Shapes: B_t rows run the task, L the padded length, T_t their real tokens, H hidden, C classes, V vocabulary.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtbert_fast.models.config import ACTIVATIONS, EncoderConfig
from mtbert_fast.models.encoder import EncoderOutput, PackedBatch
from mtbert_fast.ops import bias_gelu_layer_norm, gather_rows, mlm_gather_loss

IGNORE_INDEX = -100


class HeadInput:
    """The encoder output seen from one task: the rows `rows` (int64 [B_t]) of the batch, or all rows when None.

    Sub-batches are built lazily and only from index arithmetic on the packed layout, so a head run on some
    rows computes exactly what it would compute on a batch made of only those rows.
    """

    def __init__(self, encoder_output: EncoderOutput, rows: torch.Tensor | None = None):
        self.encoder_output = encoder_output
        self.rows = rows
        self._tokens: tuple[torch.Tensor, PackedBatch] | None = None

    @property
    def hidden(self) -> torch.Tensor:
        """The whole batch's packed hidden states [T, H]."""
        return self.encoder_output.packed_hidden_state

    @property
    def batch(self) -> int:
        return self.encoder_output.packed.batch if self.rows is None else self.rows.numel()

    @property
    def seqlen(self) -> int:
        return self.encoder_output.packed.seqlen

    def pooled(self) -> torch.Tensor:
        """The encoder's pooler output of the rows [B_t, H]."""
        pooled = self.encoder_output.pooler_output
        if pooled is None:
            raise RuntimeError("this head reads the pooler output, but the encoder has no pooler")
        return pooled if self.rows is None else gather_rows(pooled, self.rows)

    def first_tokens(self) -> torch.Tensor:
        """Hidden state of each row's first real token (CLS / <s>) [B_t, H]."""
        first = self.encoder_output.packed.first_token_rows
        return gather_rows(self.hidden, first if self.rows is None else first[self.rows])

    def mean_tokens(self) -> torch.Tensor:
        """Mean of each row's real tokens' hidden states [B_t, H] (summed in fp32)."""
        hidden, packed = self.tokens()
        lens = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).long()
        seq = torch.repeat_interleave(torch.arange(packed.batch, device=lens.device), lens, output_size=hidden.shape[0])
        sums = hidden.new_zeros((packed.batch, hidden.shape[1]), dtype=torch.float32)
        return (sums.index_add(0, seq, hidden.float()) / lens[:, None]).to(hidden.dtype)

    def tokens(self) -> tuple[torch.Tensor, PackedBatch]:
        """(packed hidden states of the rows' real tokens [T_t, H], their PackedBatch over [B_t, L])."""
        if self._tokens is None:
            self._tokens = self._select_tokens()
        return self._tokens

    def _select_tokens(self) -> tuple[torch.Tensor, PackedBatch]:
        packed = self.encoder_output.packed
        if self.rows is None:
            return self.hidden, packed
        cu = packed.cu_seqlens.long()
        lens = (cu[1:] - cu[:-1])[self.rows]
        total = int(lens.sum())
        sub_cu = F.pad(torch.cumsum(lens, 0), (1, 0))
        # token j of selected sequence s sits at packed row cu[rows[s]] + j = j_global - sub_cu[s] + cu[rows[s]]
        shift = torch.repeat_interleave(cu[:-1][self.rows] - sub_cu[:-1], lens, output_size=total)
        token_rows = torch.arange(total, device=cu.device) + shift
        seq = torch.repeat_interleave(torch.arange(self.batch, device=cu.device), lens, output_size=total)
        indices = seq * packed.seqlen + packed.indices[token_rows] % packed.seqlen
        sub = PackedBatch(indices, sub_cu.int(), int(lens.max()), self.batch, packed.seqlen)
        return gather_rows(self.hidden, token_rows), sub

    def real_mask(self) -> torch.Tensor:
        """bool [B_t, L]: True at real tokens."""
        _, packed = self.tokens()
        mask = torch.zeros(packed.batch * packed.seqlen, dtype=torch.bool, device=packed.indices.device)
        mask[packed.indices] = True
        return mask.view(packed.batch, packed.seqlen)

    def locate(self, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """where: bool [B_t, L], True only at real tokens -> (rows of `hidden` int64 [N], positions int64 [N, 2]).

        positions are (row within the task's rows, token index), in row-major order (the order of t[where])."""
        packed = self.encoder_output.packed
        positions = where.nonzero()
        seq = positions[:, 0] if self.rows is None else self.rows[positions[:, 0]]
        row_of = torch.full((packed.batch * packed.seqlen,), -1, dtype=torch.long, device=where.device)
        row_of[packed.indices] = torch.arange(packed.indices.numel(), device=where.device)
        return row_of[seq * packed.seqlen + positions[:, 1]], positions


# --- label checks: each names the task, what was expected and what came ----------------------------------------


def _describe(t: Any) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _tensor(task: str, what: str, t: Any, shape: tuple[int, ...], expected: str, kind: str) -> torch.Tensor:
    """t must be a tensor of `shape` whose dtype is of `kind` ("int": signed, so that the ignore index -100 is one;
    "float", "number", "bool")."""
    ok_dtype = isinstance(t, torch.Tensor) and {
        "int": t.dtype.is_signed and not (t.dtype.is_floating_point or t.dtype.is_complex),
        "float": t.dtype.is_floating_point,
        "number": not t.dtype.is_complex,
        "bool": t.dtype == torch.bool,
    }[kind]
    if not ok_dtype or tuple(t.shape) != shape:
        raise ValueError(f"{what} for task {task!r} must be {expected}, got {_describe(t)}")
    return t


def _check_classes(task: str, what: str, t: torch.Tensor, num: int, bound: str) -> torch.Tensor:
    """Integer labels in [0, num) or IGNORE_INDEX."""
    bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= num))
    if bool(bad.any()):
        value = int(t[bad][0])
        raise ValueError(f"{what} for task {task!r} holds {value}, out of range: {bound} is {num} "
                         f"(valid: 0..{num - 1}, or {IGNORE_INDEX} to ignore)")
    return t.long()


def _check_not_padding(task: str, what: str, marked: torch.Tensor, real: torch.Tensor) -> None:
    at_pad = marked & ~real
    if bool(at_pad.any()):
        row, col = (int(i) for i in at_pad.nonzero()[0])
        raise ValueError(f"{what} for task {task!r} marks padding position (row {row}, token {col}); "
                         f"set {IGNORE_INDEX} (or False) at padding")


def _check_dropout(name: str, p: float) -> float:
    """A dropout probability, checked when the head is built rather than at its first training step."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def _check_num_labels(num_labels: int) -> int:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
    return num_labels


def _bert_init(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialization of head layers: normal(0, std) matrices, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _id2label(mapping: dict | None) -> dict[int, str] | None:
    return None if mapping is None else {int(k): str(v) for k, v in mapping.items()}


class PredictionTransform(nn.Module):
    """ModernBERT's prediction head, which its task heads run before their classifier (and its masked-LM head before
    the decoder): LayerNorm(GELU(dense(x))), the dense and the LayerNorm each with or without a bias.

    activation: an HF GELU name (gelu = erf; gelu_new, gelu_pytorch_tanh = the tanh form).
    """

    def __init__(self, hidden: int, eps: float = 1e-5, activation: str = "gelu", dense_bias: bool = False,
                 norm_bias: bool = False):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.hidden, self.eps, self.activation = hidden, eps, activation
        self.dense = nn.Linear(hidden, hidden, bias=dense_bias)
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)

    def config(self) -> dict[str, Any]:
        return {"eps": self.eps, "activation": self.activation, "dense_bias": self.dense.bias is not None,
                "norm_bias": self.norm.bias is not None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x), approximate=ACTIVATIONS[self.activation]))


def _transform(hidden: int, config: dict[str, Any] | None) -> PredictionTransform | None:
    return None if config is None else PredictionTransform(hidden, **config)


def _transform_config(transform: PredictionTransform | None) -> dict[str, Any] | None:
    return None if transform is None else transform.config()


class Head(nn.Module):
    """Base of the task heads. Subclasses set `kind` and implement config, check_labels and forward."""

    kind: ClassVar[str]
    accepts_positions: ClassVar[bool] = False

    @property
    def needs_pooler(self) -> bool:
        return False

    @property
    def hidden_size(self) -> int | None:
        """The hidden size the head expects of the encoder, or None when any fits."""
        return None

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-able; `from_config` rebuilds the head from them."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict[str, Any], encoder_config: EncoderConfig) -> Head:
        return cls(**config)

    def check_labels(self, task: str, labels: Any, real: torch.Tensor) -> Any:
        """Validate labels for the task's rows (real: bool [B_t, L], True at real tokens); return them normalized."""
        raise ValueError(f"task {task!r} ({self.kind}) takes no labels")

    def check_positions(self, task: str, positions: Any, real: torch.Tensor) -> torch.Tensor:
        """Validate where to predict for the task's rows (bool [B_t, L]); heads that predict everywhere take none."""
        raise ValueError(f"task {task!r} ({self.kind}) takes no positions; only masked-LM heads do")

    def tie_weights(self, word_embeddings: nn.Parameter) -> None:
        """Share the encoder's word embeddings where the head's weights are tied to them."""

    def tied_parameters(self) -> tuple[str, ...]:
        """Names (relative to the head) of parameters that are the encoder's word embeddings."""
        return ()


class SequenceClassificationHead(Head):
    """One prediction per sequence: single-label, multi-label or regression, as BertForSequenceClassification.

    pooled=True (the default for the BERT head): dropout + linear on the encoder's pooler output.
    roberta_style=True: a dense head on the first token: dropout, dense, activation, dropout, out_proj; RoBERTa's
    with activation "tanh", ELECTRA's with "gelu" (erf); DistilBERT's is dense, "relu", dropout, out_proj
    (dropout_before_dense=False). dense_dropout, where given, is the rate of the dropout before the dense when it
    differs from the one after it (DeBERTa's ContextPooler: pooler_dropout before, cls_dropout after).
    pooled=False without roberta_style: dropout + linear on the first token's hidden state.
    transform (a PredictionTransform's config): ModernBERT's head, transform, dropout and linear on the first token
    or, with mean_pooled, on the mean of the real tokens.
    Outputs: logits [B_t, C]. Labels: int [B_t] in [0, C) or -100 (single_label); float [B_t, C] (multi_label);
    float [B_t] when C == 1, else [B_t, C] (regression).
    """

    kind = "sequence_classification"
    PROBLEM_TYPES = ("single_label", "multi_label", "regression")
    _HF_PROBLEM_TYPES = {"single_label_classification": "single_label", "multi_label_classification": "multi_label"}
    ACTIVATIONS = {"tanh": torch.tanh, "gelu": F.gelu, "relu": F.relu}

    def __init__(
        self,
        hidden: int,
        num_labels: int,
        problem_type: str = "single_label",
        pooled: bool | None = None,
        roberta_style: bool = False,
        dropout: float = 0.1,
        id2label: dict[int, str] | None = None,
        activation: str = "tanh",
        dropout_before_dense: bool = True,
        transform: dict[str, Any] | None = None,
        mean_pooled: bool = False,
        dense_dropout: float | None = None,
    ):
        super().__init__()
        problem_type = self._HF_PROBLEM_TYPES.get(problem_type, problem_type)
        _check_num_labels(num_labels)
        dropout = _check_dropout("dropout", dropout)
        if dense_dropout is not None:
            dense_dropout = _check_dropout("dense_dropout", dense_dropout)
            if not (roberta_style and dropout_before_dense):
                raise ValueError("dense_dropout is the dropout before a dense head's dense: it takes "
                                 "roberta_style=True and dropout_before_dense=True")
        if transform is not None and (roberta_style or pooled):
            raise ValueError("transform runs ModernBERT's head on the tokens: it takes neither roberta_style nor "
                             "pooled=True")
        if mean_pooled and pooled:
            raise ValueError("mean_pooled averages the tokens' hidden states: it takes no pooled=True")
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(self.ACTIVATIONS)}, got {activation!r}")
        if not roberta_style and (activation != "tanh" or not dropout_before_dense):
            raise ValueError("activation and dropout_before_dense shape the dense head: pass roberta_style=True")
        if problem_type not in self.PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {', '.join(self.PROBLEM_TYPES)}, got {problem_type!r}")
        if problem_type == "single_label" and num_labels == 1:
            raise ValueError("a single_label head with num_labels=1 has a cross-entropy of 0 whatever it predicts: "
                             "pass problem_type='regression' for one output (as HF does for num_labels=1), or "
                             "num_labels >= 2")
        if pooled and roberta_style:
            raise ValueError("roberta_style reads the first token through its own dense + tanh, not the pooler: "
                             "pass pooled=False (or leave it unset)")
        if id2label is not None and len(id2label) != num_labels:
            raise ValueError(f"id2label has {len(id2label)} entries for num_labels={num_labels}")
        self.hidden, self.num_labels, self.problem_type = hidden, num_labels, problem_type
        self.pooled = not (roberta_style or transform is not None or mean_pooled) if pooled is None else pooled
        self.mean_pooled = mean_pooled
        self.roberta_style, self.dropout, self.id2label = roberta_style, dropout, _id2label(id2label)
        self.activation, self.dropout_before_dense = activation, dropout_before_dense
        self.dense_dropout = dense_dropout
        if roberta_style:
            self.dense = nn.Linear(hidden, hidden)
            self.out_proj = nn.Linear(hidden, num_labels)
        else:
            self.classifier = nn.Linear(hidden, num_labels)
        self.transform = _transform(hidden, transform)
        _bert_init(self)

    @property
    def needs_pooler(self) -> bool:
        return self.pooled

    @property
    def hidden_size(self) -> int:
        return self.hidden

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden, "num_labels": self.num_labels, "problem_type": self.problem_type,
                "pooled": self.pooled, "roberta_style": self.roberta_style, "dropout": self.dropout,
                "id2label": None if self.id2label is None else {str(k): v for k, v in self.id2label.items()},
                "activation": self.activation, "dropout_before_dense": self.dropout_before_dense,
                "transform": _transform_config(self.transform), "mean_pooled": self.mean_pooled,
                "dense_dropout": self.dense_dropout}

    def check_labels(self, task, labels, real):
        b, c = real.shape[0], self.num_labels
        if self.problem_type == "single_label":
            t = _tensor(task, "labels", labels, (b,), f"integer class indices of shape ({b},)", "int")
            return _check_classes(task, "labels", t, c, "num_labels")
        if self.problem_type == "multi_label":
            t = _tensor(task, "labels", labels, (b, c), f"0/1 targets of shape ({b}, {c})", "number")
            bad = ~((t >= 0) & (t <= 1))  # NaN too
            if bool(bad.any()):
                row, col = (int(i) for i in bad.nonzero()[0])
                raise ValueError(f"labels for task {task!r} must be targets in [0, 1] (multi_label); row {row}, "
                                 f"label {col} holds {float(t[row, col])}")
            return t
        shapes = ((b,), (b, 1)) if c == 1 else ((b, c),)
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) and tuple(labels.shape) in shapes else shapes[0]
        return _tensor(task, "labels", labels, shape, f"float targets of shape {shapes[0]}", "float")

    def forward(self, view: HeadInput, labels=None, positions=None, mlm_logits=True):
        if self.pooled:
            x = view.pooled()
        else:
            x = view.mean_tokens() if self.mean_pooled else view.first_tokens()
        if self.transform is not None:
            x = self.transform(x)
        if self.dropout_before_dense:
            x = F.dropout(x, self.dropout if self.dense_dropout is None else self.dense_dropout, self.training)
        if self.roberta_style:
            x = F.dropout(self.ACTIVATIONS[self.activation](self.dense(x)), self.dropout, self.training)
            logits = self.out_proj(x)
        else:
            logits = self.classifier(x)
        loss = None
        if labels is not None:
            scores = logits.float()
            if self.problem_type == "single_label":
                loss = F.cross_entropy(scores, labels, ignore_index=IGNORE_INDEX)
            elif self.problem_type == "multi_label":
                loss = F.binary_cross_entropy_with_logits(scores, labels.float())
            elif self.num_labels == 1:
                loss = F.mse_loss(scores.squeeze(), labels.float().squeeze())
            else:
                loss = F.mse_loss(scores, labels.float())
        return {"logits": logits}, loss


class TokenClassificationHead(Head):
    """One prediction per token (NER, tagging), as BertForTokenClassification: dropout + linear on every real token
    (after ModernBERT's PredictionTransform where `transform` gives its config).

    Outputs: logits [B_t, L, C], zeros at padding. Labels: int [B_t, L] in [0, C) or -100, -100 at padding.
    """

    kind = "token_classification"

    def __init__(self, hidden: int, num_labels: int, dropout: float = 0.1, id2label: dict[int, str] | None = None,
                 transform: dict[str, Any] | None = None):
        super().__init__()
        _check_num_labels(num_labels)
        dropout = _check_dropout("dropout", dropout)
        if id2label is not None and len(id2label) != num_labels:
            raise ValueError(f"id2label has {len(id2label)} entries for num_labels={num_labels}")
        self.hidden, self.num_labels, self.dropout, self.id2label = hidden, num_labels, dropout, _id2label(id2label)
        self.classifier = nn.Linear(hidden, num_labels)
        self.transform = _transform(hidden, transform)
        _bert_init(self)

    @property
    def hidden_size(self) -> int:
        return self.hidden

    def config(self):
        return {"hidden": self.hidden, "num_labels": self.num_labels, "dropout": self.dropout,
                "id2label": None if self.id2label is None else {str(k): v for k, v in self.id2label.items()},
                "transform": _transform_config(self.transform)}

    def check_labels(self, task, labels, real):
        shape = tuple(real.shape)
        t = _tensor(task, "labels", labels, shape, f"integer labels of shape {shape}, -100 at padding", "int")
        _check_not_padding(task, "labels", t != IGNORE_INDEX, real)
        return _check_classes(task, "labels", t, self.num_labels, "num_labels")

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        hidden, packed = view.tokens()
        if self.transform is not None:
            hidden = self.transform(hidden)
        logits = self.classifier(F.dropout(hidden, self.dropout, self.training))  # [T_t, C]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float(), labels.reshape(-1)[packed.indices], ignore_index=IGNORE_INDEX)
        return {"logits": packed.pad(logits)}, loss


class MaskedLMHead(Head):
    """Masked-LM head computed only at the positions that need it, never at every token.

    transform = LayerNorm(GELU(dense(h))) (the fused bias_gelu_layer_norm), decoder = the encoder's word
    embeddings (the same Parameter, tied when added to a MultiTaskBert) plus a vocabulary bias.
    With labels (int [B_t, L]: token ids at masked positions, -100 elsewhere and at padding) the labelled rows are
    gathered first, transformed, and mlm_gather_loss gives the loss chunk by chunk. Logits [N, V] are returned
    at `positions` (bool [B_t, L]) when given, else at the labelled positions when `mlm_logits` is true; with
    them comes positions int64 [N, 2] = (row within the task's rows, token index). Without labels or positions
    nothing is predicted.

    approximate: the GELU form ("none" = erf, "tanh"); default the encoder's hidden_act (BERT's head uses
    hidden_act, RoBERTa's always the erf GELU). tied=False keeps a decoder weight of its own. dense_bias,
    norm_bias, decoder_bias: ModernBERT's head may have none of the three.
    """

    kind = "masked_lm"
    accepts_positions = True

    def __init__(self, config: EncoderConfig, approximate: str | None = None, tied: bool = True,
                 dense_bias: bool = True, norm_bias: bool = True, decoder_bias: bool = True):
        super().__init__()
        h, v = config.hidden_size, config.vocab_size
        self.hidden, self.vocab_size, self.eps = h, v, config.layer_norm_eps
        self.approximate = approximate or config.gelu_approximate
        self.tied = tied
        self.dense = nn.Linear(h, h, bias=dense_bias)
        self.layer_norm = nn.LayerNorm(h, eps=config.layer_norm_eps, bias=norm_bias)
        self.bias = nn.Parameter(torch.zeros(v)) if decoder_bias else None
        if tied:
            self.register_parameter("decoder_weight", None)
        else:
            self.decoder_weight = nn.Parameter(torch.empty(v, h))
            nn.init.normal_(self.decoder_weight, std=0.02)
        _bert_init(self)

    @property
    def hidden_size(self) -> int:
        return self.hidden

    def config(self):
        return {"approximate": self.approximate, "tied": self.tied, "dense_bias": self.dense.bias is not None,
                "norm_bias": self.layer_norm.bias is not None, "decoder_bias": self.bias is not None}

    @classmethod
    def from_config(cls, config, encoder_config):
        return cls(encoder_config, **config)

    def _zeros_for_missing(self, bias: torch.Tensor | None, n: int) -> torch.Tensor:
        """The fused kernels take a bias: zeros where the head has none (no parameter, no gradient)."""
        return bias if bias is not None else self.dense.weight.new_zeros(n)

    def tie_weights(self, word_embeddings):
        if self.tied:
            if tuple(word_embeddings.shape) != (self.vocab_size, self.hidden):
                raise ValueError(f"the MLM decoder is [{self.vocab_size}, {self.hidden}] but the word embeddings "
                                 f"are {list(word_embeddings.shape)}")
            self.decoder_weight = word_embeddings

    def tied_parameters(self):
        return ("decoder_weight",) if self.tied else ()

    def check_labels(self, task, labels, real):
        shape = tuple(real.shape)
        t = _tensor(task, "labels", labels, shape,
                    f"integer token ids of shape {shape}, -100 at unmasked tokens and padding", "int")
        _check_not_padding(task, "labels", t != IGNORE_INDEX, real)
        return _check_classes(task, "labels", t, self.vocab_size, "vocab_size")

    def check_positions(self, task, positions, real):
        shape = tuple(real.shape)
        t = _tensor(task, "positions", positions, shape, f"a bool mask of shape {shape}", "bool")
        _check_not_padding(task, "positions", t, real)
        return t

    def _decoder(self) -> torch.Tensor:
        if self.decoder_weight is None:
            raise RuntimeError("the MLM decoder is tied to the encoder's word embeddings: add the head to a "
                               "MultiTaskBert (or call tie_weights) before running it")
        return self.decoder_weight

    def transform(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """[N, H] -> LayerNorm(GELU(hidden_rows @ dense.T + dense.bias)) [N, H]."""
        x = F.linear(hidden_rows, self.dense.weight)
        h = self.hidden
        return bias_gelu_layer_norm(x, self._zeros_for_missing(self.dense.bias, h), self.layer_norm.weight,
                                    self._zeros_for_missing(self.layer_norm.bias, h), self.eps, self.approximate)

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        out, loss = {}, None
        weight = self._decoder()
        bias = self._zeros_for_missing(self.bias, self.vocab_size)
        if labels is not None:
            masked = labels != IGNORE_INDEX
            rows, where = view.locate(masked)
            transformed = self.transform(gather_rows(view.hidden, rows))
            loss = mlm_gather_loss(transformed, weight, bias, labels[masked])
            if positions is None and mlm_logits:
                out["logits"], out["positions"] = vocab_logits(transformed, weight, bias), where
        if positions is not None:
            rows, where = view.locate(positions)
            transformed = self.transform(gather_rows(view.hidden, rows))
            out["logits"], out["positions"] = vocab_logits(transformed, weight, bias), where
        return out, loss


class NextSentenceHead(Head):
    """BERT's next-sentence prediction: linear(H, 2) on the pooler output. Outputs logits [B_t, 2];
    labels int [B_t] in {0, 1} (0: B follows A) or -100."""

    kind = "next_sentence"

    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.seq_relationship = nn.Linear(hidden, 2)
        _bert_init(self)

    @property
    def needs_pooler(self) -> bool:
        return True

    @property
    def hidden_size(self) -> int:
        return self.hidden

    def config(self):
        return {"hidden": self.hidden}

    def check_labels(self, task, labels, real):
        b = real.shape[0]
        t = _tensor(task, "labels", labels, (b,), f"integer labels of shape ({b},)", "int")
        return _check_classes(task, "labels", t, 2, "the number of classes")

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        logits = self.seq_relationship(view.pooled())
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        return {"logits": logits}, loss


class SpanExtractionHead(Head):
    """Extractive QA, as BertForQuestionAnswering: linear(H, 2) on every real token; with `transform`, ModernBERT's
    PredictionTransform before it. `dropout` acts right before the linear (DistilBERT's qa_dropout, ModernBERT's
    classifier_dropout; BERT's QA head has none).

    Outputs start_logits, end_logits [B_t, L], the dtype's most negative value at padding (HF computes garbage
    there; a softmax or argmax over a row then ignores padding). Labels: (start_positions, end_positions) or
    {"start_positions": ..., "end_positions": ...}, int [B_t] each, at real tokens of the row. The loss is
    (CE(start) + CE(end)) / 2, normalized over real tokens only; HF's own loss also counts its padding logits,
    so the two agree exactly on unpadded rows.
    """

    kind = "span_extraction"

    def __init__(self, hidden: int, transform: dict[str, Any] | None = None, dropout: float = 0.0):
        super().__init__()
        self.hidden, self.dropout = hidden, _check_dropout("dropout", dropout)
        self.qa_outputs = nn.Linear(hidden, 2)
        self.transform = _transform(hidden, transform)
        _bert_init(self)

    @property
    def hidden_size(self) -> int:
        return self.hidden

    def config(self):
        return {"hidden": self.hidden, "transform": _transform_config(self.transform), "dropout": self.dropout}

    def check_labels(self, task, labels, real):
        b, seqlen = real.shape
        if isinstance(labels, dict):
            unknown = set(labels) - {"start_positions", "end_positions"}
            if unknown or len(labels) != 2:
                raise ValueError(f"labels for task {task!r} must have the keys start_positions and end_positions, "
                                 f"got {sorted(labels)}")
            labels = (labels["start_positions"], labels["end_positions"])
        if not isinstance(labels, (tuple, list)) or len(labels) != 2:
            raise ValueError(f"labels for task {task!r} must be (start_positions, end_positions), got "
                             f"{_describe(labels)}")
        out = []
        for name, t in zip(("start_positions", "end_positions"), labels):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == (b, 1):
                t = t.squeeze(-1)
            t = _tensor(task, name, t, (b,), f"integer token indices of shape ({b},)", "int").long()
            bad = (t < 0) | (t >= seqlen)
            if bool(bad.any()):
                raise ValueError(f"{name} for task {task!r} holds {int(t[bad][0])}, out of range: the sequence "
                                 f"length is {seqlen}")
            at_pad = ~real[torch.arange(b, device=t.device), t.to(real.device)]
            if bool(at_pad.any()):
                row = int(at_pad.nonzero()[0])
                raise ValueError(f"{name} for task {task!r} points at padding: row {row}, token {int(t[row])}")
            out.append(t)
        return tuple(out)

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        hidden, packed = view.tokens()
        if self.transform is not None:
            hidden = self.transform(hidden)
        logits = packed.pad(self.qa_outputs(F.dropout(hidden, self.dropout, self.training)))  # [B_t, L, 2]
        padding = ~view.real_mask()
        start, end = (s.squeeze(-1).masked_fill(padding, torch.finfo(s.dtype).min) for s in logits.split(1, -1))
        loss = None
        if labels is not None:
            loss = (F.cross_entropy(start.float(), labels[0]) + F.cross_entropy(end.float(), labels[1])) / 2
        return {"start_logits": start, "end_logits": end}, loss


class SentenceEmbeddingHead(Head):
    """A sentence vector per row, no weights: the first token's hidden state ("cls") or the mean over the real
    tokens ("mean"), L2-normalized when `normalize`. Outputs embeddings [B_t, H]. Takes no labels."""

    kind = "sentence_embedding"
    POOLINGS = ("cls", "mean")

    def __init__(self, pooling: str = "cls", normalize: bool = False):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(self.POOLINGS)}, got {pooling!r}")
        self.pooling, self.normalize = pooling, normalize

    def config(self):
        return {"pooling": self.pooling, "normalize": self.normalize}

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        emb = view.first_tokens() if self.pooling == "cls" else view.mean_tokens()
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return {"embeddings": emb}, None


class PreTrainingHead(Head):
    """BERT's pretraining pair in one task, as BertForPreTraining: a MaskedLMHead (`mlm`) and a NextSentenceHead
    (`nsp`). Labels: (mlm_labels [B_t, L], next_sentence_labels [B_t]) or {"mlm": ..., "nsp": ...}, both needed;
    the loss is their sum, with mlm_loss and nsp_loss in the outputs. Outputs prediction_logits [N, V] and
    positions [N, 2] (as MaskedLMHead), seq_relationship_logits [B_t, 2]."""

    kind = "pretraining"
    accepts_positions = True

    def __init__(self, config: EncoderConfig, approximate: str | None = None, tied: bool = True):
        super().__init__()
        self.mlm = MaskedLMHead(config, approximate, tied)
        self.nsp = NextSentenceHead(config.hidden_size)

    @property
    def needs_pooler(self) -> bool:
        return True

    @property
    def hidden_size(self) -> int:
        return self.mlm.hidden

    def config(self):
        return {"approximate": self.mlm.approximate, "tied": self.mlm.tied}

    @classmethod
    def from_config(cls, config, encoder_config):
        return cls(encoder_config, **config)

    def tie_weights(self, word_embeddings):
        self.mlm.tie_weights(word_embeddings)

    def tied_parameters(self):
        return tuple(f"mlm.{n}" for n in self.mlm.tied_parameters())

    def check_labels(self, task, labels, real):
        if isinstance(labels, dict) and set(labels) == {"mlm", "nsp"}:
            labels = (labels["mlm"], labels["nsp"])
        if not isinstance(labels, (tuple, list)) or len(labels) != 2:
            raise ValueError(f"labels for task {task!r} must be (mlm_labels, next_sentence_labels) or "
                             f"{{'mlm': ..., 'nsp': ...}}, got {_describe(labels)}")
        return self.mlm.check_labels(task, labels[0], real), self.nsp.check_labels(task, labels[1], real)

    def check_positions(self, task, positions, real):
        return self.mlm.check_positions(task, positions, real)

    def forward(self, view, labels=None, positions=None, mlm_logits=True):
        mlm_labels, nsp_labels = labels if labels is not None else (None, None)
        mlm_out, mlm_loss = self.mlm(view, mlm_labels, positions, mlm_logits)
        nsp_out, nsp_loss = self.nsp(view, nsp_labels)
        out = {"seq_relationship_logits": nsp_out["logits"]}
        if "logits" in mlm_out:
            out["prediction_logits"], out["positions"] = mlm_out["logits"], mlm_out["positions"]
        if labels is None:
            return out, None
        out["mlm_loss"], out["nsp_loss"] = mlm_loss, nsp_loss
        return out, mlm_loss + nsp_loss


def vocab_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The vocabulary projection of transformed rows: [N, H] -> logits [N, V]. Only ever called on gathered rows."""
    return F.linear(hidden, weight, bias)


HEAD_KINDS: dict[str, type[Head]] = {
    cls.kind: cls
    for cls in (SequenceClassificationHead, TokenClassificationHead, MaskedLMHead, NextSentenceHead,
                SpanExtractionHead, SentenceEmbeddingHead, PreTrainingHead)
}
