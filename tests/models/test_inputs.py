"""Bad input gets a clear error that names the problem, never a wrong answer: for FastBertModel and for a swapped HF
task model alike. Loading refuses to unpickle and names a weight the checkpoint lacks.
"""

from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, BertModel, RobertaForSequenceClassification

from mtbert_fast import FastBertModel, swap
from mtbert_fast.models import MissingWeightError

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
MAX_POSITIONS = 64
BATCH, SEQLEN = 2, 16


@pytest.fixture(params=["fast", "swapped"])
def target(request, bert_config, make_hf):
    """(model, config): FastBertModel, or a swapped BertForSequenceClassification; vocab 1000, 64 positions."""
    config = bert_config(max_position_embeddings=MAX_POSITIONS)
    hf = make_hf(BertForSequenceClassification, config)
    model = FastBertModel.from_hf(hf) if request.param == "fast" else swap(hf)
    return model, config


@pytest.fixture
def good(bert_config, ragged_batch):
    """Valid inputs for `target`: input_ids and attention_mask [2, 16], rows of 16 and 7 tokens."""
    ids, mask = ragged_batch(bert_config(), [SEQLEN, 7], seed=5)
    return ids, mask


def _set(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _meta(t):
    return t.to("meta")


# name -> (inputs from the good ids and mask, exception, message pattern)
BAD_INPUTS = {
    "negative_id": (lambda ids, mask: dict(input_ids=_set(ids, (1, 3), -1), attention_mask=mask),
                    ValueError, r"token id -1, outside the vocabulary \[0, 1000\)"),
    "id_equal_to_vocab_size": (lambda ids, mask: dict(input_ids=_set(ids, (0, 2), 1000), attention_mask=mask),
                               ValueError, r"token id 1000, outside the vocabulary \[0, 1000\)"),
    "id_far_above_vocab": (lambda ids, mask: dict(input_ids=_set(ids, (0, 15), 10**6), attention_mask=mask),
                           ValueError, r"token id 1000000, outside the vocabulary"),
    "id_in_padding_outside_vocab": (lambda ids, mask: dict(input_ids=_set(ids, (1, 12), 5000), attention_mask=mask),
                                    ValueError, r"token id 5000, outside the vocabulary"),
    "mask_shorter_than_ids": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask[:, :-1]),
                              ValueError, r"attention_mask has shape \(2, 15\) but the input is \(2, 16\)"),
    "mask_fewer_rows": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask[:1]),
                        ValueError, r"attention_mask has shape \(1, 16\) but the input is \(2, 16\)"),
    "longer_than_max_positions": (
        lambda ids, mask: dict(input_ids=torch.randint(3, 1000, (2, MAX_POSITIONS + 1)),
                               attention_mask=torch.ones(2, MAX_POSITIONS + 1, dtype=torch.int64)),
        ValueError, r"a sequence of 65 tokens is longer than the model's max_position_embeddings"),
    "row_without_real_token": (lambda ids, mask: dict(input_ids=ids, attention_mask=_set(mask, 1, 0)),
                               ValueError, r"row 1 of attention_mask has no real token"),
    "additive_float_mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=(1.0 - mask.float()) * -1e4),
                            ValueError, r"float attention_mask must hold only 0.0 and 1.0 .*holds -10000.0: an "
                                        r"additive mask"),
    "additive_inf_mask": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=torch.zeros(mask.shape).masked_fill(mask == 0, -torch.inf)),
        ValueError, r"float attention_mask must hold only 0.0 and 1.0 .*holds -inf"),
    "fractional_float_mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=_set(mask.float(), (0, 3), 0.5)),
                              ValueError, r"float attention_mask must hold only 0.0 and 1.0 .*holds 0.5"),
    "nan_in_float_mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=_set(mask.float(), (1, 2), torch.nan)),
                          ValueError, r"float attention_mask must hold only 0.0 and 1.0 .*holds nan"),
    "complex_mask": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask.to(torch.complex64)),
                     TypeError, r"attention_mask must hold integers, bools or floats.*complex64"),
    "mask_with_a_2": (lambda ids, mask: dict(input_ids=ids, attention_mask=_set(mask, (0, 4), 2)),
                      ValueError, r"attention_mask must hold only 0 and 1, it holds 2"),
    "mask_with_a_minus_1": (lambda ids, mask: dict(input_ids=ids, attention_mask=_set(mask, (1, 10), -1)),
                            ValueError, r"attention_mask must hold only 0 and 1, it holds -1"),
    "mask_on_another_device": (lambda ids, mask: dict(input_ids=ids, attention_mask=_meta(mask)),
                               ValueError, r"attention_mask is on meta but the model is on cpu"),
    "ids_on_another_device": (lambda ids, mask: dict(input_ids=_meta(ids), attention_mask=mask),
                              ValueError, r"input_ids is on meta but the model is on cpu"),
    "token_types_on_another_device": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, token_type_ids=_meta(torch.zeros_like(ids))),
        ValueError, r"token_type_ids is on meta but the model is on cpu"),
    "positions_on_another_device": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, position_ids=_meta(torch.arange(SEQLEN)[None])),
        ValueError, r"position_ids is on meta but the model is on cpu"),
    "token_type_out_of_range": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.full_like(ids, 2)),
        ValueError, r"token_type_ids must be in \[0, 2\), got values in \[2, 2\]"),
    "token_types_wrong_shape": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros(2, 3, dtype=torch.long)),
        ValueError, r"token_type_ids has shape \(2, 3\) but the input is \(2, 16\)"),
    "position_ids_wrong_shape": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, position_ids=torch.arange(SEQLEN - 1)[None]),
        ValueError, r"position_ids has shape \(1, 15\), expected \(2, 16\) or \(1, 16\)"),
    "position_id_past_the_table": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, position_ids=torch.arange(SEQLEN)[None] + 60),
        ValueError, r"position_ids hold values in \[60, 75\], outside \[0, 64\)"),
    "negative_position_id": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, position_ids=torch.arange(SEQLEN)[None] - 1),
        ValueError, r"position_ids hold values in \[-1, 14\], outside \[0, 64\)"),
    "ids_and_embeds": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, inputs_embeds=torch.zeros(2, SEQLEN, 64)),
        ValueError, r"exactly one of input_ids and inputs_embeds"),
    "embeds_wrong_width": (lambda ids, mask: dict(inputs_embeds=torch.zeros(2, SEQLEN, 32), attention_mask=mask),
                           ValueError, r"inputs_embeds must be \[batch, seqlen, 64\], got .*\(2, 16, 32\)"),
    "embeds_wrong_dtype": (
        lambda ids, mask: dict(inputs_embeds=torch.zeros(2, SEQLEN, 64, dtype=torch.float64), attention_mask=mask),
        TypeError, r"inputs_embeds has dtype torch.float64 but the model runs in torch.float32"),
    "ids_one_dimensional": (lambda ids, mask: dict(input_ids=ids[0]),
                            ValueError, r"input_ids must be \[batch, seqlen\], got torch.int64 \(16,\)"),
    "float_ids": (lambda ids, mask: dict(input_ids=ids.float(), attention_mask=mask),
                  TypeError, r"input_ids must be int64 or int32"),
    "float_token_types": (lambda ids, mask: dict(input_ids=ids, attention_mask=mask, token_type_ids=mask * 0.9),
                          TypeError, r"token_type_ids must be int64 or int32, got torch.float32"),
    "bool_position_ids": (
        lambda ids, mask: dict(input_ids=ids, attention_mask=mask, position_ids=torch.ones_like(ids, dtype=torch.bool)),
        TypeError, r"position_ids must be int64 or int32, got torch.bool"),
    # transformers reads restarting position ids without a mask as sequences packed in a row (its flattening format)
    "packed_position_ids_without_mask": (
        lambda ids, mask: dict(input_ids=ids, position_ids=torch.cat([torch.arange(9), torch.arange(7)])[None]),
        ValueError, r"position_ids do not count up by one in row 0 \(token 9\) and no attention_mask is given"),
    "empty_batch": (lambda ids, mask: dict(input_ids=ids[:0], attention_mask=mask[:0]),
                    ValueError, r"empty batch: input shape \(0, 16\)"),
}


def test_good_inputs_run(target, good):
    """The inputs every bad case starts from are valid; each case changes one thing."""
    model, _ = target
    ids, mask = good
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    result = out.logits if hasattr(out, "logits") else out.pooler_output
    assert result.shape[0] == BATCH and torch.isfinite(result).all()


@pytest.mark.parametrize("mask_check", ["one_pass", "by_ops"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused(case, mask_check, target, good, monkeypatch):
    """Every case refused with its message, the mask read by pack_mask's one pass (CPU) and by tensor ops (every
    other device and backend)."""
    from mtbert_fast.models import encoder

    if mask_check == "by_ops":
        monkeypatch.setattr(encoder, "_packed_mask", lambda *a: None)
    model, _ = target
    make, error, match = BAD_INPUTS[case]
    kwargs = make(*good)
    with torch.no_grad(), pytest.raises(error, match=match):
        model(**kwargs)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_check_inputs_refuses_what_forward_refuses(case, bert_config, make_hf, good):
    """FastBertModel.check_inputs (which MultiTaskBert runs once before any compute) refuses every bad input with the
    error forward gives, long sequences and position ids past the table included."""
    config = bert_config(max_position_embeddings=MAX_POSITIONS)
    model = FastBertModel.from_hf(make_hf(BertModel, config))
    make, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        model.check_inputs(**make(*good))
    too_long = torch.ones(1, MAX_POSITIONS + 1, dtype=torch.long)
    for kwargs in (dict(input_ids=too_long), dict(inputs_embeds=torch.zeros(1, MAX_POSITIONS + 1, 64))):
        with pytest.raises(ValueError, match=rf"a sequence of {MAX_POSITIONS + 1} tokens is longer"):
            model.check_inputs(**kwargs)
    padded = torch.ones(2, MAX_POSITIONS + 4, dtype=torch.long)
    padded[1, MAX_POSITIONS:] = 0
    assert model.check_inputs(too_long[:, :1].expand(2, MAX_POSITIONS + 4), padded[[1, 1]]) == (2, MAX_POSITIONS + 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_float_mask_of_zeros_and_ones_equals_the_integer_mask(dtype, target, good):
    """HF takes a float 0.0/1.0 mask as it takes an integer one; so does the fast path (the int8 path's calibration
    and the heads read the same validated mask)."""
    model, _ = target
    ids, mask = good
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        out = model(input_ids=ids, attention_mask=mask.to(dtype))
    for name in ("logits", "pooler_output", "last_hidden_state"):
        if hasattr(ref, name):
            assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_float_mask_in_multitask_model(bert_config, make_hf, ragged_batch):
    """MultiTaskBert takes the float mask too, for the encoder and for the heads' checks of labels at padding."""
    from transformers import BertForTokenClassification

    from mtbert_fast import MultiTaskBert

    config = bert_config()
    seq, tok = make_hf(BertForSequenceClassification, config), make_hf(BertForTokenClassification, config)
    tok.bert.load_state_dict(seq.bert.state_dict(), strict=False)  # one shared encoder (tok has no pooler)
    model = MultiTaskBert.from_hf_heads({"seq": seq, "tok": tok})
    ids, mask = ragged_batch(config, [SEQLEN, 7], seed=5)
    labels = {"tok": torch.zeros_like(ids).masked_fill(mask == 0, -100)}
    with torch.no_grad():
        ref = model(ids, mask, labels=labels)
        out = model(ids, mask.float(), labels=labels)
        for task in ("seq", "tok"):
            assert torch.equal(out.outputs[task]["logits"], ref.outputs[task]["logits"]), task
        assert torch.equal(out.loss, ref.loss)
        with pytest.raises(ValueError, match=r"float attention_mask must hold only 0.0 and 1.0 .*additive"):
            model(ids, (1.0 - mask.float()) * torch.finfo(torch.float32).min)


@pytest.mark.parametrize("kind", ["fast", "swapped"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_longest_sequence_runs_and_one_more_is_refused(family, kind, bert_config, roberta_config, make_hf,
                                                       ragged_batch, assert_tokens_close):
    """Exactly as many tokens as the position table allows matches HF; one more raises (no off-by-one). RoBERTa
    numbers positions from pad_token_id + 1, so 66 positions hold 64 tokens."""
    if family == "bert":
        cls, config, longest = BertModel, bert_config(max_position_embeddings=64), 64
    else:
        cls, config, longest = RobertaForSequenceClassification, roberta_config(max_position_embeddings=66), 64
    hf = make_hf(cls, config)
    ids, mask = ragged_batch(config, [longest, 5])
    with torch.no_grad():
        ref = hf.base_model(ids, attention_mask=mask)
        model = FastBertModel.from_hf(hf) if kind == "fast" else swap(hf).base_model
        out = model(ids, attention_mask=mask)
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, mask)
        ids, mask = ragged_batch(config, [longest + 1, 5])
        with pytest.raises(ValueError, match=rf"a sequence of {longest + 1} tokens is longer than the model's "
                                             r"max_position_embeddings"):
            model(ids, attention_mask=mask)


def test_inputs_embeds_longer_than_max_positions(bert_config, make_hf):
    config = bert_config(max_position_embeddings=MAX_POSITIONS)
    model = FastBertModel.from_hf(make_hf(BertModel, config))
    with torch.no_grad(), pytest.raises(ValueError, match=r"a sequence of 65 tokens is longer"):
        model(inputs_embeds=torch.zeros(1, MAX_POSITIONS + 1, 64))


# --- loading checkpoints -------------------------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates the directory `path`: proof that a loader ran pickle on the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_from_pretrained_refuses_to_unpickle(bert_config, make_hf, tmp_path, monkeypatch):
    model = make_hf(BertModel, bert_config())
    model.config.save_pretrained(tmp_path)
    sprung = tmp_path / "sprung"
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(sprung))))
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_Trap(str(proof))))
    assert proof.is_dir()  # the trap works when something unpickles it

    def no_unpickling(*args, **kwargs):
        raise AssertionError("from_pretrained unpickled a file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(FileNotFoundError,
                       match=r"no model.safetensors .*found pytorch_model.bin, which is not read: it would need "
                             r"unpickling"):
        FastBertModel.from_pretrained(tmp_path)
    assert not sprung.exists()


def test_from_pretrained_without_weights(bert_config, make_hf, tmp_path):
    make_hf(BertModel, bert_config()).config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors or model.safetensors.index.json in"):
        FastBertModel.from_pretrained(tmp_path)


def test_from_pretrained_warns_of_layers_the_config_leaves_out(bert_config, make_hf, tmp_path, recwarn):
    """A checkpoint deeper than its config.json (HF loads it too, with a warning): the layers past the config's are
    named, never dropped unsaid."""
    import json

    make_hf(BertModel, bert_config(num_hidden_layers=3)).save_pretrained(tmp_path)
    FastBertModel.from_pretrained(tmp_path)
    assert not [w for w in recwarn if "encoder layers" in str(w.message)]
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))
    with pytest.warns(UserWarning, match=r"the checkpoint holds encoder layers 1..2 \(weights such as "
                                         r"'encoder.layer.1.attention.self.query.weight'\), which the config's "
                                         r"num_hidden_layers=1 leaves out: they are not loaded") as got:
        model = FastBertModel.from_pretrained(tmp_path)
    assert len(model.layers) == 1 and {w.filename for w in got} == {__file__}


MISSING = [
    "encoder.layer.1.attention.self.key.weight",
    "encoder.layer.0.attention.self.query.bias",
    "encoder.layer.1.attention.output.dense.weight",
    "encoder.layer.0.attention.output.LayerNorm.bias",
    "encoder.layer.1.intermediate.dense.bias",
    "encoder.layer.1.output.dense.weight",
    "encoder.layer.0.output.LayerNorm.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "pooler.dense.weight",
]


@pytest.mark.parametrize("prefix", ["", "bert."])
@pytest.mark.parametrize("missing", MISSING)
def test_missing_weight_is_named(missing, prefix, bert_config, make_hf, tmp_path):
    cls = BertModel if prefix == "" else BertForSequenceClassification
    make_hf(cls, bert_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    assert prefix + missing in state
    del state[prefix + missing]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(MissingWeightError, match=rf"missing weight '{re.escape(missing)}' in the checkpoint"):
        FastBertModel.from_pretrained(tmp_path)


def test_checkpoint_without_embeddings_is_named(bert_config, make_hf, tmp_path):
    make_hf(BertModel, bert_config()).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["embeddings.word_embeddings.weight"]
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(MissingWeightError, match=r"no embeddings.word_embeddings.weight in the checkpoint"):
        FastBertModel.from_pretrained(tmp_path)


def test_positions_that_count_up_run_without_a_mask(target, good, bert_config, make_hf):
    """position_ids without a mask that count up by one from any start are one sequence per row, in HF as here."""
    model, config = target
    ids, _ = good
    ref = make_hf(BertForSequenceClassification, config)
    positions = torch.arange(SEQLEN)[None] + 3
    with torch.no_grad():
        out, expected = model(input_ids=ids, position_ids=positions), ref(input_ids=ids, position_ids=positions)
    if hasattr(out, "logits"):
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float8_e4m3fn, torch.int8, torch.complex64])
def test_unsupported_dtype_argument_is_refused_before_any_change(dtype, bert_config, make_hf):
    hf = make_hf(BertModel, bert_config())
    message = r"dtype .* is not supported: pass torch.float32, torch.bfloat16 or torch.float16"
    with pytest.raises(TypeError, match=message):
        FastBertModel.from_hf(hf, dtype=dtype)
    with pytest.raises(TypeError, match=message):
        swap(hf, dtype=dtype)
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    assert not hasattr(hf, "_mtbert_fast_swap")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_padding_rows_of_the_embeddings_get_no_gradient(family, bert_config, roberta_config, make_hf):
    """HF builds the word embeddings (and RoBERTa's positions) with padding_idx: where the padding id sits at a real
    token (a padded batch given without its mask), its row gets no gradient. Trained through swap, the same."""
    from transformers import RobertaModel

    config = (bert_config if family == "bert" else roberta_config)(hidden_dropout_prob=0.0,
                                                                   attention_probs_dropout_prob=0.0)
    cls = BertModel if family == "bert" else RobertaModel
    ref, ours = make_hf(cls, config).train(), swap(make_hf(cls, config).train())
    ids = torch.randint(3, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 7:] = config.pad_token_id
    for model in (ref, ours):
        model(input_ids=ids).last_hidden_state.square().sum().backward()
    for name in ("word_embeddings", "position_embeddings"):
        g_ref = getattr(ref.embeddings, name).weight.grad
        g_ours = getattr(ours.embeddings, name).weight.grad
        torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-4)
    pad = config.pad_token_id
    assert ours.embeddings.word_embeddings.weight.grad[pad].abs().max() == 0
    assert ref.embeddings.word_embeddings.weight.grad[pad].abs().max() == 0
