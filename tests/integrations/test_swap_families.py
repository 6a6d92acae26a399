"""mtbert_fast.swap / unswap on DistilBERT and ELECTRA models and their task models.

Parity (fp32, within 1e-4 at the real tokens, our padding exactly zero) against the same HF model before the swap,
with eager and sdpa attention, on random weights of odd sizes (hidden 48, 3 heads, vocab 997): ragged batches,
lengths 1 and 512, DistilBERT's sinusoidal position table, ELECTRA with and without its embedding projection, the
input variants each family takes; bf16 within twice HF's own bf16 error; gradients; bit-exact outputs after
unswap; refusals before anything changes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    ElectraForCausalLM,
    ElectraForMaskedLM,
    ElectraForMultipleChoice,
    ElectraForPreTraining,
    ElectraForQuestionAnswering,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
)

from mtbert_fast import swap

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
DISTILBERT = [DistilBertModel, DistilBertForSequenceClassification, DistilBertForTokenClassification,
              DistilBertForQuestionAnswering, DistilBertForMaskedLM]
# ElectraForMaskedLM (the generator), ElectraForPreTraining (the discriminator's replaced-token head) and
# ElectraForCausalLM (the generator's head on a bidirectional encoder, as HF runs it without is_decoder) run HF's own
# heads on the swapped encoder's output
ELECTRA = [ElectraModel, ElectraForSequenceClassification, ElectraForTokenClassification, ElectraForQuestionAnswering,
           ElectraForMaskedLM, ElectraForPreTraining, ElectraForCausalLM]
TASKS = DISTILBERT + ELECTRA


def _config(cls, distilbert_config, electra_config, **overrides):
    return (distilbert_config if cls.__name__.startswith("DistilBert") else electra_config)(**overrides)


def _task_inputs(cls, config, ids, mask, seed=0):
    """Labels for `cls` and its output fields: name -> True when per token. Question answering's loss is left out:
    its softmax runs over the padding too, whose logits HF computes from padding states and the swap from zeros."""
    g = torch.Generator().manual_seed(seed)
    b, l = ids.shape

    def token_labels(n, keep=1.0):
        labels = torch.randint(0, n, (b, l), generator=g)
        return labels.masked_fill((mask == 0) | (torch.rand((b, l), generator=g) >= keep), -100)

    name = cls.__name__
    if name.endswith("Model"):
        return {}, {"last_hidden_state": True}
    if name.endswith("ForSequenceClassification"):
        return {"labels": torch.randint(0, config.num_labels, (b,), generator=g)}, {"logits": False, "loss": False}
    if name.endswith("ForTokenClassification"):
        return {"labels": token_labels(config.num_labels)}, {"logits": True, "loss": False}
    if name.endswith("ForQuestionAnswering"):
        return {}, {"start_logits": True, "end_logits": True}
    if name.endswith("ForMaskedLM"):
        return {"labels": token_labels(config.vocab_size, keep=0.3)}, {"logits": True, "loss": False}
    if name.endswith("ForCausalLM"):  # no loss: HF's shifted loss would read the logits at padding positions
        return {}, {"logits": True}
    if cls is ElectraForPreTraining:  # HF's loss counts the real tokens only
        return {"labels": torch.randint(0, 2, (b, l), generator=g)}, {"logits": True, "loss": False}
    raise AssertionError(cls)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_task_model_parity(cls, model_backend, distilbert_config, electra_config, make_hf, ragged_batch, swap_parity,
                           assert_tokens_close):
    config = _config(cls, distilbert_config, electra_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [5, 17, 1, 30, 12])
    labels, fields = _task_inputs(cls, config, ids, mask)
    out, refs = swap_parity(model, model_backend, ids, mask, fields, output_hidden_states=True, **labels)
    for ref in refs.values():
        assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.all_threads
@pytest.mark.parametrize("cls", [DistilBertForSequenceClassification, ElectraForTokenClassification],
                         ids=lambda c: c.__name__)
def test_lengths_1_and_512(cls, model_backend, distilbert_config, electra_config, make_hf, hf_outputs, ragged_batch,
                           compare_outputs):
    config = _config(cls, distilbert_config, electra_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [1, 512, 64], seed=2)
    labels, fields = _task_inputs(cls, config, ids, mask)
    refs = hf_outputs(model, ids, attention_mask=mask, **labels)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **labels)
        with pytest.raises(ValueError, match="a sequence of 513 tokens is longer than the model's"):
            model(torch.randint(3, 997, (1, 513)))
    for ref in refs.values():
        compare_outputs(out, ref, fields, mask)


@pytest.mark.parametrize("family,overrides", [
    ("distilbert", dict(sinusoidal_pos_embds=True)),
    ("distilbert", dict(activation="gelu_new")),
    ("electra", dict(embedding_size=48)),
    ("electra", dict(hidden_act="gelu_pytorch_tanh")),
], ids=["distilbert-sinusoidal", "distilbert-gelu_new", "electra-no-projection", "electra-tanh-gelu"])
def test_config_variants(family, overrides, model_backend, distilbert_config, electra_config, make_hf, hf_outputs,
                         ragged_batch, assert_tokens_close):
    cls = DistilBertModel if family == "distilbert" else ElectraModel
    config = _config(cls, distilbert_config, electra_config, **overrides)
    model = make_hf(cls, config)
    if "sinusoidal_pos_embds" in overrides:  # HF fills the table with fixed sines and cosines
        table = model.embeddings.position_embeddings.weight
        angle = 3.0 / torch.pow(10000.0, torch.arange(0, 48, 2) / 48.0)  # position 3
        assert torch.allclose(table[3, 0::2], torch.sin(angle), atol=1e-6)
        assert torch.allclose(table[3, 1::2], torch.cos(angle), atol=1e-6)
    if family == "electra":
        assert (getattr(model, "embeddings_project", None) is None) == (config.embedding_size == config.hidden_size)
    ids, mask = ragged_batch(config, [9, 3, 26])
    refs = hf_outputs(model, ids, attention_mask=mask)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)


VARIANTS = ["position_ids", "inputs_embeds", "float_mask", "no_mask"]


@pytest.mark.parametrize("cls,variant", [(DistilBertModel, v) for v in VARIANTS]
                         + [(ElectraModel, v) for v in ["token_type_ids", *VARIANTS]],
                         ids=lambda x: x if isinstance(x, str) else x.__name__)
def test_input_variants(variant, cls, model_backend, distilbert_config, electra_config, make_hf, hf_outputs,
                        ragged_batch, assert_tokens_close, input_variant):
    config = _config(cls, distilbert_config, electra_config)
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [20, 11, 4])
    kwargs, real = input_variant(variant, config, ids, mask, model)
    refs = hf_outputs(model, **kwargs)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(**kwargs)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, real)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_bf16(cls, distilbert_config, electra_config, make_hf, ragged_batch, assert_swap_bf16):
    config = _config(cls, distilbert_config, electra_config)
    assert_swap_bf16(make_hf(cls, config), *ragged_batch(config, [7, 40, 2, 23]))


@pytest.mark.parametrize("cls", [DistilBertForSequenceClassification, ElectraForSequenceClassification],
                         ids=lambda c: c.__name__)
def test_gradients_match_hf(cls, model_backend, distilbert_config, electra_config, make_hf, ragged_batch,
                            assert_grad_close):
    """Train mode without dropout: the loss's gradient reaches every weight as HF's does."""
    zero = dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0) if cls in DISTILBERT else dict(
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = _config(cls, distilbert_config, electra_config, **zero)
    ref_model = make_hf(cls, config).train()
    model = swap(copy.deepcopy(ref_model), backend=model_backend)
    ids, mask = ragged_batch(config, [9, 14, 3])
    labels = torch.tensor([0, 1, 1])
    ref_model(ids, attention_mask=mask, labels=labels).loss.backward()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        assert_grad_close(grads[name].grad, p.grad, what=name)


@pytest.mark.parametrize("cls", [DistilBertForMaskedLM, ElectraForSequenceClassification], ids=lambda c: c.__name__)
def test_unswap_restores_bit_exact_outputs(cls, distilbert_config, electra_config, make_hf, unswap_is_bit_exact):
    config = _config(cls, distilbert_config, electra_config)
    unswap_is_bit_exact(make_hf(cls, config), config)


@pytest.mark.parametrize("cls", [DistilBertForMultipleChoice, ElectraForMultipleChoice], ids=lambda c: c.__name__)
def test_multiple_choice(cls, model_backend, distilbert_config, electra_config, make_hf, multiple_choice_parity):
    config = _config(cls, distilbert_config, electra_config)
    multiple_choice_parity(make_hf(cls, config), config, model_backend)


def test_swapped_distilbert_ignores_token_types_as_hf_does(distilbert_config, make_hf, ragged_batch,
                                                          assert_tokens_close):
    """HF's DistilBertModel takes token_type_ids (a BERT tokenizer makes them; sentence-transformers passes them on)
    and ignores them; so does the swapped model. FastBertModel, which is not a drop-in, refuses them."""
    config = distilbert_config()
    model = make_hf(DistilBertModel, config)
    ids, mask = ragged_batch(config, [4, 9])
    types = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state, ref)
        swap(model)
        assert_tokens_close(model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state, ref, mask)


@pytest.mark.parametrize("cls,overrides,match", [
    (DistilBertForSequenceClassification, dict(activation="relu"),
     r"activation='relu' is not supported; supported: gelu, gelu_new, gelu_pytorch_tanh"),
    (ElectraForSequenceClassification, dict(hidden_act="relu"), r"hidden_act='relu' is not supported"),
    (ElectraForSequenceClassification, dict(position_embedding_type="relative_key"),
     r"position_embedding_type='relative_key'.*only absolute"),
    (ElectraForCausalLM, dict(is_decoder=True), r"is_decoder=True: decoders \(causal attention\) are not supported"),
], ids=["distilbert-relu", "electra-relu", "electra-relative-positions", "electra-causal"])
def test_unsupported_config_is_refused_and_model_untouched(cls, overrides, match, distilbert_config, electra_config,
                                                           make_hf, ragged_batch, assert_swap_refused):
    config = _config(cls, distilbert_config, electra_config, **overrides)
    assert_swap_refused(make_hf(cls, config), *ragged_batch(config, [5, 9]), match)
