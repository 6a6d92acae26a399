"""DeBERTa-v2 / v3: mtbert_fast.swap / unswap on DebertaV2Model and its task models, and FastBertModel.

DeBERTa's disentangled attention adds, to each query-key score, the query's dot product with the relative-position
key of their bucketed distance (c2p) and the key's dot product with the relative-position query (p2c). The fast path
forms those as per-token tables [T, heads, W] over only the table rows the batch reaches and hands them to
attention_varlen (pos_q, pos_k, pos_index), which gathers them per pair inside the kernel. Parity (fp32, within
1e-4 at the real tokens) against the same HF model before the swap, on random weights of odd sizes (hidden 48, 3
heads, vocab 997) with the position table drawn large (std 1), in the v3 shape (shared projections, 8 log buckets
up to 64, no absolute positions) and the v2 shapes (own projections, absolute positions, token types, one term
alone, no relative attention): ragged batches, lengths 1 and 512, left padding; bf16 within twice HF's own bf16
error; gradients (the position table's and projections' too); bit-exact outputs after unswap; and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DebertaV2ForMaskedLM,
    DebertaV2ForMultipleChoice,
    DebertaV2ForQuestionAnswering,
    DebertaV2ForSequenceClassification,
    DebertaV2ForTokenClassification,
    DebertaV2Model,
)

from mtbert_fast import FastBertModel, MultiTaskBert, is_swapped, swap
from mtbert_fast.models import EncoderConfig, UnsupportedModelError
from mtbert_fast.models.encoder import deberta_buckets, disentangled_index

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
TASKS = [DebertaV2Model, DebertaV2ForSequenceClassification, DebertaV2ForTokenClassification,
         DebertaV2ForQuestionAnswering, DebertaV2ForMaskedLM]
VARIANTS = {
    "v3": {},
    "v2-own-projections": dict(share_att_key=False, position_biased_input=True, type_vocab_size=2,
                               norm_rel_ebd="none"),
    "c2p-only": dict(pos_att_type=["c2p"], share_att_key=False, position_buckets=-1, max_relative_positions=6),
    "p2c-only": dict(pos_att_type=["p2c"]),
    "no-relative-attention": dict(relative_attention=False, position_biased_input=True),
}


def _model(make_hf, cls, config, seed=0):
    model = make_hf(cls, config, seed)
    encoder = model.base_model.encoder
    if getattr(encoder, "relative_attention", False):
        with torch.no_grad():
            table = encoder.rel_embeddings.weight
            table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed + 100)))
    return model


def _fields(cls):
    name = cls.__name__
    if name.endswith("Model"):
        return {"last_hidden_state": True}
    if name.endswith("ForQuestionAnswering"):
        return {"start_logits": True, "end_logits": True}
    return {"logits": not name.endswith("ForSequenceClassification")}


@pytest.mark.parametrize("bucket_size, max_position", [(256, 512), (8, 64), (32, 128)])
def test_buckets_are_debertas(bucket_size, max_position):
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    distance = torch.arange(-700, 701)
    hf = make_log_bucket_position(distance, bucket_size, max_position).long()
    assert torch.equal(deberta_buckets(distance, bucket_size, max_position), hf)


def test_index_reaches_only_the_rows_in_use(deberta_config):
    """pos_index over the distances of the longest sequence, less the first table row any of them reaches."""
    config = EncoderConfig.from_hf(deberta_config())
    index, lo, hi = disentangled_index(config, 5, torch.device("cpu"))
    assert index.dtype == torch.int32 and index.shape == (9,)
    assert (lo, hi) == (4, 13) and index.tolist() == list(range(8, -1, -1))  # j - i = -4..4 -> rows 12..4
    index, lo, hi = disentangled_index(config, 600, torch.device("cpu"))
    assert (lo, hi) == (0, 16) and int(index.min()) == 0 and int(index.max()) == 15


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("loader", ["from_hf", "from_pretrained"])
def test_encoder_parity(variant, loader, model_backend, deberta_config, make_hf, hf_outputs, ragged_batch, tmp_path,
                        assert_tokens_close):
    config = deberta_config(**VARIANTS[variant])
    hf = _model(make_hf, DebertaV2Model, config)
    if loader == "from_hf":
        fast = FastBertModel.from_hf(hf, backend=model_backend)
    else:
        hf.save_pretrained(tmp_path)
        fast = FastBertModel.from_pretrained(tmp_path, backend=model_backend)
    assert fast.config.family == "deberta" and fast.pooler is None
    ids, mask = ragged_batch(config, [1, 30, 7, 12])
    refs = hf_outputs(hf, ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_task_model_parity(cls, model_backend, deberta_config, make_hf, ragged_batch, swap_parity,
                           assert_tokens_close):
    config = deberta_config()
    model = _model(make_hf, cls, config)
    ids, mask = ragged_batch(config, [5, 17, 1, 30, 12])
    out, refs = swap_parity(model, model_backend, ids, mask, _fields(cls), output_hidden_states=True)
    for ref in refs.values():
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.all_threads
def test_lengths_1_and_512(model_backend, deberta_config, make_hf, hf_outputs, ragged_batch, compare_outputs):
    """DeBERTa-v3's own buckets (256 up to 512): a 512-token row reaches its logarithmic buckets."""
    config = deberta_config(position_buckets=256, max_relative_positions=512)
    model = _model(make_hf, DebertaV2ForTokenClassification, config)
    ids, mask = ragged_batch(config, [1, 512, 64], seed=2)
    refs = hf_outputs(model, ids, attention_mask=mask)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for ref in refs.values():
        compare_outputs(out, ref, {"logits": True}, mask)


@pytest.mark.parametrize("variant", ["position_ids", "inputs_embeds", "float_mask", "no_mask", "left_padding",
                                     "token_type_ids"])
def test_input_variants(variant, model_backend, deberta_config, make_hf, hf_outputs, ragged_batch, assert_tokens_close,
                        input_variant):
    """Left padding too: the position terms depend only on distances between real tokens."""
    overrides = VARIANTS["v2-own-projections"] if variant in ("position_ids", "token_type_ids") else {}
    config = deberta_config(**overrides)
    model = _model(make_hf, DebertaV2Model, config)
    ids, mask = ragged_batch(config, [20, 11, 4])
    kwargs, real = input_variant(variant, config, ids, mask, model)
    refs = hf_outputs(model, **kwargs)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(**kwargs)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, real)


def test_padding_inside_a_row_is_refused(deberta_config, make_hf, ragged_batch):
    config = deberta_config()
    model = swap(_model(make_hf, DebertaV2Model, config))
    ids, mask = ragged_batch(config, [9, 12])
    mask[1, 2] = 0
    with pytest.raises(ValueError, match="row 1 of attention_mask has padding between real tokens: a deberta model"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_bf16(cls, deberta_config, make_hf, ragged_batch, assert_swap_bf16):
    config = deberta_config()
    assert_swap_bf16(_model(make_hf, cls, config), *ragged_batch(config, [7, 40, 2, 23]))


@pytest.mark.parametrize("variant", ["v3", "v2-own-projections"])
def test_gradients_match_hf(variant, model_backend, deberta_config, make_hf, ragged_batch, assert_grad_close):
    """Train mode without dropout: the loss's gradient reaches every weight as HF's does, the position table and
    its projections included."""
    config = deberta_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **VARIANTS[variant])
    ref_model = _model(make_hf, DebertaV2ForSequenceClassification, config).train()
    model = swap(copy.deepcopy(ref_model), backend=model_backend)
    ids, mask = ragged_batch(config, [9, 30, 3])
    labels = torch.tensor([0, 1, 1])
    ref_model(ids, attention_mask=mask, labels=labels).loss.backward()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    assert "deberta.encoder.rel_embeddings.weight" in grads
    for name, p in ref_model.named_parameters():
        if p.grad is None:  # HF's unused cls.predictions.bias and the like
            assert grads[name].grad is None, name
            continue
        assert_grad_close(grads[name].grad, p.grad, what=name)


def test_unused_table_norm_without_relative_attention(deberta_config, make_hf, ragged_batch, assert_tokens_close):
    """Without relative attention HF still builds the table's LayerNorm where norm_rel_ebd names it, and never applies
    it: the swap takes such a model (that LayerNorm is no weight it leaves out) and matches HF."""
    config = deberta_config(relative_attention=False, position_biased_input=True, norm_rel_ebd="layer_norm")
    hf = _model(make_hf, DebertaV2Model, config)
    assert isinstance(hf.encoder.LayerNorm, torch.nn.LayerNorm)
    ids, mask = ragged_batch(config, [3, 9])
    with torch.no_grad():
        want = hf(ids, attention_mask=mask).last_hidden_state
        swap(hf)
        assert_tokens_close(hf(ids, attention_mask=mask).last_hidden_state, want, mask)


def test_unswap_restores_bit_exact_outputs(deberta_config, make_hf, unswap_is_bit_exact):
    config = deberta_config()
    unswap_is_bit_exact(_model(make_hf, DebertaV2ForMaskedLM, config), config)


def test_multiple_choice(model_backend, deberta_config, make_hf, multiple_choice_parity):
    config = deberta_config()
    multiple_choice_parity(_model(make_hf, DebertaV2ForMultipleChoice, config), config, model_backend)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(conv_kernel_size=3), UnsupportedModelError, "conv_kernel_size=3: DeBERTa's convolution layer"),
    (dict(embedding_size=32), UnsupportedModelError, "embedding_size=32: a DeBERTa embedding projection"),
    (dict(pos_att_type=["c2p", "p2p"]), UnsupportedModelError, "pos_att_type holds 'p2p'"),
    (dict(hidden_act="relu"), UnsupportedModelError, "hidden_act='relu' is not supported"),
    (dict(z_steps=2), UnsupportedModelError, "z_steps=2 is not supported"),
    (dict(attention_head_size=8), UnsupportedModelError, "attention_head_size=8: heads of another width"),
    (dict(norm_rel_ebd="layer_norm|batch_norm"), UnsupportedModelError,
     r"norm_rel_ebd='layer_norm\|batch_norm': only layer_norm or none"),
    (dict(pooler_hidden_size=32), UnsupportedModelError, "pooler_hidden_size=32: a pooler of another width"),
])  # fmt: skip
def test_unsupported_config_is_refused_before_anything_changes(overrides, error, match, deberta_config, make_hf):
    config = deberta_config()
    model = make_hf(DebertaV2Model, config)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    with pytest.raises(error, match=match):
        swap(model)
    assert not is_swapped(model) and "forward" not in vars(model)


def test_refusals_by_name(deberta_config, make_hf):
    model = make_hf(DebertaV2Model, deberta_config())
    with pytest.raises(UnsupportedModelError, match="int8 inference runs no disentangled attention"):
        swap(model, dtype=torch.qint8)
    assert not is_swapped(model)
    legacy_off = make_hf(DebertaV2ForMaskedLM, deberta_config(legacy=False))
    with pytest.raises(UnsupportedModelError, match="DebertaV2ForMaskedLM with legacy=False"):
        MultiTaskBert.from_hf_heads({"mlm": legacy_off})


def test_token_types_without_a_table_are_ignored_as_hf_does(deberta_config, make_hf, ragged_batch):
    """DeBERTa-v3 has no token-type table (type_vocab_size 0), yet its tokenizer hands out token_type_ids: HF's
    embeddings ignore them, and so does the swapped encoder."""
    config = deberta_config()
    assert config.type_vocab_size == 0
    model = _model(make_hf, DebertaV2Model, config)
    ids, mask = ragged_batch(config, [9, 12])
    types = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        swap(model)
        out = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-4, rtol=1e-4)
