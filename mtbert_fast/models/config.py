"""The encoder configuration: what BERT, RoBERTa, DistilBERT and ELECTRA configs use, and a clear refusal of
anything else."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("bert", "roberta", "distilbert", "electra")
# HF model_type -> family: XLM-RoBERTa and CamemBERT are RoBERTa's architecture with other vocabularies
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
               "distilbert": "distilbert", "electra": "electra"}
# HF hidden_act -> the `approximate` argument of the GELU ops
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# DistilBertConfig's own names for the fields (it has no token types and a fixed LayerNorm eps)
_DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob"}
_DISTILBERT_FIXED = {"type_vocab_size": 0, "layer_norm_eps": 1e-12}


class UnsupportedModelError(ValueError):
    """The model uses a feature the fast encoder does not implement; the message names what is supported."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and options of a BERT-family encoder, as in an HF config.json.

    family "roberta" numbers positions from pad_token_id + 1 and skips padding tokens, as RoBERTa does; "distilbert"
    has no token types (type_vocab_size 0) and no dropout on the attention output; "electra" may embed in
    embedding_size dimensions and project to hidden_size (None: hidden_size, no projection).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    family: str = "bert"
    embedding_size: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"model family {self.family!r} is not supported; supported: {FAMILIES}")
        if self.embedding_size is not None and self.family != "electra":
            raise ValueError(f"embedding_size is an ELECTRA option; a {self.family} model embeds in hidden_size")
        if (self.type_vocab_size == 0) != (self.family == "distilbert"):
            raise ValueError(f"type_vocab_size={self.type_vocab_size}: DistilBERT alone has no token types")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        return ACTIVATIONS[self.hidden_act]

    @property
    def embedding_width(self) -> int:
        """Width of the embedding table and its LayerNorm (ELECTRA's embedding_size, else hidden_size)."""
        return self.embedding_size or self.hidden_size

    @property
    def attn_out_dropout_prob(self) -> float:
        """Dropout on the attention output before its residual: DistilBERT has none there."""
        return 0.0 if self.family == "distilbert" else self.hidden_dropout_prob

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """From an HF config (its to_dict() or config.json); refuses features the encoder does not implement."""
        model_type = d.get("model_type", "bert")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: BERT, RoBERTa, DistilBERT and ELECTRA "
                f"({', '.join(MODEL_TYPES)})"
            )
        family = MODEL_TYPES[model_type]
        if family == "distilbert":
            if d.get("activation", "gelu") not in ACTIVATIONS:
                raise UnsupportedModelError(f"activation={d['activation']!r} is not supported; supported: "
                                            f"{', '.join(ACTIVATIONS)}")
            d = {**{ours: d[theirs] for theirs, ours in _DISTILBERT_NAMES.items() if theirs in d},
                 **{k: v for k, v in d.items() if k in ("vocab_size", "max_position_embeddings", "pad_token_id")},
                 **_DISTILBERT_FIXED}
        refusals = {
            "position_embedding_type": ("absolute", "only absolute position embeddings are supported"),
            "is_decoder": (False, "decoders (causal attention) are not supported: the encoder is bidirectional"),
            "add_cross_attention": (False, "cross-attention is not supported"),
        }
        for key, (ok, why) in refusals.items():
            value = d.get(key, ok)
            if value != ok:
                raise UnsupportedModelError(f"{key}={value!r}: {why}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"family"}
        if family != "electra":
            fields.discard("embedding_size")
        kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
        if kwargs.get("embedding_size") == kwargs.get("hidden_size", cls.hidden_size):
            del kwargs["embedding_size"]  # no projection
        return cls(family=family, **kwargs)

    @classmethod
    def from_hf(cls, hf_config) -> EncoderConfig:
        return cls.from_dict(hf_config.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EncoderConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """As an HF config.json of the family holds it (DistilBERT under its own names); from_dict reads it back."""
        d = dataclasses.asdict(self)
        d["model_type"] = d.pop("family")
        del d["embedding_size"]
        if self.family == "electra":
            d["embedding_size"] = self.embedding_width
        if self.family == "distilbert":
            for theirs, ours in _DISTILBERT_NAMES.items():
                d[theirs] = d.pop(ours)
            for key in _DISTILBERT_FIXED:
                del d[key]
        return d
