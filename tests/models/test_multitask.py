"""MultiTaskBert: parity of every head with its HF task model (fp32, within 1e-4), per-row routing, one encoder
pass, save/load, HF export, bad-input errors, and an MLM head that only ever touches the masked rows."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from mtbert_fast import MultiTaskBert  # noqa: E402
from mtbert_fast.models import (  # noqa: E402
    EncoderConfig,
    FastBertModel,
    MaskedLMHead,
    MissingWeightError,
    SentenceEmbeddingHead,
    SequenceClassificationHead,
    SpanExtractionHead,
    TokenClassificationHead,
)
from mtbert_fast.models import encoder as encoder_module  # noqa: E402
from mtbert_fast.models import heads as heads_module  # noqa: E402

ATOL = 1e-4
LENGTHS = (12, 7, 3, 9)  # ragged: rows 1-3 are padded
SEQLEN = 12


def _config(family="bert", **overrides):
    common = dict(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if family == "roberta":
        return transformers.RobertaConfig(**common, max_position_embeddings=SEQLEN + 2, type_vocab_size=1,
                                          pad_token_id=1, **overrides)
    return transformers.BertConfig(**common, max_position_embeddings=SEQLEN, type_vocab_size=2, **overrides)


def _perturb(params, seed, std):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * std)


def _task_models(family, specs, seed=0):
    """HF task models (name -> (class name, config overrides)) sharing one random encoder, heads random too."""
    prefix = "Bert" if family == "bert" else "Roberta"
    torch.manual_seed(seed)
    shared = getattr(transformers, f"{prefix}Model")(_config(family)).eval()
    _perturb(shared.parameters(), seed, 0.02)
    models = {}
    for i, (task, (suffix, overrides)) in enumerate(specs.items()):
        torch.manual_seed(seed + 1 + i)
        model = getattr(transformers, f"{prefix}{suffix}")(_config(family, **overrides)).eval()
        missing, _ = model.base_model.load_state_dict(shared.state_dict(), strict=False)
        assert all(k.startswith("pooler.") for k in missing)
        base = {id(p) for p in model.base_model.parameters()}
        _perturb([p for p in model.parameters() if id(p) not in base], seed + 100 + i, 0.1)
        models[task] = model
    return models


BERT_TASKS = {
    "sentiment": ("ForSequenceClassification", {"num_labels": 3}),
    "topics": ("ForSequenceClassification", {"num_labels": 4, "problem_type": "multi_label_classification"}),
    "score": ("ForSequenceClassification", {"num_labels": 1}),
    "ner": ("ForTokenClassification", {"num_labels": 5}),
    "mlm": ("ForMaskedLM", {}),
    "nsp": ("ForNextSentencePrediction", {}),
    "qa": ("ForQuestionAnswering", {}),
    "pretrain": ("ForPreTraining", {}),
}
ROBERTA_TASKS = {
    "sentiment": ("ForSequenceClassification", {"num_labels": 3}),
    "ner": ("ForTokenClassification", {"num_labels": 5}),
    "mlm": ("ForMaskedLM", {}),
    "qa": ("ForQuestionAnswering", {}),
}


def _batch(family="bert", lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    pad_id = 1 if family == "roberta" else 0
    mask = (torch.arange(SEQLEN)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(2, 99, (b, SEQLEN), generator=g).masked_fill(mask == 0, pad_id)
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        batch["token_type_ids"] = (torch.rand(b, SEQLEN, generator=g) > 0.5).long() * mask
    return batch


def _labels(batch, seed=0):
    """Labels for every BERT_TASKS task over the whole batch."""
    g = torch.Generator().manual_seed(seed)
    mask = batch["attention_mask"].bool()
    b = mask.shape[0]
    masked = (torch.rand(mask.shape, generator=g) < 0.3) & mask
    masked[:, 0] |= True
    mlm = torch.where(masked, torch.randint(0, 99, mask.shape, generator=g), -100)
    ner = torch.randint(0, 5, mask.shape, generator=g).masked_fill(~mask, -100)
    ner[0, 2] = -100
    lengths = mask.sum(1)
    start = (torch.rand(b, generator=g) * lengths).long()
    end = torch.minimum(start + 1, lengths - 1)
    nsp = torch.randint(0, 2, (b,), generator=g)
    return {
        "sentiment": torch.randint(0, 3, (b,), generator=g),
        "topics": (torch.rand(b, 4, generator=g) > 0.5).float(),
        "score": torch.randn(b, generator=g),
        "ner": ner,
        "mlm": mlm,
        "nsp": nsp,
        "qa": (start, end),
        "pretrain": (mlm, nsp),
    }


@pytest.fixture(scope="module")
def bert():
    models = _task_models("bert", BERT_TASKS)
    return models, MultiTaskBert.from_hf_heads(models)


@pytest.fixture(scope="module")
def roberta():
    models = _task_models("roberta", ROBERTA_TASKS, seed=7)
    return models, MultiTaskBert.from_hf_heads(models)


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _real(x, mask):
    """x at the real tokens when x is per token ([B, L, ...]), else x."""
    return x[mask.bool()] if x.shape[:2] == mask.shape else x


# --- parity with the HF task models ------------------------------------------------------------------------------


@torch.no_grad()
def test_bert_heads_match_hf(bert):
    models, model = bert
    batch = _batch()
    labels = _labels(batch)
    out = model(**batch, labels=labels)
    mask = batch["attention_mask"]
    assert set(out.outputs) == set(BERT_TASKS) and set(out.losses) == set(BERT_TASKS)

    for task in ("sentiment", "topics", "score", "nsp"):
        hf = models[task](**batch, labels=labels[task])
        _close(out.outputs[task]["logits"], hf.logits)
        _close(out.losses[task], hf.loss)
        assert torch.equal(out.outputs[task]["rows"], torch.arange(4))
    assert model.heads["topics"].problem_type == "multi_label" and model.heads["score"].problem_type == "regression"

    hf = models["ner"](**batch, labels=labels["ner"])
    _close(_real(out.outputs["ner"]["logits"], mask), _real(hf.logits, mask))
    assert not out.outputs["ner"]["logits"][~mask.bool()].any()  # zeros at padding
    _close(out.losses["ner"], hf.loss)

    hf = models["mlm"](**batch, labels=labels["mlm"])
    where = labels["mlm"] != -100
    positions = out.outputs["mlm"]["positions"]
    assert torch.equal(positions, where.nonzero())
    _close(out.outputs["mlm"]["logits"], hf.logits[where])
    _close(out.losses["mlm"], hf.loss)

    hf = models["pretrain"](**batch, labels=labels["mlm"], next_sentence_label=labels["nsp"])
    _close(out.losses["pretrain"], hf.loss)
    _close(out.outputs["pretrain"]["prediction_logits"], hf.prediction_logits[where])
    _close(out.outputs["pretrain"]["seq_relationship_logits"], hf.seq_relationship_logits)
    _close(out.outputs["pretrain"]["mlm_loss"] + out.outputs["pretrain"]["nsp_loss"], hf.loss)

    start, end = labels["qa"]
    hf = models["qa"](**batch, start_positions=start, end_positions=end)
    for name in ("start_logits", "end_logits"):
        ours = out.outputs["qa"][name]
        _close(_real(ours, mask), _real(getattr(hf, name), mask))
        assert (ours[~mask.bool()] == torch.finfo(ours.dtype).min).all()
    # HF's loss also normalizes over its padding logits: compare against HF's logits restricted to real tokens
    pad = ~mask.bool()
    ref = (F.cross_entropy(hf.start_logits.masked_fill(pad, -torch.inf), start)
           + F.cross_entropy(hf.end_logits.masked_fill(pad, -torch.inf), end)) / 2
    _close(out.losses["qa"], ref)

    expected_total = sum(out.losses.values())
    _close(out.loss, expected_total)


@torch.no_grad()
def test_qa_loss_matches_hf_on_unpadded_rows(bert):
    models, model = bert
    batch = _batch(lengths=(SEQLEN, SEQLEN))
    start, end = torch.tensor([3, 0]), torch.tensor([5, 11])
    out = model(**batch, tasks="qa", labels={"qa": {"start_positions": start, "end_positions": end}})
    hf = models["qa"](**batch, start_positions=start, end_positions=end)
    _close(out.losses["qa"], hf.loss)
    _close(out.outputs["qa"]["start_logits"], hf.start_logits)


@torch.no_grad()
def test_roberta_heads_match_hf(roberta):
    models, model = roberta
    assert model.heads["sentiment"].roberta_style and not model.heads["sentiment"].needs_pooler
    assert model.encoder.pooler is None
    batch = _batch("roberta")
    mask = batch["attention_mask"]
    all_labels = _labels(batch)
    labels = {t: all_labels[t] for t in ("sentiment", "ner", "mlm")}
    out = model(**batch, labels=labels)

    hf = models["sentiment"](**batch, labels=labels["sentiment"])
    _close(out.outputs["sentiment"]["logits"], hf.logits)
    _close(out.losses["sentiment"], hf.loss)
    hf = models["ner"](**batch, labels=labels["ner"])
    _close(_real(out.outputs["ner"]["logits"], mask), _real(hf.logits, mask))
    _close(out.losses["ner"], hf.loss)
    hf = models["mlm"](**batch, labels=labels["mlm"])
    _close(out.outputs["mlm"]["logits"], hf.logits[labels["mlm"] != -100])
    _close(out.losses["mlm"], hf.loss)
    hf = models["qa"](**batch)
    _close(_real(out.outputs["qa"]["start_logits"], mask), _real(hf.start_logits, mask))


# --- routing and the single encoder pass ---------------------------------------------------------------------------


@torch.no_grad()
def test_per_row_routing_equals_running_each_task_on_its_rows_alone(bert):
    _, model = bert
    batch = _batch()
    all_labels = _labels(batch)
    per_row = ["sentiment", ["ner", "mlm"], None, ("sentiment", "mlm", "qa")]
    rows = {"sentiment": [0, 3], "ner": [1], "mlm": [1, 3], "qa": [3]}

    def take(task, idx):
        lab = all_labels[task]
        return tuple(t[idx] for t in lab) if isinstance(lab, tuple) else lab[idx]

    labels = {task: take(task, torch.tensor(r)) for task, r in rows.items()}
    out = model(**batch, tasks=per_row, labels=labels)
    assert list(out.outputs) == ["sentiment", "ner", "mlm", "qa"]
    for task, r in rows.items():
        idx = torch.tensor(r)
        assert torch.equal(out.outputs[task]["rows"], idx)
        alone = model(**{k: v[idx] for k, v in batch.items()}, tasks=[task] * len(r) if len(r) > 1 else task,
                      labels={task: labels[task]})
        assert set(alone.outputs[task]) == set(out.outputs[task])
        for name, value in alone.outputs[task].items():
            if name != "rows":
                _close(out.outputs[task][name], value, atol=1e-6)
        _close(out.losses[task], alone.losses[task], atol=1e-6)


@torch.no_grad()
def test_task_lists_for_the_whole_batch(bert):
    _, model = bert
    batch = _batch(lengths=(5, 8))
    # a tuple is always "these tasks on every row", even when it is as long as the batch
    out = model(**batch, tasks=("sentiment", "ner"))
    assert out.loss is None and out.losses == {}
    assert all(torch.equal(o["rows"], torch.arange(2)) for o in out.outputs.values())
    assert out.outputs["sentiment"]["logits"].shape == (2, 3)
    out = model(**batch, tasks=["sentiment", "ner", "nsp"])
    assert list(out.outputs) == ["sentiment", "ner", "nsp"]
    # per row (a list as long as the batch)
    out = model(**batch, tasks=["sentiment", "ner"])
    assert torch.equal(out.outputs["ner"]["rows"], torch.tensor([1]))


def test_encoder_runs_once_for_all_heads(bert):
    _, model = bert
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        batch = _batch()
        with torch.no_grad():
            out = model(**batch, labels=_labels(batch))
        assert len(out.outputs) == len(BERT_TASKS) and len(calls) == 1
        with torch.no_grad():
            model(**batch, tasks=["sentiment", ["ner", "qa"], "mlm", ("nsp", "score")])
        assert len(calls) == 2
    finally:
        handle.remove()


def test_training_step_backward(bert):
    models, _ = bert
    model = MultiTaskBert.from_hf_heads({t: models[t] for t in ("sentiment", "mlm")},
                                        loss_weights={"sentiment": 0.5}).train()
    batch = _batch()
    labels = _labels(batch)
    out = model(**batch, labels={"sentiment": labels["sentiment"], "mlm": labels["mlm"]})
    assert "logits" not in out.outputs["mlm"]  # training: the loss never needs [N, V] logits
    _close(out.loss, 0.5 * out.losses["sentiment"] + out.losses["mlm"])
    out.loss.backward()
    words = model.encoder.embeddings.word_embeddings.weight
    assert words.grad is not None and model.heads["mlm"].dense.weight.grad is not None
    assert model.heads["sentiment"].classifier.weight.grad is not None
    assert model.heads["mlm"].decoder_weight is words


def test_a_task_of_weight_zero_adds_nothing_to_the_loss(bert):
    """A task of loss weight 0 adds nothing to the total, not even the NaN its loss is (as HF's) when its labels in
    the batch are all ignored; with only such tasks the total is a zero that backward still runs through (a training
    step drawn for that task)."""
    models, _ = bert
    model = MultiTaskBert.from_hf_heads({t: models[t] for t in ("sentiment", "ner")},
                                        loss_weights={"ner": 0.0}).train()
    batch = _batch()
    labels = _labels(batch)
    ignored = torch.full_like(labels["ner"], -100)
    out = model(**batch, labels={"sentiment": labels["sentiment"], "ner": ignored})
    assert torch.isnan(out.losses["ner"])
    _close(out.loss, out.losses["sentiment"])
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    only = model(**batch, labels={"ner": labels["ner"]})
    assert torch.isfinite(only.losses["ner"]) and only.loss.item() == 0.0
    model.zero_grad()
    only.loss.backward()
    assert all(not p.grad.any() for p in model.parameters() if p.grad is not None)


# --- padding: only what a head or an output reads ------------------------------------------------------------------


@pytest.fixture
def pads(monkeypatch):
    """The shapes of every tensor padded from the packed layout ([B, L, ...]), in call order."""
    seen = []
    original = encoder_module.PackedBatch.pad

    def record(self, packed):
        out = original(self, packed)
        if not self.all_real:
            seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(encoder_module.PackedBatch, "pad", record)
    return seen


@pytest.mark.parametrize("tasks, padded", [
    ("sentiment", []),
    (("sentiment", "topics", "score", "nsp"), []),
    ("mlm", []),
    ("pretrain", []),
    ("ner", [(4, SEQLEN, 5)]),
    ("qa", [(4, SEQLEN, 2)]),
    (None, [(4, SEQLEN, 5), (4, SEQLEN, 2)]),
])
@torch.no_grad()
def test_heads_never_pad_the_hidden_states(bert, pads, tasks, padded):
    """Sequence-level and masked-LM heads read packed rows and pad nothing; token-level heads pad their logits
    [B, L, C], never the hidden states [B, L, H]."""
    _, model = bert
    batch = _batch()
    labels = _labels(batch)
    names = list(model.heads) if tasks is None else [tasks] if isinstance(tasks, str) else list(tasks)
    model(**batch, tasks=tasks, labels={t: labels[t] for t in names})
    assert pads == padded


@torch.no_grad()
def test_encoder_pads_its_outputs_on_first_read(bert, pads):
    _, model = bert
    batch = _batch()
    out = model.encoder(**batch, output_hidden_states=True)
    assert pads == []
    hidden = out.last_hidden_state
    assert pads == [(4, SEQLEN, 64)] and out.last_hidden_state is hidden
    states = out.hidden_states
    assert len(states) == 3 and out.hidden_states is states and len(pads) == 4
    assert torch.equal(hidden[batch["attention_mask"].bool()], out.packed_hidden_state)
    assert torch.equal(states[-1], hidden)


# --- each check runs once ------------------------------------------------------------------------------------------


@pytest.fixture
def check_calls(monkeypatch, bert):
    """name -> [None for a passed check, the message of a refusal], for the input check and each head's checks."""
    _, model = bert
    calls: dict[str, list[str | None]] = {}

    def spy(name, original):
        def run(*args, **kwargs):
            try:
                result = original(*args, **kwargs)
            except (ValueError, TypeError) as exc:
                calls.setdefault(name, []).append(str(exc))
                raise
            calls.setdefault(name, []).append(None)
            return result

        return run

    monkeypatch.setattr(encoder_module, "validate_inputs", spy("inputs", encoder_module.validate_inputs))
    checks = [(task, head, check) for task, head in model.heads.items()
              for check in ("check_labels", "check_positions")]
    for task, head, check in checks:
        setattr(head, check, spy(f"{task}.{check}", getattr(head, check)))
    yield calls
    for _, head, check in checks:
        delattr(head, check)  # the model is shared by the module's tests: unshadow its methods


def test_a_forward_checks_inputs_labels_and_positions_once(bert, check_calls):
    _, model = bert
    batch = _batch()
    labels = _labels(batch)
    where = batch["attention_mask"].bool()
    with torch.no_grad():
        model(**batch, labels=labels, positions={"mlm": where})
    expected = {"inputs": [None], "mlm.check_positions": [None]}
    expected.update({f"{task}.check_labels": [None] for task in BERT_TASKS})
    assert check_calls == expected


@pytest.mark.parametrize("bad, error, message, check", [
    (dict(input_ids=torch.zeros(4, SEQLEN)), TypeError, "input_ids must be int64 or int32, got torch.float32",
     "inputs"),
    (dict(input_ids=torch.zeros(4, SEQLEN, dtype=torch.long)[0]), ValueError,
     "input_ids must be \\[batch, seqlen\\], got torch.int64 \\(12,\\)", "inputs"),
    (dict(input_ids=torch.zeros(4, SEQLEN, dtype=torch.long, device="meta")), ValueError,
     "input_ids is on meta but the model is on cpu", "inputs"),
    (dict(attention_mask=torch.ones(4, SEQLEN - 1, dtype=torch.long)), ValueError,
     "attention_mask has shape \\(4, 11\\) but the input is \\(4, 12\\)", "inputs"),
    (dict(attention_mask=torch.full((4, SEQLEN), 0.5)), ValueError,
     "a float attention_mask must hold only 0.0 and 1.0 .* it holds 0.5", "inputs"),
    (dict(token_type_ids=torch.full((4, SEQLEN), 2)), ValueError, "token_type_ids must be in \\[0, 2\\)", "inputs"),
    (dict(tasks="sentiment", labels={"sentiment": torch.zeros(4)}), ValueError,
     "labels for task 'sentiment' must be integer class indices of shape \\(4,\\), got torch.float32",
     "sentiment.check_labels"),
    # unsigned: the ignore index -100 would wrap around to a class id (156 in uint8)
    (dict(tasks="sentiment", labels={"sentiment": torch.full((4,), 156, dtype=torch.uint8)}), ValueError,
     "labels for task 'sentiment' must be integer class indices of shape \\(4,\\), got torch.uint8",
     "sentiment.check_labels"),
    (dict(tasks="ner", labels={"ner": torch.full((4, SEQLEN), 5)}), ValueError,
     "labels for task 'ner' marks padding position \\(row 1, token 7\\)", "ner.check_labels"),
    (dict(tasks="ner", positions={"ner": torch.ones(4, SEQLEN, dtype=torch.bool)}), ValueError,
     "task 'ner' \\(token_classification\\) takes no positions; only masked-LM heads do", "ner.check_positions"),
    (dict(tasks="mlm", positions={"mlm": torch.ones(4, SEQLEN)}), ValueError,
     "positions for task 'mlm' must be a bool mask of shape \\(4, 12\\), got torch.float32", "mlm.check_positions"),
])
def test_each_bad_input_is_refused_once(bert, check_calls, bad, error, message, check):
    """The one check that owns a problem refuses it, once, with its message; nothing else runs it again."""
    _, model = bert
    kwargs = {**_batch(), **bad}
    with torch.no_grad(), pytest.raises(error, match=message):
        model(**kwargs)
    refusals = {name: [m for m in msgs if m is not None] for name, msgs in check_calls.items()}
    assert {name: len(msgs) for name, msgs in refusals.items() if msgs} == {check: 1}
    assert all(len(msgs) == 1 for msgs in check_calls.values()), check_calls


# --- the MLM head touches only the rows it predicts ---------------------------------------------------------------


def test_mlm_head_only_projects_masked_rows(monkeypatch):
    vocab = 50_000
    config = EncoderConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=SEQLEN)
    torch.manual_seed(0)
    model = MultiTaskBert(FastBertModel(config), {"mlm": MaskedLMHead(config)}).eval()
    assert model.heads["mlm"].decoder_weight is model.encoder.embeddings.word_embeddings.weight

    seen = {"transform": [], "loss": [], "logits": []}
    for name, key in (("bias_gelu_layer_norm", "transform"), ("mlm_gather_loss", "loss"), ("vocab_logits", "logits")):
        original = getattr(heads_module, name)

        def record(x, *args, _original=original, _key=key, **kwargs):
            seen[_key].append(tuple(x.shape))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(heads_module, name, record)

    batch = _batch()
    batch["input_ids"] = batch["input_ids"] * 400
    labels = torch.full((4, SEQLEN), -100)
    labels[0, 3], labels[1, 0], labels[3, 8] = 7, 49_999, 123
    with torch.no_grad():
        out = model(**batch, labels={"mlm": labels})
    assert seen == {"transform": [(3, 32)], "loss": [(3, 32)], "logits": [(3, 32)]}
    assert out.outputs["mlm"]["logits"].shape == (3, vocab)

    where = torch.zeros(4, SEQLEN, dtype=torch.bool)
    where[2, 1] = where[3, 0] = True
    seen.update(transform=[], loss=[], logits=[])
    with torch.no_grad():
        out = model(**batch, positions={"mlm": where})
    assert seen == {"transform": [(2, 32)], "loss": [], "logits": [(2, 32)]}
    assert out.outputs["mlm"]["logits"].shape == (2, vocab) and out.losses == {}
    assert torch.equal(out.outputs["mlm"]["positions"], torch.tensor([[2, 1], [3, 0]]))


# --- sentence embeddings -------------------------------------------------------------------------------------------


@torch.no_grad()
def test_sentence_embedding_head():
    config = EncoderConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=SEQLEN)
    torch.manual_seed(0)
    encoder = FastBertModel(config, add_pooling_layer=False).eval()
    model = MultiTaskBert(encoder, {"cls": SentenceEmbeddingHead("cls"),
                                    "mean": SentenceEmbeddingHead("mean", normalize=True)})
    batch = _batch()
    out = model(**batch, tasks=["cls", "mean", ["cls", "mean"], "mean"])
    hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].float()
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    _close(out.outputs["cls"]["embeddings"], hidden[[0, 2], 0], atol=1e-6)
    _close(out.outputs["mean"]["embeddings"], F.normalize(mean[[1, 2, 3]], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="task 'cls' \\(sentence_embedding\\) takes no labels"):
        model(**batch, tasks="cls", labels={"cls": torch.zeros(4)})


# --- save / load ---------------------------------------------------------------------------------------------------


def test_save_load_round_trip(bert, tmp_path, monkeypatch):
    _, model = bert
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "encoder.embeddings.word_embeddings.weight" in keys
    assert not any("decoder_weight" in k for k in keys)  # tied weights are saved once
    saved = json.loads((tmp_path / "multitask_config.json").read_text())
    assert saved["tasks"]["sentiment"]["kind"] == "sequence_classification"
    assert saved["tasks"]["sentiment"]["config"]["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert saved["encoder"] == model.encoder.config.to_dict()

    def no_unpickling(*args, **kwargs):
        raise AssertionError("from_pretrained must not unpickle")

    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = MultiTaskBert.from_pretrained(tmp_path)
    assert not loaded.training and loaded.loss_weights == model.loss_weights
    assert loaded.heads["mlm"].decoder_weight is loaded.encoder.embeddings.word_embeddings.weight
    assert loaded.heads["pretrain"].mlm.decoder_weight is loaded.encoder.embeddings.word_embeddings.weight
    assert loaded.heads["sentiment"].id2label == model.heads["sentiment"].id2label
    batch = _batch()
    labels = _labels(batch)
    with torch.no_grad():
        a, b = model(**batch, labels=labels), loaded(**batch, labels=labels)
    for task in a.outputs:
        for name in a.outputs[task]:
            assert torch.equal(a.outputs[task][name], b.outputs[task][name]), (task, name)
        assert torch.equal(a.losses[task], b.losses[task])


def test_a_quantized_model_saves_its_float_weights_and_says_so(bert, tmp_path):
    """save_pretrained of an int8 model writes the float weights it was quantized from, with a warning that names how
    to load it as int8 again; loaded so, it runs int8."""
    models, _ = bert
    model = MultiTaskBert.from_hf_heads({"sentiment": models["sentiment"]}).quantize()
    with pytest.warns(UserWarning, match=r"its checkpoint holds the float weights it was quantized from: load it with "
                                         r"MultiTaskBert.from_pretrained\(path, dtype=torch.qint8"):
        model.save_pretrained(tmp_path)
    assert MultiTaskBert.from_pretrained(tmp_path).encoder.int8 is None
    loaded = MultiTaskBert.from_pretrained(tmp_path, dtype=torch.qint8)
    assert loaded.encoder.int8 is not None
    batch = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).outputs["sentiment"]["logits"], model(**batch).outputs["sentiment"]["logits"])


def test_from_pretrained_names_a_missing_head_weight(bert, tmp_path):
    from safetensors.torch import load_file, save_file

    _, model = bert
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    state = load_file(path)
    del state["heads.ner.classifier.weight"]
    save_file(state, path)
    with pytest.raises(MissingWeightError, match="lacks weight 'heads.ner.classifier.weight' \\(of task 'ner'\\)"):
        MultiTaskBert.from_pretrained(tmp_path)


def test_from_pretrained_of_mixed_dtypes_asks_for_one(bert, tmp_path):
    """A checkpoint whose weights mix dtypes is refused at load time, naming them (it used to load and fail at the
    first forward in a product of two dtypes); dtype= chooses one, as for FastBertModel."""
    from safetensors.torch import load_file, save_file

    _, model = bert
    model.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    state = load_file(path)
    state["heads.ner.classifier.weight"] = state["heads.ner.classifier.weight"].bfloat16()
    save_file(state, path)
    with pytest.raises(ValueError, match=r"several dtypes \(bfloat16, float32\): pass dtype="):
        MultiTaskBert.from_pretrained(tmp_path)
    loaded = MultiTaskBert.from_pretrained(tmp_path, dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


# --- export to transformers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["sentiment", "topics", "ner", "mlm", "nsp", "qa", "pretrain"])
@torch.no_grad()
def test_export_hf_loads_in_transformers_with_the_same_outputs(bert, tmp_path, task):
    models, model = bert
    model.export_hf(task, tmp_path)
    hf = type(models[task]).from_pretrained(tmp_path).eval()
    batch = _batch()
    mask = batch["attention_mask"]
    ref = models[task](**batch)
    got = hf(**batch)
    for name in ("logits", "start_logits", "end_logits", "prediction_logits", "seq_relationship_logits"):
        if getattr(ref, name, None) is not None:
            _close(_real(getattr(got, name), mask), _real(getattr(ref, name), mask), atol=1e-5)
    if task == "mlm":
        assert hf.cls.predictions.decoder.weight is hf.bert.embeddings.word_embeddings.weight
    if task == "topics":
        assert hf.config.problem_type == "multi_label_classification"


@torch.no_grad()
def test_export_roberta_and_embeddings(roberta, tmp_path):
    models, model = roberta
    batch = _batch("roberta")
    model.export_hf("sentiment", tmp_path / "sentiment")
    hf = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "sentiment").eval()
    _close(hf(**batch).logits, models["sentiment"](**batch).logits, atol=1e-5)

    emb = MultiTaskBert(model.encoder, {"emb": SentenceEmbeddingHead()})
    emb.export_hf("emb", tmp_path / "emb")
    hf = transformers.RobertaModel.from_pretrained(tmp_path / "emb").eval()
    _close(hf(**batch).last_hidden_state[:, 0], emb(**batch).outputs["emb"]["embeddings"])


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_input_errors_before_any_compute(bert):
    _, model = bert
    batch = _batch()
    labels = _labels(batch)
    calls = []
    handle = model.encoder.register_forward_hook(lambda *args: calls.append(1))
    cases = [
        (dict(tasks="sentimen"), "unknown task 'sentimen'; known tasks: sentiment, topics, score, ner, mlm"),
        (dict(tasks=["sentiment", "ner", "nope", None]), "unknown task 'nope'"),
        (dict(tasks="ner", labels={"sentiment": labels["sentiment"]}),
         "labels given for task 'sentiment', which does not run on this batch \\(running: ner\\)"),
        (dict(labels={"sentimentt": labels["sentiment"]}), "unknown task 'sentimentt' in labels"),
        (dict(tasks="sentiment", labels={"sentiment": torch.tensor([0, 1, 3, 2])}),
         "labels for task 'sentiment' holds 3, out of range: num_labels is 3"),
        (dict(tasks="sentiment", labels={"sentiment": torch.zeros(4, 3, dtype=torch.long)}),
         "labels for task 'sentiment' must be integer class indices of shape \\(4,\\), got torch.int64 of shape"),
        (dict(tasks="sentiment", labels={"sentiment": torch.zeros(4)}),
         "must be integer class indices of shape \\(4,\\), got torch.float32"),
        (dict(tasks="topics", labels={"topics": torch.zeros(4, 3)}), "must be 0/1 targets of shape \\(4, 4\\)"),
        (dict(tasks="topics", labels={"topics": torch.full((4, 4), 2.0)}),
         "labels for task 'topics' must be targets in \\[0, 1\\] \\(multi_label\\); row 0, label 0 holds 2.0"),
        (dict(tasks="topics", labels={"topics": torch.zeros(4, 4).index_fill_(0, torch.tensor([2]), float("nan"))}),
         "row 2, label 0 holds nan"),
        (dict(tasks="mlm", labels={"mlm": labels["mlm"].masked_fill(labels["mlm"] == labels["mlm"].max(), 99)}),
         "labels for task 'mlm' holds 99, out of range: vocab_size is 99"),
        (dict(tasks="mlm", labels={"mlm": labels["mlm"][:, :5]}), "must be integer token ids of shape \\(4, 12\\)"),
        (dict(tasks="mlm", labels={"mlm": torch.full((4, SEQLEN), 5)}),
         "labels for task 'mlm' marks padding position \\(row 1, token 7\\)"),
        (dict(tasks="ner", labels={"ner": labels["ner"].masked_fill(labels["ner"] == 4, 5)}),
         "labels for task 'ner' holds 5, out of range: num_labels is 5"),
        (dict(tasks="qa", labels={"qa": (torch.tensor([0, 1, 2, 12]), torch.tensor([0, 1, 2, 3]))}),
         "start_positions for task 'qa' holds 12, out of range: the sequence length is 12"),
        (dict(tasks="qa", labels={"qa": (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 9, 2, 3]))}),
         "end_positions for task 'qa' points at padding: row 1, token 9"),
        (dict(tasks="qa", labels={"qa": torch.tensor([0, 1, 2, 3])}),
         "labels for task 'qa' must be \\(start_positions, end_positions\\)"),
        (dict(tasks="nsp", labels={"nsp": torch.tensor([0, 1, 2, 0])}), "labels for task 'nsp' holds 2, out of range"),
        (dict(tasks="pretrain", labels={"pretrain": labels["mlm"]}),
         "labels for task 'pretrain' must be \\(mlm_labels, next_sentence_labels\\)"),
        (dict(tasks=["sentiment", "ner", "sentiment", "ner"], labels={"sentiment": labels["sentiment"]}),
         "labels for task 'sentiment' must be integer class indices of shape \\(2,\\), got torch.int64 of shape "
         "\\(4,\\)"),
        (dict(tasks="ner", positions={"ner": torch.ones(4, SEQLEN, dtype=torch.bool)}),
         "task 'ner' .* takes no positions"),
        (dict(tasks="mlm", positions={"mlm": torch.ones(4, SEQLEN, dtype=torch.bool)}),
         "positions for task 'mlm' marks padding position \\(row 1, token 7\\)"),
    ]
    try:
        for kwargs, match in cases:
            with pytest.raises(ValueError, match=match):
                model(**batch, **kwargs)
    finally:
        handle.remove()
    assert calls == []
    with pytest.raises(TypeError, match="labels must be a dict task -> labels"):
        model(**batch, labels=labels["sentiment"])


@pytest.mark.parametrize("prefix", ["XLMRoberta", "Camembert"])
def test_roberta_under_other_names_gives_its_heads(prefix):
    """XLM-R's and CamemBERT's task models are RoBERTa's under other class names: their heads map as RoBERTa's."""
    config = getattr(transformers, f"{prefix}Config")(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=64,
                                                      max_position_embeddings=SEQLEN + 2, pad_token_id=1)
    torch.manual_seed(0)
    models = {s: getattr(transformers, prefix + s)(config).eval()
              for s in ("ForSequenceClassification", "ForTokenClassification", "ForMaskedLM", "ForQuestionAnswering")}
    encoder = models["ForSequenceClassification"].roberta.state_dict()
    for m in models.values():
        m.base_model.load_state_dict(encoder)
    model = MultiTaskBert.from_hf_heads(models).eval()
    ids = torch.randint(3, 99, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = 5, 9
    with torch.no_grad():
        out = model(ids, mask, labels={"ForMaskedLM": labels})
        for task, m in models.items():
            if task == "ForMaskedLM":
                _close(out.losses[task], m(ids, attention_mask=mask, labels=labels).loss)
            else:
                field = "start_logits" if task == "ForQuestionAnswering" else "logits"
                _close(out.outputs[task][field], getattr(m(ids, attention_mask=mask), field))


def test_from_hf_heads_refuses_different_encoders(bert):
    models, _ = bert
    ner = _task_models("bert", {"ner": BERT_TASKS["ner"]})["ner"]
    with torch.no_grad():
        ner.bert.encoder.layer[1].attention.self.query.weight[0, 0] += 1e-3
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.query.weight differs between 'sentiment' "
                                         "and 'ner'"):
        MultiTaskBert.from_hf_heads({"sentiment": models["sentiment"], "ner": ner})
    other = transformers.BertForTokenClassification(_config(layer_norm_eps=1e-5))
    with pytest.raises(ValueError, match="encoder configs differ between 'sentiment' and 'ner': layer_norm_eps"):
        MultiTaskBert.from_hf_heads({"sentiment": models["sentiment"], "ner": other})
    with pytest.raises(ValueError, match="unsupported|not a supported task model"):
        MultiTaskBert.from_hf_heads({"x": transformers.BertForMultipleChoice(_config())})


@pytest.mark.parametrize("cls", [transformers.BertForMaskedLM, transformers.BertForPreTraining])
def test_an_untied_decoder_equal_to_the_word_table_stays_untied(cls, tmp_path):
    """Tying follows HF's model (the decoder is the word table itself), never equal values: an untied decoder that
    starts as a copy of the table trains apart from it, and exports untied."""
    torch.manual_seed(0)
    untied = cls(_config(tie_word_embeddings=False))
    decoder = untied.get_output_embeddings()
    with torch.no_grad():
        decoder.weight.copy_(untied.get_input_embeddings().weight)
    tied = cls(_config())
    assert decoder.weight is not untied.get_input_embeddings().weight
    for hf, want in ((untied, False), (tied, True)):
        model = MultiTaskBert.from_hf_heads({"lm": hf})
        head = model.heads["lm"]
        assert (head.mlm if cls is transformers.BertForPreTraining else head).tied is want
        model.export_hf("lm", tmp_path / str(want))
        exported = cls.from_pretrained(tmp_path / str(want))
        assert (exported.get_output_embeddings().weight is exported.get_input_embeddings().weight) is want


def test_head_and_weight_values_are_checked_when_built():
    config = EncoderConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=SEQLEN)
    encoder = FastBertModel(config, add_pooling_layer=False)
    head = SequenceClassificationHead(64, 2, pooled=False)
    for weight in (-1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match=f"loss_weights\\['s'\\] must be a finite number >= 0, got"):
            MultiTaskBert(encoder, {"s": head}, {"s": weight})
    for name in ("keys", "training", "forward", "update"):  # the heads live in an nn.ModuleDict
        with pytest.raises(ValueError, match=f"task name '{name}' is the name of an nn.ModuleDict attribute"):
            MultiTaskBert(encoder, {name: head})
    with pytest.raises(ValueError, match="single_label head with num_labels=1 has a cross-entropy of 0"):
        SequenceClassificationHead(64, 1)
    assert SequenceClassificationHead(64, 1, problem_type="regression").num_labels == 1
    for make in (lambda: SequenceClassificationHead(64, 0, problem_type="regression"),
                 lambda: TokenClassificationHead(64, 0)):
        with pytest.raises(ValueError, match="num_labels must be a positive integer, got 0"):
            make()
    for make, name in ((lambda p: SequenceClassificationHead(64, 2, dropout=p), "dropout"),
                       (lambda p: TokenClassificationHead(64, 2, dropout=p), "dropout"),
                       (lambda p: SpanExtractionHead(64, dropout=p), "dropout"),
                       (lambda p: SequenceClassificationHead(64, 2, roberta_style=True, dense_dropout=p),
                        "dense_dropout")):
        for p in (-0.1, 1.5, float("nan")):
            with pytest.raises(ValueError, match=f"{name} must be a probability in \\[0, 1\\], got"):
                make(p)
    with pytest.raises(ValueError, match="dense_dropout is the dropout before a dense head's dense"):
        SequenceClassificationHead(64, 2, dense_dropout=0.1)


@pytest.mark.parametrize("edit, message", [
    (lambda saved: saved["tasks"]["ner"]["config"].pop("num_labels"),
     "the config of task 'ner' does not fit a token_classification head: .*missing 1 required positional argument: "
     "'num_labels'"),
    (lambda saved: saved["tasks"]["ner"]["config"].update(labels=3),
     "the config of task 'ner' does not fit a token_classification head: .*unexpected keyword argument 'labels'"),
    (lambda saved: saved["tasks"]["ner"]["config"].update(num_labels=0),
     "the config of task 'ner' does not fit a token_classification head: num_labels must be a positive integer"),
    (lambda saved: saved["tasks"]["ner"].pop("kind"), "task 'ner' lacks 'kind'"),
    (lambda saved: saved["tasks"]["ner"].pop("config"), "task 'ner' lacks 'config'"),
    (lambda saved: saved.pop("loss_weights"), "the file lacks 'loss_weights'"),
    (lambda saved: saved.pop("encoder_pooler"), "the file lacks 'encoder_pooler'"),
], ids=["missing field", "unknown field", "bad value", "no kind", "no config", "no loss_weights", "no pooler flag"])
def test_from_pretrained_names_what_a_config_lacks(bert, tmp_path, edit, message):
    _, model = bert
    model.save_pretrained(tmp_path)
    path = tmp_path / "multitask_config.json"
    saved = json.loads(path.read_text())
    edit(saved)
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"multitask_config.json: {message}"):
        MultiTaskBert.from_pretrained(tmp_path)


def test_head_construction_errors():
    config = EncoderConfig(vocab_size=99, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=SEQLEN)
    encoder = FastBertModel(config, add_pooling_layer=False)
    with pytest.raises(ValueError, match="reads the pooler output, but the encoder has no pooler"):
        MultiTaskBert(encoder, {"s": SequenceClassificationHead(64, 2)})
    with pytest.raises(ValueError, match="expects hidden size 32, the encoder has 64"):
        MultiTaskBert(encoder, {"s": SequenceClassificationHead(32, 2, pooled=False)})
    with pytest.raises(ValueError, match="loss_weights name unknown tasks \\['t'\\]"):
        MultiTaskBert(encoder, {"s": SequenceClassificationHead(64, 2, pooled=False)}, {"t": 2.0})
    with pytest.raises(ValueError, match="problem_type must be one of"):
        SequenceClassificationHead(64, 2, problem_type="ranking")
