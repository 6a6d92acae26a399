"""The encoder configuration: what BERT and RoBERTa configs use, and a clear refusal of anything else."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

FAMILIES = ("bert", "roberta")
# HF model_type -> family: XLM-RoBERTa and CamemBERT are RoBERTa's architecture with other vocabularies
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta"}
# HF hidden_act -> the `approximate` argument of the GELU ops
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


class UnsupportedModelError(ValueError):
    """The model uses a feature the fast encoder does not implement; the message names what is supported."""


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and options of a BERT-family encoder, as in an HF config.json.

    family "roberta" numbers positions from pad_token_id + 1 and skips padding tokens, as RoBERTa does.
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

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"model family {self.family!r} is not supported; supported: {FAMILIES}")
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        """From an HF config (its to_dict() or config.json); refuses features the encoder does not implement."""
        model_type = d.get("model_type", "bert")
        if model_type not in MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: BERT and RoBERTa ({', '.join(MODEL_TYPES)})"
            )
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
        kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
        return cls(family=MODEL_TYPES[model_type], **kwargs)

    @classmethod
    def from_hf(cls, hf_config) -> EncoderConfig:
        return cls.from_dict(hf_config.to_dict())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> EncoderConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = d.pop("family")
        return d
