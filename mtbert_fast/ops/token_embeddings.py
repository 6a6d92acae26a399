"""token_embeddings: a BERT embedding layer's output at the real tokens, LayerNorm(word + token type + position), in
one call, for CPU inference.

The encoder's embedding step otherwise gathers the real tokens' ids and types, looks each table up, adds the rows,
numbers the positions and normalizes: a dozen small calls, a large share of a short input's forward. The kernel does
it row by row from the padded ids, summing in fp32. Inference only (no autograd).
"""

from __future__ import annotations

import torch

from mtbert_fast.ops import reference
from mtbert_fast.ops.registry import CPU_DTYPES, Backend, Op

_ID_DTYPES = (torch.int64, torch.int32)


def _check(input_ids, indices, token_type_ids, word, position, token_type, weight, bias) -> None:
    op = "token_embeddings"
    if input_ids.dim() != 2 or input_ids.dtype not in _ID_DTYPES:
        raise ValueError(f"{op}: input_ids must be [batch, seqlen] int64 or int32, got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    if token_type_ids is not None and (token_type_ids.shape != input_ids.shape
                                       or token_type_ids.dtype != input_ids.dtype):
        raise ValueError(f"{op}: token_type_ids must have input_ids' shape {tuple(input_ids.shape)} and dtype "
                         f"{input_ids.dtype}, got {token_type_ids.dtype} {tuple(token_type_ids.shape)}")
    if indices is not None and (indices.dim() != 1 or indices.dtype != torch.int64):
        raise ValueError(f"{op}: indices must be a 1-D int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if word.dim() != 2 or not word.dtype.is_floating_point:
        raise ValueError(f"{op}: word must be a [vocab, width] floating-point table, got {word.dtype} "
                         f"{tuple(word.shape)}")
    width = word.shape[1]
    for name, t in (("position", position), ("token_type", token_type)):
        if t is not None and (t.dim() != 2 or t.shape[1] != width or t.dtype != word.dtype):
            raise ValueError(f"{op}: {name} must be a [rows, {width}] table of word's dtype {word.dtype}, got "
                             f"{t.dtype} {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (width,) or t.dtype not in (word.dtype, torch.float32)):
            raise ValueError(f"{op}: {name} must be a vector of {width} elements in word's dtype or float32, got "
                             f"{t.dtype} {tuple(t.shape)}")
    tensors = {"input_ids": input_ids, "indices": indices, "token_type_ids": token_type_ids, "position": position,
               "token_type": token_type, "weight": weight, "bias": bias}
    for name, t in tensors.items():
        if t is not None and t.device != word.device:
            raise ValueError(f"{op}: {name} is on {t.device} but word is on {word.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors.values(), word)):
        raise RuntimeError(f"{op} runs inference only: call it under torch.no_grad() or torch.inference_mode(), or "
                           "train with the embedding modules themselves")


def token_embeddings(input_ids: torch.Tensor, indices: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                     word: torch.Tensor, position: torch.Tensor | None, token_type: torch.Tensor | None,
                     weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-12, *,
                     backend: str | None = None) -> torch.Tensor:
    """LayerNorm(word[id] + token_type[type] + position[column]) * weight + bias of the tokens at `indices` -> [T, E]
    in word's dtype, statistics in fp32.

    input_ids [B, L] int64 or int32; indices int64 [T], slots of the flattened [B * L] (unpad_indices), or None for
    every slot in order; token_type_ids like input_ids, or None for type 0; word [V, E]; position [P, E] or None (no
    absolute positions), a token's position its column in input_ids; token_type [TT, E] or None; weight, bias [E] in
    word's dtype or float32, bias None for none. An id, type or position outside its table is a ValueError naming
    it. The sum (word + token type) + position is formed in fp32, where the modules add in their dtype.
    """
    _check(input_ids, indices, token_type_ids, word, position, token_type, weight, bias)
    return OP(input_ids, indices, token_type_ids, word, position, token_type, weight, bias, eps, backend=backend)


def _fake(input_ids, indices, token_type_ids, word, position, token_type, weight, bias, eps):
    rows = indices.shape[0] if indices is not None else input_ids.shape[0] * input_ids.shape[1]
    return word.new_empty((rows, word.shape[1]))


OP = Op(
    name="token_embeddings",
    # input_ids [B, L], indices int64 [T] or None, token_type_ids [B, L] or None, word [V, E], position [P, E],
    # token_type [TT, E], weight [E], bias [E] -> [T, E]
    schema="(Tensor input_ids, Tensor? indices, Tensor? token_type_ids, Tensor word, Tensor? position, "
           "Tensor? token_type, Tensor weight, Tensor? bias, float eps) -> Tensor",
    reference=reference.token_embeddings,
    backends={"cpu": Backend(dtypes=CPU_DTYPES)},
    fake=_fake,
    main=3,
)
