"""Swap the fast encoder into a Hugging Face BERT/RoBERTa/DistilBERT/ELECTRA/MPNet/ModernBERT/DeBERTa-v2 model (or the one inside a
sentence-transformers model) in place, and back.

`swap` replaces the forward of the model's base encoder (BertModel / RobertaModel / DistilBertModel / ElectraModel /
MPNetModel / ModernBertModel / DebertaV2Model, also inside any `*For*` task model) with the packed-token path. No
module is replaced, no parameter is renamed or moved, so state_dict keys (and the tensors it hands out), the forward
signature and the output types stay HF's. The fused QKV product reads a [3H, H] concatenation of the query, key and
value weights, kept while they do not change.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import warnings

import torch
import torch.nn as nn
from torch.multiprocessing.reductions import StorageWeakRef

from mtbert_fast.models.config import EncoderConfig, UnsupportedModelError, family_names
from mtbert_fast.models.encoder import (
    DisentangledWeights, EmbeddingWeights, Int8State, LayerCache, LayerWeights, PackedBatch, disentangled_projections,
    encode, quantize_encoder, refuse_graph_capture,
)
from mtbert_fast.models.hf_mapping import (
    HF_PREFIXES, LAYOUTS, HfLayout, hf_encoder_keys, layer_has_bias, qkv_part_shape, shared_layer_norm_eps,
)
from mtbert_fast.models.int8 import DEFAULT_SMOOTHING, STORAGE_ADDRESS, check_model_dtype
from mtbert_fast.models.plain_modules import (
    PLAIN_MODULES, allow_hooks, check_plain_module, check_runs_plain, refuse_hooks,
)
from mtbert_fast.models.weight_pack import releases as pack_releases
from mtbert_fast.ops.dispatch import requested_backend

_STATE = "_mtbert_fast_swap"
# what HF's encoders take and ignore: decoder caching, and the token count of a loss that transformers' Trainer hands
# every model whose forward takes **kwargs (the task models pass it on to the base model)
_IGNORED_KWARGS = {"use_cache", "cache", "past_key_values", "cache_position", "num_items_in_batch"}


def _base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    if not hasattr(base, "embeddings") or not hasattr(base, "config"):
        raise TypeError(
            f"{type(model).__name__} is not a model of the {family_names()} families (no embeddings); swap takes "
            f"{', '.join(f'{prefix}Model' for prefix in HF_PREFIXES.values())} and their *For* task models"
        )
    return base


def _submodule(module: nn.Module, path: tuple[str, ...]) -> nn.Module:
    """module.get_submodule(".".join(path)), read from the child dictionaries directly: get_submodule costs
    microseconds per name, which a forward of short inputs reading every layer's modules notices."""
    for name in path:
        child = module._modules.get(name)
        if child is None:
            return module.get_submodule(".".join(path))  # raises with get_submodule's message
        module = child
    return module


def _check_encoder_modules(base: nn.Module, config: EncoderConfig, layout: HfLayout) -> None:
    """Refuses what the swapped forward would leave out without a word: parameters that are none of the encoder's
    weights (adapters, added modules), weight modules that are not plain torch.nn modules, hooks and replaced forwards
    anywhere inside the base model, and query/key/value weights of another shape than the config's (pruned heads)."""
    keys = hf_encoder_keys(config, has_pooler=layout.pooler and getattr(base, "pooler", None) is not None)
    unread = [name for name, _ in base.named_parameters() if name not in keys]
    if unread:
        shown = ", ".join(unread[:4]) + (f" and {len(unread) - 4} more" if len(unread) > 4 else "")
        raise UnsupportedModelError(
            f"{type(base).__name__} holds parameters that are no weights of a {config.family} encoder ({shown}): the "
            "swapped encoder would leave them out; merge adapters into the weights first (peft's merge_and_unload)"
        )
    if "forward" in base.__dict__:
        raise UnsupportedModelError(
            f"{type(base).__name__} has its own forward, set on the instance (as accelerate's hooks set one): the swap "
            "would replace it, and unswap would not bring it back; swap the model before such a forward is set")
    shared_layer_norm_eps(base.named_modules())  # LayerNorms of different eps; each call reads the one they hold
    for path, module in base.named_modules():
        if module is not base:
            check_runs_plain(path, module)
    for key in sorted(keys):
        path = key.rpartition(".")[0]
        module = base.get_submodule(path)
        if type(module) not in PLAIN_MODULES:  # for its message: on a plain module it would install the hook tables
            check_plain_module(path, module)
    for i, layer in enumerate(_submodule(base, tuple(layout.layers.split(".")))):
        for name in layout.qkv:
            _check_qkv_shape(config, layout, f"{layout.layers}.{i}.{name}", layer.get_submodule(name))


def _check_qkv_shape(config: EncoderConfig, layout: HfLayout, path: str, module: nn.Module) -> None:
    h = config.hidden_size
    want = qkv_part_shape(config, len(layout.qkv))
    if tuple(module.weight.shape) != want:
        raise UnsupportedModelError(
            f"{path}.weight has shape {list(module.weight.shape)}, where hidden_size {h} asks for {list(want)}: "
            "attention heads pruned from the weights are not supported"
        )


def _param(module: nn.Module, kind: str) -> torch.Tensor | None:
    """getattr(module, kind, None) for a parameter, without nn.Module.__getattr__'s Python fallback."""
    params = module._parameters
    return params[kind] if kind in params else getattr(module, kind, None)


class _QKVSlices(torch.autograd.Function):
    """The kept [3H, H] weight and [3H] bias as autograd's concatenation of the query, key and value parameters: the
    forward hands the kept tensors on (no copy), the backward gives each parameter its rows of the gradient."""

    @staticmethod
    def forward(ctx, weight, bias, *params):
        ctx.rows = [w.shape[0] for w in params[:3]]
        ctx.has_bias = [b is not None for b in params[3:]]
        return weight.view_as(weight), None if bias is None else bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        weights = [None] * 3 if grad_weight is None else list(grad_weight.split(ctx.rows))
        biases = [None] * 3 if grad_bias is None else list(grad_bias.split(ctx.rows))
        return None, None, *weights, *[g if has else None for g, has in zip(biases, ctx.has_bias)]


class _QKVFusion:
    """One layer's query/key/value parameters, and the [3H, H] weight and [3H] bias that the fused QKV product reads:
    concatenated from the parameters, which keep their own storage (so state_dict() aliases them, as PyTorch's does),
    and kept while every parameter keeps its storage (by identity: a weak reference holds each one's, so no new
    storage can take its address) and version counter and release_packs() has not run (a write through .data changes
    neither, as for the packed weights of models/weight_pack.py). Where autograd must reach the parameters, the kept
    tensors are handed out through _QKVSlices (a model in eval mode called without torch.no_grad copies nothing);
    in training, where each optimizer step changes the parameters, inference tensors (no version counter) and
    while compiling, they are concatenated at every call and nothing is kept."""

    def __init__(self, linears: tuple[nn.Linear, nn.Linear, nn.Linear]):
        self.linears = self.modules = linears
        # (key, weight, bias, weak references to the parameters' storages) of the kept concatenation, or None: one
        # tuple, replaced whole, so that threads calling at once each read one consistent state
        self.kept: tuple | None = None

    def drop(self) -> None:
        """Forget the kept concatenation (its memory goes with it)."""
        self.kept = None

    def __getstate__(self) -> dict:
        # a copy or a pickle concatenates its own parameters: the kept buffers are not carried along
        return {**self.__dict__, "kept": None}

    def _params(self) -> list[torch.Tensor | None]:
        return [_param(lin, kind) for kind in ("weight", "bias") for lin in self.linears]

    @staticmethod
    def _fused(params: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The [3H, H] weight and the [3H] bias of [query, key, value weights, their biases]: no bias where none of
        the three has one, and zeros in the place of a missing one beside the others' (it adds nothing)."""
        weights, biases = params[:3], params[3:]
        present = next((b for b in biases if b is not None), None)
        if present is None:
            return torch.cat(weights, 0), None
        return torch.cat(weights, 0), torch.cat([present.new_zeros(w.shape[0]) if b is None else b
                                                 for w, b in zip(weights, biases)])

    def weights(self, training: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The fused [3H, H] weight and [3H] bias (None where the linears have no bias). training: the model is in
        training mode (nothing is kept for parameters that autograd reaches)."""
        params = self._params()
        present = [p for p in params if p is not None]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in present)
        if (grad and (training or torch.compiler.is_compiling())) or any(p.is_inference() for p in present):
            self.drop()
            return self._fused(params)
        # the key is read before the parameters are: a write landing in between shows at the next call
        key = (tuple(map(STORAGE_ADDRESS, present)), tuple(p.data_ptr() for p in present),
               tuple(p._version for p in present), pack_releases())
        kept = self.kept
        if kept is None or kept[0] != key:
            # never an inference tensor, whatever mode this call runs in: it is kept for later calls, which may save
            # it for a backward, and inference tensors are never packed
            with torch.inference_mode(False):
                weight, bias = self._fused([None if p is None else p.detach() for p in params])
            kept = (key, weight, bias, [StorageWeakRef(p.untyped_storage()) for p in present])
            self.kept = kept
        if grad:
            return _QKVSlices.apply(kept[1], kept[2], *params)
        return kept[1], kept[2]


class _FusedQKV:
    """A layer whose query, key and value are one linear already (ModernBERT's Wqkv): nothing to fuse or undo."""

    linears = ()

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.modules = (linear,)

    def weights(self, training: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias


class _SwapState:
    def __init__(self, base: nn.Module, backend: str | None):
        self.config = EncoderConfig.from_hf(base.config)
        self.layout: HfLayout = LAYOUTS[self.config.family]
        self.layers_path = tuple(self.layout.layers.split("."))
        self.layer_paths = [tuple(name.split(".")) for _, name in self.layout.layer]
        self.backend = backend
        self.qkv_paths = [tuple(name.split(".")) for name in self.layout.qkv]
        self.qkv = [self._fusion(tuple(_submodule(layer, path) for path in self.qkv_paths))
                    for layer in self.layers(base)]
        self.int8: Int8State | None = None
        self.layer_cache = LayerCache()
        self.norm_path = tuple(self.layout.norm.split("."))
        self.final_norm_path = tuple((self.layout.final_norm or "").split("."))
        # the layers' LayerNorms as the last gather of their weights found them: (path, module)
        self.layer_norms = self._layer_norms(base)
        refuse_hooks(base)  # the swapped forward never calls the modules inside: a hook there would never run

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return _submodule(base, self.layers_path)

    def training_config(self, base: nn.Module) -> EncoderConfig:
        """The config with the dropout rates the HF modules hold now, as HF's own forward would apply them (setting a
        Dropout's p, or putting an Identity in its place, are the usual ways to change them); one rate per kind, since
        the swapped encoder runs one rate for every layer."""
        layers = [(f"{self.layout.layers}.{i}.", layer) for i, layer in enumerate(self.layers(base))]
        attention = [(prefix, layer, path) for prefix, layer in layers for path in self.layout.attention_dropout]
        hidden = [(prefix, layer, path) for prefix, layer in layers for path in self.layout.hidden_dropout]
        embedding = [("", base, self.layout.embedding_dropout)]
        groups = {"attention_probs_dropout_prob": attention}
        if self.config.embedding_dropout_prob is None:  # the embeddings drop out at the hidden rate
            groups["hidden_dropout_prob"] = embedding + hidden
        else:
            groups.update(hidden_dropout_prob=hidden, embedding_dropout_prob=embedding)
        rates = {}
        for field, places in groups.items():
            found = {}
            for prefix, module, path in places:
                rate = _dropout_rate(module, path, prefix + path)
                if rate is not None:
                    found.setdefault(rate, prefix + path)
            if len(found) > 1:
                (p0, at0), (p1, at1) = list(found.items())[:2]
                raise UnsupportedModelError(
                    f"{at0} drops out with p={p0} but {at1} with p={p1}: the swapped encoder runs one rate for every "
                    f"{field.removesuffix('_prob').replace('_', ' ')} (set them alike, or call mtbert_fast.unswap)"
                )
            if found:
                rates[field] = next(iter(found))
        if all(getattr(self.config, field) == rate for field, rate in rates.items()):
            return self.config
        return dataclasses.replace(self.config, **rates)

    def _layer_norms(self, base: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{self.layout.layers}.{i}.{name}", _submodule(layer, path))
                for i, layer in enumerate(self.layers(base))
                for (part, name), path in zip(self.layout.layer, self.layer_paths) if part.endswith("_norm")]

    def run_config(self, base: nn.Module) -> EncoderConfig:
        """The config of this call: the dropout rates the modules hold in training (training_config), and the eps
        that every LayerNorm holds now, which the encoder reads from the config for all of them (set on the modules
        after the swap, it is followed; LayerNorms of different eps are refused by name)."""
        config = self.training_config(base) if base.training else self.config
        norms = [(f"embeddings.{self.layout.norm}", _submodule(base.embeddings, self.norm_path)), *self.layer_norms]
        if self.layout.final_norm is not None:
            norms.append((self.layout.final_norm, _submodule(base, self.final_norm_path)))
        if config.disentangled and config.norm_rel_ebd:
            norms.append(("encoder.LayerNorm", base.encoder.LayerNorm))
        eps = shared_layer_norm_eps(norms)
        if eps is None or eps == config.layer_norm_eps:
            return config
        return dataclasses.replace(config, layer_norm_eps=eps)

    def _fusion(self, modules: tuple[nn.Module, ...]) -> _QKVFusion | _FusedQKV:
        return _FusedQKV(modules[0]) if len(modules) == 1 else _QKVFusion(modules)

    def _current_qkv(self, index: int, layer: nn.Module) -> _QKVFusion | _FusedQKV:
        """Layer `index`'s query/key/value, fused afresh where a module was put in the place of one (a new plain
        Linear is taken; anything else is refused by name)."""
        fusion = self.qkv[index]
        modules = tuple(_submodule(layer, path) for path in self.qkv_paths)
        if any(m is not kept for m, kept in zip(modules, fusion.modules)):
            for name, module in zip(self.layout.qkv, modules):
                check_plain_module(f"{self.layout.layers}.{index}.{name}", module)
                _check_qkv_shape(self.config, self.layout, f"{self.layout.layers}.{index}.{name}", module)
            fusion = self.qkv[index] = self._fusion(modules)
        return fusion

    def release(self, base: nn.Module) -> None:
        """Undo what the state did to the model: the refused hooks."""
        allow_hooks(base)

    def quantize(self, base: nn.Module, calibration, smoothing: float) -> None:
        def quantize():
            with torch.no_grad():  # the fused QKV buffers, not copies made for autograd
                layers = self.layer_weights(base)
            return quantize_encoder(self.config, _embedding_weights(base, self.layout), layers, calibration,
                                    smoothing, self.backend, self.relative_bias(base))

        self.int8 = Int8State(self.layers(base), quantize)
        for fusion in self.qkv:  # the int8 layers never read the float concatenations
            if isinstance(fusion, _QKVFusion):
                fusion.drop()

    def relative_bias(self, base: nn.Module) -> torch.Tensor | None:
        """MPNet's [buckets, heads] relative position bias weight, or None."""
        name = self.layout.relative_bias
        return base.get_submodule(name).weight if name is not None else None

    def disentangled(self, base: nn.Module, layers: list[LayerWeights]) -> DisentangledWeights | None:
        """DeBERTa's relative-position table, its LayerNorm and each layer's projections of it, or None."""
        if not self.config.disentangled:
            return None
        encoder = base.encoder
        norm = (encoder.LayerNorm.weight, encoder.LayerNorm.bias) if self.config.norm_rel_ebd else None
        projections = [
            disentangled_projections(self.config, w.qkv_weight, w.qkv_bias,
                                     getattr(layer.attention.self, "pos_key_proj", None),
                                     getattr(layer.attention.self, "pos_query_proj", None))
            for layer, w in zip(self.layers(base), layers)
        ]
        return DisentangledWeights(encoder.rel_embeddings.weight, norm, projections)

    def final_norm(self, base: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """ModernBERT's LayerNorm after the last layer, or None."""
        if self.layout.final_norm is None:
            return None
        norm = base.get_submodule(self.layout.final_norm)
        return norm.weight, norm.bias

    def run_layers(self, base: nn.Module) -> tuple[list, dict | None]:
        """The layers to run and the one-call stacks kept for them (Int8State's, or LayerCache's in inference)."""
        if self.int8 is not None:
            return self.int8.current(self.layers(base)), self.int8.stacks
        return self.layer_cache.current(self.layers(base), lambda: self.layer_weights(base))

    def layer_weights(self, base: nn.Module) -> list[LayerWeights]:
        out = []
        for i, layer in enumerate(self.layers(base)):
            fusion = self._current_qkv(i, layer)
            modules = [_submodule(layer, path) for path in self.layer_paths]
            for (_, name), module in zip(self.layout.layer, modules):
                check_plain_module(f"{self.layout.layers}.{i}.{name}", module)
            params = []
            for (part, _), module in zip(self.layout.layer, modules):
                weight, bias = _param(module, "weight"), _param(module, "bias")
                # A linear or LayerNorm built without a bias where the config gives that part one (a Linear(...,
                # bias=False) put in its place) adds nothing: zeros stand in for the kernels that take a bias.
                # ModernBERT's first attn_norm is an Identity, and its parts may have no bias: None there.
                if bias is None and weight is not None and layer_has_bias(self.config, part):
                    bias = weight.detach().new_zeros(weight.shape[0])
                params += [weight, bias]
            out.append(LayerWeights(*fusion.weights(base.training), *params))
        self.layer_norms = self._layer_norms(base)
        return out


def _dropout_rate(module: nn.Module, path: str, name: str) -> float | None:
    """The dropout rate at `path` under module: a Dropout's p, 0 for an Identity in its place, or a float attribute
    (ModernBERT's attention_dropout); None where the model has nothing there."""
    obj = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
    if obj is None:
        return None
    if type(obj) is nn.Dropout:
        return float(obj.p)
    if type(obj) is nn.Identity:
        return 0.0
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    raise UnsupportedModelError(f"{name} is a {type(obj).__name__}, where the swapped encoder applies a plain dropout "
                                "(torch.nn.Dropout, or an Identity for none)")


def _embedding_weights(base: nn.Module, layout: HfLayout) -> EmbeddingWeights:
    emb = base.embeddings
    types, project = getattr(emb, "token_type_embeddings", None), getattr(base, "embeddings_project", None)
    norm = emb.get_submodule(layout.norm)
    positions = getattr(emb, "position_embeddings", None) if layout.positions else None
    word = emb.get_submodule(layout.word)
    for name, module in ((layout.word, word), ("token_type_embeddings", types), (layout.norm, norm),
                         ("position_embeddings", positions)):
        if module is not None:
            check_plain_module(f"embeddings.{name}", module)
    if project is not None:
        check_plain_module("embeddings_project", project)
    return EmbeddingWeights(
        word.weight,
        positions.weight if positions is not None else None,
        types.weight if types is not None else None,
        norm.weight,
        norm.bias,
        project.weight if project is not None else None,
        project.bias if project is not None else None,
    )


# The packages a swapped model's call passes through before it reaches the encoder: this one, PyTorch's module call,
# transformers' task models, sentence-transformers' wrappers.
_LIBRARIES = ("mtbert_fast", "torch", "transformers", "sentence_transformers")


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside those packages: the user's own call, however deeply the
    task model and the module call nest the encoder's."""
    dirs = tuple(os.path.dirname(sys.modules[name].__file__) + os.sep for name in _LIBRARIES if name in sys.modules)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(dirs):
        frame, level = frame.f_back, level + 1
    return level


def _swapped_forward(
    self,
    input_ids=None,
    attention_mask=None,
    token_type_ids=None,
    position_ids=None,
    inputs_embeds=None,
    encoder_hidden_states=None,
    encoder_attention_mask=None,
    output_attentions=None,
    output_hidden_states=None,
    return_dict=None,
    **kwargs,
):
    from transformers import modeling_outputs

    refuse_graph_capture()  # before the int8 weights' watch, which export's own parameters would trip
    state: _SwapState = getattr(self, _STATE)
    if encoder_hidden_states is not None or encoder_attention_mask is not None:
        raise NotImplementedError("mtbert_fast's encoder has no cross-attention (encoder_hidden_states)")
    if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
        raise NotImplementedError(
            "output_attentions=True is not available after mtbert_fast.swap: the fused attention never forms the "
            "attention probabilities. Call mtbert_fast.unswap(model) to get them from HF's implementation."
        )
    unknown = {name for name, value in kwargs.items() if value is not None} - _IGNORED_KWARGS
    if unknown:
        raise TypeError(f"unexpected arguments for the swapped encoder: {', '.join(sorted(unknown))}")
    if output_hidden_states is None:
        output_hidden_states = getattr(self.config, "output_hidden_states", False)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    # HF's DistilBertModel takes token_type_ids in **kwargs and ignores them, and DeBERTa-v2 without a token-type table
    # (DeBERTa-v3's type_vocab_size 0) ignores them too: its tokenizer hands them out all the same
    if not state.layout.token_types or state.config.type_vocab_size == 0:
        token_type_ids = None
    pooler = getattr(self, "pooler", None) if state.layout.pooler else None
    if pooler is not None:
        check_plain_module("pooler.dense", pooler.dense)
    layers, stacks = state.run_layers(self)
    out = encode(
        state.run_config(self),
        _embedding_weights(self, state.layout),
        layers,
        (pooler.dense.weight, pooler.dense.bias) if pooler is not None else None,
        input_ids,
        attention_mask,
        token_type_ids,
        position_ids,
        inputs_embeds,
        output_hidden_states=bool(output_hidden_states),
        training=self.training,
        backend=state.backend,
        relative_attention_bias=state.relative_bias(self),
        final_norm=state.final_norm(self),
        disentangled=state.disentangled(self, layers),
        stacks=stacks,
    )
    # after encode(), which has validated the mask
    if not out.packed.all_real and _first_column_padded(out.packed, attention_mask):
        if pooler is not None:
            message = ("the swapped pooler reads each row's first real token, where HF's reads position 0 (a padding "
                       "slot), so pooler_output and the heads that read it differ from HF's there")
        else:
            message = ("position 0 of last_hidden_state is then a padding slot, zeros after the swap where HF's holds "
                       "a padding token's state, so a head that reads position 0 (the classification heads of "
                       "RoBERTa, ELECTRA, DistilBERT, DeBERTa, ModernBERT) differs from HF's there")
        warnings.warn(f"left-padded batch: {message}; pad on the right (these tokenizers' default) to match HF",
                      stacklevel=_caller_level())
    fields = {"last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states}
    if state.layout.pooler:
        fields["pooler_output"] = out.pooler_output
    result = getattr(modeling_outputs, state.layout.output)(**fields)
    return result if return_dict else result.to_tuple()


def _first_column_padded(packed: PackedBatch, attention_mask: torch.Tensor) -> bool:
    known = packed.first_column_padded
    return known if known is not None else bool((attention_mask[:, 0] == 0).any())


class _SwappedForward:
    """A swapped base model's forward: HF's signature (as inspect.signature shows it and as positional arguments map
    to it) around `_swapped_forward`, so that a swapped BertModel is called exactly as before. Kept on the module
    itself, and pickled, copied and deep-copied along with it."""

    def __init__(self, module: nn.Module, hf_forward):
        self.module, self.hf_forward = module, hf_forward
        signature = inspect.signature(hf_forward)
        self.signature = signature
        params = list(signature.parameters.values())[1:]
        self.__signature__ = signature.replace(parameters=params)
        self.named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        self.any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)

    def __reduce__(self):
        return _SwappedForward, (self.module, self.hf_forward)

    def __call__(self, *args, **kwargs):
        module = self.module
        if not args and (self.any_keyword or kwargs.keys() <= self.named):  # keywords alone: bound as given
            return _swapped_forward(module, **kwargs)
        arguments = self.signature.bind(module, *args, **kwargs).arguments
        arguments.pop(next(iter(self.signature.parameters)))
        for name, param in self.signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
            elif param.kind is param.VAR_POSITIONAL and arguments.pop(name, ()):
                raise TypeError(f"{type(module).__name__}.forward got unexpected positional arguments")
        return _swapped_forward(module, **arguments)


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models `swap` works on: `model` itself, or those inside a sentence-transformers model
    (SentenceTransformer, CrossEncoder): each module of it that holds one as `auto_model`."""
    if not any(cls.__module__.startswith("sentence_transformers.") for cls in type(model).__mro__):
        return [model]
    inner = list({id(m.auto_model): m.auto_model for m in model.modules()
                  if isinstance(getattr(m, "auto_model", None), nn.Module)}.values())
    if not inner:
        raise TypeError(f"{type(model).__name__} holds no transformers model (no module with an auto_model) to swap")
    return inner


def swap(
    model: nn.Module,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    *,
    calibration=None,
    smoothing: float = DEFAULT_SMOOTHING,
) -> nn.Module:
    """Run `model`'s BERT-family encoder on mtbert_fast's packed-token path, in place; returns `model`.

    model: an HF BertModel, RobertaModel, DistilBertModel, ElectraModel, MPNetModel, ModernBertModel or
      DebertaV2Model (DeBERTa-v3 too), or any of their *For* task models (XLM-R and CamemBERT too); or a sentence-transformers
      SentenceTransformer or CrossEncoder, whose transformers model is swapped (`encode` / `predict` keep working).
    backend: "auto" or one of cuda / triton / cpu / reference for every op.
    dtype: if given, the whole model is cast to it first (as model.to(dtype) would), e.g. torch.bfloat16.
      torch.qint8: int8 inference on the CPU. The encoder's four products per layer run on int8 weights (per
      output channel) and int8 activations (per token, smoothed); embeddings, attention, LayerNorm, GELU and the
      task heads stay in the model's float dtype (float32, or bfloat16 if the model was cast to it before). The
      float weights stay in the model, so state_dict and `unswap` are unaffected; after changing them, swap again.
    calibration, smoothing: for torch.qint8 only (see FastBertModel.quantize): model inputs to calibrate the
      activation ranges on (a tokenizer's output, or a list of them; with them the weights are rounded with GPTQ's
      error compensation; default: synthetic token ids), and SmoothQuant's alpha.
    Outputs at padding positions of last_hidden_state (and hidden_states) are zeros. Undo with `unswap`.
    """
    bases = [_base_model(m) for m in _hf_models(model)]
    requested_backend(backend)
    for base in bases:  # refuses unsupported configs before anything changes
        config = EncoderConfig.from_hf(base.config)
        if hasattr(base, _STATE):
            raise RuntimeError(f"{type(model).__name__} is already swapped; call mtbert_fast.unswap(model) first")
        _check_encoder_modules(base, config, LAYOUTS[config.family])
    check_model_dtype(dtype)
    int8 = dtype == torch.qint8
    if calibration is not None and not int8:
        raise ValueError("calibration is read for int8 only: pass dtype=torch.qint8 with it")
    if smoothing != DEFAULT_SMOOTHING and not int8:
        raise ValueError("smoothing is read for int8 only: pass dtype=torch.qint8 with it")
    if dtype is not None and not int8:
        model.to(dtype)
    states = []
    try:
        for base in bases:
            states.append(_SwapState(base, None if backend == "auto" else backend))
            if int8:
                states[-1].quantize(base, calibration, smoothing)
    except Exception:
        for base, state in zip(bases, states):
            state.release(base)
        raise
    for base, state in zip(bases, states):
        setattr(base, _STATE, state)
        base.forward = _SwappedForward(base, type(base).forward)
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Restore HF's own forward; parameters keep their values (and the dtype `swap` cast them to)."""
    bases = [_base_model(m) for m in _hf_models(model)]
    if not all(hasattr(base, _STATE) for base in bases):
        raise RuntimeError(f"{type(model).__name__} is not swapped")
    for base in bases:
        getattr(base, _STATE).release(base)
        del base.forward
        delattr(base, _STATE)
    return model


def is_swapped(model: nn.Module) -> bool:
    return all(hasattr(_base_model(m), _STATE) for m in _hf_models(model))
