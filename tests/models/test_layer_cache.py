"""The float layers' weights kept between inference calls (LayerCache): gathered once while the layers are unchanged,
gathered again after any change a forward must see (an in-place update, a replaced parameter or submodule, a loaded
state dict, a write through .data followed by release_packs, new storage where the old one's data was; .to() and a
training step: test_weight_pack.py), never kept under autograd, and never carried into a copy or a pickle, for
FastBertModel and a swapped HF model."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from transformers import BertModel

from mtbert_fast import FastBertModel, swap
from mtbert_fast.models import encoder, weight_pack
from mtbert_fast.models.encoder import LayerCache

pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")


@pytest.fixture(autouse=True, params=["panels", "onednn"])
def one_call_route(request, monkeypatch):
    """Every inference input on one route, panel_linear's rows or oneDNN's, each with the layers in the one
    post_norm_layers call whose tensors the cache keeps."""
    if request.param == "onednn" and not weight_pack.AVAILABLE:
        pytest.skip("this PyTorch has no oneDNN linear")
    rows = 1 << 30 if request.param == "panels" else 0
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: rows)
    weight_pack.release_packs()
    yield
    weight_pack.release_packs()


def _counting(model: FastBertModel):
    calls = []

    def gather():
        calls.append(1)
        return [layer.weights() for layer in model.layers]

    return gather, calls


def test_gathers_once_while_the_layers_are_unchanged(bert_config, make_hf):
    fast = FastBertModel.from_hf(make_hf(BertModel, bert_config()))
    cache = LayerCache()
    gather, calls = _counting(fast)
    with torch.no_grad():
        layers, stacks = cache.current(fast.layers, gather)
        again, stacks_again = cache.current(fast.layers, gather)
    assert len(calls) == 1 and again is layers and stacks_again is stacks and stacks == {}
    with torch.enable_grad():
        fresh, none = cache.current(fast.layers, gather)
    assert len(calls) == 2 and fresh is not layers and none is None
    with torch.no_grad():
        assert cache.current(fast.layers, gather)[0] is layers  # the grad-mode call kept nothing
        assert cache.current(fast.layers[:1], gather)[0] is not layers  # another module tree
    assert len(calls) == 3


def test_a_failed_gather_leaves_nothing_to_reuse(bert_config, make_hf):
    fast = FastBertModel.from_hf(make_hf(BertModel, bert_config()))
    cache = LayerCache()

    def broken():
        raise RuntimeError("missing weight")

    with torch.no_grad():
        cache.current(fast.layers, lambda: [layer.weights() for layer in fast.layers])
        fast.layers[0].ffn_in.weight.add_(1.0)
        with pytest.raises(RuntimeError, match="missing weight"):
            cache.current(fast.layers, broken)
        with pytest.raises(RuntimeError, match="missing weight"):
            cache.current(fast.layers, broken)


def _replace_bias(model):
    old = model.layers[0].ffn_out.bias  # not a constant shift: the LayerNorm after it would take that away
    model.layers[0].ffn_out.bias = nn.Parameter(old.detach() + torch.linspace(-1.0, 1.0, old.numel()))


def _replace_module(model):
    old = model.layers[1].attn_out
    new = nn.Linear(old.in_features, old.out_features)
    new.weight.data.copy_(old.weight.data * 1.5)
    new.bias.data.copy_(old.bias.data)
    model.layers[1].attn_out = new


def _load_state_dict(model):
    state = {k: v * 1.1 if k.endswith("qkv.weight") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)


def _write_through_data(model):
    model.layers[0].qkv.weight.data.mul_(1.5)
    weight_pack.release_packs()


_KEPT = []  # what a test's storage must outlive


def _new_storage_at_the_old_address(model):
    """What .half() then .float() can do between two calls: the weight gets new storage whose data the allocator put
    where the old storage's was (same data_ptr, same version counter) and other values. Made here for certain, with a
    second storage over the old memory, the old tensor kept so that the memory stays valid."""
    weight = model.layers[0].ffn_in.weight
    old = weight.data
    _KEPT.append(old)
    alias = torch._C._construct_storage_from_data_pointer(old.data_ptr(), old.device, old.untyped_storage().nbytes())
    weight.data = torch.empty(0, dtype=old.dtype).set_(alias, 0, old.shape, old.stride())
    weight.data.mul_(1.5)


CHANGES = {
    "in place": lambda m: m.layers[0].ffn_in.weight.mul_(1.5),
    "new storage at the old address": _new_storage_at_the_old_address,
    "replaced parameter": _replace_bias,
    "replaced submodule": _replace_module,
    "load_state_dict": _load_state_dict,
    ".data and release_packs": _write_through_data,
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_fast_model_sees_every_change(change, bert_config, make_hf, ragged_batch, assert_tokens_close):
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config)).eval()
    ids, mask = ragged_batch(config, [9, 17, 4])
    with torch.no_grad():
        before = fast(ids, mask).last_hidden_state
        fast(ids, mask)  # a second call from the cache
        change(fast)
        after = fast(ids, mask).last_hidden_state
        fresh = copy.deepcopy(fast)(ids, mask).last_hidden_state
    assert (after - before)[mask.bool()].abs().max() > 1e-3
    assert_tokens_close(after, fresh, mask, atol=0.0)


def test_copies_and_pickles_start_empty(bert_config, make_hf, ragged_batch, assert_tokens_close):
    """A copy gets no packs or watch of the original's: a pickle stays the weights' size, and editing the copy leaves
    the original's outputs as they were."""
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config)).eval()
    ids, mask = ragged_batch(config, [9, 17, 4])

    def pickled_size(model):
        buf = io.BytesIO()
        torch.save(model, buf)
        return buf.tell()

    cold = pickled_size(fast)
    with torch.no_grad():
        before = fast(ids, mask).last_hidden_state
        assert fast._layer_cache.state[3]  # the layers ran in one call from the cache
        assert pickled_size(fast) == cold
        twin = copy.deepcopy(fast)
        assert twin._layer_cache.state is None
        twin.layers[0].ffn_in.weight.mul_(2.0)
        assert (twin(ids, mask).last_hidden_state - before)[mask.bool()].abs().max() > 1e-3
        assert_tokens_close(fast(ids, mask).last_hidden_state, before, mask, atol=0.0)


def _shifted(bias: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(bias.detach() + torch.linspace(-1.0, 1.0, bias.numel()))


SWAPPED_CHANGES = {
    "fused query/key/value in place": lambda hf: hf.encoder.layer[0].attention.self.value.weight.mul_(1.5),
    "replaced parameter": lambda hf: setattr(hf.encoder.layer[1].output.dense, "bias",
                                             _shifted(hf.encoder.layer[1].output.dense.bias)),
    "replaced submodule": lambda hf: setattr(hf.encoder.layer[0].intermediate, "dense",
                                             copy.deepcopy(hf.encoder.layer[1].intermediate.dense)),
}


@pytest.mark.parametrize("change", SWAPPED_CHANGES.values(), ids=SWAPPED_CHANGES.keys())
def test_swapped_model_sees_every_change(change, bert_config, make_hf, ragged_batch, assert_tokens_close):
    config = bert_config()
    model = make_hf(BertModel, config)
    reference = copy.deepcopy(model)
    swap(model)
    ids, mask = ragged_batch(config, [9, 17, 4])
    with torch.no_grad():
        before = model(ids, attention_mask=mask).last_hidden_state
        model(ids, attention_mask=mask)
        for m in (model, reference):
            change(m)
        after = model(ids, attention_mask=mask).last_hidden_state
        expected = reference(ids, attention_mask=mask).last_hidden_state
    assert (after - before)[mask.bool()].abs().max() > 1e-3
    assert_tokens_close(after, expected, mask)


def test_a_write_during_the_gather_is_seen_next_call(bert_config, make_hf, ragged_batch, assert_tokens_close):
    """The watch is taken before the layers are gathered: a write that lands while they are gathered (another
    thread's update, here after a swapped model concatenated its query, key and value) is seen at the next call, not
    taken for the state the layers were gathered from."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    model = swap(copy.deepcopy(hf))
    state = model._mtbert_fast_swap
    ids, mask = ragged_batch(config, [9, 4])
    gather = state.layer_weights

    def racing(base):
        layers = gather(base)
        with torch.no_grad():
            for m in (model, hf):  # after the layers were read, before the watch would have been taken
                m.encoder.layer[1].attention.self.query.weight.add_(0.05)
        return layers

    with torch.inference_mode():
        model(ids, attention_mask=mask)
        model.encoder.layer[0].output.dense.bias.add_(0.0)  # a write: the next call gathers again
        state.layer_weights = racing
        model(ids, attention_mask=mask)
        state.layer_weights = gather
        after = model(ids, attention_mask=mask).last_hidden_state
        want = hf(ids, attention_mask=mask).last_hidden_state
    assert_tokens_close(after, want, mask)


def test_shared_memory_is_no_change(bert_config, make_hf, ragged_batch):
    """share_memory_() moves a weight's data, values and all (torch.multiprocessing does so to hand a model to a
    worker): an int8 model is not refused for it, and a float one keeps its layers."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    ids, mask = ragged_batch(config, [9, 4])
    for dtype in (None, torch.qint8):
        model = FastBertModel.from_hf(hf, dtype=dtype).eval()
        with torch.no_grad():
            before = model(ids, mask).last_hidden_state
            model.share_memory()
            assert torch.equal(model(ids, mask).last_hidden_state, before)

