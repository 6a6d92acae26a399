"""FastBertModel against the unswapped HF model: fp32 parity (eager and sdpa) on the real all-MiniLM-L6-v2, on
random-weight BERT and RoBERTa configs (bert-base at its real size once), at lengths 1 and 512, with every input
variant; loading from an HF model and from an HF directory (safetensors, sharded or not); gradients; dropout; bf16;
and refusal of the configs the encoder does not implement.

Outputs are compared at the real tokens within 1e-4; the padded positions of our outputs must
be exactly zero.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertForSequenceClassification,
    BertModel,
    RobertaForMaskedLM,
    RobertaModel,
)

from mtbert_fast import EncoderConfig, FastBertModel, swap
from mtbert_fast.models import EncoderOutput, UnsupportedModelError
from mtbert_fast.models.hf_mapping import fast_state_dict_from_hf

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
LOADERS = ("from_hf", "from_pretrained")


def _fast(loader, hf_model, tmp_path, backend) -> FastBertModel:
    """FastBertModel from a loaded HF model, or from the directory it was saved to (safetensors)."""
    if loader == "from_hf":
        return FastBertModel.from_hf(hf_model, backend=backend)
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "pytorch_model.bin").exists()
    return FastBertModel.from_pretrained(tmp_path, backend=backend)


def _family(name, bert_config, roberta_config):
    return (BertModel, bert_config()) if name == "bert" else (RobertaModel, roberta_config())


def _check_parity(fast_out, hf_out, mask, assert_tokens_close, assert_close, pooler=True):
    assert isinstance(fast_out, EncoderOutput)
    assert fast_out.last_hidden_state.dtype == torch.float32
    assert_tokens_close(fast_out.last_hidden_state, hf_out.last_hidden_state, mask, what="last_hidden_state")
    real = int(mask.sum())
    assert fast_out.packed_hidden_state.shape == (real, hf_out.last_hidden_state.shape[-1])
    assert torch.equal(fast_out.packed_hidden_state, fast_out.last_hidden_state[mask.bool()])
    if pooler:
        assert_close(fast_out.pooler_output, hf_out.pooler_output, what="pooler_output")


# --- the real all-MiniLM-L6-v2 on real sentences ------------------------------------------------------------------


def test_sentences_are_ragged(minilm_batch):
    lengths = minilm_batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(lengths), lengths
    assert min(lengths) == 3 and max(lengths) >= 60, lengths
    assert minilm_batch["input_ids"].shape[1] == max(lengths)


@pytest.mark.parametrize("loader", LOADERS)
def test_minilm_parity(loader, model_backend, minilm, minilm_dir, minilm_batch, assert_tokens_close, assert_close):
    if loader == "from_hf":
        fast = FastBertModel.from_hf(minilm.model, backend=model_backend)
    else:
        fast = FastBertModel.from_pretrained(minilm_dir, backend=model_backend)
    assert not fast.training and fast.dtype == torch.float32
    with torch.no_grad():
        out = fast(**minilm_batch)
    assert set(minilm.refs) == {"eager", "sdpa"}
    for ref in minilm.refs.values():
        _check_parity(out, ref, minilm_batch["attention_mask"], assert_tokens_close, assert_close)
    assert out.hidden_states is None


def test_minilm_bf16_error_is_at_most_twice_hf_bf16(minilm, minilm_batch, assert_low_precision_error):
    hf = minilm.model
    fast = FastBertModel.from_hf(hf, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16
    mask = minilm_batch["attention_mask"]
    ref = minilm.refs["eager"]
    with torch.no_grad():
        out = fast(**minilm_batch)
        assert out.last_hidden_state.dtype == torch.bfloat16
        for impl in ("eager", "sdpa"):
            native_model = copy.deepcopy(hf).to(torch.bfloat16)
            native_model.set_attn_implementation(impl)
            native = native_model(**minilm_batch)
            assert_low_precision_error(out.last_hidden_state, native.last_hidden_state, ref.last_hidden_state, mask,
                                       what=f"last_hidden_state vs {impl}")
            assert_low_precision_error(out.pooler_output, native.pooler_output, ref.pooler_output,
                                       what=f"pooler_output vs {impl}")
    assert torch.count_nonzero(out.last_hidden_state[~mask.bool()]) == 0


def test_minilm_under_bf16_autocast(minilm, minilm_batch, assert_low_precision_error):
    """An fp32 model under torch.autocast(bfloat16): the fused ops take autocast's bf16 activations with fp32
    weights, and the error stays within twice HF's own error under the same autocast."""
    hf = minilm.model
    fast = FastBertModel.from_hf(hf)
    mask = minilm_batch["attention_mask"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(**minilm_batch)
        native = hf(**minilm_batch)
    assert_low_precision_error(out.last_hidden_state, native.last_hidden_state,
                               minilm.refs["eager"].last_hidden_state, mask, what="last_hidden_state")


@pytest.mark.parametrize("kind", ["fast", "swapped"])
def test_autocast_keeps_the_residual_stream_in_float32(kind, bert_config, make_hf, ragged_batch):
    """Under torch.autocast(bfloat16) an fp32 model's products run in bf16 and its residual stream and LayerNorms
    stay fp32, as HF's do: the hidden states come back fp32 and as close to the fp32 model's as HF's own (a bf16
    residual stream was 50 times further off on this model), and gradients reach every weight."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    model = FastBertModel.from_hf(hf) if kind == "fast" else swap(copy.deepcopy(hf))
    ids, mask = ragged_batch(config, [12, 7])
    keep = mask.bool()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).last_hidden_state
        with torch.autocast("cpu", dtype=torch.bfloat16):
            native = hf(ids, attention_mask=mask).last_hidden_state
            out = model(ids, attention_mask=mask).last_hidden_state
    assert out.dtype == native.dtype == torch.float32
    err, native_err = ((x - ref)[keep].abs().max().item() for x in (out, native))
    assert err <= 1.5 * native_err, (err, native_err)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(ids, attention_mask=mask).last_hidden_state.float().square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "pooler" not in n}
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values())


# --- random-weight BERT and RoBERTa ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("loader", LOADERS)
def test_random_config_parity(family, loader, model_backend, bert_config, roberta_config, make_hf, hf_outputs,
                              ragged_batch, tmp_path, assert_tokens_close, assert_close):
    cls, config = _family(family, bert_config, roberta_config)
    hf = make_hf(cls, config)
    fast = _fast(loader, hf, tmp_path, model_backend)
    ids, mask = ragged_batch(config, [5, 17, 1, 30, 12])
    with torch.no_grad():
        out = fast(ids, mask)
    for ref in hf_outputs(hf, ids, mask).values():
        _check_parity(out, ref, mask, assert_tokens_close, assert_close)


@pytest.mark.all_threads
def test_bert_base_full_size_parity(bert_base, model_backend, assert_tokens_close, assert_close):
    ids, mask = bert_base.ids, bert_base.mask
    fast = FastBertModel.from_hf(bert_base.model, backend=model_backend)
    assert len(fast.layers) == 12 and fast.config.hidden_size == 768
    with torch.no_grad():
        out = fast(ids, mask)
    assert set(bert_base.refs) == {"eager", "sdpa"}
    for ref in bert_base.refs.values():
        _check_parity(out, ref, mask, assert_tokens_close, assert_close)


@pytest.mark.all_threads
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_lengths_1_and_512(family, model_backend, bert_config, roberta_config, make_hf, hf_outputs, ragged_batch,
                           assert_tokens_close, assert_close):
    cls, config = _family(family, bert_config, roberta_config)
    hf = make_hf(cls, config)
    fast = FastBertModel.from_hf(hf, backend=model_backend)
    ids, mask = ragged_batch(config, [1, 512, 77], seed=1)
    assert ids.shape == (3, 512)
    with torch.no_grad():
        out = fast(ids, mask)
    for ref in hf_outputs(hf, ids, mask).values():
        _check_parity(out, ref, mask, assert_tokens_close, assert_close)
    assert out.packed.max_seqlen == 512 and out.packed.cu_seqlens.tolist() == [0, 1, 513, 590]


VARIANTS = ["token_type_ids", "position_ids", "position_ids_broadcast", "inputs_embeds", "all_ones_mask", "no_mask",
            "bool_mask", "float_mask", "holes", "left_padding"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_input_variants(variant, family, model_backend, bert_config, roberta_config, make_hf, hf_outputs,
                        ragged_batch, assert_tokens_close, assert_close, input_variant):
    cls, config = _family(family, bert_config, roberta_config)
    hf = make_hf(cls, config)
    fast = FastBertModel.from_hf(hf, backend=model_backend)
    ids, mask = ragged_batch(config, [9, 20, 14], seed=3)
    with torch.no_grad():
        kwargs, real = input_variant(variant, config, ids, mask, hf)
        out = fast(**kwargs)
    for ref in hf_outputs(hf, **kwargs).values():
        # With left padding HF's pooler reads the padding at position 0, which the packed path never computes.
        _check_parity(out, ref, real, assert_tokens_close, assert_close, pooler=variant != "left_padding")


def test_variants_change_the_output(bert_config, make_hf, ragged_batch, input_variant):
    """The variants above are real tests: token types and positions given change HF's output."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    ids, mask = ragged_batch(config, [9, 20, 14], seed=3)
    with torch.no_grad():
        plain = hf(ids, mask).last_hidden_state
        for variant in ("token_type_ids", "position_ids", "position_ids_broadcast"):
            kwargs, _ = input_variant(variant, config, ids, mask, hf)
            assert (hf(**kwargs).last_hidden_state - plain)[mask.bool()].abs().max() > 1e-2, variant


def test_mask_all_ones_equals_no_mask(bert_config, model_backend, make_hf, ragged_batch):
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config), backend=model_backend)
    ids, _ = ragged_batch(config, [16, 16])
    with torch.no_grad():
        a = fast(ids, torch.ones_like(ids))
        b = fast(ids)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(a.pooler_output, b.pooler_output)


def test_dense_packing_equals_unpad_of_all_ones():
    from mtbert_fast.models.encoder import PackedBatch
    from mtbert_fast.ops import unpad_indices

    dense = PackedBatch.dense(3, 5, torch.device("cpu"))
    indices, cu_seqlens, max_seqlen = unpad_indices(torch.ones(3, 5, dtype=torch.int64))
    assert torch.equal(dense.indices, indices) and torch.equal(dense.cu_seqlens, cu_seqlens)
    assert (dense.max_seqlen, dense.batch, dense.seqlen) == (max_seqlen, 3, 5)
    assert dense.all_real and not PackedBatch(indices, cu_seqlens, max_seqlen, 3, 5).all_real
    rows = torch.randn(15, 4)
    padded = dense.pad(rows)  # no padding to fill: the packed rows themselves, viewed as [batch, seqlen, ...]
    assert padded.shape == (3, 5, 4) and padded.data_ptr() == rows.data_ptr()
    assert torch.equal(padded, PackedBatch(indices, cu_seqlens, max_seqlen, 3, 5).pad(rows))


def test_inference_layer_equals_the_checked_wrapper_path(bert_config, model_backend, make_hf, ragged_batch):
    """In inference the layer calls the attention op without its wrapper's checks; with dropout off, training mode
    runs the wrapper, and both give the same bits."""
    from mtbert_fast.models.encoder import layer_forward

    config = bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), backend=model_backend)
    ids, mask = ragged_batch(config, [5, 16, 9])
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
        x, packed, w = out.packed_hidden_states[0], out.packed, fast.layers[0].weights()
        inference = layer_forward(fast.config, w, x, packed, training=False, backend=model_backend)
        wrapper = layer_forward(fast.config, w, x, packed, training=True, backend=model_backend)
    assert torch.equal(inference, wrapper)


def test_inference_chooses_each_kernel_once_per_forward(bert_config, model_backend, make_hf, ragged_batch,
                                                         monkeypatch):
    """Every layer hands attention and the LayerNorms inputs of one shape and dtype: the dispatch runs once per op
    and forward (the embeddings' op and the pooler's gather of the first tokens too), and the batch remembers the
    choice. (Every layer's output is asked for, so the layers run one by one, not in one post_norm_layers call.)"""
    from mtbert_fast.ops import dispatch

    config = bert_config(num_hidden_layers=3)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), backend=model_backend)
    ids, mask = ragged_batch(config, [5, 16, 9])
    choose, calls = dispatch.choose, []

    def spy(op, t, backend=None):
        calls.append(op)
        return choose(op, t, backend)

    monkeypatch.setattr(dispatch, "choose", spy)
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
    layer_ops = {"attention_varlen", "bias_residual_layer_norm"}
    # the packing's own row copies take the backend that $MTBERT_FAST_BACKEND or the dispatch picks, as before
    assert out.packed.kernels.pop("gather_rows") == choose("gather_rows", out.packed_hidden_state)
    if model_backend == "reference":  # the reference runs the ops' wrappers, which choose again
        assert set(out.packed.kernels) == layer_ops
        assert set(out.packed.kernels.values()) == {"reference"}
    else:  # and the embeddings run in one token_embeddings call
        assert set(out.packed.kernels) == layer_ops | {"token_embeddings"}
        assert all(calls.count(op) == 1 for op in out.packed.kernels)
        assert calls.count("gather_rows") == 1
        assert "reference" not in out.packed.kernels.values()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["ragged", "full", "int32_ids", "no_token_types"])
def test_cpu_inference_embeds_in_one_call(case, dtype, bert_config, make_hf, ragged_batch, monkeypatch):
    """In CPU inference from input_ids the embeddings are one token_embeddings call, which gives what the per-op
    path gives (fp32 within the LayerNorm's rounding; bf16 closer to fp32, its sums not rounded to bf16)."""
    from mtbert_fast.models import encoder
    from mtbert_fast.ops.token_embeddings import OP

    config = bert_config(num_hidden_layers=1)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), dtype=dtype)
    ids, mask = ragged_batch(config, [7, 7] if case == "full" else [7, 2, 5])
    kwargs = {"token_type_ids": None if case == "no_token_types" else (torch.arange(7) > 3).long().expand_as(ids)}
    if case == "int32_ids":
        ids, kwargs["token_type_ids"] = ids.int(), kwargs["token_type_ids"].int()
    kernel, calls = OP.kernel("cpu"), []
    monkeypatch.setitem(OP._kernels, ("cpu", "forward"), lambda *a: calls.append(a[1]) or kernel(*a))
    with torch.inference_mode():
        one_call = fast(ids, mask, **kwargs).last_hidden_state
        assert len(calls) == 1 and (calls[0] is None) == (case == "full")
        monkeypatch.setattr(encoder, "_one_call_embeddings", lambda *a: False)
        by_op = fast(ids, mask, **kwargs).last_hidden_state
        fp32 = FastBertModel.from_hf(make_hf(BertModel, config))(ids, mask, **kwargs).last_hidden_state
    assert len(calls) == 1
    if dtype == torch.float32:
        torch.testing.assert_close(one_call, by_op, atol=2e-5, rtol=0)
    else:
        assert (one_call.float() - fp32).abs().max() <= (by_op.float() - fp32).abs().max() * 1.25


@pytest.mark.parametrize("case", ["position_ids", "inputs_embeds", "grad", "reference", "too_long"])
def test_embeddings_in_one_call_only_where_it_computes_the_same(case, bert_config, make_hf, ragged_batch,
                                                                 monkeypatch):
    """Explicit position_ids, inputs_embeds, autograd, another backend asked for, and an input longer than the
    position table (whose error the per-op path names) take the per-op path."""
    from mtbert_fast.ops.token_embeddings import OP

    config = bert_config(num_hidden_layers=1, max_position_embeddings=8 if case == "too_long" else 512)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), backend="reference" if case == "reference" else None)
    ids, mask = ragged_batch(config, [9, 4] if case == "too_long" else [7, 4])
    calls = []
    monkeypatch.setitem(OP._kernels, ("cpu", "forward"), lambda *a: calls.append(a))
    kwargs = {"position_ids": torch.arange(ids.shape[1])[None]} if case == "position_ids" else {}
    if case == "inputs_embeds":
        kwargs, ids = {"inputs_embeds": fast.embeddings.word_embeddings(ids).detach()}, None
    with torch.enable_grad() if case == "grad" else torch.inference_mode():
        if case == "too_long":
            with pytest.raises(ValueError, match="position id 8 is outside"):
                fast(ids, mask)
        else:
            fast(ids, mask, **kwargs)
    assert calls == []


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_inference_layer_norm_refuses_bad_weights(bad, mode, bert_config, model_backend, make_hf, ragged_batch):
    """Inference calls the LayerNorm kernels without the wrapper's Python checks: a LayerNorm weight of the wrong
    shape or dtype is still refused, by name, on every backend."""
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config), backend=model_backend)
    norm = fast.layers[1].ffn_norm
    with torch.no_grad():
        if bad == "shape":
            norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size + 1))
        else:
            norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=torch.float64))
    ids, mask = ragged_batch(config, [5, 9])
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context, pytest.raises((ValueError, TypeError, RuntimeError), match="weight"):
        fast(ids, mask)


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_hidden_act(hidden_act, family, model_backend, bert_config, roberta_config, make_hf, hf_outputs, ragged_batch,
                    assert_tokens_close, assert_close):
    config = (bert_config if family == "bert" else roberta_config)(hidden_act=hidden_act)
    hf = make_hf(BertModel if family == "bert" else RobertaModel, config)
    fast = FastBertModel.from_hf(hf, backend=model_backend)
    expected = "none" if hidden_act == "gelu" else "tanh"
    assert fast.config.hidden_act == hidden_act and fast.config.gelu_approximate == expected
    ids, mask = ragged_batch(config, [7, 25, 3])
    with torch.no_grad():
        out = fast(ids, mask)
    for ref in hf_outputs(hf, ids, mask).values():
        _check_parity(out, ref, mask, assert_tokens_close, assert_close)


def test_tanh_and_erf_gelu_differ(bert_config, make_hf, ragged_batch):
    """gelu and gelu_new models with the same weights give different outputs, so the test above can tell them apart."""
    ids, mask = ragged_batch(bert_config(), [7, 25, 3])
    outs = []
    for act in ("gelu", "gelu_new"):
        fast = FastBertModel.from_hf(make_hf(BertModel, bert_config(hidden_act=act)))
        with torch.no_grad():
            outs.append(fast(ids, mask).last_hidden_state)
    assert (outs[0] - outs[1]).abs().max() > 1e-6


def test_output_hidden_states(model_backend, bert_config, make_hf, hf_outputs, ragged_batch, assert_tokens_close):
    config = bert_config(num_hidden_layers=3)
    hf = make_hf(BertModel, config)
    fast = FastBertModel.from_hf(hf, backend=model_backend)
    ids, mask = ragged_batch(config, [4, 19, 11])
    with torch.no_grad():
        out = fast(ids, mask, output_hidden_states=True)
    for impl, ref in hf_outputs(hf, ids, mask, output_hidden_states=True).items():
        assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
        for i, (a, e) in enumerate(zip(out.hidden_states, ref.hidden_states)):
            assert_tokens_close(a, e, mask, what=f"{impl}: hidden_states[{i}]")
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)


def test_without_pooler(model_backend, bert_config, make_hf, ragged_batch, tmp_path, assert_tokens_close):
    config = bert_config()
    torch.manual_seed(0)
    hf = BertModel._from_config(config, add_pooling_layer=False).eval()
    assert hf.pooler is None
    ids, mask = ragged_batch(config, [6, 13])
    for loader in LOADERS:
        fast = _fast(loader, hf, tmp_path / loader, model_backend)
        assert fast.pooler is None
        with torch.no_grad():
            out = fast(ids, mask)
            assert out.pooler_output is None
            assert_tokens_close(out.last_hidden_state, hf(ids, mask).last_hidden_state, mask)


# --- loading -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification, RobertaForMaskedLM])
def test_from_pretrained_task_checkpoints(cls, sharded, bert_config, roberta_config, make_hf, ragged_batch, tmp_path,
                                          assert_tokens_close, assert_close):
    """Task-model checkpoints (keys under bert. / roberta.) and sharded safetensors load the encoder they hold."""
    config = roberta_config() if cls is RobertaForMaskedLM else bert_config()
    hf = make_hf(cls, config)
    hf.save_pretrained(tmp_path, max_shard_size="100KB" if sharded else "50GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    fast = FastBertModel.from_pretrained(tmp_path)
    base = hf.base_model
    ids, mask = ragged_batch(config, [6, 13, 2])
    with torch.no_grad():
        ref = base(ids, mask)
        out = fast(ids, mask)
    assert (fast.pooler is None) == (base.pooler is None)
    _check_parity(out, ref, mask, assert_tokens_close, assert_close, pooler=base.pooler is not None)


def test_from_pretrained_dtype(bert_config, make_hf, ragged_batch, tmp_path):
    config = bert_config()
    make_hf(BertModel, config).save_pretrained(tmp_path)
    fast = FastBertModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert not any(p.is_meta for p in fast.parameters())
    ids, mask = ragged_batch(config, [6, 13])
    with torch.no_grad():
        out = fast(ids, mask)
    assert out.last_hidden_state.dtype == torch.bfloat16 and torch.isfinite(out.last_hidden_state).all()


def _edit_checkpoint(path, config=None, weights=None):
    """Rewrites a saved model's config.json through config(dict) -> dict and its model.safetensors through
    weights(dict) -> dict."""
    from safetensors.torch import load_file, save_file

    if config is not None:
        d = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config(d)))
    if weights is not None:
        save_file(weights(load_file(path / "model.safetensors")), path / "model.safetensors")


def test_from_pretrained_reads_the_config_as_hf_does(roberta_config, make_hf, ragged_batch, tmp_path,
                                                     assert_tokens_close):
    """config.json keys left out take the family's HF defaults (RoBERTa pads with 1, where BERT's default is 0, and
    numbers its positions from it), and a config.json that names no model_type is refused, as HF's AutoConfig
    refuses it, instead of being read as BERT."""
    config = roberta_config(pad_token_id=1)
    make_hf(RobertaModel, config).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, config=lambda d: {k: v for k, v in d.items() if k != "pad_token_id"})
    hf = RobertaModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert hf.config.pad_token_id == 1
    fast = FastBertModel.from_pretrained(tmp_path)
    ids, mask = ragged_batch(config, [5, 12])
    ids = ids.masked_fill(mask == 0, 1)
    with torch.no_grad():
        assert_tokens_close(fast(ids, mask).last_hidden_state, hf(ids, attention_mask=mask).last_hidden_state, mask)
    _edit_checkpoint(tmp_path, config=lambda d: {k: v for k, v in d.items() if k != "model_type"})
    with pytest.raises(UnsupportedModelError, match="config.json names no model_type"):
        FastBertModel.from_pretrained(tmp_path)


def test_from_pretrained_dtype_of_mixed_weights(bert_config, make_hf, ragged_batch, tmp_path, assert_tokens_close):
    """dtype=None takes the dtype config.json names, not that of whichever tensor comes first (a float32 model whose
    word table alone was stored in bf16 loads in float32, as HF loads it); from_hf refuses a model of mixed dtypes
    unless dtype says which."""
    config = bert_config()
    make_hf(BertModel, config).save_pretrained(tmp_path)
    word = "embeddings.word_embeddings.weight"
    _edit_checkpoint(tmp_path, weights=lambda w: {**w, word: w[word].bfloat16()})
    hf = BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    fast = FastBertModel.from_pretrained(tmp_path)
    assert {p.dtype for p in fast.parameters()} == {p.dtype for p in hf.parameters()} == {torch.float32}
    ids, mask = ragged_batch(config, [7, 3])
    with torch.no_grad():
        assert_tokens_close(fast(ids, mask).last_hidden_state, hf(ids, attention_mask=mask).last_hidden_state, mask)
    hf.encoder.layer[0].output.LayerNorm.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"tensors of several dtypes \(bfloat16, float32\): pass dtype="):
        FastBertModel.from_hf(hf)
    assert FastBertModel.from_hf(hf, dtype=torch.float32).dtype == torch.float32


def test_from_pretrained_checks_each_of_query_key_value(bert_config, make_hf, tmp_path):
    """A query and a key whose shapes are wrong but add up to the fused [3H, H] are refused by name."""
    config = bert_config()
    make_hf(BertModel, config).save_pretrained(tmp_path)
    h, cut = config.hidden_size, 8
    q, k = "encoder.layer.0.attention.self.query.weight", "encoder.layer.0.attention.self.key.weight"
    _edit_checkpoint(tmp_path, weights=lambda w: {**w, q: torch.cat([w[q], w[k][:cut]]), k: w[k][cut:]})
    with pytest.raises(ValueError, match=rf"size mismatch for '{q}': the checkpoint holds \[{h + cut}, {h}\]"):
        FastBertModel.from_pretrained(tmp_path)


def test_from_pretrained_names_the_checkpoint_key_of_a_wrong_shape(bert_config, make_hf, tmp_path):
    """A weight whose shape the config does not give it is named by the checkpoint's own key, not the fast model's,
    and the message says that the config and the weights disagree."""
    config = bert_config()
    make_hf(BertModel, config).save_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, config=lambda d: {**d, "intermediate_size": d["intermediate_size"] + 8})
    with pytest.raises(ValueError, match=r"size mismatch for 'encoder.layer.0.intermediate.dense.weight': the "
                                         rf"checkpoint holds \[{config.intermediate_size}, {config.hidden_size}\], "
                                         r"where the config asks for .*: the config and the weights disagree"):
        FastBertModel.from_pretrained(tmp_path)


def test_from_pretrained_names_encoder_weights_it_does_not_read(bert_config, make_hf, tmp_path):
    """Weights under the encoder that are none of its own (an unmerged LoRA adapter) are named in a warning, as HF
    lists unexpected keys; the embeddings' position_ids buffer that older checkpoints hold, and a task model's head
    outside the encoder, are not."""
    import warnings

    config = bert_config()
    make_hf(BertForSequenceClassification, config).save_pretrained(tmp_path)
    extra = "bert.encoder.layer.1.attention.self.value.lora_A.weight"
    _edit_checkpoint(tmp_path, weights=lambda w: {**w, "bert.embeddings.position_ids": torch.arange(8)[None]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FastBertModel.from_pretrained(tmp_path)
    _edit_checkpoint(tmp_path, weights=lambda w: {**w, extra: torch.zeros(4, config.hidden_size)})
    with pytest.warns(UserWarning, match=r"holds weights of the encoder that are none of a bert encoder's \(encoder"
                                         r".layer.1.attention.self.value.lora_A.weight\): they are not loaded"):
        FastBertModel.from_pretrained(tmp_path)


def test_from_hf_owns_its_weights(bert_config, make_hf):
    """Training or editing the fast model leaves the HF model it came from unchanged."""
    hf = make_hf(BertModel, bert_config())
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    fast = FastBertModel.from_hf(hf)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fused_qkv_layout(bert_config, make_hf):
    """qkv holds query, key and value stacked in that order (so the attention reads the right third)."""
    hf = make_hf(BertModel, bert_config())
    fast = FastBertModel.from_hf(hf)
    attn = hf.encoder.layer[1].attention.self
    h = hf.config.hidden_size
    for kind in ("weight", "bias"):
        fused = getattr(fast.layers[1].qkv, kind)
        for i, part in enumerate((attn.query, attn.key, attn.value)):
            assert torch.equal(fused[i * h:(i + 1) * h], getattr(part, kind))


# --- training: gradients and dropout -------------------------------------------------------------------------------


def test_gradients_match_hf(model_backend, bert_config, make_hf, ragged_batch, assert_grad_close):
    """The gradient of a loss on last_hidden_state and pooler_output reaches every weight as it does in HF."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    fast = FastBertModel.from_hf(hf, backend=model_backend)
    ids, mask = ragged_batch(config, [5, 17, 9])
    g = torch.Generator().manual_seed(1)
    w_tokens = torch.randn(*ids.shape, config.hidden_size, generator=g) * mask[..., None]
    w_pooled = torch.randn(len(ids), config.hidden_size, generator=g)

    def loss(out):  # a mean, as a task loss is, so that the gradients are of order one
        return (out.last_hidden_state * w_tokens).sum() / mask.sum() + (out.pooler_output * w_pooled).mean()

    loss(hf(ids, mask)).backward()
    loss(fast(ids, mask)).backward()
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    expected = fast_state_dict_from_hf(hf_grads, fast.config, has_pooler=True)
    got = dict(fast.named_parameters())
    assert set(expected) == set(got)
    for name, grad in expected.items():
        assert_grad_close(got[name].grad, grad, what=name)
    h = config.hidden_size
    for i, part in enumerate(("query", "key", "value")):  # each third of the fused matrix, on its own scale
        rows = slice(i * h, (i + 1) * h)
        assert_grad_close(got["layers.0.qkv.weight"].grad[rows], expected["layers.0.qkv.weight"][rows], what=part)


@pytest.mark.parametrize("kind", ["fast", "swapped"])
def test_compiled_inference_follows_the_lengths(kind, bert_config, make_hf, ragged_batch, assert_tokens_close,
                                                fresh_inductor):
    """torch.compile(dynamic=True) of the model in inference: the products run as F.linear there (Inductor lowers
    oneDNN's linear only for weights frozen into the graph), and batches of new lengths reuse the compiled code:
    max_seqlen and the row counts stay symbolic, where an int in the ops' schemas compiled the layers once per length
    until torch.compile's recompile limit sent them back to eager."""
    from torch._dynamo.utils import counters

    hf = make_hf(BertModel, bert_config())
    model = FastBertModel.from_hf(hf) if kind == "fast" else swap(copy.deepcopy(hf))
    compiled = torch.compile(model, dynamic=True)
    counters.clear()
    graphs = []
    with torch.no_grad():
        for seed, lengths in enumerate([[9, 4], [13, 13], [17, 2], [23, 11], [30, 30], [5, 3], [7, 7]]):
            ids, mask = ragged_batch(hf.config, lengths, seed=seed)
            out = compiled(ids, attention_mask=mask).last_hidden_state
            assert_tokens_close(out, model(ids, attention_mask=mask).last_hidden_state, mask)
            graphs.append(counters["stats"]["unique_graphs"])
    # the first calls of each kind (ragged, every token real) fill the dispatch's caches, which the guards of the
    # call before read as empty
    assert graphs[3] == graphs[-1], graphs


def test_train_mode_dropout(bert_config, make_hf, ragged_batch, assert_tokens_close, assert_close):
    ids_mask = ragged_batch(bert_config(), [8, 21, 3])
    mask = ids_mask[1]
    # no dropout: train mode equals HF's train mode
    hf = make_hf(BertModel, bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    fast = FastBertModel.from_hf(hf).train()
    _check_parity(fast(*ids_mask), hf(*ids_mask), mask, assert_tokens_close, assert_close)
    # with dropout: two calls differ, and one seed gives one answer
    for probs in ((0.1, 0.0), (0.0, 0.1)):
        config = bert_config(hidden_dropout_prob=probs[0], attention_probs_dropout_prob=probs[1])
        fast = FastBertModel.from_hf(make_hf(BertModel, config)).train()
        with torch.no_grad():
            a = fast(*ids_mask).last_hidden_state
            b = fast(*ids_mask).last_hidden_state
            torch.manual_seed(5)
            c = fast(*ids_mask).last_hidden_state
            torch.manual_seed(5)
            d = fast(*ids_mask).last_hidden_state
            evaluated = fast.eval()(*ids_mask).last_hidden_state
        assert (a - b)[mask.bool()].abs().max() > 1e-3, probs
        assert (a - evaluated)[mask.bool()].abs().max() > 1e-3, probs
        assert torch.equal(c, d), probs
        assert torch.count_nonzero(a[~mask.bool()]) == 0


# --- refusals ------------------------------------------------------------------------------------------------------


UNSUPPORTED = [
    (dict(position_embedding_type="relative_key"), r"position_embedding_type='relative_key'.*only absolute"),
    (dict(is_decoder=True), r"is_decoder=True.*decoders .*not supported"),
    (dict(hidden_act="relu"), r"hidden_act='relu' is not supported; supported: gelu, gelu_new, gelu_pytorch_tanh"),
]


@pytest.mark.parametrize("overrides,match", UNSUPPORTED, ids=["relative_key", "is_decoder", "relu"])
def test_unsupported_configs_are_refused(overrides, match, bert_config, make_hf, tmp_path):
    hf = make_hf(BertModel, bert_config(**overrides))
    with pytest.raises(UnsupportedModelError, match=match):
        FastBertModel.from_hf(hf)
    hf.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=match):
        FastBertModel.from_pretrained(tmp_path)


def test_non_bert_model_is_refused(tmp_path):
    torch.manual_seed(0)
    albert = AlbertModel(AlbertConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                      num_hidden_layers=1, embedding_size=32))
    with pytest.raises(UnsupportedModelError, match=r"'albert' is not supported; supported: BERT, RoBERTa, "
                                                    r"DistilBERT, ELECTRA, MPNet"):
        FastBertModel.from_hf(albert)
    albert.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'albert' is not supported; supported: BERT, RoBERTa, "
                                                    r"DistilBERT, ELECTRA, MPNet"):
        FastBertModel.from_pretrained(tmp_path)


def test_encoder_config_round_trip(bert_config, roberta_config, tmp_path):
    for hf_config, family in ((bert_config(), "bert"), (roberta_config(), "roberta")):
        cfg = EncoderConfig.from_hf(hf_config)
        assert cfg.family == family and cfg.hidden_size == 64 and cfg.pad_token_id == hf_config.pad_token_id
        assert cfg.max_position_embeddings == hf_config.max_position_embeddings
        path = tmp_path / f"{family}.json"
        path.write_text(json.dumps(cfg.to_dict()))
        assert EncoderConfig.from_json_file(path) == cfg


def test_modules_are_read_not_called(bert_config, make_hf, ragged_batch, adapted):
    """FastBertModel reads its submodules' weights into the fused kernels and never calls them: a hook on one is
    refused where it is registered, a wrapper put in place of one (a LoRA adapter) is refused by name at the next call,
    with or without autograd, and a plain Linear put in place is read. Hooks on the model itself run."""
    config = bert_config()
    model = FastBertModel.from_hf(make_hf(BertModel, config)).eval()
    ids, mask = ragged_batch(config, [6, 9])
    with pytest.raises(RuntimeError, match="layers.1.ffn_in is inside a fast encoder: a hook on it, but mtbert_fast's "
                                           "encoder reads its modules' weights without calling the modules"):
        model.layers[1].ffn_in.register_forward_hook(lambda module, args, out: out)
    with pytest.raises(RuntimeError, match="embeddings.LayerNorm is inside a fast encoder"):
        model.embeddings.LayerNorm.register_forward_pre_hook(lambda module, args: None)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    assert len(seen) == 1

    replacement = nn.Linear(config.hidden_size, config.hidden_size)
    model.layers[0].attn_out = replacement
    with torch.no_grad():
        replaced = model(ids, attention_mask=mask).last_hidden_state
        assert not torch.equal(replaced, ref)
        model.layers[0].attn_out = adapted(replacement)
        with pytest.raises(UnsupportedModelError, match=r"layers.0.attn_out is a .*_Adapted, where mtbert_fast's "
                                                        r"encoder reads the weights of a plain torch.nn module"):
            model(ids, attention_mask=mask)
    with pytest.raises(UnsupportedModelError, match=r"layers.0.attn_out is a .*_Adapted"):
        model(ids, attention_mask=mask)
    model.layers[0].attn_out = replacement
    with pytest.raises(RuntimeError, match="layers.0.attn_out is inside a fast encoder"):  # guarded once read
        with torch.no_grad():
            model(ids, attention_mask=mask)
            replacement.register_forward_hook(lambda module, args, out: out)


@pytest.mark.parametrize("field, value", [
    ("num_attention_heads", 0), ("hidden_size", "32"), ("hidden_size", 0), ("num_hidden_layers", -1),
    ("num_hidden_layers", 2.0), ("intermediate_size", None), ("vocab_size", True), ("max_position_embeddings", -1),
    ("type_vocab_size", -2), ("hidden_dropout_prob", 1.5), ("attention_probs_dropout_prob", "0.1"),
    ("layer_norm_eps", -1e-12), ("layer_norm_eps", float("nan")), ("layer_norm_eps", "1e-12"),
])
def test_config_sizes_and_rates_are_checked_by_name(field, value):
    """A config written by hand with a size that is no integer (or too small), a rate outside [0, 1] or an eps
    below 0 is refused at once, naming the field and the value, instead of failing inside a forward."""
    with pytest.raises(ValueError, match=rf"^{field} must be .*, got {re.escape(repr(value))}$"):
        EncoderConfig(**{**dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=50),
                         field: value})
