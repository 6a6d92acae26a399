"""mtbert_fast.swap / unswap on HF BertModel, RobertaModel and their task models.

Parity (fp32, within 1e-4 at the real tokens, our padding exactly zero) against the same HF model before the swap,
with eager and sdpa attention: the real all-MiniLM-L6-v2, random bert-base at its real size, small random BERT and
RoBERTa task models, lengths 1 and 512, and every input variant. Then what a swap must keep: the forward signature,
output types, state_dict keys and values, hidden states, gradients, save_pretrained, dtype changes and
load_state_dict after the swap, bit-exact outputs after unswap; bf16; dropout in train mode; refusals.
"""

from __future__ import annotations

import copy
import functools
import inspect
import pickle

import pytest
import torch
import torch.nn as nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertForMaskedLM,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

import mtbert_fast
from mtbert_fast import FastBertModel, is_swapped, swap, unswap
from mtbert_fast.models import UnsupportedModelError, weight_pack
from mtbert_fast.ops import BackendUnavailable, dispatch

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
CPU = torch.device("cpu")
BERT_TASKS = [BertModel, BertForSequenceClassification, BertForTokenClassification, BertForMaskedLM,
              BertForPreTraining, BertForNextSentencePrediction, BertForQuestionAnswering]
ROBERTA_TASKS = [RobertaModel, RobertaForSequenceClassification, RobertaForMaskedLM]
TASKS = BERT_TASKS + ROBERTA_TASKS


def _config(cls, bert_config, roberta_config, **overrides):
    return (roberta_config if cls in ROBERTA_TASKS else bert_config)(**overrides)


def _task_inputs(cls, config, ids, mask, seed=0):
    """Labels for `cls`, and its output fields: name -> True when the field is per token ([B, L, ...]).

    A loss is compared only where the padding cannot enter it: question answering's softmax runs over every position,
    padding included, whose logits HF computes from padding states and the swapped model from zeros."""
    g = torch.Generator().manual_seed(seed)
    b, l = ids.shape

    def token_labels(n, keep=1.0):
        labels = torch.randint(0, n, (b, l), generator=g)
        drop = (mask == 0) | (torch.rand((b, l), generator=g) >= keep)
        return labels.masked_fill(drop, -100)

    if cls in (BertModel, RobertaModel):
        return {}, {"last_hidden_state": True, "pooler_output": False}
    if cls in (BertForSequenceClassification, RobertaForSequenceClassification):
        return {"labels": torch.randint(0, config.num_labels, (b,), generator=g)}, {"logits": False, "loss": False}
    if cls is BertForTokenClassification:
        return {"labels": token_labels(config.num_labels)}, {"logits": True, "loss": False}
    if cls in (BertForMaskedLM, RobertaForMaskedLM):
        return {"labels": token_labels(config.vocab_size, keep=0.3)}, {"logits": True, "loss": False}
    if cls is BertForPreTraining:
        labels = {"labels": token_labels(config.vocab_size, keep=0.3),
                  "next_sentence_label": torch.randint(0, 2, (b,), generator=g)}
        return labels, {"prediction_logits": True, "seq_relationship_logits": False, "loss": False}
    if cls is BertForNextSentencePrediction:
        return {"labels": torch.randint(0, 2, (b,), generator=g)}, {"logits": False, "loss": False}
    if cls is BertForQuestionAnswering:
        lengths = mask.sum(1)
        start = (torch.rand(b, generator=g) * lengths).long()
        return {"start_positions": start, "end_positions": torch.minimum(start + 2, lengths - 1)}, {
            "start_logits": True, "end_logits": True}
    raise AssertionError(cls)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- parity ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_task_model_parity(cls, model_backend, bert_config, roberta_config, make_hf, ragged_batch, swap_parity):
    config = _config(cls, bert_config, roberta_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [5, 17, 1, 30, 12])
    labels, fields = _task_inputs(cls, config, ids, mask)
    swap_parity(model, model_backend, ids, mask, fields, **labels)


def test_question_answering_loss_without_padding(model_backend, bert_config, make_hf, ragged_batch, assert_close):
    config = bert_config()
    model = make_hf(BertForQuestionAnswering, config)
    ids, mask = ragged_batch(config, [20, 20, 20])
    labels, _ = _task_inputs(BertForQuestionAnswering, config, ids, mask)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, **labels)
        swap(model, backend=model_backend)
        out = model(ids, attention_mask=mask, **labels)
    for name in ("loss", "start_logits", "end_logits"):
        assert_close(getattr(out, name), getattr(ref, name), what=name)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification], ids=lambda c: c.__name__)
def test_minilm_parity(cls, model_backend, minilm, minilm_batch, hf_outputs, compare_outputs):
    """The real all-MiniLM-L6-v2 weights on real sentences (a classifier head from a fixed seed on top)."""
    mask = minilm_batch["attention_mask"]
    if cls is BertModel:
        model = copy.deepcopy(minilm.model)
        refs, fields = minilm.refs, {"last_hidden_state": True, "pooler_output": False}
    else:
        torch.manual_seed(0)
        model = BertForSequenceClassification(copy.deepcopy(minilm.model.config)).eval()
        model.bert.load_state_dict(minilm.model.state_dict())
        refs, fields = hf_outputs(model, **minilm_batch), {"logits": False}
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(**minilm_batch)
    for ref in refs.values():
        compare_outputs(out, ref, fields, mask)


@pytest.mark.all_threads
def test_bert_base_full_size_parity(bert_base, model_backend, compare_outputs):
    model = copy.deepcopy(bert_base.model)
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 768
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(bert_base.ids, attention_mask=bert_base.mask)
    for ref in bert_base.refs.values():
        compare_outputs(out, ref, {"last_hidden_state": True, "pooler_output": False}, bert_base.mask)


@pytest.mark.all_threads
@pytest.mark.parametrize("cls", [BertForSequenceClassification, RobertaForMaskedLM], ids=lambda c: c.__name__)
def test_lengths_1_and_512(cls, model_backend, bert_config, roberta_config, make_hf, hf_outputs, ragged_batch,
                           assert_tokens_close, compare_outputs):
    config = _config(cls, bert_config, roberta_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [1, 512, 64], seed=2)
    labels, fields = _task_inputs(cls, config, ids, mask)
    refs = hf_outputs(model, ids, attention_mask=mask, output_hidden_states=True, **labels)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, **labels)
    for ref in refs.values():
        compare_outputs(out, ref, fields, mask)
        assert_tokens_close(out.hidden_states[-1], ref.hidden_states[-1], mask, what="hidden_states[-1]")


@pytest.mark.parametrize("variant", ["token_type_ids", "position_ids", "inputs_embeds", "float_mask", "all_ones_mask",
                                     "no_mask"])
@pytest.mark.parametrize("cls", [BertModel, RobertaModel, BertForSequenceClassification], ids=lambda c: c.__name__)
def test_input_variants(variant, cls, model_backend, bert_config, roberta_config, make_hf, hf_outputs, ragged_batch,
                        compare_outputs, input_variant):
    config = _config(cls, bert_config, roberta_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [9, 20, 14], seed=4)
    with torch.no_grad():
        kwargs, real = input_variant(variant, config, ids, mask, model)
    refs = hf_outputs(model, **kwargs)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(**kwargs)
    _, fields = _task_inputs(cls, config, ids, mask)
    fields.pop("loss", None)
    for ref in refs.values():
        compare_outputs(out, ref, fields, real)


@pytest.mark.parametrize("hidden_act", ["gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("cls", [BertForSequenceClassification, RobertaModel], ids=lambda c: c.__name__)
def test_hidden_act(hidden_act, cls, model_backend, bert_config, roberta_config, make_hf, hf_outputs, ragged_batch,
                    assert_tokens_close, compare_outputs):
    config = _config(cls, bert_config, roberta_config, hidden_act=hidden_act)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [3, 26, 11])
    labels, fields = _task_inputs(cls, config, ids, mask)
    refs = hf_outputs(model, ids, attention_mask=mask, output_hidden_states=True, **labels)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_hidden_states=True, **labels)
    for ref in refs.values():
        compare_outputs(out, ref, fields, mask)
        assert_tokens_close(out.hidden_states[-1], ref.hidden_states[-1], mask, what="hidden_states[-1]")


# --- gradients -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertForTokenClassification, RobertaForMaskedLM],
                         ids=lambda c: c.__name__)
def test_gradients_match_hf(cls, model_backend, bert_config, roberta_config, make_hf, ragged_batch, assert_grad_close):
    """After swap, the task loss's gradient reaches every parameter as in the unswapped model (eval mode, fp32)."""
    config = _config(cls, bert_config, roberta_config)
    ref_model = make_hf(cls, config)
    model = copy.deepcopy(ref_model)
    swap(model, backend=model_backend)
    ids, mask = ragged_batch(config, [5, 17, 9, 2])
    labels, _ = _task_inputs(cls, config, ids, mask, seed=3)
    ref_model(ids, attention_mask=mask, **labels).loss.backward()
    model(ids, attention_mask=mask, **labels).loss.backward()
    ref_params, params = dict(ref_model.named_parameters()), dict(model.named_parameters())
    assert list(params) == list(ref_params)
    for name, p in params.items():
        ref_grad = ref_params[name].grad
        assert (p.grad is None) == (ref_grad is None), name
        if ref_grad is not None:
            assert_grad_close(p.grad, ref_grad, what=name)
    prefix = "roberta" if cls is RobertaForMaskedLM else "bert"
    for part in ("query", "key", "value"):  # the fused QKV path must still reach each of the three
        grad = params[f"{prefix}.encoder.layer.0.attention.self.{part}.weight"].grad
        assert grad is not None and grad.abs().max() > 1e-6, part


# --- what a swap keeps -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_signature_is_kept(cls, bert_config, roberta_config, make_hf):
    model = make_hf(cls, _config(cls, bert_config, roberta_config))
    signature = inspect.signature(model.forward)
    base_signature = inspect.signature(model.base_model.forward)
    swap(model)
    assert inspect.signature(model.forward) == signature
    assert inspect.signature(model.base_model.forward) == base_signature
    unswap(model)
    assert inspect.signature(model.forward) == signature


def test_positional_arguments_keep_their_meaning(model_backend, bert_config, make_hf, ragged_batch,
                                                 assert_tokens_close):
    """A swapped BertModel called positionally (input_ids, attention_mask, token_type_ids, position_ids) as HF's."""
    config = bert_config()
    model = make_hf(BertModel, config)
    ids, mask = ragged_batch(config, [6, 12])
    types = torch.ones_like(ids) * mask
    positions = torch.arange(12) + 3
    with torch.no_grad():
        ref = model(ids, mask, types, positions[None])
        swap(model, backend=model_backend)
        out = model(ids, mask, types, positions[None])
        plain = model(ids, mask)
    assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)
    assert (plain.last_hidden_state - out.last_hidden_state)[mask.bool()].abs().max() > 1e-2


def test_keyword_calls_mean_what_bound_ones_do(model_backend, bert_config, make_hf, ragged_batch):
    """A call with keywords alone skips binding them to HF's signature: the same output as the same arguments given
    positionally; an argument that the swapped encoder does not take is refused either way."""
    config = bert_config()
    model = make_hf(BertModel, config)
    ids, mask = ragged_batch(config, [6, 12])
    types = torch.ones_like(ids) * mask
    swap(model, backend=model_backend)
    with torch.no_grad():
        bound = model(ids, mask, types)
        keywords = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(bound.last_hidden_state, keywords.last_hidden_state)
    assert torch.equal(bound.pooler_output, keywords.pooler_output)
    with pytest.raises(TypeError, match="unexpected arguments for the swapped encoder: bogus"):
        model(input_ids=ids, bogus=1)
    with pytest.raises(TypeError, match="unexpected arguments for the swapped encoder: bogus"):
        model(ids, bogus=1)
    with torch.no_grad():  # an argument given as None is no argument (older callers pass head_mask=None)
        none = model(input_ids=ids, attention_mask=mask, token_type_ids=types, head_mask=None)
    assert torch.equal(none.last_hidden_state, keywords.last_hidden_state)
    with pytest.raises(TypeError, match="unexpected arguments for the swapped encoder: head_mask"):
        model(input_ids=ids, head_mask=torch.ones(config.num_attention_heads))


def test_trainer_loss_kwargs_are_taken(bert_config, make_hf, ragged_batch):
    """transformers' Trainer passes num_items_in_batch to every model whose forward takes **kwargs, and the task
    models pass it on to the base model, which ignores it: so does the swapped one. Packed-row kwargs are refused."""
    config = bert_config()
    hf = make_hf(BertForTokenClassification, config)
    ids, mask = ragged_batch(config, [9, 5])
    labels = torch.where(mask.bool(), ids % config.num_labels, torch.full_like(ids, -100))
    kwargs = dict(attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(14))
    with torch.no_grad():
        ref = hf(ids, **kwargs)
        model = swap(copy.deepcopy(hf))
        out = model(ids, **kwargs)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.logits[mask.bool()], ref.logits[mask.bool()])
        with pytest.raises(TypeError, match="unexpected arguments for the swapped encoder: cu_seq_lens_q"):
            model(ids, cu_seq_lens_q=torch.tensor([0, 9, 14], dtype=torch.int32))


def test_resized_vocabulary_is_read_from_the_table(bert_config, make_hf, ragged_batch):
    """Token ids are checked against the word table the model holds now: after resize_token_embeddings the new ids
    run (as in HF), and an id past the table names the table's size."""
    config = bert_config()
    model = make_hf(BertModel, config)
    vocab = config.vocab_size
    swap(model)
    model.resize_token_embeddings(vocab + 3)  # also sets config.vocab_size
    ids, mask = ragged_batch(config, [5, 8])
    ids[0, 1] = vocab + 2
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        unswap(model)
        ref = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    swap(model)
    ids[0, 1] = vocab + 3
    with pytest.raises(ValueError, match=rf"token id {vocab + 3}, outside the vocabulary \[0, {vocab + 3}\)"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, RobertaForMaskedLM],
                         ids=lambda c: c.__name__)
def test_output_hidden_states(cls, model_backend, bert_config, roberta_config, make_hf, ragged_batch,
                              assert_tokens_close):
    config = _config(cls, bert_config, roberta_config, num_hidden_layers=3)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [4, 19, 11])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
        swap(model, backend=model_backend)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        plain = model(ids, attention_mask=mask)
    assert len(ref.hidden_states) == len(out.hidden_states) == 4
    for i, (a, e) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_tokens_close(a, e, mask, what=f"hidden_states[{i}]")
    assert plain.hidden_states is None
    if cls is BertModel:
        assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_output_hidden_states_from_config_and_tuples(bert_config, make_hf, ragged_batch, assert_tokens_close,
                                                     assert_close):
    config = bert_config(output_hidden_states=True)
    model = make_hf(BertForSequenceClassification, config)
    ids, mask = ragged_batch(config, [4, 19, 11])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask)
        ref_tuple = model(ids, attention_mask=mask, return_dict=False)
        swap(model)
        out = model(ids, attention_mask=mask)
        out_tuple = model(ids, attention_mask=mask, return_dict=False)
    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for a, e in zip(out.hidden_states, ref.hidden_states):
        assert_tokens_close(a, e, mask)
    assert isinstance(out_tuple, tuple) and len(out_tuple) == len(ref_tuple) == 2
    assert_close(out_tuple[0], ref_tuple[0])
    for a, e in zip(out_tuple[1], ref_tuple[1]):
        assert_tokens_close(a, e, mask)
    base = make_hf(BertModel, bert_config())
    with torch.no_grad():
        ref_tuple = base(ids, mask, return_dict=False)
        out_tuple = swap(base)(ids, mask, return_dict=False)
    assert isinstance(out_tuple, tuple) and len(out_tuple) == len(ref_tuple) == 2
    assert_tokens_close(out_tuple[0], ref_tuple[0], mask)
    assert_close(out_tuple[1], ref_tuple[1])


@pytest.mark.parametrize("via", ["argument", "config"])
def test_output_attentions_raises(via, bert_config, make_hf, ragged_batch):
    config = bert_config(output_attentions=via == "config")
    model = make_hf(BertForSequenceClassification, config)
    ids, mask = ragged_batch(config, [4, 9])
    kwargs = {"output_attentions": True} if via == "argument" else {}
    with torch.no_grad():
        assert model(ids, attention_mask=mask, **kwargs).attentions is not None
        swap(model)
        with pytest.raises(NotImplementedError, match=r"output_attentions=True is not available after mtbert_fast"):
            model(ids, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("cls", [BertForMaskedLM, BertForSequenceClassification, RobertaModel],
                         ids=lambda c: c.__name__)
def test_unswap_restores_bit_exact_outputs(cls, model_backend, bert_config, roberta_config, make_hf, ragged_batch):
    config = _config(cls, bert_config, roberta_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [7, 15, 2])
    labels, fields = _task_inputs(cls, config, ids, mask)
    base = model.base_model
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True, **labels)
        swap(model, backend=model_backend)
        swapped = model(ids, attention_mask=mask, output_hidden_states=True, **labels)
        assert unswap(model) is model
        again = model(ids, attention_mask=mask, output_hidden_states=True, **labels)
    assert not is_swapped(model) and "forward" not in vars(base)
    first_field = next(iter(fields))
    assert not torch.equal(getattr(swapped, first_field), getattr(ref, first_field))  # the swap did run
    for name in list(fields) + ["hidden_states"]:
        a, e = getattr(again, name), getattr(ref, name)
        for x, y in zip(a if isinstance(a, tuple) else (a,), e if isinstance(e, tuple) else (e,)):
            assert torch.equal(x, y), name
    attn = base.encoder.layer[0].attention.self
    ptrs = {getattr(lin, kind).untyped_storage().data_ptr()
            for lin in (attn.query, attn.key, attn.value) for kind in ("weight", "bias")}
    assert len(ptrs) == 6  # each parameter owns its storage again
    if cls is BertForMaskedLM:
        assert model.cls.predictions.decoder.weight is base.embeddings.word_embeddings.weight


def test_swap_unswap_swap(bert_config, make_hf, ragged_batch, assert_close):
    config = bert_config()
    model = make_hf(BertForSequenceClassification, config)
    ids, mask = ragged_batch(config, [7, 15, 2])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        swap(unswap(swap(model)))
        assert is_swapped(model)
        assert_close(model(ids, attention_mask=mask).logits, ref)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_a_swapped_model(how, bert_config, make_hf, ragged_batch, assert_close, tmp_path):
    """A deep copy, a pickle (multiprocessing) or torch.save of the whole model is swapped on its own: it runs on its
    own weights, and unswapping it leaves the original swapped."""
    config = bert_config()
    model = make_hf(BertForSequenceClassification, config)
    ids, mask = ragged_batch(config, [7, 15, 2])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        swap(model)
        if how == "deepcopy":
            twin = copy.deepcopy(model)
        elif how == "pickle":
            twin = pickle.loads(pickle.dumps(model))
        else:
            torch.save(model, tmp_path / "model.pt")
            twin = torch.load(tmp_path / "model.pt", weights_only=False)
        assert is_swapped(twin) and twin.bert.forward.module is twin.bert
        assert_close(twin(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
        twin.bert.encoder.layer[1].attention.self.value.weight.mul_(2.0)  # must not reach the original
        changed = twin(ids, attention_mask=mask).logits
        assert_close(model(ids, attention_mask=mask).logits, ref)
        assert (changed - ref).abs().max() > 1e-5
        unswap(twin)
        assert not is_swapped(twin) and is_swapped(model)
        assert_close(twin(ids, attention_mask=mask).logits, changed)
        assert_close(model(ids, attention_mask=mask).logits, ref)


def test_state_dict_aliases_the_parameters(bert_config, make_hf, ragged_batch, assert_close):
    """state_dict(keep_vars=True) hands out the parameters themselves and the plain state_dict their detached
    aliases, as HF's does: a write through them (an exponential moving average kept in a twin model) reaches the
    swapped model's outputs, query, key and value included."""
    config = bert_config()
    model = swap(make_hf(BertForSequenceClassification, config, seed=0))
    other = make_hf(BertForSequenceClassification, config, seed=1)
    query = model.bert.encoder.layer[0].attention.self.query.weight
    assert model.state_dict(keep_vars=True)["bert.encoder.layer.0.attention.self.query.weight"] is query
    assert model.state_dict()["bert.encoder.layer.0.attention.self.query.weight"].data_ptr() == query.data_ptr()
    ids, mask = ragged_batch(config, [7, 3])
    with torch.no_grad():
        model(ids, attention_mask=mask)  # the fused weights exist and have been used
        for mine, theirs in zip(model.state_dict().values(), other.state_dict().values()):
            mine.copy_(theirs)
        assert_close(model(ids, attention_mask=mask).logits, other(ids, attention_mask=mask).logits)


def test_swap_twice_and_unswap_twice_raise(bert_config, make_hf):
    model = make_hf(BertForSequenceClassification, bert_config())
    with pytest.raises(RuntimeError, match="is not swapped"):
        unswap(model)
    swap(model)
    with pytest.raises(RuntimeError, match=r"already swapped; call mtbert_fast.unswap\(model\) first"):
        swap(model)
    with pytest.raises(RuntimeError, match="already swapped"):
        swap(model.bert)
    unswap(model)
    with pytest.raises(RuntimeError, match="is not swapped"):
        unswap(model)


@pytest.mark.parametrize("cls", [BertForPreTraining, RobertaForSequenceClassification], ids=lambda c: c.__name__)
def test_state_dict_is_kept_and_unshared(cls, bert_config, roberta_config, make_hf):
    model = make_hf(cls, _config(cls, bert_config, roberta_config))
    before = _state(model)
    swap(model)
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    qkv = [k for k in after if ".attention.self." in k]
    assert len(qkv) == 6 * model.config.num_hidden_layers
    storages = {after[k].untyped_storage().data_ptr() for k in qkv}
    assert len(storages) == len(qkv), "q/k/v entries of the state_dict share storage"
    for k in qkv:  # each is an independent, exactly-sized copy: a checkpoint writer may save it as is
        assert after[k].untyped_storage().nbytes() == after[k].numel() * after[k].element_size(), k


def test_save_pretrained_while_swapped(model_backend, bert_config, make_hf, ragged_batch, tmp_path, assert_close):
    config = bert_config()
    model = make_hf(BertForMaskedLM, config)
    before = _state(model)
    ids, mask = ragged_batch(config, [7, 15, 2])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    swap(model, backend=model_backend)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = BertForMaskedLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    state = reloaded.state_dict()
    assert set(state) == set(before)
    for k, v in before.items():
        assert torch.equal(state[k], v), k
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, ref)
        # the swapped model still runs on its fused weights after saving
        swapped = model(ids, attention_mask=mask).logits
    assert_close(swapped[mask.bool()], ref[mask.bool()])
    fast = FastBertModel.from_pretrained(tmp_path)
    assert torch.equal(fast.layers[0].qkv.weight, torch.cat(
        [before[f"bert.encoder.layer.0.attention.self.{p}.weight"] for p in ("query", "key", "value")]))


def test_dtype_change_after_swap(bert_config, make_hf, ragged_batch, assert_tokens_close, assert_close,
                                 assert_low_precision_error):
    """model.to(dtype) after swap re-fuses query/key/value: outputs follow the new weights, not stale copies."""
    config = bert_config()
    ref_model = make_hf(BertForSequenceClassification, config)
    model = copy.deepcopy(ref_model)
    swap(model)
    ids, mask = ragged_batch(config, [7, 15, 2])
    kwargs = dict(attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        ref32 = ref_model(ids, **kwargs)
        ref64 = copy.deepcopy(ref_model).double()(ids, **kwargs)

        out64 = model.to(torch.float64)(ids, **kwargs)
        assert out64.logits.dtype == torch.float64
        assert_close(out64.logits, ref64.logits, atol=1e-9, what="float64 logits")
        assert_tokens_close(out64.hidden_states[-1], ref64.hidden_states[-1], mask, atol=1e-9)

        out32 = model.float()(ids, **kwargs)
        assert out32.logits.dtype == torch.float32
        assert_close(out32.logits, ref32.logits, what="float32 logits")
        assert_tokens_close(out32.hidden_states[-1], ref32.hidden_states[-1], mask)

        for dtype, cast in ((torch.bfloat16, nn.Module.bfloat16), (torch.float16, nn.Module.half)):
            native = cast(copy.deepcopy(ref_model))(ids, **kwargs)
            out = cast(model)(ids, **kwargs)
            assert out.logits.dtype == dtype
            assert_low_precision_error(out.hidden_states[-1], native.hidden_states[-1], ref32.hidden_states[-1], mask,
                                       what=f"{dtype} last hidden state")
            assert_low_precision_error(out.logits, native.logits, ref32.logits, what=f"{dtype} logits")
            model.float().load_state_dict(ref_model.state_dict())  # undo the rounding before the next dtype


@pytest.mark.parametrize("how", ["load_state_dict", "load_state_dict_assign", "in_place_edit", "through_data"])
def test_weights_changed_after_swap(how, model_backend, bert_config, make_hf, ragged_batch, assert_tokens_close,
                                    assert_close):
    """Outputs follow the weights after a loaded state dict or an in-place edit; after a write through .data once
    release_packs() announces it."""
    from mtbert_fast.models.weight_pack import release_packs

    config = bert_config()
    model = make_hf(BertForSequenceClassification, config, seed=0)
    other = make_hf(BertForSequenceClassification, config, seed=1)
    ids, mask = ragged_batch(config, [7, 15, 2])
    kwargs = dict(attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        old = model(ids, **kwargs)
        swap(model, backend=model_backend)
        model(ids, **kwargs)  # the fused buffers exist and have been used
        if how in ("in_place_edit", "through_data"):
            for layer in (model.bert.encoder.layer[0], other.bert.encoder.layer[0]):
                value, key = layer.attention.self.value, layer.attention.self.key
                if how == "through_data":
                    value, key = value.weight.data, key.bias.data
                else:
                    value, key = value.weight, key.bias
                value.mul_(3.0)
                key.add_(0.5)
            other.load_state_dict(model.state_dict())
            if how == "through_data":
                release_packs()
        else:
            model.load_state_dict(other.state_dict(), assign=how == "load_state_dict_assign")
        expected = other(ids, **kwargs)
        out = model(ids, **kwargs)
    assert (expected.hidden_states[-1] - old.hidden_states[-1])[mask.bool()].abs().max() > 1e-2
    assert_close(out.logits, expected.logits)
    assert_tokens_close(out.hidden_states[-1], expected.hidden_states[-1], mask)


def test_fused_qkv_made_under_inference_mode_serves_a_backward(bert_config, make_hf, ragged_batch):
    """The fused query/key/value kept from a call under torch.inference_mode is an ordinary tensor: a later training
    step with those weights frozen saves it for the backward (an inference tensor cannot be saved)."""
    config = bert_config()
    model = swap(make_hf(BertForSequenceClassification, config))
    ids, mask = ragged_batch(config, [7, 4])
    with torch.inference_mode():
        model(ids, attention_mask=mask)
    for layer in model.bert.encoder.layer:
        for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            linear.requires_grad_(False)
    model.train()(ids, attention_mask=mask, labels=torch.tensor([0, 1])).loss.backward()
    assert model.bert.encoder.layer[0].attention.output.dense.weight.grad is not None


def test_fused_qkv_sees_new_storage_at_the_old_address(bert_config, make_hf, ragged_batch, assert_close):
    """A value weight given new storage where the old one's data was, with other values (same data pointer, same
    version counter: what .half() then .float() can give when the allocator hands back the freed block): the fused
    weights follow it, as every other weight does."""
    config = bert_config()
    hf = make_hf(BertForSequenceClassification, config)
    model = swap(copy.deepcopy(hf))
    ids, mask = ragged_batch(config, [7, 4])
    kept = []
    with torch.no_grad():
        model(ids, attention_mask=mask)
        for m in (model, hf):
            weight = m.bert.encoder.layer[0].attention.self.value.weight
            old = weight.data
            kept.append(old)
            alias = torch._C._construct_storage_from_data_pointer(old.data_ptr(), old.device,
                                                                  old.untyped_storage().nbytes())
            weight.data = torch.empty(0, dtype=old.dtype).set_(alias, 0, old.shape, old.stride())
            weight.data.mul_(3.0)
        assert_close(model(ids, attention_mask=mask).logits, hf(ids, attention_mask=mask).logits)


def test_int8_swap_keeps_no_float_qkv(bert_config, make_hf):
    """An int8 swap reads the fused float query/key/value once, to quantize them, and keeps none of them."""
    model = swap(make_hf(BertModel, bert_config()), dtype=torch.qint8)
    fusions = model._mtbert_fast_swap.qkv
    assert fusions and all(f.kept is None for f in fusions)


# --- bf16, dropout ---------------------------------------------------------------------------------------------------


def test_swap_bf16_minilm(minilm, minilm_batch, assert_low_precision_error):
    model = copy.deepcopy(minilm.model)
    swap(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    mask = minilm_batch["attention_mask"]
    with torch.no_grad():
        out = model(**minilm_batch)
        native_model = copy.deepcopy(minilm.model).to(torch.bfloat16)
        for impl in ("eager", "sdpa"):
            native_model.set_attn_implementation(impl)
            native = native_model(**minilm_batch)
            ref = minilm.refs["eager"]
            assert_low_precision_error(out.last_hidden_state, native.last_hidden_state, ref.last_hidden_state, mask,
                                       what=f"last_hidden_state vs {impl}")
            assert_low_precision_error(out.pooler_output, native.pooler_output, ref.pooler_output,
                                       what=f"pooler_output vs {impl}")
    assert out.last_hidden_state.dtype == torch.bfloat16
    assert torch.count_nonzero(out.last_hidden_state[~mask.bool()]) == 0


def test_swap_bf16_task_model(bert_config, make_hf, ragged_batch, assert_swap_bf16):
    config = bert_config()
    assert_swap_bf16(make_hf(BertForSequenceClassification, config), *ragged_batch(config, [7, 40, 2, 23]))


@pytest.mark.parametrize("dropout", [(0.1, 0.0), (0.0, 0.1)], ids=["hidden", "attention"])
def test_train_mode_dropout_is_random(dropout, bert_config, make_hf, ragged_batch):
    config = bert_config(hidden_dropout_prob=dropout[0], attention_probs_dropout_prob=dropout[1])
    model = swap(make_hf(BertModel, config)).train()
    ids, mask = ragged_batch(config, [8, 21, 3])
    real = mask.bool()
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = model(ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(3)
        c = model(ids, attention_mask=mask).last_hidden_state
        torch.manual_seed(3)
        d = model(ids, attention_mask=mask).last_hidden_state
        evaluated = model.eval()(ids, attention_mask=mask).last_hidden_state
    assert (a - b)[real].abs().max() > 1e-3
    assert (a - evaluated)[real].abs().max() > 1e-3
    assert torch.equal(c, d)
    assert torch.count_nonzero(a[~real]) == 0


@pytest.mark.parametrize("dropout", [(0.1, 0.0), (0.0, 0.1)], ids=["hidden", "attention"])
def test_train_mode_dropout_matches_hf_in_distribution(dropout, bert_config, make_hf, ragged_batch):
    """Dropout at every site HF has, at HF's rate: the mean |train - eval| deviation of the last hidden state, over 64
    seeds, is within 6% of HF's (its seed-to-seed spread is about 1%). Weights are enlarged so that every layer's
    dropout shows (with BERT's 0.02 init the embedding dropout alone dominates); leaving out one site (embeddings, the
    attention output's or the feed-forward output's) moves the ratio by 10% or more, all residual sites by 30%."""
    config = bert_config(hidden_dropout_prob=dropout[0], attention_probs_dropout_prob=dropout[1])
    ref_model = make_hf(BertModel, config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in ref_model.named_parameters():
            if "LayerNorm" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model = swap(copy.deepcopy(ref_model))
    ids, mask = ragged_batch(config, [8, 21, 3])
    real = mask.bool()
    deviation = {}
    with torch.no_grad():
        for name, m in (("hf", ref_model), ("swapped", model)):
            evaluated = m.eval()(ids, attention_mask=mask).last_hidden_state
            m.train()
            total = 0.0
            for seed in range(64):
                torch.manual_seed(100 + seed)
                total += (m(ids, attention_mask=mask).last_hidden_state - evaluated)[real].abs().mean().item()
            deviation[name] = total / 64
    ratio = deviation["swapped"] / deviation["hf"]
    assert 0.94 <= ratio <= 1.06, f"train-mode deviation {deviation}: ratio {ratio:.3f}"


def test_train_mode_without_dropout_equals_hf(model_backend, bert_config, make_hf, ragged_batch, assert_close):
    config = bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref_model = make_hf(BertForSequenceClassification, config).train()
    model = swap(copy.deepcopy(ref_model), backend=model_backend)
    assert model.training
    ids, mask = ragged_batch(config, [8, 21, 3])
    labels, _ = _task_inputs(BertForSequenceClassification, config, ids, mask)
    ref = ref_model(ids, attention_mask=mask, **labels)
    out = model(ids, attention_mask=mask, **labels)
    assert_close(out.logits, ref.logits)
    assert_close(out.loss, ref.loss)


# --- refusals --------------------------------------------------------------------------------------------------------


UNSUPPORTED = [
    (dict(position_embedding_type="relative_key"), r"position_embedding_type='relative_key'.*only absolute"),
    (dict(is_decoder=True), r"is_decoder=True.*decoders .*not supported"),
    (dict(hidden_act="relu"), r"hidden_act='relu' is not supported; supported: gelu, gelu_new, gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("overrides,match", UNSUPPORTED, ids=["relative_key", "is_decoder", "relu"])
@pytest.mark.parametrize("cls", [BertForSequenceClassification, RobertaForMaskedLM], ids=lambda c: c.__name__)
def test_unsupported_config_is_refused_and_model_untouched(overrides, match, cls, bert_config, roberta_config,
                                                           make_hf, ragged_batch, assert_swap_refused):
    config = _config(cls, bert_config, roberta_config, **overrides)
    assert_swap_refused(make_hf(cls, config), *ragged_batch(config, [5, 9]), match)


def test_cross_attention_config_is_refused_and_model_untouched(bert_config, make_hf, ragged_batch, assert_swap_refused):
    """A config that asks for cross-attention (HF builds it only in decoders, so it is set after construction)."""
    config = bert_config()
    model = make_hf(BertForSequenceClassification, config)
    model.config.add_cross_attention = True
    assert_swap_refused(model, *ragged_batch(config, [5, 9]), r"add_cross_attention=True: cross-attention is not")


def _tiny_gpt2():
    return GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=16))


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)


@pytest.mark.parametrize("make", [_tiny_gpt2, _Plain], ids=["gpt2", "nn.Module"])
def test_non_bert_models_are_refused(make):
    model = make()
    with pytest.raises(TypeError, match=r"is not a model of the BERT, RoBERTa, DistilBERT, ELECTRA, .* families .*swap "
                                        r"takes BertModel, RobertaModel, DistilBertModel, ElectraModel"):
        swap(model)
    assert "forward" not in vars(model)


def test_albert_is_refused_by_model_type():
    """ALBERT has embeddings and an encoder, but not BERT's: refused by its model_type, naming what is supported."""
    model = AlbertModel(AlbertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=1,
                                     embedding_size=32))
    with pytest.raises(UnsupportedModelError,
                       match=r"'albert' is not supported; supported: BERT, RoBERTa, DistilBERT, ELECTRA, MPNet"):
        swap(model)
    assert "forward" not in vars(model)


def test_unknown_backend_is_refused(bert_config, make_hf):
    model = make_hf(BertModel, bert_config())
    with pytest.raises(ValueError, match=r"'fastest' is not a backend; choose one of auto, cuda, triton, cpu, "
                                         r"reference"):
        swap(model, backend="fastest")
    assert not is_swapped(model)


@pytest.mark.parametrize("backend", [b for b in dispatch.BACKENDS
                                     if dispatch.reason(b, "bias_gelu", CPU, torch.float32) is not None])
def test_forced_backend_that_cannot_run_raises_with_reasons(backend, bert_config, make_hf, ragged_batch):
    config = bert_config()
    model = swap(make_hf(BertModel, config), backend=backend)
    ids, mask = ragged_batch(config, [5, 9])
    with pytest.raises(BackendUnavailable, match=rf"backend '{backend}' cannot run this input.*reference: can run"):
        with torch.no_grad():
            model(ids, attention_mask=mask)


def test_public_api():
    assert mtbert_fast.swap is swap and mtbert_fast.unswap is unswap and mtbert_fast.is_swapped is is_swapped


def test_left_padding_warns_that_the_pooler_differs(bert_config, make_hf, ragged_batch, recwarn):
    config = bert_config()
    hf = swap(make_hf(BertModel, config))
    ids, mask = ragged_batch(config, [5, 3])
    with torch.no_grad():
        hf(input_ids=ids, attention_mask=mask)
        assert not [w for w in recwarn if "left-padded" in str(w.message)]
        with pytest.warns(UserWarning, match="left-padded batch: the swapped pooler reads each row's first") as got:
            hf(input_ids=ids.flip(1), attention_mask=mask.flip(1))
        task = swap(make_hf(BertForSequenceClassification, config))
        with pytest.warns(UserWarning, match="left-padded batch") as got_task:
            task(input_ids=ids.flip(1), attention_mask=mask.flip(1))
    # each warning points at the line that called the model, through the module call and the task model alike
    assert {w.filename for w in [*got, *got_task]} == {__file__}


def test_left_padding_warns_without_a_pooler(roberta_config, make_hf, ragged_batch):
    """RoBERTa's classification head reads position 0 of last_hidden_state, a padding slot in a left-padded batch
    (zeros after the swap, a padding token's state in HF): the logits differ from HF's there, and the call says so."""
    config = roberta_config()
    model = make_hf(RobertaForSequenceClassification, config)
    ids, mask = ragged_batch(config, [5, 9])
    swap(model)
    with torch.no_grad(), pytest.warns(UserWarning, match="left-padded batch: position 0 of last_hidden_state") as got:
        model(input_ids=ids.flip(1), attention_mask=mask.flip(1))
    assert {w.filename for w in got} == {__file__}


@pytest.mark.parametrize("family", ["xlm-roberta", "camembert"])
def test_roberta_architecture_families(family, model_backend, roberta_config, make_hf, ragged_batch,
                                       assert_tokens_close, assert_close):
    """XLM-RoBERTa and CamemBERT are RoBERTa's architecture: both the swap and FastBertModel.from_hf match HF."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    fields = {k: v for k, v in roberta_config().to_dict().items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model(family, **fields)
    ids, mask = ragged_batch(config, [6, 2, 9])
    with torch.no_grad():
        base = make_hf(AutoModel.from_config(config).__class__, config)
        fast = FastBertModel.from_hf(base, backend=model_backend)(ids, attention_mask=mask)
        ref = base(ids, attention_mask=mask)
        assert_tokens_close(fast.last_hidden_state, ref.last_hidden_state, mask)
        task = make_hf(AutoModelForSequenceClassification.from_config(config).__class__, config)
        ref = task(ids, attention_mask=mask).logits
        swap(task, backend=model_backend)
        assert_close(task(ids, attention_mask=mask).logits, ref)


def test_adapters_and_hooks_are_refused_by_name(bert_config, make_hf, adapted):
    """The swapped forward reads the weights of the encoder's modules without calling them: an adapter wrapping a
    linear, a hook on a submodule or a forward set on one would be left out without a word, so swap refuses each by
    name, and leaves the model as it was."""
    config = bert_config()
    query = "encoder.layer.0.attention.self.query"
    model = make_hf(BertModel, config)
    layer = model.encoder.layer[0]
    layer.attention.self.query = adapted(layer.attention.self.query)
    with pytest.raises(UnsupportedModelError, match=rf"parameters that are no weights of a bert encoder "
                                                    rf"\({query}\.base_layer\.weight, {query}\.base_layer\.bias, "
                                                    rf"{query}\.lora_A\.weight, {query}\.lora_B\.weight\)"):
        swap(model)
    assert not is_swapped(model)

    model = make_hf(BertModel, config)
    handle = model.encoder.layer[1].output.register_forward_hook(lambda module, args, out: out * 2)
    with pytest.raises(UnsupportedModelError, match="encoder.layer.1.output has a forward hook, but mtbert_fast's "
                                                    "encoder reads its modules' weights without calling the modules"):
        swap(model)
    handle.remove()
    model.encoder.layer[1].intermediate.dense.forward = lambda x: x
    with pytest.raises(UnsupportedModelError, match="encoder.layer.1.intermediate.dense has its own forward"):
        swap(model)
    del model.encoder.layer[1].intermediate.dense.forward
    task = make_hf(BertForSequenceClassification, config)
    task.bert.forward = functools.partial(type(task.bert).forward, task.bert)  # as accelerate's hooks wrap it
    with pytest.raises(UnsupportedModelError, match="BertModel has its own forward, set on the instance .*the swap "
                                                    "would replace it, and unswap would not bring it back"):
        swap(task)
    assert not is_swapped(task) and isinstance(task.bert.forward, functools.partial)
    swap(model)
    assert is_swapped(model)


def test_a_layer_norm_eps_set_by_hand_is_refused(bert_config, make_hf):
    """The encoder runs one eps for every LayerNorm, where HF's modules read their own: a module whose eps was set
    apart from the others is refused by name, by swap and by FastBertModel.from_hf."""
    model = make_hf(BertModel, bert_config())
    model.encoder.layer[1].output.LayerNorm.eps = 1e-2
    match = r"encoder.layer.1.output.LayerNorm is a LayerNorm of eps 0.01, where embeddings.LayerNorm holds 1e-12"
    with pytest.raises(UnsupportedModelError, match=match):
        swap(model)
    with pytest.raises(UnsupportedModelError, match=match):
        FastBertModel.from_hf(model)
    assert not is_swapped(model)


def test_an_eps_set_on_every_layer_norm_before_the_swap_is_followed(bert_config, make_hf, ragged_batch,
                                                                      assert_tokens_close):
    """An eps set on every LayerNorm by hand, apart from the config's, is the one HF's forward runs: swap and
    FastBertModel.from_hf run it too."""
    config = bert_config()
    ref = make_hf(BertModel, config)
    for module in ref.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 0.5
    ids, mask = ragged_batch(config, [7, 12])
    fast = FastBertModel.from_hf(ref)
    assert fast.config.layer_norm_eps == 0.5
    model = swap(copy.deepcopy(ref))
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert_tokens_close(model(ids, attention_mask=mask).last_hidden_state, want, mask)
        assert_tokens_close(fast(ids, mask).last_hidden_state, want, mask)


def test_layer_norm_eps_set_after_the_swap_is_followed(bert_config, make_hf, ragged_batch, assert_tokens_close):
    """The LayerNorms' eps is read from the modules on every call, with autograd or without and where the layer
    weights are kept between calls, as HF's modules read their own: set on every one after the swap, it is followed;
    set on one apart from the others, the next call names it."""
    config = bert_config()
    ref = make_hf(BertModel, config)
    model = copy.deepcopy(ref)
    swap(model)
    ids, mask = ragged_batch(config, [7, 12])
    with torch.no_grad():
        model(ids, attention_mask=mask)  # the layer weights are now kept for inference calls
    for m in (ref, model):
        for module in m.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = 0.5
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert_tokens_close(model(ids, attention_mask=mask).last_hidden_state, want, mask)
    assert_tokens_close(model(ids, attention_mask=mask).last_hidden_state.detach(), want, mask)
    model.encoder.layer[1].attention.output.LayerNorm.eps = 1e-3
    with pytest.raises(UnsupportedModelError, match=r"encoder.layer.1.attention.output.LayerNorm is a LayerNorm of "
                                                    r"eps 0.001, where embeddings.LayerNorm holds 0.5"):
        model(ids, attention_mask=mask)


# a part of a BERT layer built without its bias: (module path in the layer, whether it is a LayerNorm)
UNBIASED_PARTS = [("attention.self.query", False), ("attention.self.key", False), ("attention.self.value", False),
                  ("attention.output.dense", False), ("attention.output.LayerNorm", True),
                  ("intermediate.dense", False), ("output.dense", False), ("output.LayerNorm", True)]


@pytest.mark.parametrize("part, norm", UNBIASED_PARTS, ids=[p for p, _ in UNBIASED_PARTS])
def test_a_part_built_without_a_bias_adds_nothing(part, norm, bert_config, make_hf, ragged_batch,
                                                   assert_tokens_close):
    """A Linear or LayerNorm without a bias (bias=False, or one of query, key and value without one beside the
    others' biases) adds nothing, as in HF: the swapped model matches HF with and without autograd (gradients too)
    and quantizes to int8, where the biases that remain count."""
    config = bert_config()
    ref = make_hf(BertModel, config)
    with torch.no_grad():  # biases that matter: HF initializes them to zero
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    owner, _, leaf = f"encoder.layer.0.{part}".rpartition(".")
    if norm:
        old = ref.get_submodule(f"{owner}.{leaf}")
        new = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=False)
        with torch.no_grad():
            new.weight.copy_(old.weight)
        setattr(ref.get_submodule(owner), leaf, new)
    else:
        ref.get_submodule(f"{owner}.{leaf}").bias = None
    model = copy.deepcopy(ref)
    swap(model)
    ids, mask = ragged_batch(config, [5, 11])
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        assert_tokens_close(model(ids, attention_mask=mask).last_hidden_state, want, mask)
    ref_out = ref(ids, attention_mask=mask).last_hidden_state
    out = model(ids, attention_mask=mask).last_hidden_state
    assert_tokens_close(out.detach(), want, mask)
    (ref_out * mask[..., None]).square().sum().backward()
    (out * mask[..., None]).square().sum().backward()
    weights = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(weights[name].grad, p.grad, atol=2e-4, rtol=1e-4, msg=f"gradient of {name}")
    int8 = swap(copy.deepcopy(ref), dtype=torch.qint8)
    with torch.no_grad():
        got = int8(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    cos = torch.nn.functional.cosine_similarity(got[real], want[real], dim=-1)
    assert cos.min() > 0.99, f"int8 without the {part} bias: lowest token cosine {cos.min():.4f}"


@pytest.mark.parametrize("capture", ["export", "jit.trace"])
def test_export_and_jit_trace_are_refused_by_name(capture, bert_config, make_hf, ragged_batch):
    """torch.export and torch.jit.trace would keep one call's packing of the real tokens in their graph: a swapped
    model (float and int8) and FastBertModel refuse them by name (not with the int8 model's message about changed
    weights, which export's own parameters would trip), and run as before afterwards."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    ids, mask = ragged_batch(config, [4, 9])

    class Hidden(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(ids, attention_mask=mask).last_hidden_state

    for model in (swap(copy.deepcopy(hf)), swap(copy.deepcopy(hf), dtype=torch.qint8), FastBertModel.from_hf(hf)):
        wrapped = Hidden(model.eval())
        with torch.no_grad():
            before = wrapped(ids, mask)
            with pytest.raises(NotImplementedError, match="torch.export and torch.jit.trace cannot capture "
                                                          "mtbert_fast's encoder"):
                if capture == "export":
                    torch.export.export(wrapped, (ids, mask))
                else:
                    torch.jit.trace(wrapped, (ids, mask))
            torch.testing.assert_close(wrapped(ids, mask), before, atol=0, rtol=0)


def test_hooks_and_replaced_modules_after_swap(bert_config, make_hf, ragged_batch, adapted):
    """After the swap, a hook on a module inside the encoder is refused where it is registered; a plain Linear put in
    the place of a query is read (the outputs follow it, as HF's do); a wrapper put there is refused by name at the
    next call, with or without autograd. transformers' own output-capturing hooks stay where they were."""
    config = bert_config()
    model = make_hf(BertForSequenceClassification, config)
    ids, mask = ragged_batch(config, [6, 9])
    with torch.no_grad():
        model(ids, attention_mask=mask, output_hidden_states=True)  # HF leaves its output-capturing hooks on layers
    layer = model.bert.encoder.layer[0]
    hf_hooks = dict(layer._forward_hooks)
    assert hf_hooks
    swap(model)
    with pytest.raises(RuntimeError, match="encoder.layer.0.attention.output.dense is inside a fast encoder: a "
                                           "hook on it.*would never run"):
        layer.attention.output.dense.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(RuntimeError, match="encoder.layer.0 is inside a fast encoder"):
        layer.register_forward_pre_hook(lambda module, args: None)
    with pytest.raises(RuntimeError, match="encoder.layer.0.output.LayerNorm is inside a fast encoder"):
        layer.output.LayerNorm.register_full_backward_hook(lambda module, grad_in, grad_out: None)

    replacement = nn.Linear(config.hidden_size, config.hidden_size)
    layer.attention.self.query = replacement
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        unswap(model)
        ref = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert dict(layer._forward_hooks) == hf_hooks  # kept through swap and unswap

    swap(model)
    layer.attention.self.key = adapted(layer.attention.self.key)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(
            UnsupportedModelError, match=r"encoder.layer.0.attention.self.key is a .*_Adapted, where mtbert_fast's "
                                         r"encoder reads the weights of a plain torch.nn module"):
            model(ids, attention_mask=mask)
    layer.attention.self.key = layer.attention.self.key.base_layer
    model.bert.embeddings.word_embeddings = adapted(nn.Linear(2, 2))
    with pytest.raises(UnsupportedModelError, match="embeddings.word_embeddings is a .*_Adapted"):
        model(ids, attention_mask=mask)


def test_pruned_heads_are_refused_by_name(bert_config, make_hf):
    """Heads pruned by shrinking the query/key/value linears leave weights of another shape than the config's: refused
    by name at the swap, and at the next call for such a linear put in place after it."""
    config = bert_config()
    model = make_hf(BertModel, config)
    h = config.hidden_size
    model.encoder.layer[1].attention.self.query = nn.Linear(h, h - config.hidden_size // config.num_attention_heads)
    match = (rf"encoder.layer.1.attention.self.query.weight has shape \[{h - h // config.num_attention_heads}, {h}\], "
             rf"where hidden_size {h} asks for \[{h}, {h}\]")
    with pytest.raises(UnsupportedModelError, match=match):
        swap(model)
    ids = torch.randint(3, config.vocab_size, (2, 6))
    swapped = swap(make_hf(BertModel, config))
    swapped.encoder.layer[1].attention.self.query = nn.Linear(h, h - config.hidden_size // config.num_attention_heads)
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(UnsupportedModelError, match=match):
            swapped(ids)


_DROPOUT_FAMILIES = {
    "bert": ("bert_config", BertModel),
    "distilbert": ("distilbert_config", "DistilBertModel"),
    "mpnet": ("mpnet_config", "MPNetModel"),
    "deberta": ("deberta_config", "DebertaV2Model"),
    "modernbert": ("modernbert_config", "ModernBertModel"),
}


@pytest.mark.parametrize("family", list(_DROPOUT_FAMILIES))
def test_dropout_rates_follow_the_modules(family, request, make_hf, ragged_batch):
    """In training, the swapped encoder takes its dropout rates from the HF modules, as HF's forward does: with every
    Dropout's p set to 0 (or an Identity put in its place) a training call is deterministic and matches HF's; rates
    that differ between layers are refused by name."""
    import transformers

    fixture, cls = _DROPOUT_FAMILIES[family]
    cls = getattr(transformers, cls) if isinstance(cls, str) else cls
    config = request.getfixturevalue(fixture)()
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [6, 9])
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if family == "modernbert":
        for layer in model.layers:
            layer.attn.attention_dropout = 0.0
    model.train()
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        swap(model)
        first = model(ids, attention_mask=mask).last_hidden_state
        second = model(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert torch.equal(first, second)
    torch.testing.assert_close(first[real], ref[real], atol=1e-4, rtol=1e-4)
    state = model._mtbert_fast_swap
    assert state.training_config(model).hidden_dropout_prob == 0.0
    assert state.training_config(model).attention_probs_dropout_prob == 0.0

    dropouts = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Dropout)]
    name, module = dropouts[-1]
    module.p = 0.25
    with pytest.raises(UnsupportedModelError, match=rf"{name} with p=0.25: the swapped encoder runs one rate"):
        model(ids, attention_mask=mask)
    model.eval()
    with torch.no_grad():  # inference applies no dropout: nothing to refuse
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", list(_DROPOUT_FAMILIES))
def test_eval_calls_with_autograd_match_hf(family, dtype, request, make_hf, ragged_batch, assert_grad_close,
                                           assert_tokens_close, assert_low_precision_error):
    """A model in eval mode called with autograd on: the first call multiplies the plain weights, later ones (the
    weights unchanged) their packs; each call's output and gradients are HF's (bf16: within twice HF's own bf16
    error of the fp32 result)."""
    import transformers

    fixture, cls = _DROPOUT_FAMILIES[family]
    cls = getattr(transformers, cls) if isinstance(cls, str) else cls
    config = request.getfixturevalue(fixture)()
    ref32 = make_hf(cls, config)
    ref = copy.deepcopy(ref32).to(dtype)
    model = swap(copy.deepcopy(ref))
    ids, mask = ragged_batch(config, [6, 13])
    w = torch.randn(*ids.shape, config.hidden_size, generator=torch.Generator().manual_seed(2)) * mask[..., None]

    def grads(m):
        m.zero_grad()
        out = m(ids, attention_mask=mask).last_hidden_state
        (out.float() * w).sum().backward()
        return out.detach().float(), {name: p.grad for name, p in m.named_parameters() if p.grad is not None}

    want32, grads32 = grads(ref32)
    want, hf_grads = grads(ref)
    weight_pack.release_packs()
    for call in range(2):
        out, got = grads(model)
        packs = sum(weight_pack.pack_count(kind) for kind in ("onednn", "panels", "mkl"))
        assert (packs > 0) == (call > 0 and weight_pack.AVAILABLE), f"call {call}: {packs} packs"
        assert got.keys() == hf_grads.keys(), f"call {call}"
        if dtype == torch.float32:
            assert_tokens_close(out, want, mask, zero_padding=False)
            for name, grad in hf_grads.items():
                if grad.abs().max() < 1e-7:  # the key bias's, zero in exact arithmetic: rounding noise on both sides
                    assert got[name].abs().max() < 1e-7, f"call {call}: {name}"
                else:
                    assert_grad_close(got[name], grad, what=f"call {call}: {name}")
        else:
            assert_low_precision_error(out, want, want32, mask, what=f"call {call}: output")
            for name, grad in grads32.items():
                assert_low_precision_error(got[name].float(), hf_grads[name].float(), grad,
                                           what=f"call {call}: {name}")
