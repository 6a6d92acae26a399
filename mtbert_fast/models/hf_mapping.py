"""HF BERT/RoBERTa state_dict <-> FastBertModel state_dict, and safetensors reading (never unpickling)."""

from __future__ import annotations

import json
import os

import torch

from mtbert_fast.models.config import EncoderConfig

_PREFIXES = ("bert.", "roberta.", "model.", "")
# (fast name, HF name) for each layer, the QKV fusion aside
_LAYER_MAP = (
    ("attn_out", "attention.output.dense"),
    ("attn_norm", "attention.output.LayerNorm"),
    ("ffn_in", "intermediate.dense"),
    ("ffn_out", "output.dense"),
    ("ffn_norm", "output.LayerNorm"),
)
_EMBEDDINGS = ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
               "LayerNorm.weight", "LayerNorm.bias")


class MissingWeightError(KeyError):
    """A weight the encoder needs is not in the checkpoint; the message names it."""

    def __str__(self) -> str:
        return str(self.args[0])


def _normalize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip the task-model prefix (bert., roberta.) and rename old LayerNorm gamma/beta to weight/bias."""
    prefix = next((p for p in _PREFIXES if f"{p}embeddings.word_embeddings.weight" in state), None)
    if prefix is None:
        raise MissingWeightError(
            "no embeddings.word_embeddings.weight in the checkpoint (looked under prefixes "
            f"{', '.join(repr(p) for p in _PREFIXES)}): is this a BERT or RoBERTa checkpoint?"
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


def fast_state_dict_from_hf(
    hf_state: dict[str, torch.Tensor], config: EncoderConfig, has_pooler: bool
) -> dict[str, torch.Tensor]:
    """HF keys (with or without the bert./roberta. prefix) -> FastBertModel keys, Q/K/V concatenated."""
    src = _normalize(hf_state)

    def take(name: str) -> torch.Tensor:
        if name not in src:
            raise MissingWeightError(f"missing weight {name!r} in the checkpoint")
        return src[name]

    out = {f"embeddings.{n}": take(f"embeddings.{n}") for n in _EMBEDDINGS}
    for i in range(config.num_hidden_layers):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            parts = [take(f"{hf}attention.self.{p}.{kind}") for p in ("query", "key", "value")]
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(parts, 0)
            for fast_name, hf_name in _LAYER_MAP:
                out[f"layers.{i}.{fast_name}.{kind}"] = take(f"{hf}{hf_name}.{kind}")
    if has_pooler:
        out["pooler.weight"] = take("pooler.dense.weight")
        out["pooler.bias"] = take("pooler.dense.bias")
    return out


def hf_state_dict_from_fast(state: dict[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """The inverse of fast_state_dict_from_hf: FastBertModel keys -> HF BertModel/RobertaModel keys (no task prefix),
    Q/K/V split back apart."""
    out = {f"embeddings.{n}": state[f"embeddings.{n}"] for n in _EMBEDDINGS}
    for i in range(config.num_hidden_layers):
        hf = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            for part, t in zip(("query", "key", "value"), state[f"layers.{i}.qkv.{kind}"].chunk(3, 0)):
                out[f"{hf}attention.self.{part}.{kind}"] = t
            for fast_name, hf_name in _LAYER_MAP:
                out[f"{hf}{hf_name}.{kind}"] = state[f"layers.{i}.{fast_name}.{kind}"]
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
