"""The cache of packed linear weights (oneDNN's blocked layout, the column panels of panel_linear, which the
encoder runs for inputs of few rows, and MKL's packs of float32 weights): a pack is made once and reused, gives the
same products as the plain weight, and is replaced whenever the weight changes (in place, by `.to()`, by assigning
`.data`), for FastBertModel and a swapped HF model on each route; gradients and inference tensors never go through a
pack."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

from mtbert_fast import FastBertModel, swap
from mtbert_fast.models import encoder, weight_pack
from mtbert_fast.models.hf_mapping import fast_state_dict_from_hf
from mtbert_fast.models.weight_pack import onednn_dtype, onednn_weight, pack_count, panel_weight, release_packs
from mtbert_fast.ops import mkl_linear, reference
from mtbert_fast.ops.mkl_linear import available as mkl_available

# the module (mtbert_fast.ops.mkl_linear is the wrapper function)
mkl_linear_module = importlib.import_module("mtbert_fast.ops.mkl_linear")

pytestmark = [
    pytest.mark.usefixtures("one_thread_unless_marked"),
    pytest.mark.skipif(not weight_pack.AVAILABLE, reason="this PyTorch build has no oneDNN weight packing"),
]
DTYPES = [torch.float32, torch.bfloat16]


def _linear(x, w, bias=None):
    """oneDNN's linear in the dtype it multiplies x's dtype in here (bf16 widened to float32 where it has no bf16
    product), on a pack or a plain weight."""
    dtype = onednn_dtype(x.dtype)
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), w if w.is_mkldnn else w.to(dtype), bias, "none", [], "")


@pytest.fixture(autouse=True)
def no_packs():
    release_packs()
    yield
    release_packs()


def _set_route(route: str, monkeypatch) -> None:
    """The encoder's inference linears on oneDNN's linear, on panel_linear, or on MKL's packed sgemm, whatever the
    number of rows."""
    if route == "mkl" and not mkl_available():
        pytest.skip("this PyTorch has no MKL")
    rows = 1 << 30 if route == "panels" else 0
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: rows)
    monkeypatch.setattr(encoder, "mkl_rows", lambda dtype, *weight: 1 << 30 if route == "mkl" else 0)


@pytest.fixture(params=["onednn", "panels", "mkl"])
def route(request, monkeypatch):
    _set_route(request.param, monkeypatch)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_is_made_once_and_gives_the_plain_product(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g).to(dtype)
    x = torch.randn(37, 64, generator=g).to(dtype)
    packed = onednn_weight(w)
    assert packed is not w and packed.is_mkldnn and packed.dtype == onednn_dtype(dtype) and pack_count() == 1
    assert onednn_weight(w) is packed
    assert torch.equal(_linear(x, packed), _linear(x, w))


@pytest.mark.parametrize("flags,want", [
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, True),
    ({"avx2", "avx_ne_convert"}, True),
    # oneDNN takes bf16 on any AVX-512 CPU, but widens it itself at a fraction of its float32 rate
    ({"avx2", "avx512f", "avx512_vnni"}, False),
    ({"avx2", "fma"}, False),
    (set(), True),  # no x86 flags to read: torch's answer stands
])
def test_onednn_bf16_needs_bf16_instructions(flags, want, monkeypatch):
    monkeypatch.setattr(weight_pack, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert weight_pack._onednn_bf16() is (want and weight_pack.AVAILABLE)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert weight_pack._onednn_bf16() is False


@pytest.mark.parametrize("packable", [True, False])
@pytest.mark.parametrize("approximate", [None, "none", "tanh"])
def test_bf16_without_onednn_bf16_products_runs_float32_products(packable, approximate, monkeypatch):
    """Where oneDNN has no bf16 product at a bf16 rate (CPUs without AVX512-BF16, AMX or AVX-NE-CONVERT), a bf16
    weight packs as float32 (or, where it cannot be packed, is widened on each call), and the encoder's bf16 linears
    run float32 products rounded once to bf16."""
    monkeypatch.setattr(weight_pack, "ONEDNN_BF16", False)
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: 0)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(not packable):
        w = torch.randn(96, 64, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    x = torch.randn(37, 64, generator=g).bfloat16()
    assert onednn_weight(w).dtype == torch.float32 and onednn_weight(w).is_mkldnn == packable
    lin = encoder._Linear(True, None)
    got = lin(x, w, b) if approximate is None else lin.gelu(x, w, b, approximate)
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    if approximate is not None:
        want = torch.nn.functional.gelu(want, approximate=approximate)
    assert got.dtype == torch.bfloat16
    # one rounding to bf16 (half a unit in its 8-bit significand) of float32 sums of exact products
    torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-6)
    assert pack_count() == (1 if packable else 0)


@pytest.mark.parametrize("change", ["in_place", "assign_data", "to_dtype"])
def test_changed_weight_is_packed_again(change):
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 96)
    x = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        onednn_weight(layer.weight)
        if change == "in_place":
            layer.weight.mul_(2.0)
        elif change == "assign_data":
            layer.weight.data = torch.randn(96, 64, generator=g)
        else:
            layer.to(torch.bfloat16)
            x = x.bfloat16()
        assert torch.equal(_linear(x, onednn_weight(layer.weight)), _linear(x, layer.weight))


def test_view_is_packed_again_when_its_base_changes():
    """A view shares its base's version counter (as query, key and value share one fused buffer in a swap)."""
    base = torch.randn(192, 64)
    w = base[96:]
    x = torch.randn(5, 64)
    onednn_weight(w)
    base.add_(1.0)
    assert torch.equal(_linear(x, onednn_weight(w)), _linear(x, w))


def test_writes_through_data_need_release_packs():
    """`.data` bypasses the version counter, as it bypasses autograd: release_packs() makes such writes seen."""
    w = torch.randn(32, 16)
    x = torch.randn(3, 16)
    stale = onednn_weight(w)
    w.data.mul_(2.0)
    assert onednn_weight(w) is stale
    release_packs()
    assert torch.equal(_linear(x, onednn_weight(w)), _linear(x, w))


@pytest.mark.parametrize("kind", ["onednn", "panels"])
def test_a_pack_made_across_a_release_is_made_again(kind, monkeypatch):
    """A pack that read the weight before a write through .data and the release_packs() after it, stored once that
    release has run (another thread packing meanwhile: here the write lands inside the pack function), serves that
    call only; the next call packs the written values."""
    w = torch.randn(48, 32)
    x = torch.randn(5, 32)
    get, make = (onednn_weight, "pack_onednn") if kind == "onednn" else (panel_weight, "pack_panels")
    real = getattr(weight_pack, make)

    def pack_then_write(weight):
        packed = real(weight)
        w.data.mul_(2.0)
        release_packs()
        return packed

    monkeypatch.setattr(weight_pack, make, pack_then_write)
    stale = get(w)
    monkeypatch.setattr(weight_pack, make, real)
    fresh = get(w)
    assert fresh is not stale
    if kind == "onednn":
        assert torch.equal(_linear(x, fresh), _linear(x, w))
    else:
        from mtbert_fast.ops import panel_linear
        torch.testing.assert_close(panel_linear(x, fresh, None, w.shape[0]), x @ w.T, atol=1e-5, rtol=1e-5)


def test_inference_tensors_and_grad_weights_are_not_packed():
    with torch.inference_mode():
        frozen = torch.randn(32, 16)
    assert onednn_weight(frozen) is frozen
    trained = torch.nn.Parameter(torch.randn(32, 16))
    assert onednn_weight(trained) is trained
    with torch.no_grad():
        assert onednn_weight(trained) is not trained
    assert pack_count() == 1


def test_nothing_is_packed_while_torch_compile_traces(monkeypatch):
    """The pack cache is keyed on id(weight): traced, it would make torch.compile guard on every weight and recompile
    past its limit, so a traced call takes the weight as it is."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    w = torch.randn(32, 16)
    with torch.no_grad():
        assert onednn_weight(w) is w and panel_weight(w) is None
    assert pack_count("onednn") == pack_count("panels") == 0


def test_a_weight_is_settled_once_unchanged_since_the_call_before():
    w = torch.randn(32, 16)
    assert not weight_pack.settled(w) and weight_pack.settled(w) and weight_pack.settled(w)
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step between calls
    assert not weight_pack.settled(w) and weight_pack.settled(w)
    w.data = torch.randn(32, 16)
    assert not weight_pack.settled(w) and weight_pack.settled(w)
    release_packs()
    assert not weight_pack.settled(w) and weight_pack.settled(w)
    assert not weight_pack.settled(w[:8]) and not weight_pack.settled(torch.randn(32, 16))
    with torch.inference_mode():
        frozen = torch.randn(32, 16)
    assert not weight_pack.settled(frozen) and not weight_pack.settled(frozen)


def test_pack_is_freed_with_its_weight():
    w = torch.randn(32, 16)
    onednn_weight(w)
    assert pack_count() == 1
    del w
    assert pack_count() == 0


def _batch(ragged_batch, config):
    return ragged_batch(config, [9, 17, 4])


def test_panels_are_made_once_and_repacked_when_the_weight_changes():
    w = torch.randn(40, 24)
    panels = panel_weight(w)
    assert panel_weight(w) is panels and pack_count("panels") == 1 and pack_count() == 0
    assert torch.equal(reference.unpack_panels(panels, 40), w)
    w.mul_(2.0)
    assert torch.equal(reference.unpack_panels(panel_weight(w), 40), w)
    with torch.inference_mode():
        frozen = torch.randn(32, 16)
    assert panel_weight(frozen) is None
    del w
    assert pack_count("panels") == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_fast_model_outputs_equal_unpacked(dtype, bert_config, make_hf, ragged_batch, monkeypatch):
    _set_route("onednn", monkeypatch)
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config), dtype=dtype)
    ids, mask = _batch(ragged_batch, config)
    with torch.no_grad():
        packed = fast(ids, mask)
        assert fast.pooler is not None and pack_count() == 4 * config.num_hidden_layers + 1  # and the pooler's
        monkeypatch.setattr(weight_pack, "AVAILABLE", False)
        plain = fast(ids, mask)
    assert torch.equal(packed.last_hidden_state, plain.last_hidden_state)
    assert torch.equal(packed.pooler_output, plain.pooler_output)


@pytest.mark.parametrize("route", ["panels", "mkl"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_route_matches_the_onednn_route(route, dtype, bert_config, make_hf, ragged_batch, monkeypatch):
    """On panel_linear's panels or MKL's packed sgemm: one pack of that kind per weight (the pooler's too) and no
    oneDNN pack, the oneDNN route's outputs up to rounding, and the same outputs on a second call."""
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config), dtype=dtype)
    ids, mask = _batch(ragged_batch, config)
    with torch.no_grad():
        _set_route(route, monkeypatch)
        out = fast(ids, mask)
        assert pack_count(route) == 4 * config.num_hidden_layers + 1 and pack_count() == 0
        assert torch.equal(fast(ids, mask).last_hidden_state, out.last_hidden_state)
        _set_route("onednn", monkeypatch)
        onednn = fast(ids, mask)
    real = mask.bool()
    # the same products summed in another order: fp32 rounding, or in bf16 an output rounding that may differ (rounded
    # once from float32 products, or on oneDNN's bf16 product where the CPU has one)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(out.last_hidden_state[real].float(), onednn.last_hidden_state[real].float(), **tol)
    torch.testing.assert_close(out.pooler_output.float(), onednn.pooler_output.float(), **tol)


def test_mkl_packs_are_made_again_under_another_thread_count(bert_config, make_hf, ragged_batch, monkeypatch):
    """MKL plans a pack's work for the thread count it is made under: a weight's pack, and the encoder's layer stack
    that holds the packs, are made anew when torch's thread count changes (one pack per weight all along), with the
    same outputs."""
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config))
    ids, mask = _batch(ragged_batch, config)
    _set_route("mkl", monkeypatch)
    stack_kernel = encoder.post_norm_layers_op.kernel("cpu")
    seen = []

    def spy(x, *args):
        seen.append(args[8])
        return stack_kernel(x, *args)

    monkeypatch.setitem(encoder.post_norm_layers_op._kernels, ("cpu", "forward"), spy)
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = fast(ids, mask).last_hidden_state
            torch.set_num_threads(2)
            two = fast(ids, mask).last_hidden_state
            again = fast(ids, mask).last_hidden_state
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 3 and seen[1] is seen[2]
    assert not {id(p) for p in seen[0]} & {id(p) for p in seen[1]}
    assert pack_count("mkl") == 4 * config.num_hidden_layers + 1
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    assert torch.equal(two, again)


def test_mkl_packs_are_made_once_and_repacked_when_the_weight_changes():
    if not mkl_available():
        pytest.skip("this PyTorch has no MKL")
    w = torch.randn(40, 24)
    pack = weight_pack.mkl_weight(w)
    assert weight_pack.mkl_weight(w) is pack and pack_count("mkl") == 1
    assert weight_pack.mkl_weight(w.half()) is None
    x = torch.randn(300, 24)
    with torch.no_grad():
        w.mul_(2)
    again = weight_pack.mkl_weight(w)
    assert again is not pack
    torch.testing.assert_close(mkl_linear(x, again, w), x @ w.t(), atol=1e-5, rtol=1e-5)


OPTIMIZERS = {"sgd": lambda p: torch.optim.SGD(p, lr=1.0),
              "adamw foreach": lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
              "adamw fused": lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True)}


@pytest.mark.parametrize("optimizer", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
@pytest.mark.parametrize("kind", ["fast", "swapped"])
def test_eval_sees_a_training_step(kind, optimizer, route, bert_config, make_hf, ragged_batch, assert_tokens_close):
    """Eval after an optimizer step computes with the stepped weights, not the packs of the eval before it; a fused
    step too, which writes the weights without moving their version counters (a step hook moves them)."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    fast = FastBertModel.from_hf(hf) if kind == "fast" else swap(hf)
    ids, mask = _batch(ragged_batch, config)
    with torch.no_grad():
        before = fast(ids, mask).last_hidden_state
    opt = optimizer(fast.parameters())
    fast.train()
    fast(ids, mask).last_hidden_state.square().mean().backward()
    opt.step()
    fast.eval()
    with torch.no_grad():
        after = fast(ids, mask).last_hidden_state
        fresh = copy.deepcopy(fast)(ids, mask).last_hidden_state
    assert (after - before)[mask.bool()].abs().max() > 1e-3
    assert_tokens_close(after, fresh, mask, atol=0.0)


def _model(kind, hf):
    return FastBertModel.from_hf(hf) if kind == "fast" else swap(copy.deepcopy(hf))


@pytest.mark.parametrize("kind", ["fast", "swapped"])
def test_eval_with_autograd_runs_on_packs_made_once(kind, route, bert_config, make_hf, ragged_batch,
                                                     assert_tokens_close, assert_grad_close):
    """A model in eval mode called with autograd on (no torch.no_grad) runs its products on packs once its weights
    are the same as at the call before, and keeps them for the next calls (the swapped model's query/key/value
    concatenation too), with HF's outputs and gradients; in training mode nothing is packed or kept (every
    optimizer step would make them anew)."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    model = _model(kind, hf)
    ids, mask = _batch(ragged_batch, config)
    model(ids, mask)
    assert pack_count(route) == 0
    first = model(ids, mask).last_hidden_state
    packs = pack_count(route)
    assert packs == 4 * config.num_hidden_layers + 1  # and the pooler's
    fusion = None if kind == "fast" else model._mtbert_fast_swap.qkv[0]
    kept = None if fusion is None else fusion.kept[1]
    out = model(ids, mask)
    assert pack_count(route) == packs and (fusion is None or fusion.kept[1] is kept)
    want = hf(ids, attention_mask=mask)
    assert_tokens_close(out.last_hidden_state.detach(), want.last_hidden_state.detach(), mask)
    assert torch.equal(first, out.last_hidden_state)
    g = torch.Generator().manual_seed(1)
    w_tokens = torch.randn(*ids.shape, config.hidden_size, generator=g) * mask[..., None]

    def loss(o):
        return (o.last_hidden_state * w_tokens).sum() / mask.sum() + o.pooler_output.square().mean()

    loss(out).backward()
    loss(want).backward()
    hf_grads = {name: p.grad for name, p in hf.named_parameters()}
    if kind == "fast":
        expected = fast_state_dict_from_hf(hf_grads, model.config, has_pooler=True)
    else:
        expected = hf_grads
    got = dict(model.named_parameters())
    assert set(got) == set(expected)
    for name, grad in expected.items():
        assert_grad_close(got[name].grad, grad, what=name)

    release_packs()
    model.train()(ids, mask).last_hidden_state.square().mean().backward()
    assert pack_count(route) == 0 and (fusion is None or model._mtbert_fast_swap.qkv[0].kept is None)


@pytest.mark.parametrize("kind", ["fast", "swapped"])
def test_eval_mode_steps_match_hf(kind, route, bert_config, make_hf, ragged_batch, assert_tokens_close):
    """Optimizer steps taken in eval mode (fine-tuning without dropout) follow HF's step for step, and pack nothing
    while the weights change at every step; calls after the steps run on packs of the weights the last step left."""
    config = bert_config()
    hf = make_hf(BertModel, config)
    model = _model(kind, hf)
    ids, mask = _batch(ragged_batch, config)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (hf, model)]
    for _ in range(3):
        outs = []
        for m, opt in zip((hf, model), opts):
            opt.zero_grad()
            out = m(ids, attention_mask=mask)
            ((out.last_hidden_state * mask[..., None]).square().mean() + out.pooler_output.square().mean()).backward()
            opt.step()
            outs.append(out.last_hidden_state.detach())
        assert_tokens_close(outs[1], outs[0], mask)
    assert pack_count(route) == 0
    want = hf(ids, attention_mask=mask).last_hidden_state
    for _ in range(2):
        assert_tokens_close(model(ids, attention_mask=mask).last_hidden_state.detach(), want.detach(), mask)
    assert pack_count(route) == 4 * config.num_hidden_layers + 1


def test_fast_model_sees_to_dtype(route, bert_config, make_hf, ragged_batch, assert_tokens_close):
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config))
    ids, mask = _batch(ragged_batch, config)
    with torch.no_grad():
        fast(ids, mask)
        out = fast.to(torch.bfloat16)(ids, mask).last_hidden_state
        fresh = copy.deepcopy(fast)(ids, mask).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert_tokens_close(out, fresh, mask, atol=0.0)


def test_swapped_model_sees_in_place_edits(route, bert_config, make_hf, ragged_batch, assert_close):
    """Every linear of a swapped layer: the fused query/key/value buffer and the three plain parameters."""
    config = bert_config()
    model = make_hf(BertForSequenceClassification, config)
    reference = copy.deepcopy(model)
    swap(model)
    ids, mask = _batch(ragged_batch, config)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        for m in (model, reference):
            layer = m.bert.encoder.layer[0]
            for linear in (layer.attention.self.key, layer.attention.output.dense, layer.intermediate.dense,
                           layer.output.dense):
                linear.weight.mul_(1.5)
        assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


@pytest.mark.parametrize("route", ["panels", "onednn", "mkl"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["bert", "distilbert", "mpnet"])
def test_inference_runs_the_layers_in_one_call(route, family, dtype, bert_config, distilbert_config, mpnet_config,
                                               make_hf, ragged_batch, monkeypatch):
    """On every route (panel_linear's few rows, or oneDNN's linear or MKL's packed sgemm for more), inference runs
    every layer in one post_norm_layers call (MPNet's relative position bias too) on the weights packed for that
    route, with the result of the layers run one by one, bit for bit; a forward that asks for every layer's output,
    or records gradients, runs them one by one."""
    from transformers import DistilBertModel, MPNetModel

    if route == "onednn" and weight_pack.onednn_dtype(dtype) != dtype:
        pytest.skip(f"oneDNN does not multiply {dtype} on this CPU: its layers widen each product's input")
    _set_route(route, monkeypatch)
    config = {"bert": bert_config, "distilbert": distilbert_config, "mpnet": mpnet_config}[family]()
    cls = {"bert": BertModel, "distilbert": DistilBertModel, "mpnet": MPNetModel}[family]
    fast = FastBertModel.from_hf(make_hf(cls, config), dtype=dtype).eval()
    ids, mask = ragged_batch(config, [7, 1, 12])
    stack_kernel = encoder.post_norm_layers_op.kernel("cpu")
    calls = []

    def spy(x, *args):
        weights, packs = args[2], args[8] if len(args) > 8 else []
        calls.append((len(weights), {w.is_mkldnn for w in weights[0::12] + weights[8::12]}, len(packs)))
        return stack_kernel(x, *args)

    monkeypatch.setitem(encoder.post_norm_layers_op._kernels, ("cpu", "forward"), spy)
    with torch.no_grad():
        stacked = fast(ids, mask)
        packs = 4 * config.num_hidden_layers if route == "mkl" else 0
        assert calls == [(12 * config.num_hidden_layers, {route == "onednn"}, packs)]
        by_layer = fast(ids, mask, output_hidden_states=True)
        assert len(calls) == 1
    assert torch.equal(stacked.last_hidden_state, by_layer.last_hidden_state)
    with torch.enable_grad():
        fast(ids, mask)
    assert len(calls) == 1


@pytest.mark.all_threads
@pytest.mark.parametrize("threads,tokens,on_mkl", [(2, 20, True), (2, 21, False), (1, 21, True)])
def test_float32_stack_and_layers_leave_mkl_past_the_narrow_weights_limit(threads, tokens, on_mkl, bert_config,
                                                                          make_hf, ragged_batch, monkeypatch):
    """mkl_linear's row limit is a weight's (narrow weights take fewer rows on more than one thread): the one
    post_norm_layers call runs on MKL's packs only where every product's limit reaches the input's rows, else every
    product on oneDNN's layout, and the layers run one by one take the same route, product by product, bit for bit."""
    if not mkl_available():
        pytest.skip("this PyTorch has no MKL")
    monkeypatch.setattr(mkl_linear_module, "route", lambda: True)
    monkeypatch.setattr(mkl_linear_module, "NARROW_ROWS", {torch.float32: 20})
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: 0)
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config)).eval()
    ids, mask = ragged_batch(config, [tokens - 9, 9])
    stack_kernel = encoder.post_norm_layers_op.kernel("cpu")
    calls = []

    def spy(x, *args):
        weights, packs = args[2], args[8] if len(args) > 8 else []
        calls.append(({w.is_mkldnn for w in weights[0::12] + weights[8::12]}, len(packs)))
        return stack_kernel(x, *args)

    monkeypatch.setitem(encoder.post_norm_layers_op._kernels, ("cpu", "forward"), spy)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            stacked = fast(ids, mask)
            assert calls == [({not on_mkl}, 4 * config.num_hidden_layers if on_mkl else 0)]
            by_layer = fast(ids, mask, output_hidden_states=True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(stacked.last_hidden_state, by_layer.last_hidden_state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_narrow_weights_take_panels_beside_onednn(dtype, bert_config, make_hf, ragged_batch, monkeypatch):
    """Where narrow weights keep panel_linear for more rows than the others (bf16 on AMX tiles), the one
    post_norm_layers call takes those weights as panels and the others in oneDNN's layout, and gives the layers run
    one by one, each product on the same route, bit for bit."""
    if weight_pack.onednn_dtype(dtype) != dtype:
        pytest.skip(f"oneDNN does not multiply {dtype} on this CPU: its layers widen each product's input")
    config = bert_config()
    narrow = config.hidden_size  # the attention output and FFN output weights, not QKV's or the FFN input's
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, out_features=None, in_features=None, gelu=False: (
        1 << 30 if out_features is not None and out_features <= narrow else 0))
    monkeypatch.setattr(encoder, "mkl_rows", lambda dtype, *weight: 0)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), dtype=dtype).eval()
    ids, mask = ragged_batch(config, [7, 1, 12])
    stack_kernel = encoder.post_norm_layers_op.kernel("cpu")
    panel_kernel = encoder.panel_linear_op.kernel("cpu")
    calls, panel_calls = [], []

    def spy(x, *args):
        weights = args[2]
        calls.append([{w.is_mkldnn for w in weights[i::12]} for i in (0, 2, 6, 8)])
        return stack_kernel(x, *args)

    def panel_spy(x, panels, bias, out_features, *args):
        panel_calls.append(out_features)
        return panel_kernel(x, panels, bias, out_features, *args)

    monkeypatch.setitem(encoder.post_norm_layers_op._kernels, ("cpu", "forward"), spy)
    monkeypatch.setitem(encoder.panel_linear_op._kernels, ("cpu", "forward"), panel_spy)
    with torch.no_grad():
        stacked = fast(ids, mask)
        assert calls == [[{True}, {False}, {True}, {False}]]
        assert panel_calls == [narrow]  # the pooler's dense, [H, H]
        by_layer = fast(ids, mask, output_hidden_states=True)
        assert len(calls) == 1
    assert panel_calls == [narrow] * (2 * config.num_hidden_layers + 2)
    assert torch.equal(stacked.last_hidden_state, by_layer.last_hidden_state)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stack_follows_each_products_row_limit(dtype, bert_config, make_hf, ragged_batch, monkeypatch):
    """Where products keep panel_linear for rows by their own limits (bf16 on AMX tiles: the FFN input's GELU
    product for more rows than the others), the one post_norm_layers call takes as panels exactly the weights whose
    limit reaches the input's rows, the others in oneDNN's layout, keyed by that limit: an input past the FFN input's
    limit after one within it gets a stack of oneDNN layouts only, not the one kept from before. Each gives the layers
    run one by one bit for bit."""
    if weight_pack.onednn_dtype(dtype) != dtype:
        pytest.skip(f"oneDNN does not multiply {dtype} on this CPU: its layers widen each product's input")
    config = bert_config()
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, out_features=None, in_features=None, gelu=False: (
        30 if gelu else 8 if out_features is not None and out_features == config.hidden_size else 0))
    monkeypatch.setattr(encoder, "mkl_rows", lambda dtype, *weight: 0)
    fast = FastBertModel.from_hf(make_hf(BertModel, config), dtype=dtype).eval()
    stack_kernel = encoder.post_norm_layers_op.kernel("cpu")
    calls = []

    def spy(x, *args):
        weights = args[2]
        calls.append([{w.is_mkldnn for w in weights[i::12]} for i in (0, 2, 6, 8)])
        return stack_kernel(x, *args)

    monkeypatch.setitem(encoder.post_norm_layers_op._kernels, ("cpu", "forward"), spy)
    with torch.no_grad():
        for lengths, want in (([7, 1, 12], [{True}, {True}, {False}, {True}]),  # 20 tokens: the FFN input's only
                              ([20, 13], [{True}, {True}, {True}, {True}]),  # 33: past every limit
                              ([3, 4], [{True}, {False}, {False}, {False}])):  # 7: all but QKV's
            ids, mask = ragged_batch(config, lengths)
            stacked = fast(ids, mask)
            assert calls.pop() == want
            by_layer = fast(ids, mask, output_hidden_states=True)
            assert not calls
            assert torch.equal(stacked.last_hidden_state, by_layer.last_hidden_state)


@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_layers_in_one_call_defer_to_a_forced_backend(backend, bert_config, make_hf, monkeypatch):
    """Asked for a backend other than cpu (a GPU's, or the reference), the encoder does not take the CPU-only
    post_norm_layers call, whose dispatch would refuse that backend: the layers run one by one on the backend asked
    for, or fail there with its own reason."""
    monkeypatch.setattr(encoder, "panel_rows", lambda dtype, *weight: 1 << 30)
    config = bert_config()
    fast = FastBertModel.from_hf(make_hf(BertModel, config))
    layers = [layer.weights() for layer in fast.layers]
    x = torch.randn(5, config.hidden_size)
    on_meta = torch.empty(5, config.hidden_size, device="meta")

    def stack(t, asked):
        return encoder._post_norm_stack(fast.config, layers, t, encoder.PackedBatch.dense(1, 5, x.device), asked)

    with torch.no_grad():
        assert stack(x, backend) is None
        assert stack(x, "cpu") is not None
        assert stack(on_meta, None) is None
