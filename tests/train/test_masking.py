"""BERT's masked-LM corruption and next-sentence pairs: the statistics of the recipe, its determinism, and that
special tokens and padding are never touched."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast.train import make_nsp_examples, mask_tokens
from mtbert_fast.train.masking import IGNORE_INDEX, IS_NEXT, NOT_NEXT, nsp_pair

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 101, 102, 103


def _batch(rows=512, seqlen=128, seed=0):
    """Ragged rows [CLS] tokens [SEP] + padding, with the special tokens mask and attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, seqlen + 1, (rows,), generator=g)
    ids = torch.randint(200, VOCAB, (rows, seqlen), generator=g)
    positions = torch.arange(seqlen)
    attention = (positions[None, :] < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(rows), lengths - 1] = SEP
    ids = ids.masked_fill(attention == 0, PAD)
    special = ((ids == CLS) | (ids == SEP) | (attention == 0)).long()
    return ids, attention, special


def test_masking_statistics_follow_the_bert_recipe():
    ids, attention, special = _batch()
    out, labels = mask_tokens(ids, attention, special, VOCAB, MASK, 0.15, torch.Generator().manual_seed(1))
    candidates = attention.bool() & ~special.bool()
    selected = labels != IGNORE_INDEX
    n_candidates, n_selected = int(candidates.sum()), int(selected.sum())
    assert n_candidates > 30_000

    # 15% of the real, non-special tokens; never a special token or padding
    assert abs(n_selected / n_candidates - 0.15) < 0.01
    assert not (selected & ~candidates).any()
    assert torch.equal(out[~candidates], ids[~candidates])
    assert torch.equal(labels[selected], ids[selected])

    # of the selected: 80% [MASK], 10% a random token, 10% unchanged (a random draw may hit the original: 1/V)
    to_mask = (out == MASK) & selected
    unchanged = (out == ids) & selected
    to_random = selected & ~to_mask & ~unchanged
    assert abs(int(to_mask.sum()) / n_selected - 0.8) < 0.02
    assert abs(int(to_random.sum()) / n_selected - 0.1) < 0.015
    assert abs(int(unchanged.sum()) / n_selected - 0.1) < 0.015
    assert int(out[to_random].max()) < VOCAB and int(out[to_random].min()) >= 0
    # nothing outside the selection changes
    assert torch.equal(out[~selected], ids[~selected])


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_masking_rate_follows_mlm_probability(p):
    ids, attention, special = _batch(rows=256, seed=3)
    _, labels = mask_tokens(ids, attention, special, VOCAB, MASK, p, torch.Generator().manual_seed(0))
    rate = int((labels != IGNORE_INDEX).sum()) / int((attention.bool() & ~special.bool()).sum())
    assert abs(rate - p) < 0.01


def test_masking_is_deterministic_given_the_generator():
    ids, attention, special = _batch(rows=16, seqlen=32)
    a = mask_tokens(ids, attention, special, VOCAB, MASK, generator=torch.Generator().manual_seed(5))
    b = mask_tokens(ids, attention, special, VOCAB, MASK, generator=torch.Generator().manual_seed(5))
    c = mask_tokens(ids, attention, special, VOCAB, MASK, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    # the input is never changed in place
    assert torch.equal(ids, _batch(rows=16, seqlen=32)[0])


def test_masking_always_selects_at_least_one_token():
    ids = torch.tensor([[CLS, 300, 301, SEP, PAD, PAD]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0]])
    special = torch.tensor([[1, 0, 0, 1, 1, 1]])
    for seed in range(20):
        _, labels = mask_tokens(ids, attention, special, VOCAB, MASK, 0.01, torch.Generator().manual_seed(seed))
        selected = (labels != IGNORE_INDEX).nonzero()[:, 1].tolist()
        assert len(selected) >= 1 and set(selected) <= {1, 2}


def test_masking_rejects_bad_input():
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, None, None, VOCAB, MASK, 1.5)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        mask_tokens(ids, torch.ones(2, 3), None, VOCAB, MASK)
    with pytest.raises(ValueError, match=r"\[batch, seqlen\]"):
        mask_tokens(ids[0], None, None, VOCAB, MASK)


def test_nsp_pair_layout():
    ex = nsp_pair([5, 6, 7], [8, 9], IS_NEXT, CLS, SEP, max_length=64)
    assert ex.input_ids == [CLS, 5, 6, 7, SEP, 8, 9, SEP]
    assert ex.token_type_ids == [0, 0, 0, 0, 0, 1, 1, 1]
    assert ex.special_tokens_mask == [1, 0, 0, 0, 1, 0, 0, 1]
    assert not ex.cut and not nsp_pair([5, 6, 7], [8, 9], IS_NEXT, CLS, SEP, max_length=8).cut
    # truncation trims the longer segment from its end, and says so
    ex = nsp_pair(list(range(10, 20)), [8, 9], NOT_NEXT, CLS, SEP, max_length=9)
    assert ex.input_ids == [CLS, 10, 11, 12, 13, SEP, 8, 9, SEP] and ex.label == NOT_NEXT and ex.cut


def test_nsp_pairs_are_half_next_half_random():
    # 50 documents of 10 sentences; sentence s of document d is [1000*d + s]
    docs = [[[1000 * d + s] for s in range(10)] for d in range(50)]
    examples = make_nsp_examples(docs, CLS, SEP, max_length=16, seed=0)
    assert len(examples) == 50 * 9
    is_next = [ex for ex in examples if ex.label == IS_NEXT]
    assert abs(len(is_next) / len(examples) - 0.5) < 0.06
    for ex in examples:
        a, b = ex.input_ids[1], ex.input_ids[3]
        if ex.label == IS_NEXT:
            assert b == a + 1  # the true successor
        else:
            assert b // 1000 != a // 1000  # a sentence of another document
    assert examples == make_nsp_examples(docs, CLS, SEP, max_length=16, seed=0)
    assert examples != make_nsp_examples(docs, CLS, SEP, max_length=16, seed=1)


def test_nsp_needs_two_documents():
    with pytest.raises(ValueError, match="two non-empty documents"):
        make_nsp_examples([[[1], [2]]], CLS, SEP, max_length=16)
