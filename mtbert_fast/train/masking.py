"""The BERT pre-training inputs: masked-LM corruption and next-sentence pairs (Devlin et al. 2019, section 3.1)."""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import torch

IGNORE_INDEX = -100
# next-sentence labels as HF's BertForPreTraining reads them
IS_NEXT, NOT_NEXT = 0, 1


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    special_tokens_mask: torch.Tensor | None,
    vocab_size: int,
    mask_token_id: int,
    mlm_probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM corruption.

    input_ids int64 [B, L]; attention_mask [B, L] (1 = real token; None: all real); special_tokens_mask [B, L]
    (1 = [CLS]/[SEP]/...; None: none).  Each real, non-special token is selected with probability
    mlm_probability; a selected token becomes [MASK] with probability 0.8, a uniformly random token of
    [0, vocab_size) with 0.1, and stays as it is with 0.1.  When nothing at all is selected one candidate is
    selected anyway, so the loss is never a mean over zero tokens.
    -> (corrupted input_ids [B, L], labels int64 [B, L]: the original id at selected tokens, -100 elsewhere).
    The draws come from `generator` only, so a generator in a given state always gives the same result.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"mask_tokens: input_ids must be [batch, seqlen], got shape {tuple(input_ids.shape)}")
    if not 0.0 < mlm_probability < 1.0:
        raise ValueError(f"mask_tokens: mlm_probability must be in (0, 1), got {mlm_probability}")
    candidates = torch.ones_like(input_ids, dtype=torch.bool)
    for name, m in (("attention_mask", attention_mask), ("special_tokens_mask", special_tokens_mask)):
        if m is not None and m.shape != input_ids.shape:
            raise ValueError(f"mask_tokens: {name} has shape {tuple(m.shape)}, input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None:
        candidates &= attention_mask.bool()
    if special_tokens_mask is not None:
        candidates &= ~special_tokens_mask.bool()

    # every draw is made whatever the input holds, so the generator always advances by the same amount
    select_u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    action_u = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)

    selected = candidates & (select_u < mlm_probability)
    if not selected.any() and candidates.any():
        # the candidate with the smallest draw: the one most nearly selected
        flat = torch.where(candidates, select_u, torch.full_like(select_u, 2.0)).flatten()
        selected.view(-1)[flat.argmin()] = True

    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    to_mask = selected & (action_u < 0.8)
    to_random = selected & (action_u >= 0.8) & (action_u < 0.9)
    corrupted = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    corrupted = torch.where(to_random, random_ids.to(input_ids.dtype), corrupted)
    return corrupted, labels


class NspExample(NamedTuple):
    """One pre-training pair: input_ids = [CLS] A [SEP] B [SEP], token_type_ids 0 over "[CLS] A [SEP]" and 1 over
    "B [SEP]", special_tokens_mask 1 at [CLS]/[SEP], label IS_NEXT (0) or NOT_NEXT (1); cut: whether max_length cut
    A or B."""

    input_ids: list[int]
    token_type_ids: list[int]
    special_tokens_mask: list[int]
    label: int
    cut: bool = False


def truncate_pair(a: list[int], b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Trims the longer of the two from its end until together they fit in max_tokens (BERT's truncate_seq_pair)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def nsp_pair(a: Sequence[int], b: Sequence[int], label: int, cls_id: int, sep_id: int, max_length: int) -> NspExample:
    """[CLS] A [SEP] B [SEP], truncated to max_length tokens."""
    cut = len(a) + len(b) > max_length - 3
    a, b = truncate_pair(list(a), list(b), max_length - 3)
    ids = [cls_id, *a, sep_id, *b, sep_id]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    special = [1] + [0] * len(a) + [1] + [0] * len(b) + [1]
    return NspExample(ids, types, special, label, cut)


def make_nsp_examples(
    documents: Sequence[Sequence[Sequence[int]]],
    cls_id: int,
    sep_id: int,
    max_length: int,
    seed: int = 0,
    next_probability: float = 0.5,
) -> list[NspExample]:
    """Next-sentence pairs from a corpus: documents -> sentences -> token ids.

    For each sentence that has a successor in its document, A is the sentence and B is, with probability
    next_probability, its successor (label IS_NEXT), otherwise a random sentence of another document (label
    NOT_NEXT).  Deterministic given seed.  Needs at least two documents (a random B must come from elsewhere).
    """
    docs = [[list(s) for s in d if len(s)] for d in documents]
    if sum(1 for d in docs if d) < 2:
        raise ValueError("next-sentence pairs need at least two non-empty documents (B is drawn from another one)")
    if max_length < 5:
        raise ValueError(f"max_length {max_length} leaves no room for two sentences between [CLS] and [SEP]s")
    rng = random.Random(seed)
    non_empty = [i for i, d in enumerate(docs) if d]
    examples = []
    for di, doc in enumerate(docs):
        for si in range(len(doc) - 1):
            if rng.random() < next_probability:
                b, label = doc[si + 1], IS_NEXT
            else:
                other = di
                while other == di:
                    other = rng.choice(non_empty)
                b, label = rng.choice(docs[other]), NOT_NEXT
            examples.append(nsp_pair(doc[si], b, label, cls_id, sep_id, max_length))
    if not examples:
        raise ValueError("no document has two sentences: next-sentence pairs need consecutive sentences")
    return examples
