"""Error-compensated rounding of int8 weights (GPTQ) and the calibration passes that collect its X^T X."""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import FastBertModel
from mtbert_fast.models import encoder, int8
from mtbert_fast.models.int8 import gptq_round, gram_passes
from mtbert_fast.ops.int8 import pairs_safe


def _nearest(w, scale):
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)


def _weight_and_inputs(n=48, k=64, rows=2000, seed=0):
    """A weight and correlated inputs (a few strong directions plus noise, as activations have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, generator=g) @ torch.randn(8, k, generator=g) + 0.1 * torch.randn(rows, k, generator=g)
    w = 0.05 * torch.randn(n, k, generator=g)
    return w, w.abs().amax(1) / 127, x


def test_uncorrelated_inputs_round_to_nearest():
    """With X^T X diagonal no column's error has anywhere to go: every entry is rounded to nearest."""
    w, scale, _ = _weight_and_inputs()
    gram = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) + 0.5)
    assert torch.equal(gptq_round(w, scale, gram), _nearest(w, scale))


def test_the_products_move_less_than_rounded_to_nearest():
    w, scale, x = _weight_and_inputs()
    q = gptq_round(w, scale, x.T @ x)
    assert q.dtype == torch.int8 and q.shape == w.shape and q.is_contiguous()
    assert q.abs().max() <= 127

    def error(q):
        return (x @ (q.float() * scale[:, None] - w).T).norm()

    assert error(q) < 0.7 * error(_nearest(w, scale)), (error(q), error(_nearest(w, scale)))
    # each entry stays within a step of the weight it was rounded from (the compensation moves later columns by
    # less than a step on these inputs)
    assert ((q.float() - w / scale[:, None]).abs() <= 1.5).all()


def test_columns_no_input_reached_round_to_nearest():
    w, scale, x = _weight_and_inputs()
    x[:, [0, 5]] = 0
    got = gptq_round(w, scale, x.T @ x)
    assert torch.equal(got[:, [0, 5]], _nearest(w, scale)[:, [0, 5]])

    def error(q):
        return (x @ (q.float() * scale[:, None] - w).T).norm()

    assert error(got) < 0.7 * error(_nearest(w, scale))
    x[:] = 0
    assert torch.equal(gptq_round(w, scale, x.T @ x), _nearest(w, scale))


def test_bad_shapes_are_named():
    w, scale, x = _weight_and_inputs()
    with pytest.raises(ValueError, match=r"gram must be \[64, 64\]"):
        gptq_round(w, scale, torch.eye(63))
    with pytest.raises(ValueError, match=r"scale must be \[48\]"):
        gptq_round(w, scale[:-1], x.T @ x)


class _Layer:
    """The four weights' shapes, as gram_passes reads them from LayerWeights."""

    def __init__(self, hidden, inner):
        self.qkv_weight = torch.empty(3 * hidden, hidden)
        self.attn_out_weight = self.ffn_in_weight = torch.empty(inner, hidden)
        self.ffn_out_weight = torch.empty(hidden, inner)


def test_layers_are_calibrated_in_groups_that_fit_the_budget():
    layers = [_Layer(8, 16)] * 5
    per_layer = 4 * (3 * 8 * 8 + 16 * 16)
    assert gram_passes(layers, budget=2 * per_layer) == [[0, 1], [2, 3], [4]]
    assert gram_passes(layers, budget=10 * per_layer) == [[0, 1, 2, 3, 4]]
    assert gram_passes(layers, budget=per_layer - 1) == [[0], [1], [2], [3], [4]]


def test_several_passes_quantize_as_one(monkeypatch, minilm_batch):
    """A budget of one layer's matrices calibrates layer by layer, and gives the same int8 weights as one pass."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    hf = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                              intermediate_size=48, max_position_embeddings=128)).eval()
    calibration = {"input_ids": minilm_batch["input_ids"] % 50, "attention_mask": minilm_batch["attention_mask"]}
    one = FastBertModel.from_hf(hf, dtype=torch.qint8, calibration=calibration).int8.layers
    passes = []
    monkeypatch.setattr(int8, "GRAM_BUDGET_BYTES", 1)
    monkeypatch.setattr(encoder, "gram_passes", lambda layers: passes.append(gram_passes(layers)) or passes[-1])
    several = FastBertModel.from_hf(hf, dtype=torch.qint8, calibration=calibration).int8.layers
    assert passes == [[[0], [1], [2]]]
    for a, b in zip(one, several):
        for p in int8.PRODUCTS:
            assert torch.equal(getattr(a, p).weight, getattr(b, p).weight)
            assert torch.equal(getattr(a, p).smooth, getattr(b, p).smooth)


def _product(lin, x):
    """The int8 product of quantize_linear's result on float rows x, with its outlier channels' fp32 part."""
    from mtbert_fast import ops

    q, scale, zero = ops.quantize_rows(x, lin.smooth)
    product = lin.sums(q, scale, zero)
    return ops.int8_linear(*product.args, outliers=lin.outliers(x), panels=product.panels)


def test_outlier_channels_run_in_fp32(monkeypatch):
    """The inputs whose smoothed range stands out (OUTLIER_RATIO times the median's, at most OUTLIER_CHANNELS of them)
    leave the int8 product (smooth 0, weight column 0) and come back in fp32 from the float weight; on rows where two
    channels are 50x and 20x the rest, the product's error falls far below what it is with every channel in int8."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    x[:, 7] *= 50
    x[:, 20] *= 20
    w, bias = 0.1 * torch.randn(24, 32, generator=g), torch.randn(24, generator=g)
    absmax = x.abs().amax(0)
    lin = int8.quantize_linear(w, bias, absmax)
    assert lin.outlier_index.tolist() == [7, 20]
    assert (lin.smooth[lin.outlier_index] == 0).all() and (lin.weight[:, lin.outlier_index] == 0).all()
    assert torch.equal(lin.outlier_weight, w[:, lin.outlier_index].t())
    want = x @ w.T + bias
    with_outliers = (_product(lin, x) - want).norm() / want.norm()
    monkeypatch.setattr(int8, "OUTLIER_CHANNELS", 0)
    plain = int8.quantize_linear(w, bias, absmax)
    assert plain.outlier_index.numel() == 0 and plain.outliers(x) is None
    without = (_product(plain, x) - want).norm() / want.norm()
    assert with_outliers < 0.5 * without, (with_outliers, without)
    monkeypatch.setattr(int8, "OUTLIER_CHANNELS", 1)
    assert int8.quantize_linear(w, bias, absmax).outlier_index.tolist() == [7]
    monkeypatch.setattr(int8, "OUTLIER_CHANNELS", 4)
    x[:, 7] /= 50
    x[:, 20] /= 20
    assert int8.quantize_linear(w, bias, x.abs().amax(0)).outlier_index.numel() == 0


def _paired_weight(n=48, k=65, seed=0):
    """A weight whose neighbouring columns (2i, 2i + 1) are often both large and of one sign."""
    g = torch.Generator().manual_seed(seed)
    w = 0.05 * torch.randn(n, k, generator=g)
    pairs = k // 2
    w[:, 1:2 * pairs:2] = w[:, 0:2 * pairs:2] * (0.5 + torch.rand(n, pairs, generator=g))
    return w


@pytest.mark.parametrize("gptq", [False, True], ids=["nearest", "gptq"])
def test_pair_limited_weights_are_pairs_safe(gptq):
    """With `pairs` (CPUs whose int8 product adds neighbouring columns in int16), the scale leaves room for each
    row's largest pair of one sign, and nearest rounding and GPTQ (which clamps each odd column against its even
    neighbour, then compensates for it) both give pairs_safe weights that still round the weight closely; without
    it the same weight's pairs pass the limit."""
    w = _paired_weight()
    _, _, x = _weight_and_inputs(k=w.shape[1])
    scale = int8.weight_scale(w, pairs=True)
    assert torch.equal(int8.weight_scale(w), w.abs().amax(1) / 127)
    assert (scale >= w.abs().amax(1) / 127).all() and (scale <= 2 * w.abs().amax(1) / 127).all()
    q = gptq_round(w, scale, x.T @ x, pairs=True) if gptq else int8.round_to_nearest(w, scale, pairs=True)
    assert q.dtype == torch.int8 and pairs_safe(q)
    if not gptq:
        assert torch.equal(q, _nearest(w, scale))  # the clamp has nothing to do after weight_scale
    assert (q.float() * scale[:, None] - w).abs().max() <= 2 * scale.max()
    plain = w.abs().amax(1) / 127
    assert not pairs_safe(gptq_round(w, plain, x.T @ x) if gptq else _nearest(w, plain))


def test_clamp_pair_keeps_each_pair_within_the_limit():
    even = torch.tensor([127.0, -127.0, 64.0, -5.0, 0.0, 100.0])
    odd = torch.tensor([3.0, -3.0, 90.0, -127.0, 127.0, -127.0])
    int8.clamp_pair_(odd, even)
    assert odd.tolist() == [1.0, -1.0, 64.0, -123.0, 127.0, -127.0]


def test_quantize_linear_follows_the_pairs_route(monkeypatch):
    """quantize_linear quantizes pairs_safe weights exactly where weight_pairs_limited() says the int8 product
    needs them, and otherwise keeps the full-range scale; `pairs` decides it instead where given (int8 panels
    without VNNI need pairs_safe weights whatever oneDNN's product needs)."""
    w, bias = _paired_weight(24, 32), torch.zeros(24)
    absmax = torch.ones(32)
    for limited in (True, False):
        monkeypatch.setattr(int8, "weight_pairs_limited", lambda limited=limited: limited)
        assert pairs_safe(int8.quantize_linear(w, bias, absmax).weight) == limited
        for pairs in (True, False):
            assert pairs_safe(int8.quantize_linear(w, bias, absmax, pairs=pairs).weight) == pairs
