"""The encoder configuration: what BERT, RoBERTa, DistilBERT, ELECTRA, MPNet, ModernBERT and DeBERTa-v2/v3 configs use,
and a clear refusal of anything else."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

FAMILIES = ("bert", "roberta", "distilbert", "electra", "mpnet", "modernbert", "deberta")
# HF model_type -> family: XLM-RoBERTa and CamemBERT are RoBERTa's architecture with other vocabularies
MODEL_TYPES = {"bert": "bert", "roberta": "roberta", "xlm-roberta": "roberta", "camembert": "roberta",
               "distilbert": "distilbert", "electra": "electra", "mpnet": "mpnet", "modernbert": "modernbert",
               "deberta-v2": "deberta"}
# the families as people name them, in FAMILIES' order
FAMILY_NAMES = {"bert": "BERT", "roberta": "RoBERTa", "distilbert": "DistilBERT", "electra": "ELECTRA", "mpnet": "MPNet",
                "modernbert": "ModernBERT", "deberta": "DeBERTa-v2/v3"}
# families without token types
NO_TOKEN_TYPES = ("distilbert", "mpnet", "modernbert")
# DeBERTa's position terms: content-to-position and position-to-content
POS_ATT_TYPES = ("c2p", "p2c")
# ModernBERT's attention kinds per layer: the whole sequence, or a window of local_attention / 2 each side
LAYER_TYPES = ("full_attention", "sliding_attention")
# families whose position ids count from a padding id + 1, skipping padding tokens (fairseq's make_positions), and
# that id: RoBERTa's pad_token_id; MPNet's embeddings fix it at 1 whatever the config's pad_token_id
_POSITION_PADDING = {"roberta": None, "mpnet": 1}
# HF's MPNet buckets relative distances into this many buckets, a constant of its code: the config's
# relative_attention_num_buckets sizes the table only (rows past these are never read)
MPNET_BUCKETS = 32
# HF hidden_act -> the `approximate` argument of the GELU ops
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
# DistilBertConfig's own names for the fields (it has no token types and a fixed LayerNorm eps)
_DISTILBERT_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
                     "hidden_dim": "intermediate_size", "activation": "hidden_act", "dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob"}
_DISTILBERT_FIXED = {"type_vocab_size": 0, "layer_norm_eps": 1e-12}


def family_names(names: dict[str, str] | None = None) -> str:
    """"BERT, RoBERTa, ... and ModernBERT": the supported families, or `names` of them, for messages."""
    names = list((names or FAMILY_NAMES).values())
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


class UnsupportedModelError(ValueError):
    """The model uses a feature the fast encoder does not implement; the message names what is supported."""


# EncoderConfig's integer sizes and the least value each takes, its dropout rates, and which of them may be None
_SIZES = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 0, "num_attention_heads": 1, "intermediate_size": 1,
          "max_position_embeddings": 0, "type_vocab_size": 0, "embedding_size": 1}
_RATES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob")
_OPTIONAL = {"embedding_size", "embedding_dropout_prob"}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and options of a BERT-family encoder, as in an HF config.json.

    family "roberta" numbers positions from pad_token_id + 1 and skips padding tokens, as RoBERTa does; "distilbert"
    has no token types (type_vocab_size 0) and no dropout on the attention output; "electra" may embed in
    embedding_size dimensions and project to hidden_size (None: hidden_size, no projection); "mpnet" has no token
    types, numbers positions as RoBERTa does from the padding id 1, and adds a relative position bias to the
    attention scores, bucketed into relative_attention_num_buckets (None for every other family); "modernbert" is
    pre-norm, with rotary positions (theta rope_theta in full-attention layers, local_rope_theta in sliding ones),
    a GeGLU feed-forward, no token types and no position table, layer_types saying which layers attend within
    local_attention / 2 of each token, optional biases (norm_bias, attention_bias, mlp_bias) and a final norm;
    "deberta" (DeBERTa-v2 and v3) has disentangled attention where relative_attention is set: each layer adds the
    pos_att_type terms ("c2p": query . relative-position key, "p2c": key . relative-position query) over the
    relative_position_table rows of log-bucketed distances (position_buckets, max_relative_positions), with the
    table LayerNorm-ed where norm_rel_ebd and projected by the layer's own query/key linears where share_att_key;
    absolute positions are added to the embeddings only where position_biased_input. bos_token_id and eos_token_id:
    the ids a tokenizer puts first and last in a sequence, where the HF config names them (RoBERTa's, MPNet's and
    ModernBERT's do; BERT's do not); synthetic int8 calibration frames its rows with them.
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
    relative_attention_num_buckets: int | None = None
    layer_types: tuple[str, ...] | None = None
    local_attention: int | None = None
    rope_theta: float | None = None
    local_rope_theta: float | None = None
    norm_bias: bool = True
    attention_bias: bool = True
    mlp_bias: bool = True
    embedding_dropout_prob: float | None = None
    relative_attention: bool = False
    position_buckets: int = -1
    max_relative_positions: int = -1
    pos_att_type: tuple[str, ...] = ()
    share_att_key: bool = False
    position_biased_input: bool = True
    norm_rel_ebd: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UnsupportedModelError(f"model family {self.family!r} is not supported; supported: {FAMILIES}")
        self._check_sizes()
        if self.embedding_size is not None and self.family != "electra":
            raise ValueError(f"embedding_size is an ELECTRA option; a {self.family} model embeds in hidden_size")
        if self.family != "deberta" and (self.type_vocab_size == 0) != (self.family in NO_TOKEN_TYPES):
            raise ValueError(f"type_vocab_size={self.type_vocab_size}: only DistilBERT, MPNet and ModernBERT have no "
                             "token types (DeBERTa may have either)")
        buckets = self.relative_attention_num_buckets
        if (buckets is not None) != (self.family == "mpnet"):
            raise ValueError(f"relative_attention_num_buckets={buckets}: an MPNet option, which MPNet needs")
        if buckets is not None and buckets < MPNET_BUCKETS:
            raise ValueError(f"relative_attention_num_buckets must be >= {MPNET_BUCKETS}: HF's MPNet buckets the "
                             f"distances into {MPNET_BUCKETS} whatever the config says (the table's size only), so a "
                             f"smaller table cannot hold them; got {buckets}")
        self._check_modernbert()
        self._check_deberta()
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModelError(
                f"hidden_act={self.hidden_act!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    def _check_sizes(self) -> None:
        """Sizes are integers (at least 1 where a table or a product needs one row or feature), rates are in
        [0, 1] and layer_norm_eps is a number >= 0: a config.json written by hand is named here, not deep in a
        forward."""
        for name, least in _SIZES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not (_is_number(value) and isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name in _RATES:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not (_is_number(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        eps = self.layer_norm_eps
        if not (_is_number(eps) and eps >= 0.0):
            raise ValueError(f"layer_norm_eps must be a number >= 0, got {eps!r}")

    def _check_modernbert(self) -> None:
        modern = self.family == "modernbert"
        own = {"layer_types": self.layer_types, "local_attention": self.local_attention, "rope_theta": self.rope_theta,
               "local_rope_theta": self.local_rope_theta, "embedding_dropout_prob": self.embedding_dropout_prob}
        given = [k for k, v in own.items() if v is not None]
        if not modern:
            unbiased = [k for k in ("norm_bias", "attention_bias", "mlp_bias") if not getattr(self, k)]
            if given or unbiased:
                raise ValueError(f"{(given + unbiased)[0]} is a ModernBERT option; a {self.family} model has no use "
                                 "for it")
            return
        missing = [k for k in ("layer_types", "local_attention", "rope_theta", "local_rope_theta") if own[k] is None]
        if missing:
            raise ValueError(f"a modernbert config needs {', '.join(missing)}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, but num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"layer_types holds {unknown[0]!r}; supported: {', '.join(LAYER_TYPES)}")
        if self.local_attention < 0:
            raise ValueError(f"local_attention must be >= 0, got {self.local_attention}")
        if self.head_dim % 2:
            raise ValueError(f"rotary positions rotate pairs: head_dim {self.head_dim} must be even")

    def _check_deberta(self) -> None:
        own = {"relative_attention": False, "position_buckets": -1, "max_relative_positions": -1, "pos_att_type": (),
               "share_att_key": False, "position_biased_input": True, "norm_rel_ebd": False}
        if self.family != "deberta":
            changed = next((k for k, v in own.items() if getattr(self, k) != v), None)
            if changed is not None:
                raise ValueError(f"{changed} is a DeBERTa option; a {self.family} model has no use for it")
            return
        unknown = sorted(set(self.pos_att_type) - set(POS_ATT_TYPES))
        if unknown:
            raise UnsupportedModelError(f"pos_att_type holds {unknown[0]!r}; supported: {', '.join(POS_ATT_TYPES)}")

    @property
    def relative_positions(self) -> bool:
        """Attention depends on the distance between tokens beyond their embeddings (MPNet's bias, ModernBERT's
        window, DeBERTa's position terms), measured over the padded row."""
        return self.relative_attention_num_buckets is not None or self.family == "modernbert" or self.disentangled

    @property
    def int8_reason(self) -> str | None:
        """Why int8 inference cannot run this encoder, or None: its int8 layers are post-norm (BERT-style) and have
        no position terms in attention."""
        if not (self.pre_norm or self.disentangled):
            return None
        what = "post-norm (BERT-style) layers" if self.pre_norm else "no disentangled attention"
        return f"int8 inference runs {what}; a {self.family} encoder runs in float32 or bfloat16"

    @property
    def disentangled(self) -> bool:
        """DeBERTa's relative position terms are added to the attention scores."""
        return self.relative_attention and bool(self.pos_att_type)

    @property
    def attention_span(self) -> int:
        """DeBERTa's S: the relative-position table has 2S rows; bucketed distances index them from S."""
        if self.position_buckets > 0:
            return self.position_buckets
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def attention_scale(self) -> float:
        """Every score term's scale: 1 / sqrt(head_dim), over sqrt(1 + the number of DeBERTa's position terms)."""
        return 1.0 / math.sqrt(self.head_dim * (1 + len(set(self.pos_att_type) & set(POS_ATT_TYPES))))

    @property
    def window(self) -> int:
        """ModernBERT's sliding layers: each token attends to the keys within this distance (local_attention // 2,
        both ends included, as HF's sliding-window mask)."""
        return self.local_attention // 2

    @property
    def pre_norm(self) -> bool:
        """LayerNorm before attention and feed-forward, the residual added after (ModernBERT); else after (BERT)."""
        return self.family == "modernbert"

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
    def word_padding_idx(self) -> int | None:
        """The word embedding row HF builds as padding_idx, which no gradient reaches: pad_token_id (MPNet's
        embeddings fix it at 1)."""
        return 1 if self.family == "mpnet" else self.pad_token_id

    @property
    def position_padding_idx(self) -> int | None:
        """The padding id positions count from (RoBERTa, MPNet), or None where positions count from 0."""
        if self.family not in _POSITION_PADDING:
            return None
        fixed = _POSITION_PADDING[self.family]
        return self.pad_token_id if fixed is None else fixed

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
                f"model_type {model_type!r} is not supported; supported: {family_names()} ({', '.join(MODEL_TYPES)})"
            )
        family = MODEL_TYPES[model_type]
        if family == "distilbert":
            if d.get("activation", "gelu") not in ACTIVATIONS:
                raise UnsupportedModelError(f"activation={d['activation']!r} is not supported; supported: "
                                            f"{', '.join(ACTIVATIONS)}")
            d = {**{ours: d[theirs] for theirs, ours in _DISTILBERT_NAMES.items() if theirs in d},
                 **{k: v for k, v in d.items() if k in ("vocab_size", "max_position_embeddings", "pad_token_id")},
                 **_DISTILBERT_FIXED}
        if family == "mpnet":
            d = {**d, "type_vocab_size": 0, "relative_attention_num_buckets": d.get("relative_attention_num_buckets", 32)}
        if family == "modernbert":
            d = _modernbert_fields(d)
        if family == "deberta":
            d = _deberta_fields(d)
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
        if family != "mpnet":
            fields.discard("relative_attention_num_buckets")
        if family != "modernbert":
            fields -= set(_MODERNBERT_FIELDS)
        if family != "deberta":
            fields -= set(_DEBERTA_FIELDS)
        kwargs = {k: d[k] for k in fields if k in d and d[k] is not None}
        for key in _FRAME_FIELDS:  # one id each, or none (a config may list several end ids)
            value = kwargs.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                del kwargs[key]
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
        for key in _FRAME_FIELDS:
            if d[key] is None:
                del d[key]
        del d["embedding_size"]
        if self.family == "mpnet":
            del d["type_vocab_size"]
        else:
            del d["relative_attention_num_buckets"]
        if self.family == "modernbert":
            return _modernbert_dict(self, d)
        for key in _MODERNBERT_FIELDS:
            del d[key]
        if self.family == "deberta":
            d["model_type"] = "deberta-v2"
            d["pos_att_type"] = list(self.pos_att_type)
            d["norm_rel_ebd"] = "layer_norm" if self.norm_rel_ebd else "none"
        else:
            for key in _DEBERTA_FIELDS:
                del d[key]
        if self.family == "electra":
            d["embedding_size"] = self.embedding_width
        if self.family == "distilbert":
            for theirs, ours in _DISTILBERT_NAMES.items():
                d[theirs] = d.pop(ours)
            for key in _DISTILBERT_FIXED:
                del d[key]
        return d


# the ids of a sequence's first and last tokens, kept where the HF config names them
_FRAME_FIELDS = ("bos_token_id", "eos_token_id")
_MODERNBERT_FIELDS = ("layer_types", "local_attention", "rope_theta", "local_rope_theta", "norm_bias", "attention_bias",
                      "mlp_bias", "embedding_dropout_prob")
# ModernBertConfig's names for the fields that BERT names otherwise
_MODERNBERT_NAMES = {"hidden_activation": "hidden_act", "norm_eps": "layer_norm_eps", "mlp_dropout": "hidden_dropout_prob",
                     "attention_dropout": "attention_probs_dropout_prob", "embedding_dropout": "embedding_dropout_prob"}


def _modernbert_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A ModernBertConfig dict (its to_dict(), or a config.json of either format: rope_parameters, or the older
    global_rope_theta / local_rope_theta / global_attn_every_n_layers) in EncoderConfig's names."""
    rope = d.get("rope_parameters") or {}
    for kind in LAYER_TYPES:
        rope_type = (rope.get(kind) or {}).get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(f"rope_parameters[{kind!r}] has rope_type={rope_type!r}: only the default "
                                        "rotary embedding is supported")
    layers = d.get("num_hidden_layers", 22)
    every = d.get("global_attn_every_n_layers", 3)
    layer_types = d.get("layer_types") or [LAYER_TYPES[bool(i % every)] for i in range(layers)]
    out = {k: d[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                             "intermediate_size", "max_position_embeddings", "pad_token_id", "norm_bias",
                             "attention_bias", "mlp_bias", "local_attention", *_FRAME_FIELDS) if k in d}
    out.update({ours: d[theirs] for theirs, ours in _MODERNBERT_NAMES.items() if theirs in d})
    out.update(type_vocab_size=0, layer_types=tuple(layer_types), local_attention=d.get("local_attention", 128),
               rope_theta=float((rope.get("full_attention") or {}).get("rope_theta", d.get("global_rope_theta",
                                                                                            160000.0))),
               local_rope_theta=float((rope.get("sliding_attention") or {}).get("rope_theta",
                                                                                d.get("local_rope_theta", 10000.0))))
    out.setdefault("hidden_act", "gelu")
    out.setdefault("layer_norm_eps", 1e-5)
    for bias in ("norm_bias", "attention_bias", "mlp_bias"):
        out.setdefault(bias, False)
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "embedding_dropout_prob"):
        out.setdefault(key, 0.0)
    return out


def _modernbert_dict(config: EncoderConfig, d: dict[str, Any]) -> dict[str, Any]:
    """EncoderConfig's asdict() of a ModernBERT encoder -> ModernBertConfig's fields."""
    for theirs, ours in _MODERNBERT_NAMES.items():
        d[theirs] = d.pop(ours)
    del d["type_vocab_size"]
    d["layer_types"] = list(config.layer_types)
    d["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": d.pop("rope_theta")},
                            "sliding_attention": {"rope_type": "default", "rope_theta": d.pop("local_rope_theta")}}
    return d


_DEBERTA_FIELDS = ("relative_attention", "position_buckets", "max_relative_positions", "pos_att_type", "share_att_key",
                   "position_biased_input", "norm_rel_ebd")


def _deberta_fields(d: dict[str, Any]) -> dict[str, Any]:
    """A DebertaV2Config dict in EncoderConfig's names; refuses what the encoder does not run."""
    if d.get("conv_kernel_size", 0) > 0:
        raise UnsupportedModelError(f"conv_kernel_size={d['conv_kernel_size']}: DeBERTa's convolution layer (the "
                                    "v2-xlarge/xxlarge models) is not supported")
    embedding_size = d.get("embedding_size")
    if embedding_size is not None and embedding_size != d.get("hidden_size", 768):
        raise UnsupportedModelError(f"embedding_size={embedding_size}: a DeBERTa embedding projection is not supported "
                                    "(embedding_size must equal hidden_size)")
    if d.get("z_steps", 0) > 1:
        raise UnsupportedModelError(f"z_steps={d['z_steps']} is not supported")
    heads = d.get("num_attention_heads", 12)
    head_size = d.get("attention_head_size")
    if head_size is not None and head_size * heads != d.get("hidden_size", 768):
        raise UnsupportedModelError(f"attention_head_size={head_size}: heads of another width than hidden_size / "
                                    "num_attention_heads are not supported")
    pos_att_type = d.get("pos_att_type") or ()
    if isinstance(pos_att_type, str):
        pos_att_type = [x.strip() for x in pos_att_type.lower().split("|")]
    norm = [x.strip() for x in str(d.get("norm_rel_ebd") or "none").lower().split("|")]
    if set(norm) - {"none", "layer_norm"}:
        raise UnsupportedModelError(f"norm_rel_ebd={d['norm_rel_ebd']!r}: only layer_norm or none is supported")
    if d.get("pooler_hidden_size", d.get("hidden_size")) != d.get("hidden_size"):
        raise UnsupportedModelError(f"pooler_hidden_size={d['pooler_hidden_size']}: a pooler of another width than "
                                    "hidden_size is not supported")
    return {**d, "pos_att_type": tuple(pos_att_type), "norm_rel_ebd": "layer_norm" in norm,
            "relative_attention": bool(d.get("relative_attention", False)),
            "position_buckets": d.get("position_buckets", -1), "max_relative_positions": d.get("max_relative_positions", -1),
            "share_att_key": bool(d.get("share_att_key", False)),
            "position_biased_input": bool(d.get("position_biased_input", True)), "embedding_size": None}
