"""mtbert_fast.swap / unswap on MPNet models and their task models, and MPNet in FastBertModel.

MPNet adds one relative position bias table [buckets, heads], shared by every layer, to the attention scores; the
fast path hands it to attention_varlen as a table over every distance of the batch. Parity (fp32, within 1e-4 at
the real tokens) against the same HF model before the swap, on random weights of odd sizes (hidden 48, 3 heads,
vocab 997) with the bias table drawn large (std 1, so that a wrong bucket or a missing bias shows far above the
tolerance): ragged batches, lengths 1 and 512 (distances past MPNet's 128 share its last buckets), left padding, the
input variants MPNet takes; bf16 within twice HF's own bf16 error; gradients (the bias table's too); bit-exact
outputs after unswap; and the refusals.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers
from transformers import (
    MPNetForMaskedLM,
    MPNetForMultipleChoice,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    MPNetForTokenClassification,
    MPNetModel,
)

from mtbert_fast import FastBertModel, swap
from mtbert_fast.models.encoder import relative_bias_table, relative_position_buckets
from mtbert_fast.models.hf_mapping import MissingWeightError

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
TASKS = [MPNetModel, MPNetForSequenceClassification, MPNetForTokenClassification, MPNetForQuestionAnswering,
         MPNetForMaskedLM]


def _model(make_hf, cls, config, seed=0):
    model = make_hf(cls, config, seed)
    with torch.no_grad():
        table = model.base_model.encoder.relative_attention_bias.weight
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(seed + 100)))
    return model


def _fields(cls):
    name = cls.__name__
    if name.endswith("Model"):
        return {"last_hidden_state": True, "pooler_output": False}
    if name.endswith("ForQuestionAnswering"):
        return {"start_logits": True, "end_logits": True}
    return {"logits": not name.endswith("ForSequenceClassification")}


@pytest.mark.parametrize("num_buckets", [32, 8, 64])
def test_buckets_are_mpnets(num_buckets):
    distance = torch.arange(-700, 701)
    hf = transformers.models.mpnet.modeling_mpnet.MPNetEncoder.relative_position_bucket(distance, num_buckets)
    assert torch.equal(relative_position_buckets(distance, num_buckets), hf)


def test_bias_table_clamps_exactly():
    """The table handed to the kernels stops at distance 128, where MPNet's buckets stop changing: clamped, it gives
    every distance of a 600-token row the bias its own bucket has."""
    weight = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    table = relative_bias_table(weight, 600)
    assert table.shape == (3, 257) and table.dtype == torch.float32
    distance = torch.arange(-599, 600)
    assert torch.equal(table[:, distance.clamp(-128, 128) + 128], weight[relative_position_buckets(distance, 32)].t())
    assert relative_bias_table(weight, 5).shape == (3, 9)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_task_model_parity(cls, model_backend, mpnet_config, make_hf, ragged_batch, swap_parity, assert_tokens_close):
    config = mpnet_config()
    model = _model(make_hf, cls, config)
    ids, mask = ragged_batch(config, [5, 17, 1, 140, 12])
    out, refs = swap_parity(model, model_backend, ids, mask, _fields(cls), output_hidden_states=True)
    for ref in refs.values():
        assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
        for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_tokens_close(a, r, mask, what=f"hidden_states[{i}]")


@pytest.mark.all_threads
def test_lengths_1_and_512(model_backend, mpnet_config, make_hf, hf_outputs, ragged_batch, compare_outputs):
    config = mpnet_config()
    model = _model(make_hf, MPNetForTokenClassification, config)
    ids, mask = ragged_batch(config, [1, 512, 64], seed=2)
    refs = hf_outputs(model, ids, attention_mask=mask)
    swap(model, backend=model_backend)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        with pytest.raises(ValueError, match="a sequence of 513 tokens is longer than the model's"):
            model(torch.randint(3, 997, (1, 513)))
    for ref in refs.values():
        compare_outputs(out, ref, {"logits": True}, mask)


def test_larger_bucket_table_reads_mpnets_32_buckets(model_backend, mpnet_config, make_hf, ragged_batch, swap_parity):
    """HF's MPNet buckets distances into 32 whatever relative_attention_num_buckets says: a larger table's rows
    past 32 are never read, here as there."""
    config = mpnet_config(relative_attention_num_buckets=64)
    model = _model(make_hf, MPNetModel, config)
    ids, mask = ragged_batch(config, [40, 7])
    swap_parity(model, model_backend, ids, mask, _fields(MPNetModel))


@pytest.mark.parametrize("variant", ["position_ids", "inputs_embeds", "float_mask", "no_mask", "left_padding"])
def test_input_variants(variant, model_backend, mpnet_config, make_hf, hf_outputs, ragged_batch, assert_tokens_close,
                        input_variant):
    """Left padding too: MPNet numbers positions from the token ids (skipping its padding id 1) and its relative
    bias depends only on distances, so the real tokens' states equal HF's wherever the padding sits."""
    config = mpnet_config()
    model = _model(make_hf, MPNetModel, config)
    ids, mask = ragged_batch(config, [20, 11, 4])
    kwargs, real = input_variant(variant, config, ids, mask, model)
    refs = hf_outputs(model, **kwargs)
    swap(model, backend=model_backend)
    left = variant == "left_padding"
    with torch.no_grad(), pytest.warns(UserWarning, match="left-padded batch") if left else contextlib.nullcontext():
        out = model(**kwargs)
    for ref in refs.values():
        assert_tokens_close(out.last_hidden_state, ref.last_hidden_state, real)


def test_padding_inside_a_row_is_refused(mpnet_config, make_hf, ragged_batch):
    """HF measures the relative distance across padding inside a row; the packed path closes the gap, so such a
    mask is refused by name rather than answered differently."""
    config = mpnet_config()
    model = swap(_model(make_hf, MPNetModel, config))
    ids, mask = ragged_batch(config, [9, 12])
    mask[1, 4] = 0
    with pytest.raises(ValueError, match="row 1 of attention_mask has padding between real tokens: a mpnet model's "
                                         "relative position bias"):
        model(ids, attention_mask=mask)


@pytest.mark.parametrize("cls", TASKS, ids=lambda c: c.__name__)
def test_bf16(cls, mpnet_config, make_hf, ragged_batch, assert_swap_bf16):
    config = mpnet_config()
    assert_swap_bf16(_model(make_hf, cls, config), *ragged_batch(config, [7, 40, 2, 23]))


def test_gradients_match_hf(model_backend, mpnet_config, make_hf, ragged_batch, assert_grad_close):
    """Train mode without dropout: the loss's gradient reaches every weight as HF's does, the relative position
    bias table (summed over every layer and every pair of tokens at each distance) included."""
    config = mpnet_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ref_model = _model(make_hf, MPNetForSequenceClassification, config).train()
    model = swap(copy.deepcopy(ref_model), backend=model_backend)
    ids, mask = ragged_batch(config, [9, 30, 3])
    labels = torch.tensor([0, 1, 1])
    ref_model(ids, attention_mask=mask, labels=labels).loss.backward()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    grads = dict(model.named_parameters())
    assert "mpnet.encoder.relative_attention_bias.weight" in grads
    for name, p in ref_model.named_parameters():
        assert_grad_close(grads[name].grad, p.grad, what=name)


def test_int8_with_autograd_on_runs_its_no_grad_forward(mpnet_config, make_hf, ragged_batch):
    """An int8 MPNet called with autograd on (eval mode, outside torch.no_grad) runs the forward of no_grad, its
    relative bias table kept out of the graph with the int8 layers, and a backward stops at those layers by name."""
    config = mpnet_config()
    model = swap(make_hf(MPNetModel, config), dtype=torch.qint8)
    ids, mask = ragged_batch(config, [4, 10])
    out = model(ids, attention_mask=mask).last_hidden_state
    assert out.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out.detach(), model(ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="an int8 model has no backward"):
        out.sum().backward()


def test_unswap_restores_bit_exact_outputs(mpnet_config, make_hf, unswap_is_bit_exact):
    config = mpnet_config()
    unswap_is_bit_exact(_model(make_hf, MPNetForMaskedLM, config), config)


def test_multiple_choice(model_backend, mpnet_config, make_hf, multiple_choice_parity):
    config = mpnet_config()
    multiple_choice_parity(_model(make_hf, MPNetForMultipleChoice, config), config, model_backend)


def test_fast_model_needs_the_bias_table(mpnet_config, make_hf, tmp_path):
    """A checkpoint without the table is refused by its name; FastBertModel carries the table under its own key."""
    model = _model(make_hf, MPNetModel, mpnet_config())
    fast = FastBertModel.from_hf(model)
    assert torch.equal(fast.relative_attention_bias.weight, model.encoder.relative_attention_bias.weight)
    state = {k: v for k, v in model.state_dict().items() if "relative_attention_bias" not in k}
    model.save_pretrained(tmp_path)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MissingWeightError, match="encoder.relative_attention_bias.weight"):
        FastBertModel.from_pretrained(tmp_path)


def test_config_refusals(mpnet_config):
    from mtbert_fast.models import EncoderConfig

    with pytest.raises(ValueError, match="relative_attention_num_buckets must be >= 32"):
        EncoderConfig.from_hf(mpnet_config(relative_attention_num_buckets=16))
    with pytest.raises(ValueError, match="relative_attention_num_buckets=32: an MPNet option"):
        EncoderConfig(relative_attention_num_buckets=32)
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        EncoderConfig.from_hf(mpnet_config(hidden_act="relu"))


def test_unsupported_config_is_refused_and_model_untouched(mpnet_config, make_hf, ragged_batch, assert_swap_refused):
    config = mpnet_config()
    model = _model(make_hf, MPNetForSequenceClassification, config)
    model.config.hidden_act = "relu"
    assert_swap_refused(model, *ragged_batch(config, [5, 9]), "hidden_act='relu' is not supported")
