"""Swap the fast encoder into a Hugging Face BERT/RoBERTa/DistilBERT/ELECTRA/MPNet/ModernBERT/DeBERTa-v2 model (or the one inside a
sentence-transformers model) in place, and back.

`swap` replaces the forward of the model's base encoder (BertModel / RobertaModel / DistilBertModel / ElectraModel /
MPNetModel / ModernBertModel / DebertaV2Model, also inside any `*For*` task model) with the packed-token path. No module is replaced and no parameter is renamed,
so state_dict keys, the forward signature and the output types stay HF's. Query, key and value weights are moved
into one [3H, H] buffer that the three parameters view, so the fused QKV GEMM needs no copy; while swapped,
`state_dict()` hands out independent copies of those three, so checkpoints never hold shared storage.
"""

from __future__ import annotations

import inspect
import os
import sys
import types
import warnings

import torch
import torch.nn as nn

from mtbert_fast.models.config import EncoderConfig, family_names
from mtbert_fast.models.encoder import (
    DisentangledWeights, EmbeddingWeights, Int8State, LayerCache, LayerWeights, PackedBatch, disentangled_projections,
    encode, quantize_encoder,
)
from mtbert_fast.models.hf_mapping import HF_PREFIXES, LAYOUTS, HfLayout
from mtbert_fast.models.int8 import DEFAULT_SMOOTHING, check_model_dtype
from mtbert_fast.ops.dispatch import requested_backend

_STATE = "_mtbert_fast_swap"
_IGNORED_KWARGS = {"use_cache", "cache", "past_key_values", "cache_position"}


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


def _param(module: nn.Module, kind: str) -> torch.Tensor | None:
    """getattr(module, kind, None) for a parameter, without nn.Module.__getattr__'s Python fallback."""
    params = module._parameters
    return params[kind] if kind in params else getattr(module, kind, None)


class _QKVFusion:
    """One layer's query/key/value parameters as views of one [3H, H] weight and one [3H] bias buffer.

    The parameters keep their own version counters (`.data =` does not share the buffer's), so a write through a
    parameter (load_state_dict, an optimizer step) moves the fused weight's version on by hand: the packed copy
    oneDNN computes with (models/weight_pack.py) follows it.
    """

    def __init__(self, linears: tuple[nn.Linear, nn.Linear, nn.Linear]):
        self.linears = linears
        self.fuse()

    def fuse(self) -> None:
        for kind in ("weight", "bias"):
            params = [_param(lin, kind) for lin in self.linears]
            buf = torch.cat([p.detach() for p in params], 0)
            for p, view in zip(params, buf.chunk(3, 0)):
                p.data = view
            setattr(self, kind, buf)
        self.versions = self._weight_versions()
        self.addresses = self._addresses()

    def _weight_versions(self) -> tuple[int, ...] | None:
        weights = [_param(lin, "weight") for lin in self.linears]
        if any(w.is_inference() for w in weights):  # no version counter; such weights are never packed
            return None
        return tuple(w._version for w in weights)

    def _addresses(self) -> tuple[int, ...]:
        return tuple(_param(lin, kind).data_ptr() for kind in ("weight", "bias") for lin in self.linears)

    def _intact(self) -> bool:
        """Whether every parameter is still its view of the fused buffers: .to(), .half() or assigning a parameter
        gives it other memory, and while the buffers live no other tensor can take their addresses."""
        return self._addresses() == self.addresses

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused [3H, H] weight and [3H] bias; concatenated afresh when autograd must reach the parameters."""
        params = [_param(lin, k) for k in ("weight", "bias") for lin in self.linears]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat(params[:3], 0), torch.cat(params[3:], 0)
        if not self._intact():  # .to(), .half() or a reassigned parameter broke the views
            self.fuse()
        versions = self._weight_versions()
        if versions != self.versions and not self.weight.is_inference():
            torch.autograd.graph.increment_version(self.weight)
            self.versions = versions
        return self.weight, self.bias


class _FusedQKV:
    """A layer whose query, key and value are one linear already (ModernBERT's Wqkv): nothing to fuse or undo."""

    linears = ()

    def __init__(self, linear: nn.Linear):
        self.linear = linear

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.linear.weight, self.linear.bias


class _SwapState:
    def __init__(self, base: nn.Module, backend: str | None):
        self.config = EncoderConfig.from_hf(base.config)
        self.layout: HfLayout = LAYOUTS[self.config.family]
        self.layers_path = tuple(self.layout.layers.split("."))
        self.layer_paths = [tuple(name.split(".")) for _, name in self.layout.layer]
        self.backend = backend
        if len(self.layout.qkv) == 1:
            self.qkv = [_FusedQKV(layer.get_submodule(self.layout.qkv[0])) for layer in self.layers(base)]
            qkv_keys = set()
        else:
            self.qkv = [_QKVFusion(tuple(layer.get_submodule(n) for n in self.layout.qkv))
                        for layer in self.layers(base)]
            qkv_keys = {f"{self.layout.layers}.{i}.{n}.{kind}" for i in range(len(self.qkv)) for n in self.layout.qkv
                        for kind in ("weight", "bias")}

        def unshare_qkv(module, state_dict, prefix, local_metadata):
            for key, value in state_dict.items():
                if key.startswith(prefix) and key[len(prefix):] in qkv_keys:
                    state_dict[key] = value.clone()

        self.state_dict_hook = base.register_state_dict_post_hook(unshare_qkv)
        self.int8: Int8State | None = None
        self.layer_cache = LayerCache()

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return _submodule(base, self.layers_path)

    def release(self) -> None:
        """Undo what the state did to the model: the state_dict hook, the shared QKV storage."""
        self.state_dict_hook.remove()
        for fusion in self.qkv:  # give each parameter its own storage again
            for lin in fusion.linears:
                for kind in ("weight", "bias"):
                    p = getattr(lin, kind)
                    p.data = p.data.clone()

    def quantize(self, base: nn.Module, calibration, smoothing: float) -> None:
        with torch.no_grad():  # the fused QKV buffers, not copies made for autograd
            layers = self.layer_weights(base)
        int8 = quantize_encoder(self.config, _embedding_weights(base, self.layout), layers, calibration, smoothing,
                                self.backend, self.relative_bias(base))
        self.int8 = Int8State(int8, self.layers(base))

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
        for layer, fusion in zip(self.layers(base), self.qkv):
            modules = [_submodule(layer, path) for path in self.layer_paths]
            # ModernBERT's first attn_norm is an Identity and its linears may have no bias: None there
            out.append(LayerWeights(*fusion.weights(), *(_param(m, kind) for m in modules
                                                         for kind in ("weight", "bias"))))
        return out


def _embedding_weights(base: nn.Module, layout: HfLayout) -> EmbeddingWeights:
    emb = base.embeddings
    types, project = getattr(emb, "token_type_embeddings", None), getattr(base, "embeddings_project", None)
    norm = emb.get_submodule(layout.norm)
    positions = getattr(emb, "position_embeddings", None) if layout.positions else None
    return EmbeddingWeights(
        emb.get_submodule(layout.word).weight,
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

    state: _SwapState = getattr(self, _STATE)
    if encoder_hidden_states is not None or encoder_attention_mask is not None:
        raise NotImplementedError("mtbert_fast's encoder has no cross-attention (encoder_hidden_states)")
    if output_attentions if output_attentions is not None else getattr(self.config, "output_attentions", False):
        raise NotImplementedError(
            "output_attentions=True is not available after mtbert_fast.swap: the fused attention never forms the "
            "attention probabilities. Call mtbert_fast.unswap(model) to get them from HF's implementation."
        )
    unknown = set(kwargs) - _IGNORED_KWARGS
    if unknown:
        raise TypeError(f"unexpected arguments for the swapped encoder: {', '.join(sorted(unknown))}")
    if output_hidden_states is None:
        output_hidden_states = getattr(self.config, "output_hidden_states", False)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    if not state.layout.token_types:  # HF's DistilBertModel takes token_type_ids in **kwargs and ignores them
        token_type_ids = None
    pooler = getattr(self, "pooler", None) if state.layout.pooler else None
    layers, stacks = state.run_layers(self)
    out = encode(
        state.config,
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
    if pooler is not None and not out.packed.all_real and _first_column_padded(out.packed, attention_mask):
        warnings.warn(
            "left-padded batch: the swapped pooler reads each row's first real token, where HF's reads position 0 "
            "(a padding slot), so pooler_output and the heads that read it differ from HF's there; pad on the right "
            "(the BERT tokenizers' default) to match HF",
            stacklevel=_caller_level(),
        )
    fields = {"last_hidden_state": out.last_hidden_state, "hidden_states": out.hidden_states}
    if state.layout.pooler:
        fields["pooler_output"] = out.pooler_output
    result = getattr(modeling_outputs, state.layout.output)(**fields)
    return result if return_dict else result.to_tuple()


def _first_column_padded(packed: PackedBatch, attention_mask: torch.Tensor) -> bool:
    known = packed.first_column_padded
    return known if known is not None else bool((attention_mask[:, 0] == 0).any())


def _forward_with_signature(hf_forward) -> types.FunctionType:
    """A forward that keeps HF's signature (as inspect.signature shows it and as positional arguments map to it)
    and runs `_swapped_forward`: a swapped BertModel is called exactly as before."""
    signature = inspect.signature(hf_forward)
    params = list(signature.parameters.values())[1:]
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    any_keyword = any(p.kind is p.VAR_KEYWORD for p in params)

    def forward(self, *args, **kwargs):
        if not args and (any_keyword or kwargs.keys() <= named):  # keywords alone: bind would hand them on as given
            return _swapped_forward(self, **kwargs)
        arguments = signature.bind(self, *args, **kwargs).arguments
        arguments.pop(next(iter(signature.parameters)))
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
            elif param.kind is param.VAR_POSITIONAL and arguments.pop(name, ()):
                raise TypeError(f"{type(self).__name__}.forward got unexpected positional arguments")
        return _swapped_forward(self, **arguments)

    forward.__signature__ = signature
    return forward


def _hf_models(model: nn.Module) -> list[nn.Module]:
    """The transformers models `swap` works on: `model` itself, or those inside a sentence-transformers model
    (SentenceTransformer, CrossEncoder): each module of it that holds one as `auto_model`."""
    if not type(model).__module__.startswith("sentence_transformers."):
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
        EncoderConfig.from_hf(base.config)
        if hasattr(base, _STATE):
            raise RuntimeError(f"{type(model).__name__} is already swapped; call mtbert_fast.unswap(model) first")
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
        for state in states:
            state.release()
        raise
    for base, state in zip(bases, states):
        setattr(base, _STATE, state)
        base.forward = types.MethodType(_forward_with_signature(type(base).forward), base)
    return model


def unswap(model: nn.Module) -> nn.Module:
    """Restore HF's own forward; parameters keep their values (and the dtype `swap` cast them to)."""
    bases = [_base_model(m) for m in _hf_models(model)]
    if not all(hasattr(base, _STATE) for base in bases):
        raise RuntimeError(f"{type(model).__name__} is not swapped")
    for base in bases:
        getattr(base, _STATE).release()
        del base.forward
        delattr(base, _STATE)
    return model


def is_swapped(model: nn.Module) -> bool:
    return all(hasattr(_base_model(m), _STATE) for m in _hf_models(model))
