"""Hugging Face <-> mtbert_fast: HF BERT/RoBERTa/DistilBERT/ELECTRA/MPNet/ModernBERT/DeBERTa-v2 state_dict <-> FastBertModel state_dict,
safetensors reading (never unpickling), the task heads <-> the heads of HF's *For* task models, and a MultiTaskBert's
encoder and heads from HF task models or one task of it as a transformers checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from mtbert_fast.models.config import ACTIVATIONS, EncoderConfig, UnsupportedModelError, family_names
from mtbert_fast.models.encoder import FastBertModel
from mtbert_fast.models.heads import (
    Head,
    MaskedLMHead,
    NextSentenceHead,
    PredictionTransform,
    PreTrainingHead,
    SentenceEmbeddingHead,
    SequenceClassificationHead,
    SpanExtractionHead,
    TokenClassificationHead,
)

_PREFIXES = ("bert.", "roberta.", "distilbert.", "electra.", "mpnet.", "deberta.", "model.", "")


@dataclasses.dataclass(frozen=True)
class HfLayout:
    """Where a family's HF base model keeps the encoder, relative to the base model.

    layers: the ModuleList of layers; qkv: the query, key and value linears in a layer (one, already fused, in
    ModernBERT); layer: (fast name, HF module) for the rest of a layer, in LayerWeights' order; token_types: whether
    the embeddings have a token-type table; pooler: whether the base model can have a pooler; output: the
    transformers.modeling_outputs class the base model returns; relative_bias: the Embedding of relative position
    biases (MPNet's), or None; word, norm: the embeddings' table and LayerNorm; positions: whether the embeddings
    have a position table; final_norm: the LayerNorm after the last layer (ModernBERT's), or None;
    attention_dropout, hidden_dropout: where a layer keeps the dropout of the attention probabilities and those of
    its hidden states (Dropout modules, or a module's float attribute), embedding_dropout: the embeddings' Dropout.
    """

    layers: str
    qkv: tuple[str, ...]
    layer: tuple[tuple[str, str], ...]
    token_types: bool
    pooler: bool
    output: str
    relative_bias: str | None = None
    word: str = "word_embeddings"
    norm: str = "LayerNorm"
    positions: bool = True
    final_norm: str | None = None
    attention_dropout: tuple[str, ...] = ("attention.self.dropout",)
    hidden_dropout: tuple[str, ...] = ("attention.output.dropout", "output.dropout")
    embedding_dropout: str = "embeddings.dropout"

    def embedding_pairs(self, config: EncoderConfig) -> list[tuple[str, str]]:
        """(FastEmbeddings name, HF embeddings name) of every embedding weight."""
        pairs = [("word_embeddings.weight", f"{self.word}.weight")]
        if self.positions and config.position_biased_input:
            pairs.append(("position_embeddings.weight", "position_embeddings.weight"))
        if self.token_types and config.type_vocab_size > 0:
            pairs.append(("token_type_embeddings.weight", "token_type_embeddings.weight"))
        return pairs + [(f"LayerNorm.{kind}", f"{self.norm}.{kind}") for kind in _kinds(config.norm_bias)]


def _kinds(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


_BERT_LAYOUT = HfLayout(
    layers="encoder.layer",
    qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
    layer=(("attn_out", "attention.output.dense"), ("attn_norm", "attention.output.LayerNorm"),
           ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"), ("ffn_norm", "output.LayerNorm")),
    token_types=True,
    pooler=True,
    output="BaseModelOutputWithPoolingAndCrossAttentions",
)
LAYOUTS = {
    "bert": _BERT_LAYOUT,
    "roberta": _BERT_LAYOUT,
    "electra": dataclasses.replace(_BERT_LAYOUT, pooler=False, output="BaseModelOutputWithPastAndCrossAttentions"),
    "distilbert": HfLayout(
        layers="transformer.layer",
        qkv=("attention.q_lin", "attention.k_lin", "attention.v_lin"),
        layer=(("attn_out", "attention.out_lin"), ("attn_norm", "sa_layer_norm"), ("ffn_in", "ffn.lin1"),
               ("ffn_out", "ffn.lin2"), ("ffn_norm", "output_layer_norm")),
        token_types=False,
        pooler=False,
        output="BaseModelOutput",
        attention_dropout=("attention.dropout",),
        hidden_dropout=("ffn.dropout",),
    ),
    "mpnet": HfLayout(
        layers="encoder.layer",
        qkv=("attention.attn.q", "attention.attn.k", "attention.attn.v"),
        layer=(("attn_out", "attention.attn.o"), ("attn_norm", "attention.LayerNorm"),
               ("ffn_in", "intermediate.dense"), ("ffn_out", "output.dense"), ("ffn_norm", "output.LayerNorm")),
        token_types=False,
        pooler=True,
        output="BaseModelOutputWithPooling",
        relative_bias="encoder.relative_attention_bias",
        attention_dropout=("attention.attn.dropout",),
        hidden_dropout=("attention.dropout", "output.dropout"),
    ),
    "modernbert": HfLayout(
        layers="layers",
        qkv=("attn.Wqkv",),
        layer=(("attn_out", "attn.Wo"), ("attn_norm", "attn_norm"), ("ffn_in", "mlp.Wi"), ("ffn_out", "mlp.Wo"),
               ("ffn_norm", "mlp_norm")),
        token_types=False,
        pooler=False,
        output="BaseModelOutput",
        word="tok_embeddings",
        norm="norm",
        positions=False,
        final_norm="final_norm",
        attention_dropout=("attn.attention_dropout", "attn.out_drop"),
        hidden_dropout=("mlp.drop",),
        embedding_dropout="embeddings.drop",
    ),
    "deberta": HfLayout(
        layers="encoder.layer",
        qkv=("attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"),
        layer=_BERT_LAYOUT.layer,
        token_types=True,
        pooler=False,
        output="BaseModelOutput",
        hidden_dropout=("attention.output.dropout", "output.dropout", "attention.self.pos_dropout"),
    ),
}
# DeBERTa's relative positions: (FastBertModel name, HF base-model name) of the table and its LayerNorm, and of each
# layer's projections of it
_DEBERTA_TABLE = (("rel_embeddings", "encoder.rel_embeddings"), ("rel_norm", "encoder.LayerNorm"))
_DEBERTA_PROJECTIONS = (("pos_key", "attention.self.pos_key_proj"), ("pos_query", "attention.self.pos_query_proj"))
# which config flag says whether each part of a layer has a bias (all do, but in ModernBERT)
_LAYER_BIAS = {"qkv": "attention_bias", "attn_out": "attention_bias", "attn_norm": "norm_bias", "ffn_in": "mlp_bias",
               "ffn_out": "mlp_bias", "ffn_norm": "norm_bias"}
# ELECTRA's projection from embedding_size to hidden_size sits beside the embeddings in HF, inside them here
_PROJECTION = (("embeddings.project", "embeddings_project"),)


def layer_has_bias(config: EncoderConfig, part: str) -> bool:
    """Whether the config gives that part of a layer ("qkv", "attn_out", "attn_norm", "ffn_in", "ffn_out",
    "ffn_norm") a bias."""
    return bool(getattr(config, _LAYER_BIAS[part]))


class MissingWeightError(KeyError):
    """A weight the encoder needs is not in the checkpoint; the message names it."""

    def __str__(self) -> str:
        return str(self.args[0])


def _normalize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task-model prefix (bert., roberta.) and rename old LayerNorm gamma/beta to weight/bias."""
    prefix = next((p for p in _PREFIXES for table in ("word_embeddings", "tok_embeddings")
                   if f"{p}embeddings.{table}.weight" in state), None)
    if prefix is None:
        raise MissingWeightError(
            "no embeddings.word_embeddings.weight in the checkpoint (nor ModernBERT's embeddings.tok_embeddings.weight; "
            f"looked under prefixes {', '.join(repr(p) for p in _PREFIXES)}): is this a checkpoint of the "
            f"{family_names()} families?"
        )
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        if k.endswith("LayerNorm.gamma"):
            k = k[: -len("gamma")] + "weight"
        elif k.endswith("LayerNorm.beta"):
            k = k[: -len("beta")] + "bias"
        out[k] = v
    return out


def _encoder_key_pairs(config: EncoderConfig) -> list[tuple[str, str]]:
    """(FastBertModel key, HF base-model key) of every encoder weight except query/key/value and the pooler."""
    layout = LAYOUTS[config.family]
    pairs = [(f"embeddings.{fast}", f"embeddings.{hf}") for fast, hf in layout.embedding_pairs(config)]
    if config.embedding_width != config.hidden_size:
        pairs += [(f"{fast}.{kind}", f"{hf}.{kind}") for fast, hf in _PROJECTION for kind in ("weight", "bias")]
    if layout.relative_bias is not None:
        pairs.append(("relative_attention_bias.weight", f"{layout.relative_bias}.weight"))
    if layout.final_norm is not None:
        pairs += [(f"final_norm.{kind}", f"{layout.final_norm}.{kind}") for kind in _kinds(config.norm_bias)]
    if config.relative_attention:
        (table, hf_table), (norm, hf_norm) = _DEBERTA_TABLE
        pairs.append((f"{table}.weight", f"{hf_table}.weight"))
        if config.norm_rel_ebd:
            pairs += [(f"{norm}.{kind}", f"{hf_norm}.{kind}") for kind in ("weight", "bias")]
        own = [] if config.share_att_key else [
            pair for pair, term in zip(_DEBERTA_PROJECTIONS, ("c2p", "p2c")) if term in config.pos_att_type]
        pairs += [(f"layers.{i}.{fast}.{kind}", f"{layout.layers}.{i}.{hf}.{kind}")
                  for i in range(config.num_hidden_layers) for fast, hf in own for kind in ("weight", "bias")]
    for i in range(config.num_hidden_layers):
        for fast, hf in layout.layer:
            if fast == "attn_norm" and config.pre_norm and i == 0:  # ModernBERT's first layer has none
                continue
            pairs += [(f"layers.{i}.{fast}.{kind}", f"{layout.layers}.{i}.{hf}.{kind}")
                      for kind in _kinds(getattr(config, _LAYER_BIAS[fast]))]
    return pairs


def _qkv_kinds(config: EncoderConfig) -> tuple[str, ...]:
    return _kinds(config.attention_bias)


def qkv_part_shape(config: EncoderConfig, parts: int, kind: str = "weight") -> tuple[int, ...]:
    """The shape of each of the `parts` linears that hold a layer's query/key/value `kind` ("weight" or "bias"):
    three of [H, H] for separate query, key and value, one of [3H, H] for a fused Wqkv."""
    h = config.hidden_size
    return (3 * h // parts, h) if kind == "weight" else (3 * h // parts,)


def _qkv_keys(config: EncoderConfig, i: int, kind: str) -> list[str]:
    layout = LAYOUTS[config.family]
    return [f"{layout.layers}.{i}.{name}.{kind}" for name in layout.qkv]


def hf_layer_norm_eps(base: nn.Module, config: EncoderConfig) -> float:
    """The eps that every LayerNorm of an HF base model holds, which the fast encoder runs for all of them (HF's
    modules each read their own): the config's where the model has no LayerNorm; LayerNorms of different eps are
    refused by name (shared_layer_norm_eps)."""
    eps = shared_layer_norm_eps(base.named_modules())
    return config.layer_norm_eps if eps is None else eps


def shared_layer_norm_eps(norms: Iterable[tuple[str, nn.Module]]) -> float | None:
    """The eps that the LayerNorms among (path, module) pairs hold, one for all of them (None where there are none);
    two that differ are refused by name."""
    first = None
    for path, module in norms:
        if not isinstance(module, nn.LayerNorm):
            continue
        if first is None:
            first = path, module.eps
        elif module.eps != first[1]:
            raise UnsupportedModelError(
                f"{path} is a LayerNorm of eps {module.eps}, where {first[0]} holds {first[1]}: mtbert_fast's encoder "
                "runs one eps for every LayerNorm; set them alike")
    return None if first is None else first[1]


def hf_encoder_keys(config: EncoderConfig, has_pooler: bool) -> set[str]:
    """The HF base model's keys of all of a supported model's parameters: every weight the fast encoder reads, and
    DeBERTa's LayerNorm of the relative-position table where HF builds it (norm_rel_ebd) without relative attention,
    which its forward then never applies."""
    keys = {hf for _, hf in _encoder_key_pairs(config)}
    if config.family == "deberta" and config.norm_rel_ebd and not config.relative_attention:
        keys.update(f"{_DEBERTA_TABLE[1][1]}.{kind}" for kind in ("weight", "bias"))
    keys.update(key for i in range(config.num_hidden_layers) for kind in _qkv_kinds(config)
                for key in _qkv_keys(config, i, kind))
    if has_pooler:
        keys.update(("pooler.dense.weight", "pooler.dense.bias"))
    return keys


# buffers that older transformers versions saved with the embeddings, which no forward reads from a checkpoint
_UNREAD_BUFFERS = frozenset({"embeddings.position_ids", "embeddings.token_type_ids"})


def fast_state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], config: EncoderConfig, has_pooler: bool
) -> dict[str, torch.Tensor]:
    """HF keys (with or without the task model's prefix) -> FastBertModel keys, Q/K/V concatenated."""
    src = _normalize(hf_state)

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise MissingWeightError(f"missing weight {name!r} in the checkpoint")
        return src[name]

    out = {fast: take(hf) for fast, hf in _encoder_key_pairs(config)}
    h = config.hidden_size
    for i in range(config.num_hidden_layers):
        for kind in _qkv_kinds(config):
            keys = _qkv_keys(config, i, kind)
            want = qkv_part_shape(config, len(keys), kind)
            for key in keys:  # each on its own: parts of other shapes could still concatenate to the fused one's
                if tuple(take(key).shape) != want:
                    raise ValueError(f"size mismatch for {key!r}: the checkpoint holds {list(take(key).shape)}, where "
                                     f"the config's hidden_size {h} asks for {list(want)}")
            out[f"layers.{i}.qkv.{kind}"] = torch.cat([take(k) for k in keys], 0)
    def first_key(layer: int) -> str:
        return _qkv_keys(config, layer, _qkv_kinds(config)[0])[0]

    extra = first_key(config.num_hidden_layers)
    if extra in src:  # the checkpoint's encoder is deeper than the config says: layers would go unused, unsaid
        last = config.num_hidden_layers
        while first_key(last + 1) in src:
            last += 1
        warnings.warn(f"the checkpoint holds encoder layers {config.num_hidden_layers}..{last} (weights such as "
                      f"{extra!r}), which the config's num_hidden_layers={config.num_hidden_layers} leaves out: "
                      "they are not loaded", stacklevel=3)
    if has_pooler:
        out["pooler.weight"] = take("pooler.dense.weight")
        out["pooler.bias"] = take("pooler.dense.bias")
    with torch.device("meta"):  # the shapes the config gives every weight, named by the checkpoint's keys
        expected = FastBertModel(config, add_pooling_layer=has_pooler).state_dict()
    pooler = [(f"pooler.{kind}", f"pooler.dense.{kind}") for kind in ("weight", "bias")]
    for fast, hf in _encoder_key_pairs(config) + pooler:
        if fast in out and fast in expected and out[fast].shape != expected[fast].shape:
            raise ValueError(f"size mismatch for {hf!r}: the checkpoint holds {list(out[fast].shape)}, where the "
                             f"config asks for {list(expected[fast].shape)}: the config and the weights disagree")
    layers = LAYOUTS[config.family].layers + "."

    def deeper(key: str) -> bool:  # a layer past num_hidden_layers, which the warning above names
        index = key[len(layers):].partition(".")[0] if key.startswith(layers) else ""
        return index.isdigit() and int(index) >= config.num_hidden_layers

    unread = sorted(k for k in set(src) - hf_encoder_keys(config, has_pooler) - _UNREAD_BUFFERS
                    if not deeper(k) and not (k.startswith("pooler.") and not has_pooler))
    if unread:  # what HF's loading would list as unexpected keys
        shown = ", ".join(unread[:4]) + (f" and {len(unread) - 4} more" if len(unread) > 4 else "")
        warnings.warn(f"the checkpoint holds weights of the encoder that are none of a {config.family} encoder's "
                      f"({shown}): they are not loaded, so an adapter among them (LoRA) is not applied; merge "
                      "adapters into the weights first (peft's merge_and_unload)", stacklevel=3)
    return out


def hf_state_dict_from_fast(state: dict[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """The inverse of fast_state_dict_from_hf: FastBertModel keys -> the HF base model's keys (no task prefix),
    Q/K/V split back apart."""
    out = {hf: state[fast] for fast, hf in _encoder_key_pairs(config)}
    for i in range(config.num_hidden_layers):
        for kind in _qkv_kinds(config):
            keys = _qkv_keys(config, i, kind)
            out.update(zip(keys, state[f"layers.{i}.qkv.{kind}"].chunk(len(keys), 0)))
    if "pooler.weight" in state:
        out["pooler.dense.weight"], out["pooler.dense.bias"] = state["pooler.weight"], state["pooler.bias"]
    return out


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF model directory: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(single):
        return load_file(single)
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(path, shard)))
        return state
    pickled = [n for n in ("pytorch_model.bin", "tf_model.h5") if os.path.isfile(os.path.join(path, n))]
    hint = f" (found {', '.join(pickled)}, which is not read: it would need unpickling)" if pickled else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}{hint}")


# --- task heads <-> the heads of HF's *For* task models ----------------------------------------------------------

HF_PREFIXES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert", "electra": "Electra", "mpnet": "MPNet",
               "modernbert": "ModernBert", "deberta": "DebertaV2"}
# family -> HF names of its sequence-classification head's dense and output linears, their activation, and whether
# dropout comes before the dense; BERT's reads the pooler output instead
_DENSE_CLASSIFIERS = {
    "roberta": (("classifier.dense", "classifier.out_proj"), "tanh", True),
    "mpnet": (("classifier.dense", "classifier.out_proj"), "tanh", True),
    "deberta": (("pooler.dense", "classifier"), "gelu", True),  # the activation is the config's pooler_hidden_act
    "electra": (("classifier.dense", "classifier.out_proj"), "gelu", True),
    "distilbert": (("pre_classifier", "classifier"), "relu", False),
}


def dense_classifier_form(family: str) -> tuple[str, bool] | None:
    """(activation, dropout before the dense) of the family's HF sequence classifier where it is a dense head on the
    first token (DeBERTa's activation is its config's pooler_hidden_act, "gelu" by default); None where it is not
    (BERT's reads the pooler; ModernBERT's runs its prediction head)."""
    dense = _DENSE_CLASSIFIERS.get(family)
    return None if dense is None else dense[1:]


# family -> HF names of the masked-LM head's transform dense, its LayerNorm, its decoder, and the decoder's bias
_MASKED_LM = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder",
             ("cls.predictions.bias", "cls.predictions.decoder.bias")),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", ("lm_head.bias", "lm_head.decoder.bias")),
    "mpnet": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", ("lm_head.bias", "lm_head.decoder.bias")),
    # DeBERTa's legacy head (transformers' default): the decoder's own bias computes; cls.predictions.bias is kept equal
    "deberta": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.decoder",
                ("cls.predictions.bias", "cls.predictions.decoder.bias")),
    "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector", ("vocab_projector.bias",)),
}
# families whose masked-LM head applies the erf GELU whatever the encoder's hidden_act
_ERF_MLM = ("roberta", "mpnet")
# families whose task heads take their dropout from the encoder's (their configs have no classifier_dropout)
_ENCODER_DROPOUT_HEADS = ("distilbert", "mpnet", "deberta")
# the problem_type names transformers uses for the head's own
_HF_PROBLEM_TYPE = {ours: hf for hf, ours in SequenceClassificationHead._HF_PROBLEM_TYPES.items()}
HfHead = tuple[str, dict[str, Any], dict[str, torch.Tensor]]  # (class name, config fields, weights under its keys)


def _label_config(num_labels: int, id2label: dict[int, str] | None) -> dict[str, Any]:
    if id2label is None:
        return {"num_labels": num_labels}
    return {"id2label": dict(id2label), "label2id": {v: k for k, v in id2label.items()}}


def _copy(dst: nn.Parameter, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src)


def _classifier_dropout(hf_config) -> float:
    if hf_config.model_type == "distilbert":  # its token classifier reuses the encoder's dropout
        return hf_config.dropout
    if hf_config.model_type in ("mpnet", "deberta-v2"):  # their heads' dropout is the encoder's
        return hf_config.hidden_dropout_prob
    return hf_config.classifier_dropout if hf_config.classifier_dropout is not None else hf_config.hidden_dropout_prob


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _sequence_classification_from_hf(hf_model, encoder_config: EncoderConfig) -> SequenceClassificationHead:
    cfg, family = hf_model.config, encoder_config.family
    problem_type = cfg.problem_type or ("regression" if cfg.num_labels == 1 else "single_label")
    if family == "modernbert":
        head = SequenceClassificationHead(cfg.hidden_size, cfg.num_labels, problem_type, dropout=cfg.classifier_dropout,
                                          id2label=cfg.id2label, transform=_modernbert_transform(cfg),
                                          mean_pooled=cfg.classifier_pooling == "mean")
        _load_modernbert_head(head.transform, head.classifier, hf_model)
        return head
    if family not in _DENSE_CLASSIFIERS:
        head = SequenceClassificationHead(cfg.hidden_size, cfg.num_labels, problem_type,
                                          dropout=_classifier_dropout(cfg), id2label=cfg.id2label)
        head.classifier.load_state_dict(hf_model.classifier.state_dict())
        return head
    names, activation, dropout_first = _DENSE_CLASSIFIERS[family]
    dropout = cfg.seq_classif_dropout if family == "distilbert" else _classifier_dropout(cfg)
    dense_dropout = None
    if family == "deberta":  # ContextPooler: pooler_dropout, dense, pooler_hidden_act; then cls_dropout, classifier
        activation = cfg.pooler_hidden_act
        if activation not in SequenceClassificationHead.ACTIVATIONS:
            raise UnsupportedModelError(f"pooler_hidden_act={activation!r} is not supported; supported: "
                                        f"{', '.join(SequenceClassificationHead.ACTIVATIONS)}")
        cls_dropout = getattr(cfg, "cls_dropout", None)
        dropout = cfg.hidden_dropout_prob if cls_dropout is None else cls_dropout
        dense_dropout = cfg.pooler_dropout
    head = SequenceClassificationHead(cfg.hidden_size, cfg.num_labels, problem_type, roberta_style=True,
                                      dropout=dropout, id2label=cfg.id2label, activation=activation,
                                      dropout_before_dense=dropout_first, dense_dropout=dense_dropout)
    for ours, theirs in zip(("dense", "out_proj"), names):
        getattr(head, ours).load_state_dict(hf_model.get_submodule(theirs).state_dict())
    return head


def _sequence_classification_to_hf(head: SequenceClassificationHead, encoder_config: EncoderConfig) -> HfHead:
    family = encoder_config.family
    class_name = f"{HF_PREFIXES[family]}ForSequenceClassification"
    if family == "modernbert" or head.transform is not None:
        config = {"problem_type": _HF_PROBLEM_TYPE.get(head.problem_type, head.problem_type),
                  "classifier_pooling": "mean" if head.mean_pooled else "cls",
                  **_label_config(head.num_labels, head.id2label)}
        return _modernbert_head_to_hf("ForSequenceClassification", head, head.classifier, encoder_config, config)
    if head.mean_pooled:
        raise UnsupportedModelError(f"{class_name} reads the first token; this head averages the tokens")
    dense = _DENSE_CLASSIFIERS.get(family)
    if dense is None:
        fits, hf_head = head.pooled and not head.roberta_style, "a linear layer on the pooler output"
    else:
        _, activation, dropout_first = dense
        if family == "deberta":  # any activation, named in the config
            activation = head.activation
        # DeBERTa's config alone names the dropout before the dense apart from the one after it
        fits = (head.roberta_style and not head.pooled and head.activation == activation
                and head.dropout_before_dense == dropout_first
                and (family == "deberta" or head.dense_dropout in (None, head.dropout)))
        hf_head = (f"a dense + {activation} head on the first token"
                   + ("" if dropout_first else " (no dropout before the dense)"))
    if not fits:
        raise UnsupportedModelError(f"no transformers class has this head on a {family} encoder: {class_name} "
                                    f"uses {hf_head}")
    config = {"problem_type": _HF_PROBLEM_TYPE.get(head.problem_type, head.problem_type),
              **_label_config(head.num_labels, head.id2label)}
    if family == "distilbert":
        config["seq_classif_dropout"] = head.dropout
    elif family == "deberta":
        config.update(pooler_hidden_act=head.activation, cls_dropout=head.dropout,
                      pooler_dropout=head.dropout if head.dense_dropout is None else head.dense_dropout)
    elif family not in _ENCODER_DROPOUT_HEADS:
        config["classifier_dropout"] = head.dropout
    if dense is None:
        state = _prefixed("classifier", head.classifier)
    else:
        state = {k: v for ours, theirs in zip(("dense", "out_proj"), dense[0])
                 for k, v in _prefixed(theirs, getattr(head, ours)).items()}
    return class_name, config, state


def _token_classification_from_hf(hf_model, encoder_config: EncoderConfig) -> TokenClassificationHead:
    cfg = hf_model.config
    if encoder_config.family == "modernbert":
        head = TokenClassificationHead(cfg.hidden_size, cfg.num_labels, cfg.classifier_dropout, cfg.id2label,
                                       transform=_modernbert_transform(cfg))
        _load_modernbert_head(head.transform, head.classifier, hf_model)
        return head
    head = TokenClassificationHead(cfg.hidden_size, cfg.num_labels, _classifier_dropout(cfg), cfg.id2label)
    head.classifier.load_state_dict(hf_model.classifier.state_dict())
    return head


def _token_classification_to_hf(head: TokenClassificationHead, encoder_config: EncoderConfig) -> HfHead:
    config = _label_config(head.num_labels, head.id2label)
    if encoder_config.family == "modernbert" or head.transform is not None:
        return _modernbert_head_to_hf("ForTokenClassification", head, head.classifier, encoder_config, config)
    if encoder_config.family not in _ENCODER_DROPOUT_HEADS:
        config["classifier_dropout"] = head.dropout
    return (f"{HF_PREFIXES[encoder_config.family]}ForTokenClassification", config,
            _prefixed("classifier", head.classifier))


def _load_masked_lm(head: MaskedLMHead, transform_dense: nn.Module, layer_norm: nn.Module, decoder: nn.Linear) -> None:
    head.dense.load_state_dict(transform_dense.state_dict())
    head.layer_norm.load_state_dict(layer_norm.state_dict())
    if head.bias is not None:
        _copy(head.bias, decoder.bias)
    if not head.tied:
        _copy(head.decoder_weight, decoder.weight)


def _tied(hf_model, decoder: nn.Linear) -> bool:
    """Whether the decoder reads the word table itself (HF ties them as one parameter), not a copy of equal values,
    which trains apart from it."""
    weight, table = decoder.weight, hf_model.base_model.get_input_embeddings().weight
    return weight is table or (weight.data_ptr() == table.data_ptr() and weight.shape == table.shape
                               and weight.stride() == table.stride() and weight.device == table.device)


def _masked_lm_from_hf(hf_model, encoder_config: EncoderConfig) -> MaskedLMHead:
    if encoder_config.family == "modernbert":
        cfg = hf_model.config
        head = MaskedLMHead(encoder_config, ACTIVATIONS[cfg.classifier_activation], tied=_tied(hf_model, hf_model.decoder),
                            dense_bias=cfg.classifier_bias, norm_bias=cfg.norm_bias, decoder_bias=cfg.decoder_bias)
        _load_masked_lm(head, hf_model.head.dense, hf_model.head.norm, hf_model.decoder)
        return head
    if encoder_config.family == "deberta" and not getattr(hf_model.config, "legacy", True):
        raise UnsupportedModelError("DebertaV2ForMaskedLM with legacy=False (the lm_predictions head) is not mapped; "
                                    "the legacy head (transformers' default) is")
    dense, norm, decoder = (hf_model.get_submodule(n) for n in _MASKED_LM[encoder_config.family][:3])
    # RoBERTa's and MPNet's heads always use the erf GELU; BERT's and DistilBERT's the encoder's activation
    approximate = "none" if encoder_config.family in _ERF_MLM else None
    head = MaskedLMHead(encoder_config, approximate, tied=_tied(hf_model, decoder))
    _load_masked_lm(head, dense, norm, decoder)
    return head


def _masked_lm_state(head: MaskedLMHead, encoder_config: EncoderConfig) -> dict[str, torch.Tensor]:
    family = encoder_config.family
    class_name = f"{HF_PREFIXES[family]}ForMaskedLM"
    expected = ("none", "the erf GELU") if family in _ERF_MLM else (
        encoder_config.gelu_approximate, f"the encoder's hidden_act ({encoder_config.hidden_act})")
    if head.approximate != expected[0]:
        raise UnsupportedModelError(f"{class_name}'s head uses {expected[1]}; this head uses "
                                    f"approximate={head.approximate!r}")
    missing = [name for name, bias in (("dense_bias", head.dense.bias), ("norm_bias", head.layer_norm.bias),
                                       ("decoder_bias", head.bias)) if bias is None]
    if missing:
        raise UnsupportedModelError(f"{class_name}'s head has every bias; this head was built with {missing[0]}=False")
    dense, norm, decoder, bias_keys = _MASKED_LM[family]
    state = {**_prefixed(dense, head.dense), **_prefixed(norm, head.layer_norm)}
    state.update({k: head.bias.detach() for k in bias_keys})
    state[f"{decoder}.weight"] = head._decoder().detach()
    return state


def _masked_lm_to_hf(head: MaskedLMHead, encoder_config: EncoderConfig) -> HfHead:
    if encoder_config.family == "modernbert":
        return _modernbert_masked_lm_to_hf(head, encoder_config)
    return (f"{HF_PREFIXES[encoder_config.family]}ForMaskedLM", {"tie_word_embeddings": head.tied},
            _masked_lm_state(head, encoder_config))


def _bert_only(what: str, encoder_config: EncoderConfig) -> None:
    if encoder_config.family != "bert":
        raise UnsupportedModelError(f"{what} exists in transformers for BERT only, not {encoder_config.family}")


def _next_sentence_from_hf(hf_model, encoder_config: EncoderConfig) -> NextSentenceHead:
    head = NextSentenceHead(hf_model.config.hidden_size)
    head.seq_relationship.load_state_dict(hf_model.cls.seq_relationship.state_dict())
    return head


def _next_sentence_to_hf(head: NextSentenceHead, encoder_config: EncoderConfig) -> HfHead:
    _bert_only("next-sentence prediction", encoder_config)
    return "BertForNextSentencePrediction", {}, _prefixed("cls.seq_relationship", head.seq_relationship)


def _span_extraction_from_hf(hf_model, encoder_config: EncoderConfig) -> SpanExtractionHead:
    modern = encoder_config.family == "modernbert"  # its QA linear is named classifier
    outputs = hf_model.classifier if modern else hf_model.qa_outputs
    if outputs.out_features != 2:
        raise UnsupportedModelError(f"a QA head predicts start and end (2 outputs), this one has "
                                    f"{outputs.out_features}")
    cfg = hf_model.config
    if modern:
        head = SpanExtractionHead(cfg.hidden_size, _modernbert_transform(cfg), cfg.classifier_dropout)
        _load_modernbert_head(head.transform, head.qa_outputs, hf_model)
        return head
    # DistilBERT's QA head applies qa_dropout to the tokens before its linear; the other families' have no dropout
    qa_dropout = cfg.qa_dropout if encoder_config.family == "distilbert" else 0.0
    head = SpanExtractionHead(cfg.hidden_size, dropout=qa_dropout)
    head.qa_outputs.load_state_dict(outputs.state_dict())
    return head


def _span_extraction_to_hf(head: SpanExtractionHead, encoder_config: EncoderConfig) -> HfHead:
    if encoder_config.family == "modernbert" or head.transform is not None:
        return _modernbert_head_to_hf("ForQuestionAnswering", head, head.qa_outputs, encoder_config,
                                      {"num_labels": 2})
    class_name = f"{HF_PREFIXES[encoder_config.family]}ForQuestionAnswering"
    config: dict[str, Any] = {"num_labels": 2}
    if encoder_config.family == "distilbert":
        config["qa_dropout"] = head.dropout
    elif head.dropout:
        raise UnsupportedModelError(f"{class_name} has no dropout before its QA linear; this head has "
                                    f"dropout={head.dropout} there")
    return class_name, config, _prefixed("qa_outputs", head.qa_outputs)


def _sentence_embedding_to_hf(head: SentenceEmbeddingHead, encoder_config: EncoderConfig) -> HfHead:
    return f"{HF_PREFIXES[encoder_config.family]}Model", {}, {}


def _pretraining_from_hf(hf_model, encoder_config: EncoderConfig) -> PreTrainingHead:
    pred = hf_model.cls.predictions
    head = PreTrainingHead(encoder_config, tied=_tied(hf_model, pred.decoder))
    _load_masked_lm(head.mlm, pred.transform.dense, pred.transform.LayerNorm, pred.decoder)
    head.nsp.seq_relationship.load_state_dict(hf_model.cls.seq_relationship.state_dict())
    return head


def _pretraining_to_hf(head: PreTrainingHead, encoder_config: EncoderConfig) -> HfHead:
    _bert_only("the pretraining pair", encoder_config)
    _, _, nsp_state = _next_sentence_to_hf(head.nsp, encoder_config)
    state = {**_masked_lm_state(head.mlm, encoder_config), **nsp_state}
    return "BertForPreTraining", {"tie_word_embeddings": head.mlm.tied}, state


# --- ModernBERT's heads: its prediction head (dense, activation, LayerNorm) before a classifier or the decoder ----

_GELU_NAMES = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}  # approximate -> an HF activation name


def _modernbert_transform(cfg) -> dict[str, Any]:
    """The PredictionTransform config of a ModernBertConfig's head (its LayerNorm shares the encoder's eps and
    norm_bias)."""
    return {"eps": cfg.norm_eps, "activation": cfg.classifier_activation, "dense_bias": cfg.classifier_bias,
            "norm_bias": cfg.norm_bias}


def _load_modernbert_head(transform: PredictionTransform, classifier: nn.Linear, hf_model) -> None:
    transform.dense.load_state_dict(hf_model.head.dense.state_dict())
    transform.norm.load_state_dict(hf_model.head.norm.state_dict())
    classifier.load_state_dict(hf_model.classifier.state_dict())


def _modernbert_head_config(class_name: str, dense_bias: bool, norm_bias: bool, eps: float, activation: str,
                            encoder_config: EncoderConfig) -> dict[str, Any]:
    """The ModernBertConfig fields of a head, or an error naming what ModernBERT's classes cannot hold."""
    if norm_bias != encoder_config.norm_bias or eps != encoder_config.layer_norm_eps:
        raise UnsupportedModelError(f"{class_name}'s head LayerNorm shares the encoder's norm_bias "
                                    f"({encoder_config.norm_bias}) and eps ({encoder_config.layer_norm_eps}); this "
                                    f"head's has norm_bias={norm_bias}, eps={eps}")
    return {"classifier_bias": dense_bias, "classifier_activation": activation}


def _modernbert_head_to_hf(suffix: str, head: Head, output: nn.Linear, encoder_config: EncoderConfig,
                           config: dict[str, Any]) -> HfHead:
    """A classifier head with ModernBERT's prediction head before it -> ModernBert<suffix>; refused for another
    family (no transformers class has such a head) or without the prediction head."""
    t = head.transform
    class_name = f"{HF_PREFIXES[encoder_config.family]}{suffix}"
    if encoder_config.family != "modernbert":
        raise UnsupportedModelError(f"this head runs ModernBERT's prediction head before its output; {class_name} "
                                    "has none")
    if t is None:
        raise UnsupportedModelError(f"{class_name} runs a prediction head (dense, activation, LayerNorm) before its "
                                    "output; this head has none (pass transform=)")
    fields = _modernbert_head_config(class_name, t.dense.bias is not None, t.norm.bias is not None, t.eps,
                                     t.activation, encoder_config)
    state = {**_prefixed("head.dense", t.dense), **_prefixed("head.norm", t.norm), **_prefixed("classifier", output)}
    return class_name, {**config, **fields, "classifier_dropout": head.dropout}, state


def _modernbert_masked_lm_to_hf(head: MaskedLMHead, encoder_config: EncoderConfig) -> HfHead:
    fields = _modernbert_head_config("ModernBertForMaskedLM", head.dense.bias is not None,
                                     head.layer_norm.bias is not None, head.eps, _GELU_NAMES[head.approximate],
                                     encoder_config)
    state = {**_prefixed("head.dense", head.dense), **_prefixed("head.norm", head.layer_norm),
             "decoder.weight": head._decoder().detach()}
    if head.bias is not None:
        state["decoder.bias"] = head.bias.detach()
    return ("ModernBertForMaskedLM", {**fields, "decoder_bias": head.bias is not None,
                                      "tie_word_embeddings": head.tied}, state)


# transformers class-name suffix -> the head that reads it
_FROM_HF: dict[str, Callable[[nn.Module, EncoderConfig], Head]] = {
    "ForSequenceClassification": _sequence_classification_from_hf,
    "ForTokenClassification": _token_classification_from_hf,
    "ForMaskedLM": _masked_lm_from_hf,
    "ForNextSentencePrediction": _next_sentence_from_hf,
    "ForQuestionAnswering": _span_extraction_from_hf,
    "ForPreTraining": _pretraining_from_hf,
}
_TO_HF: dict[type[Head], Callable[[Any, EncoderConfig], HfHead]] = {
    SequenceClassificationHead: _sequence_classification_to_hf,
    TokenClassificationHead: _token_classification_to_hf,
    MaskedLMHead: _masked_lm_to_hf,
    NextSentenceHead: _next_sentence_to_hf,
    SpanExtractionHead: _span_extraction_to_hf,
    SentenceEmbeddingHead: _sentence_embedding_to_hf,
    PreTrainingHead: _pretraining_to_hf,
}


# HF class-name prefix -> the task-model suffixes whose heads map. ELECTRA's ForMaskedLM is its generator (its head
# works in embedding_size) and its ForPreTraining the replaced-token discriminator: neither has a head here.
_TASKS = {
    "Bert": tuple(_FROM_HF),
    "Roberta": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    # RoBERTa's architecture under other names (exported back as Roberta* classes)
    "XLMRoberta": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    "Camembert": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    "DistilBert": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    "Electra": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"),
    "MPNet": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    "ModernBert": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
    "DebertaV2": ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering"),
}


def head_from_hf(hf_model: nn.Module, encoder_config: EncoderConfig) -> Head:
    """The head of an HF Bert* / Roberta* / DistilBert* / Electra* / MPNet* / ModernBert* / DebertaV2* task model,
    weights copied exactly."""
    for klass in type(hf_model).__mro__:
        name = klass.__name__
        for suffix in _FROM_HF:
            if name.endswith(suffix) and suffix in _TASKS.get(name[: -len(suffix)], ()):
                return _FROM_HF[suffix](hf_model, encoder_config)
    supported = ", ".join(f"{f}{s}" for f, suffixes in _TASKS.items() for s in suffixes)
    raise UnsupportedModelError(f"{type(hf_model).__name__} is not a supported task model; supported: {supported}")


def head_to_hf(head: Head, encoder_config: EncoderConfig) -> HfHead:
    """-> (transformers class name, config fields, head weights under the HF model's keys)."""
    convert = next((_TO_HF[klass] for klass in type(head).__mro__ if klass in _TO_HF), None)
    if convert is None:
        raise NotImplementedError(f"{type(head).__name__} has no transformers counterpart")
    return convert(head, encoder_config)


# --- MultiTaskBert <-> HF task models ----------------------------------------------------------------------------


def encoder_and_heads_from_hf(
    models: Mapping[str, nn.Module], *, dtype: torch.dtype | None = None, backend: str | None = None
) -> tuple[FastBertModel, dict[str, Head]]:
    """The shared encoder and one head per task of HF task models (see MultiTaskBert.from_hf_heads)."""
    if not models:
        raise ValueError("from_hf_heads needs at least one task model")
    bases = {task: getattr(m, "base_model", m) for task, m in models.items()}
    configs = {task: EncoderConfig.from_hf(b.config) for task, b in bases.items()}
    states = {task: b.state_dict() for task, b in bases.items()}
    first = next(iter(models))
    with_pooler = [t for t, b in bases.items() if getattr(b, "pooler", None) is not None]
    for task in models:
        if configs[task] != configs[first]:
            a, b = dataclasses.asdict(configs[first]), dataclasses.asdict(configs[task])
            field = next(k for k in a if a[k] != b[k])
            raise ValueError(f"encoder configs differ between {first!r} and {task!r}: {field} is {a[field]!r} "
                             f"vs {b[field]!r}")
        pooler_ref = with_pooler[0] if with_pooler else first
        for key, value in states[task].items():
            ref = first if not key.startswith("pooler.") else pooler_ref
            other = states[ref].get(key)
            if other is None or other.shape != value.shape or not torch.equal(other, value):
                raise ValueError(f"{key} differs between {ref!r} and {task!r}: the task models must share "
                                 "one encoder")
        missing = [k for k in states[first] if not k.startswith("pooler.") and k not in states[task]]
        if missing:
            raise ValueError(f"{missing[0]} differs between {first!r} and {task!r}: missing in {task!r}")
    encoder = FastBertModel.from_hf(models[with_pooler[0] if with_pooler else first], dtype=dtype, backend=backend)
    heads = {task: head_from_hf(m, configs[task]) for task, m in models.items()}
    return encoder, heads


def save_hf_task(encoder: FastBertModel, head: Head, path: str | os.PathLike) -> None:
    """The encoder and one head as an ordinary transformers checkpoint (see MultiTaskBert.export_hf)."""
    import transformers

    config = encoder.config
    class_name, config_fields, head_state = head_to_hf(head, config)
    fields = config.to_dict()
    model_type = fields.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **fields, **config_fields)
    hf_class = getattr(transformers, class_name)
    has_pooler = LAYOUTS[config.family].pooler
    kwargs = {"add_pooling_layer": encoder.pooler is not None} if class_name.endswith("Model") and has_pooler else {}
    hf_model = hf_class(hf_config, **kwargs)
    base = hf_model.base_model
    if getattr(base, "pooler", None) is not None and encoder.pooler is None:
        raise ValueError(f"{class_name} reads the pooler output, but the encoder has no pooler")
    prefix = "" if hf_model is base else f"{hf_model.base_model_prefix}."
    encoder_state = hf_state_dict_from_fast(encoder.state_dict(), config)
    state = {f"{prefix}{k}": v for k, v in encoder_state.items()
             if not (k.startswith("pooler.") and getattr(base, "pooler", None) is None)}
    state.update(head_state)
    hf_model.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True)
    hf_model.to(encoder.dtype).save_pretrained(path)
