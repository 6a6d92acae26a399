"""ModernBERT: mtbert_fast.swap / unswap on ModernBertModel and its task models, and FastBertModel.

A ModernBERT layer is pre-norm, rotates queries and keys by their positions (rotary_qk, theta per layer type), runs a
GeGLU feed-forward (geglu) and, in its sliding layers, attends only within local_attention / 2 of each token
(attention_varlen's window). Parity (fp32, within 1e-4 at the real tokens) against the same HF model before the
swap, eager and sdpa, on random weights of odd sizes (hidden 48, 3 heads, vocab 997, 4 layers: full, sliding,
sliding, full) with a window of 4 so that the test sequences reach past it: ragged batches, lengths 1 and 512 at
ModernBERT's own window of 64, left padding and the other inputs it takes, biases on, the tanh GELU; bf16 within
twice HF's own bf16 error; gradients; bit-exact outputs after unswap; and the refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    ModernBertForMaskedLM,
    ModernBertForMultipleChoice,
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

from mtbert_fast import FastBertModel, is_swapped, swap
from mtbert_fast.models import EncoderConfig, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
TASKS = [ModernBertModel, ModernBertForSequenceClassification, ModernBertForTokenClassification,
         ModernBertForQuestionAnswering, ModernBertForMaskedLM]


def _fields(cls):
    name = cls.__name__
    if name.endswith("Model"):
        return {"last_hidden_state": True}
    if name.endswith("ForQuestionAnswering"):
        return {"start_logits": True, "end_logits": True}
    return {"logits": not name.endswith("ForSequenceClassification")}


@pytest.mark.parametrize("loader", ["from_hf", "from_pretrained"])
def test_encoder_parity(loader, model_backend, modernbert_config, make_hf, hf_outputs, ragged_batch, tmp_path,
                        assert_tokens_close):
    config = modernbert_config()
    hf = make_hf(ModernBertModel, config)
    if loader == "from_hf":
        fast = FastBertModel.from_hf(hf, backend=model_backend)
    else:
        hf.save_pretrained(tmp_path)
        fast = FastBertModel.from_pretrained(tmp_path, backend=model_backend)
    assert fast.config.family == "modernbert" and fast.pooler is None and fast.layers[0].attn_norm is None
    ids, mask = ragged_batch(config, [1, 30, 7, 12])
    refs = hf_outputs(hf, ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_task_model_parity(cls, model_backend, modernbert_config, make_hf, ragged_batch, swap_parity,
                           assert_tokens_close):
    config = modernbert_config()
    model = make_hf(cls, config)
    ids, mask = ragged_batch(config, [5, 17, 1, 30, 12])
    out, refs = swap_parity(model, model_backend, ids, mask, _fields(cls), output_hidden_states=True)
    for ref in refs.values():
        assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


def test_mean_pooled_classifier(model_backend, modernbert_config, make_hf, ragged_batch, swap_parity):
    """classifier_pooling="mean" averages the last hidden state over the mask: the swapped zeros at padding give HF's
    mean."""
    config = modernbert_config(classifier_pooling="mean")
    model = make_hf(ModernBertForSequenceClassification, config)
    swap_parity(model, model_backend, *ragged_batch(config, [9, 3, 20]), {"logits": False})


@pytest.mark.all_threads
def test_lengths_1_and_512(model_backend, modernbert_config, make_hf, hf_outputs, ragged_batch, compare_outputs):
    """ModernBERT's own window (local_attention 128: 64 each side) on a 512-token row, and rows past
    max_position_embeddings (512), which HF runs too: rotary positions index no table. Negative position_ids are
    refused."""
    config = modernbert_config(local_attention=128)
    model = make_hf(ModernBertForTokenClassification, config)
    ids, mask = ragged_batch(config, [1, 512, 64], seed=2)
    longer = torch.randint(3, 997, (1, 530), generator=torch.Generator().manual_seed(3))
    past = torch.arange(40).unsqueeze(0) + 500
    cases = [((ids,), dict(attention_mask=mask), mask), ((longer,), {}, torch.ones_like(longer)),
             ((longer[:, :40],), dict(position_ids=past), torch.ones_like(past))]
    refs = [hf_outputs(model, *args, **kwargs) for args, kwargs, _ in cases]
    swap(model, backend=model_backend)
    with torch.no_grad():
        outs = [model(*args, **kwargs) for args, kwargs, _ in cases]
        with pytest.raises(ValueError, match=r"position_ids hold negative values \(down to -1\)"):
            model(longer[:, :40], position_ids=past - 501)
    for out, case_refs, (_, _, real) in zip(outs, refs, cases):
        for ref in case_refs.values():
            compare_outputs(out, ref, {"logits": True}, real)


@pytest.mark.parametrize("variant", ["position_ids", "inputs_embeds", "float_mask", "no_mask", "left_padding"])
def test_input_variants(variant, model_backend, modernbert_config, make_hf, hf_outputs, ragged_batch,
                        assert_tokens_close, input_variant):
    """Left padding too: the rotary positions count over the padded row, as HF's do, and the window and the
    rotation depend only on distances between real tokens."""
    config = modernbert_config()
    model = make_hf(ModernBertModel, config)
    ids, mask = ragged_batch(config, [20, 11, 4])
    kwargs, real = input_variant(variant, config, ids, mask, model)
    refs = hf_outputs(model, **kwargs)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(**kwargs)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, real)


@pytest.mark.parametrize("overrides", [dict(norm_bias=True, attention_bias=True, mlp_bias=True),
                                       dict(hidden_activation="gelu_pytorch_tanh"),
                                       dict(layer_types=["sliding_attention"] * 4, local_attention=2)],
                         ids=["biases", "tanh-gelu", "all-sliding"])
def test_config_variants(overrides, model_backend, modernbert_config, make_hf, hf_outputs, ragged_batch,
                         assert_tokens_close):
    config = modernbert_config(**overrides)
    model = make_hf(ModernBertModel, config)
    ids, mask = ragged_batch(config, [9, 3, 26])
    refs = hf_outputs(model, ids, attention_mask=mask)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)


def test_padding_inside_a_row_is_refused(modernbert_config, make_hf, ragged_batch):
    config = modernbert_config()
    model = swap(make_hf(ModernBertModel, config))
    ids, mask = ragged_batch(config, [9, 12])
    mask[0, 3] = 0
    with pytest.raises(ValueError, match="row 0 of attention_mask has padding between real tokens: a modernbert "
                                         "model's relative position bias or local attention window"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_bf16(cls, modernbert_config, make_hf, ragged_batch, assert_swap_bf16):
    config = modernbert_config()
    assert_swap_bf16(make_hf(cls, config), *ragged_batch(config, [7, 40, 2, 23]))


def test_gradients_match_hf(model_backend, modernbert_config, make_hf, ragged_batch, assert_grad_close):
    """Train mode (no dropout in ModernBERT's defaults): the loss's gradient reaches every weight as HF's does."""
    config = modernbert_config()
    ref_model = make_hf(ModernBertForSequenceClassification, config).train()
    model = swap(copy.deepcopy(ref_model), backend=model_backend)
    ids, mask = ragged_batch(config, [9, 30, 3])
    labels = torch.tensor([0, 1, 1])
    ref_model(ids, attention_mask=mask, labels=labels).loss.backward()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        assert_grad_close(grads[name].grad, p.grad, what=name)


def test_unswap_restores_bit_exact_outputs(modernbert_config, make_hf, unswap_is_bit_exact):
    config = modernbert_config()
    unswap_is_bit_exact(make_hf(ModernBertForMaskedLM, config), config)


def test_multiple_choice(model_backend, modernbert_config, make_hf, multiple_choice_parity):
    config = modernbert_config()
    multiple_choice_parity(make_hf(ModernBertForMultipleChoice, config), config, model_backend)


def test_config_round_trip(modernbert_config):
    config = EncoderConfig.from_hf(modernbert_config())
    assert config.layer_types == ("full_attention", "sliding_attention", "sliding_attention", "full_attention")
    assert config.window == 4 and config.pre_norm and config.type_vocab_size == 0
    assert (config.rope_theta, config.local_rope_theta) == (160000.0, 10000.0)
    assert EncoderConfig.from_dict(config.to_dict()) == config
    older = {"model_type": "modernbert", "hidden_size": 48, "num_hidden_layers": 4, "num_attention_heads": 3,
             "intermediate_size": 80, "global_rope_theta": 80000.0, "local_rope_theta": 5000.0,
             "global_attn_every_n_layers": 2}
    from_json = EncoderConfig.from_dict(older)  # a config.json from before rope_parameters
    assert from_json.layer_types == ("full_attention", "sliding_attention") * 2
    assert (from_json.rope_theta, from_json.local_rope_theta) == (80000.0, 5000.0)


@pytest.mark.parametrize("change, error, match", [
    (lambda c: c.rope_parameters["full_attention"].update(rope_type="linear", factor=2.0), UnsupportedModelError,
     r"rope_parameters\['full_attention'\] has rope_type='linear': only the default rotary embedding"),
    (lambda c: setattr(c, "hidden_activation", "silu"), UnsupportedModelError, "hidden_act='silu' is not supported"),
    (lambda c: setattr(c, "layer_types", ["full_attention"] * 3), ValueError,
     "layer_types names 3 layers, but num_hidden_layers is 4"),
    (lambda c: setattr(c, "layer_types", ["full_attention", "chunked_attention"] * 2), UnsupportedModelError,
     "layer_types holds 'chunked_attention'; supported: "),
])  # fmt: skip
def test_unsupported_config_is_refused_before_anything_changes(change, error, match, modernbert_config, make_hf):
    config = modernbert_config()
    model = make_hf(ModernBertModel, config)
    change(model.config)
    with pytest.raises(error, match=match):
        swap(model)
    assert not is_swapped(model) and "forward" not in vars(model)


def test_int8_is_refused_by_name(modernbert_config, make_hf):
    model = make_hf(ModernBertModel, modernbert_config())
    with pytest.raises(UnsupportedModelError, match="int8 inference runs post-norm .* a modernbert encoder runs in"):
        swap(model, dtype=torch.qint8)
    assert not is_swapped(model)
    with pytest.raises(UnsupportedModelError, match="int8 inference runs post-norm"):
        FastBertModel.from_hf(model, dtype=torch.qint8)


def test_heads_export_only_where_transformers_has_them(modernbert_config, bert_config):
    """A head with ModernBERT's prediction head has no class on another family, and a ModernBERT task head without
    it (or with a LayerNorm unlike the encoder's) has none either: refused by name."""
    from mtbert_fast.models import MaskedLMHead, SequenceClassificationHead, TokenClassificationHead
    from mtbert_fast.models.hf_mapping import head_to_hf

    modern = EncoderConfig.from_hf(modernbert_config())
    bert = EncoderConfig.from_hf(bert_config())
    transform = {"eps": 1e-5, "activation": "gelu"}
    with pytest.raises(UnsupportedModelError, match="ModernBERT's prediction head before its output; "
                                                    "BertForTokenClassification has none"):
        head_to_hf(TokenClassificationHead(bert.hidden_size, 3, transform=transform), bert)
    with pytest.raises(UnsupportedModelError, match="ModernBertForTokenClassification runs a prediction head"):
        head_to_hf(TokenClassificationHead(48, 3), modern)
    with pytest.raises(UnsupportedModelError, match=r"shares the encoder's norm_bias \(False\) and eps"):
        head_to_hf(SequenceClassificationHead(48, 3, transform={**transform, "norm_bias": True}), modern)
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM's head has every bias; this head was built with "
                                                    "dense_bias=False"):
        head_to_hf(MaskedLMHead(bert, dense_bias=False), bert)
    name, config, _ = head_to_hf(SequenceClassificationHead(48, 3, transform=transform, mean_pooled=True), modern)
    assert name == "ModernBertForSequenceClassification" and config["classifier_pooling"] == "mean"
