"""FastBertModel and MultiTaskBert on DistilBERT, ELECTRA and MPNet: parity with HF (fp32 within 1e-4 at the real tokens,
eager and sdpa; bf16 within twice HF's own bf16 error), loading from HF directories of every task model, the heads
of every mapped *For* class against HF's, export back to transformers, the own checkpoint, and refusals.
Random weights of odd sizes: hidden 48, 3 heads, vocab 997.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers

from mtbert_fast import FastBertModel, MultiTaskBert
from mtbert_fast.models import EncoderConfig, UnsupportedModelError
from mtbert_fast.models.hf_mapping import head_to_hf

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
FAMILIES = ("distilbert", "electra", "mpnet")
PREFIX = {"distilbert": "DistilBert", "electra": "Electra", "mpnet": "MPNet", "modernbert": "ModernBert",
          "deberta": "DebertaV2"}
# the multi-task tests also run ModernBERT and DeBERTa (their encoder tests are in tests/integrations)
HEAD_FAMILIES = (*FAMILIES, "modernbert", "deberta")
HEADS = {
    "distilbert": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"),
    "electra": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering"),
    "mpnet": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"),
    "modernbert": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"),
    "deberta": ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMaskedLM"),
}


@pytest.fixture
def family_config(distilbert_config, electra_config, mpnet_config, modernbert_config, deberta_config):
    def make(family, **overrides):
        return {"distilbert": distilbert_config, "electra": electra_config, "mpnet": mpnet_config,
                "modernbert": modernbert_config, "deberta": deberta_config}[family](**overrides)

    return make


@pytest.mark.parametrize("loader", ["from_hf", "from_pretrained"])
@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_parity(family, loader, model_backend, family_config, make_hf, hf_outputs, ragged_batch, tmp_path,
                        assert_tokens_close):
    config = family_config(family)
    hf = make_hf(getattr(transformers, f"{PREFIX[family]}Model"), config)
    if loader == "from_hf":
        fast = FastBertModel.from_hf(hf, backend=model_backend)
    else:
        hf.save_pretrained(tmp_path)
        fast = FastBertModel.from_pretrained(tmp_path, backend=model_backend)
    assert fast.config.family == family and (fast.pooler is None) == (family != "mpnet")
    ids, mask = ragged_batch(config, [1, 30, 7, 512 if loader == "from_hf" else 12])
    refs = hf_outputs(hf, ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states, strict=True)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.parametrize("family,suffix", [(f, s) for f in HEAD_FAMILIES for s in (*HEADS[f], "ForMultipleChoice")]
                         + [("electra", "ForMaskedLM"), ("electra", "ForPreTraining")])
def test_from_pretrained_task_checkpoints(family, suffix, family_config, make_hf, ragged_batch, tmp_path,
                                          assert_tokens_close):
    """The encoder of any task model's checkpoint (prefix distilbert. / electra. / ...), the head ignored, even where
    the head holds weights named like an encoder's (DeBERTa's ContextPooler is pooler.dense)."""
    cls = getattr(transformers, f"{PREFIX[family]}{suffix}")
    config = family_config(family)
    hf = make_hf(cls, config)
    hf.save_pretrained(tmp_path)
    fast = FastBertModel.from_pretrained(tmp_path)
    ids, mask = ragged_batch(config, [5, 11])
    with torch.no_grad():
        ref = hf.base_model(ids, attention_mask=mask).last_hidden_state
        assert_tokens_close(fast(ids, mask).last_hidden_state, ref, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_error_is_at_most_twice_hf_bf16(family, family_config, make_hf, ragged_batch,
                                             assert_low_precision_error):
    config = family_config(family)
    hf = make_hf(getattr(transformers, f"{PREFIX[family]}Model"), config)
    fast = FastBertModel.from_hf(hf, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    ids, mask = ragged_batch(config, [7, 40, 2, 23])
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        native = copy.deepcopy(hf).to(torch.bfloat16)(ids, attention_mask=mask).last_hidden_state
        out = fast(ids, mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert_low_precision_error(out, native, ref, mask)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_inference(family, family_config, make_hf, ragged_batch):
    """int8 quantization runs on either family's layers (DistilBERT without token types, ELECTRA after its
    projection) and stays close to the float model."""
    config = family_config(family)
    hf = make_hf(getattr(transformers, f"{PREFIX[family]}Model"), config)
    fast = FastBertModel.from_hf(hf, dtype=torch.qint8)
    ids, mask = ragged_batch(config, [9, 17, 4])
    real = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state[real]
        out = fast(ids, mask).last_hidden_state[real]
    assert F.cosine_similarity(out, ref, dim=-1).min().item() > 0.99


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_layout(family, family_config, make_hf):
    """DistilBERT has no token-type table; ELECTRA's projection comes only where embedding_size differs."""
    for overrides in ({}, {"embedding_size": 48}) if family == "electra" else ({},):
        hf = make_hf(getattr(transformers, f"{PREFIX[family]}Model"), family_config(family, **overrides))
        fast = FastBertModel.from_hf(hf)
        emb = fast.embeddings
        assert (emb.token_type_embeddings is None) == (family in ("distilbert", "mpnet"))
        assert (fast.relative_attention_bias is None) == (family != "mpnet")
        projected = family == "electra" and not overrides
        assert (emb.project is None) != projected
        assert emb.word_embeddings.weight.shape[1] == (32 if projected else 48)


def test_distilbert_refuses_token_types_and_electra_takes_them(family_config, make_hf, ragged_batch):
    config = family_config("distilbert")
    fast = FastBertModel.from_hf(make_hf(transformers.DistilBertModel, config))
    ids, mask = ragged_batch(config, [4, 6])
    with pytest.raises(ValueError, match="token_type_ids given, but a distilbert model has no token types"):
        fast(ids, mask, token_type_ids=torch.zeros_like(ids))
    config = family_config("electra")
    fast = FastBertModel.from_hf(make_hf(transformers.ElectraModel, config))
    with torch.no_grad():
        assert not torch.equal(fast(ids, mask, token_type_ids=mask).last_hidden_state,
                               fast(ids, mask).last_hidden_state)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_config_round_trip(family, family_config):
    config = EncoderConfig.from_hf(family_config(family))
    assert config.family == family
    assert EncoderConfig.from_dict(config.to_dict()) == config
    if family == "electra":
        assert config.embedding_size == 32 and config.to_dict()["embedding_size"] == 32
        assert EncoderConfig.from_hf(family_config(family, embedding_size=48)).embedding_size is None
    elif family == "mpnet":
        assert config.type_vocab_size == 0 and config.relative_attention_num_buckets == 32
        assert "type_vocab_size" not in config.to_dict() and config.position_padding_idx == 1
        assert EncoderConfig.from_hf(family_config(family, pad_token_id=0)).position_padding_idx == 1
    else:
        assert config.type_vocab_size == 0 and config.hidden_size == 48 and config.to_dict()["dim"] == 48


def test_distilbert_config_refusals(family_config):
    with pytest.raises(UnsupportedModelError, match=r"activation='relu' is not supported"):
        EncoderConfig.from_hf(family_config("distilbert", activation="relu"))
    with pytest.raises(ValueError, match="embedding_size is an ELECTRA option"):
        EncoderConfig(embedding_size=32)


# --- multi-task: the heads of every mapped *For* class ------------------------------------------------------------


def _task_models(family, family_config, seed=0):
    """One HF task model per mapped head, sharing one random encoder; heads random too."""
    torch.manual_seed(seed)
    shared = getattr(transformers, f"{PREFIX[family]}Model")(family_config(family)).eval()
    models = {}
    for i, suffix in enumerate(HEADS[family]):
        torch.manual_seed(seed + 1 + i)
        overrides = {"num_labels": 4} if suffix in ("ForSequenceClassification", "ForTokenClassification") else {}
        model = getattr(transformers, f"{PREFIX[family]}{suffix}")(family_config(family, **overrides)).eval()
        base = model.base_model  # MPNet's task models have no pooler
        base.load_state_dict({k: v for k, v in shared.state_dict().items()
                              if not k.startswith("pooler.") or getattr(base, "pooler", None) is not None})
        models[suffix[3:].lower()] = model
    return models


def _labels(mask, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = mask.bool()
    masked = ((torch.rand(mask.shape, generator=g) < 0.3) & real)
    masked[:, 0] = True
    return {
        "sequenceclassification": torch.randint(0, 4, (mask.shape[0],), generator=g),
        "tokenclassification": torch.randint(0, 4, mask.shape, generator=g).masked_fill(~real, -100),
        "maskedlm": torch.where(masked, torch.randint(0, vocab, mask.shape, generator=g), -100),
    }


@pytest.mark.parametrize("family", HEAD_FAMILIES)
@torch.no_grad()
def test_heads_match_hf(family, family_config, ragged_batch, assert_close):
    models = _task_models(family, family_config)
    model = MultiTaskBert.from_hf_heads(models)
    config = family_config(family)
    ids, mask = ragged_batch(config, [12, 7, 3, 9])
    real = mask.bool()
    labels = {t: v for t, v in _labels(mask, config.vocab_size).items() if t in models}
    out = model(ids, mask, labels=labels)
    for task, hf_model in models.items():
        ref = hf_model(ids, attention_mask=mask, labels=labels.get(task))
        got = out.outputs[task]
        if task == "sequenceclassification":
            assert_close(got["logits"], ref.logits, what=task)
        elif task == "tokenclassification":
            assert_close(got["logits"][real], ref.logits[real], what=task)
        elif task == "questionanswering":
            for name in ("start_logits", "end_logits"):
                assert_close(got[name][real], getattr(ref, name)[real], what=f"{task} {name}")
        else:
            where = labels[task] != -100
            assert_close(got["logits"], ref.logits[where], what=task)
        if task in labels:
            assert_close(out.losses[task], ref.loss, what=f"{task} loss")


@pytest.mark.parametrize("family", HEAD_FAMILIES)
@torch.no_grad()
def test_export_hf_loads_in_transformers_with_the_same_outputs(family, family_config, ragged_batch, tmp_path,
                                                               assert_close):
    models = _task_models(family, family_config, seed=3)
    model = MultiTaskBert.from_hf_heads(models)
    ids, mask = ragged_batch(family_config(family), [12, 5])
    real = mask.bool()
    for task, ref_model in models.items():
        model.export_hf(task, tmp_path / task)
        hf = type(ref_model).from_pretrained(tmp_path / task).eval()
        ref, got = ref_model(ids, attention_mask=mask), hf(ids, attention_mask=mask)
        for name in ("logits", "start_logits", "end_logits"):
            if getattr(ref, name, None) is not None:
                a, b = getattr(got, name), getattr(ref, name)
                assert_close(a[real] if a.dim() > 1 and a.shape[:2] == real.shape else a,
                             b[real] if b.dim() > 1 and b.shape[:2] == real.shape else b, atol=1e-5, what=task)
        if task == "maskedlm":
            decoder = {"distilbert": "vocab_projector", "mpnet": "lm_head.decoder", "modernbert": "decoder",
                       "deberta": "cls.predictions.decoder"}[family]
            assert hf.get_submodule(decoder).weight is hf.base_model.get_input_embeddings().weight


@pytest.mark.parametrize("family", HEAD_FAMILIES)
@torch.no_grad()
def test_own_checkpoint_round_trip(family, family_config, ragged_batch, tmp_path):
    model = MultiTaskBert.from_hf_heads(_task_models(family, family_config))
    model.save_pretrained(tmp_path)
    loaded = MultiTaskBert.from_pretrained(tmp_path)
    assert loaded.encoder.config == model.encoder.config
    ids, mask = ragged_batch(family_config(family), [8, 3])
    a, b = model(ids, mask), loaded(ids, mask)
    for task in model.tasks:
        for name, value in a.outputs[task].items():
            assert torch.equal(b.outputs[task][name], value), (task, name)


@pytest.mark.parametrize("cls", ["ElectraForMaskedLM", "ElectraForPreTraining", "ElectraForCausalLM"])
def test_electra_generator_and_discriminator_heads_are_refused(cls, family_config):
    model = getattr(transformers, cls)(family_config("electra")).eval()
    with pytest.raises(UnsupportedModelError, match=f"{cls} is not a supported task model; supported: .*"
                                                    "ElectraForSequenceClassification"):
        MultiTaskBert.from_hf_heads({"task": model})


def test_sequence_head_styles_export_only_to_their_family(family_config):
    """A RoBERTa-style (tanh) head has no DistilBERT or ELECTRA class to export to, and the reverse."""
    from mtbert_fast.models import SequenceClassificationHead
    from mtbert_fast.models.hf_mapping import head_to_hf

    tanh = SequenceClassificationHead(48, 3, roberta_style=True)
    for family, expected in (("distilbert", "dense \\+ relu head on the first token \\(no dropout before the dense\\)"),
                             ("electra", "dense \\+ gelu head on the first token")):
        config = EncoderConfig.from_hf(family_config(family))
        with pytest.raises(UnsupportedModelError, match=f"{PREFIX[family]}ForSequenceClassification uses a {expected}"):
            head_to_hf(tanh, config)
    relu = SequenceClassificationHead(48, 3, roberta_style=True, activation="relu", dropout_before_dense=False)
    assert head_to_hf(relu, EncoderConfig.from_hf(family_config("distilbert")))[0] == \
        "DistilBertForSequenceClassification"
    with pytest.raises(ValueError, match="activation must be one of tanh, gelu, relu"):
        SequenceClassificationHead(48, 3, roberta_style=True, activation="swish")
    with pytest.raises(ValueError, match="pass roberta_style=True"):
        SequenceClassificationHead(48, 3, activation="gelu")


def _seeded(hf_call, our_call):
    """(ours, HF's) each called after the same seed: in train mode, with the same dropout masks where both draw
    them in the same order."""
    torch.manual_seed(1)
    ref = hf_call()
    torch.manual_seed(1)
    return our_call(), ref


def test_distilbert_dense_head_trains_like_hf(family_config, ragged_batch):
    """DistilBERT's head has no dropout before its dense: in train mode with the same seed, its dropout masks and
    so its logits equal HF's (dropout elsewhere off)."""
    config = family_config("distilbert", dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.5)
    torch.manual_seed(0)
    hf = transformers.DistilBertForSequenceClassification(config).train()
    model = MultiTaskBert.from_hf_heads({"cls": hf}).train()
    ids, mask = ragged_batch(config, [6, 9])
    got, ref = _seeded(lambda: hf(ids, attention_mask=mask).logits, lambda: model(ids, mask).outputs["cls"]["logits"])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert not torch.equal(ref, F.linear(F.relu(hf.pre_classifier(hf.distilbert(ids, attention_mask=mask)
                                                                    .last_hidden_state[:, 0])),
                                         hf.classifier.weight, hf.classifier.bias))


def test_distilbert_qa_head_has_its_dropout(family_config):
    """DistilBERT's QA head drops out the tokens before its linear (qa_dropout): in train mode with the same seed its
    logits equal HF's (every row real, so the packed tokens are HF's in order; dropout elsewhere off), and the export
    writes the rate back."""
    config = family_config("distilbert", dropout=0.0, attention_dropout=0.0, qa_dropout=0.5)
    torch.manual_seed(0)
    hf = transformers.DistilBertForQuestionAnswering(config).train()
    model = MultiTaskBert.from_hf_heads({"qa": hf}).train()
    assert model.heads["qa"].dropout == 0.5
    ids = torch.randint(3, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    got, ref = _seeded(lambda: hf(ids, attention_mask=torch.ones_like(ids)),
                       lambda: model(ids, torch.ones_like(ids)).outputs["qa"])
    torch.testing.assert_close(got["start_logits"], ref.start_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(got["end_logits"], ref.end_logits, atol=1e-4, rtol=0)
    name, hf_config, _ = head_to_hf(model.heads["qa"], model.encoder.config)
    assert name == "DistilBertForQuestionAnswering" and hf_config["qa_dropout"] == 0.5
    electra = EncoderConfig.from_hf(family_config("electra"))
    with pytest.raises(UnsupportedModelError, match="has no dropout before its QA linear; this head has dropout=0.5"):
        head_to_hf(model.heads["qa"], electra)


@pytest.mark.parametrize("pooler_dropout, cls_dropout", [(0.0, 0.5), (0.5, 0.0)])
def test_deberta_classifier_keeps_its_two_dropouts(family_config, ragged_batch, pooler_dropout, cls_dropout):
    """DeBERTa's ContextPooler drops out the first token with pooler_dropout before its dense; the classifier then
    drops out with cls_dropout. In train mode with the same seed the logits equal HF's, and the export writes both."""
    config = family_config("deberta", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                           pooler_dropout=pooler_dropout, cls_dropout=cls_dropout, num_labels=3)
    torch.manual_seed(0)
    hf = transformers.DebertaV2ForSequenceClassification(config).train()
    model = MultiTaskBert.from_hf_heads({"cls": hf}).train()
    head = model.heads["cls"]
    assert (head.dense_dropout, head.dropout) == (pooler_dropout, cls_dropout)
    ids, mask = ragged_batch(config, [6, 9])
    got, ref = _seeded(lambda: hf(ids, attention_mask=mask).logits, lambda: model(ids, mask).outputs["cls"]["logits"])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    _, hf_config, _ = head_to_hf(head, model.encoder.config)
    assert (hf_config["pooler_dropout"], hf_config["cls_dropout"]) == (pooler_dropout, cls_dropout)
