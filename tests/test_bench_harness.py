"""The shared benchmark harness: memory reading, FLOP counting, interleaved timing."""

from __future__ import annotations

import math
import types

import pytest
import torch

from mtbert_fast.bench import harness
from mtbert_fast.models import weight_pack
from mtbert_fast.ops.mkl_linear import available as mkl_available


def test_peak_memory_sees_a_temporary_allocation():
    size = 64 * 2**20

    def allocate():
        t = torch.ones(size // 4, dtype=torch.float32)  # touched, so resident
        return float(t[-1])

    out, peak = harness.peak_memory(allocate)
    assert out == 1.0
    assert size * 0.9 <= peak <= size * 2
    _, small = harness.peak_memory(lambda: None)
    assert small < size / 4, "the peak is reset before each call"


def test_encoder_flops_is_a_hand_count():
    cfg = types.SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2)
    # per layer: linears 2*T*(4*16 + 2*4*8) = 2*5*128 = 1280; attention 4*(3^2+2^2)*4 = 208
    assert harness.encoder_flops(cfg, [3, 2]) == 2 * (1280 + 208)
    assert harness.encoder_flops(cfg, [3, 2], pooler=True) == 2 * (1280 + 208) + 2 * 2 * 16


@pytest.mark.parametrize("family", ["bert", "electra"])
def test_encoder_flops_counts_every_linear_of_a_bert_model(family):
    """The count equals 2 * in * out per row through every nn.Linear of an HF BertModel or ElectraModel (whose
    embeddings, 24 wide, are projected to H) (each sequence run alone, so no padding row), plus attention's Q K^T and
    P V per layer; the same from the EncoderConfig the benchmark reads."""
    transformers = pytest.importorskip("transformers")
    from mtbert_fast import EncoderConfig

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=50)
    if family == "electra":
        config = transformers.ElectraConfig(embedding_size=24, **sizes)
        model = transformers.ElectraModel(config).eval()
    else:
        config = transformers.BertConfig(**sizes)
        model = transformers.BertModel(config).eval()
    counted = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: counted.append(2 * args[0][..., 0].numel()
                                                                             * m.in_features * m.out_features))
    lengths = [5, 3]
    with torch.inference_mode():
        for n in lengths:
            model(input_ids=torch.arange(1, n + 1)[None])
    attention = config.num_hidden_layers * sum(2 * 2 * n * n * 32 for n in lengths)
    pooler = family == "bert"
    assert sum(counted) + attention == harness.encoder_flops(config, lengths, pooler=pooler)
    assert sum(counted) + attention == harness.encoder_flops(EncoderConfig.from_hf(config), lengths, pooler=pooler)


def test_encoder_flops_counts_every_linear_of_a_modernbert_model():
    """ModernBERT: its GeGLU up-projection is 2I wide, and a sliding layer's attention products cover only the
    query-key pairs within its window (counted against the mask HF builds)."""
    transformers = pytest.importorskip("transformers")
    from mtbert_fast.models import EncoderConfig

    config = transformers.ModernBertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                           intermediate_size=48, vocab_size=50, local_attention=4, pad_token_id=0,
                                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    model = transformers.ModernBertModel(config).eval()
    counted = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: counted.append(2 * args[0][..., 0].numel()
                                                                             * m.in_features * m.out_features))
    lengths = [5, 3, 1]
    with torch.inference_mode():
        for n in lengths:
            model(input_ids=torch.arange(3, n + 3)[None])
    pairs = {kind: sum(int(((torch.arange(n)[:, None] - torch.arange(n)[None]).abs() <= w).sum()) for n in lengths)
             for kind, w in (("full_attention", 10**6), ("sliding_attention", 2))}
    attention = sum(2 * 2 * pairs[kind] * 32 for kind in config.layer_types)
    assert sum(counted) + attention == harness.encoder_flops(EncoderConfig.from_hf(config), lengths)
    assert [harness.attended_pairs(n, 2) for n in (1, 3, 5, 9)] == [1, 9, 19, 39]


def test_encoder_flops_of_deberta_position_terms():
    """Two position terms over the 9 table rows a 5-token row reaches: per layer, the rows' two projections and
    every token's two products with them, on top of the BERT-shaped count."""
    transformers = pytest.importorskip("transformers")
    from mtbert_fast.models import EncoderConfig

    config = EncoderConfig.from_hf(transformers.DebertaV2Config(
        hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=1, vocab_size=50,
        relative_attention=True, pos_att_type=["c2p", "p2c"], position_buckets=8, max_relative_positions=64))
    plain = harness.encoder_flops(types.SimpleNamespace(hidden_size=4, intermediate_size=8, num_hidden_layers=2),
                                  [5, 2])
    extra = 2 * 2 * (2 * 9 * 16 + 2 * 7 * 9 * 4)
    assert harness.encoder_flops(config, [5, 2]) == plain + extra


def test_interleaved_timing_and_gemm_rate():
    calls = []
    timings = harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       repeats=3, warmup=1)  # fmt: skip
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"], "the first provider rotates"
    assert len(timings["a"].samples) == 3 and timings["a"].p10 <= timings["a"].median <= timings["a"].p90
    assert harness.gemm_flops_per_s(torch.float32, repeats=2, shape=(64, 64, 64)) > 0
    assert harness.gemm_flops_per_s(torch.qint8, repeats=2, shape=(64, 64, 64)) > 0
    with pytest.raises(ValueError):
        harness.time_interleaved({"a": lambda: None}, repeats=0)


def test_block_timing_runs_each_provider_in_a_row_after_an_untimed_call():
    calls = []
    timings = harness.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                       repeats=2, warmup=1, block=3)  # fmt: skip
    assert calls == ["a"] * 4 + ["b"] * 4 + ["b"] * 4 + ["a"] * 4 + ["a"] * 4 + ["b"] * 4
    assert len(timings["a"].samples) == 6 and len(timings["b"].samples) == 6
    with pytest.raises(ValueError, match="block"):
        harness.time_interleaved({"a": lambda: None}, block=0)


def test_interleaved_timing_takes_a_clock():
    """Samples are differences of the given clock around each call (here a clock that ticks 1 per reading)."""
    ticks = iter(range(100))
    timings = harness.time_interleaved({"a": lambda: None, "b": lambda: None}, repeats=2, clock=lambda: next(ticks))
    assert timings["a"].samples == [1, 1] and timings["b"].samples == [1, 1]


def test_metadata_and_csv(tmp_path):
    meta = harness.run_metadata("cpu")
    assert meta["device"].startswith("cpu") and meta["torch"]
    path = harness.append_csv(tmp_path / "r.csv", [{**meta, "x": 1}], harness.META_FIELDS + ["x"])
    harness.append_csv(path, [{**meta, "x": 2}], harness.META_FIELDS + ["x"])
    assert path.read_text().count("\n") == 3


def test_csv_with_other_columns_is_left_alone(tmp_path):
    old = tmp_path / "r.csv"
    old.write_text("time,model\n2024,tiny\n")
    path = harness.append_csv(old, [{"x": 1}], ["x"])
    assert path == tmp_path / "r-1.csv" and path.read_text().splitlines() == ["x", "1"]
    assert old.read_text() == "time,model\n2024,tiny\n"
    assert harness.append_csv(old, [{"x": 2}], ["x"]) == path, "the next run appends to the file with its columns"
    assert harness.append_csv(old, [{"y": 3}], ["y"]) == tmp_path / "r-2.csv"


def test_settle_pauses_before_each_turn(monkeypatch):
    events = []
    monkeypatch.setattr(harness.time, "sleep", lambda s: events.append(("sleep", s)))
    harness.time_interleaved({"a": lambda: events.append("a"), "b": lambda: events.append("b")}, repeats=1,
                             warmup=0, settle=0.25)  # fmt: skip
    assert events == [("sleep", 0.25), "a", ("sleep", 0.25), "b"]


def test_bench_point_runs_each_provider_over_its_batches_in_a_row(monkeypatch):
    from mtbert_fast.bench import measure

    monkeypatch.setattr(measure, "SETTLE_S", 0.0)
    calls = []
    batches = [{"attention_mask": torch.ones(2, n)} for n in (4, 3)]
    fns = {p: (lambda b, p=p: calls.append((p, b["attention_mask"].shape[1]))) for p in ("a", "b")}
    timed = measure._time_point(fns, batches, repeats=2, device="cpu")
    # each turn: an untimed pass over the batches, then the timed one; the first provider rotates
    once = [("a", 4), ("a", 3)]
    assert calls == once * 2 + [("b", 4), ("b", 3)] * 4 + once * 2
    reps, per_call = timed["a"]
    assert len(reps) == 2 and len(per_call) == 4 and reps[0] == pytest.approx(per_call[0] + per_call[1])
    calls.clear()
    measure._time_point(fns, [{"attention_mask": torch.ones(8, 5)}], repeats=1, device="cpu")
    assert calls == [("a", 5)] * 2 + [("b", 5)] * 2, "a long call gets its untimed call after the pause too"


def test_bench_point_times_the_gemm_of_the_roofline_in_its_repetitions(monkeypatch):
    """With a GEMM, each repetition gives it a turn beside the providers' (an untimed call and a timed one per
    batch); every Result of the point takes the rate of those timed calls, and the GEMM is no Result."""
    from mtbert_fast.bench import measure

    monkeypatch.setattr(measure, "SETTLE_S", 0.0)
    batches = [{"attention_mask": torch.ones(2, n)} for n in (4, 3)]
    rows = [torch.ones(int(b["attention_mask"].sum()), 4) for b in batches]
    fns = {p: (lambda b: [torch.ones(int(b["attention_mask"].sum()), 4)]) for p in ("a", "b")}
    gemm_calls = []
    point = ("sentences", 2, 4, batches)
    results = measure._run_point(point, fns, [[r] for r in rows], "m", "encoder", "float32", "cpu", 3, {},
                                 gemm=(lambda: gemm_calls.append(1), 1e6))  # fmt: skip
    assert [r.provider for r in results] == ["a", "b"]
    assert len(gemm_calls) == 3 * 2 * len(batches)
    rates = {r.gemm_flops_per_s for r in results}
    assert len(rates) == 1 and 0 < rates.pop() < float("inf")
    results = measure._run_point(point, fns, [[r] for r in rows], "m", "encoder", "float32", "cpu", 1, {})
    assert all(math.isnan(r.gemm_flops_per_s) for r in results), "no GEMM, no rate"


def test_a_nan_in_a_later_batch_fails_the_point(monkeypatch):
    """A provider whose output holds a NaN only in its second batch gets max|diff| inf and a NaN cosine (so it fails
    parity in every dtype), where the first batch's values hid it."""
    from mtbert_fast.bench import measure

    monkeypatch.setattr(measure, "SETTLE_S", 0.0)
    batches = [{"attention_mask": torch.ones(2, n)} for n in (4, 3)]
    rows = [torch.ones(int(b["attention_mask"].sum()), 4) for b in batches]

    def broken(b):
        out = torch.ones(int(b["attention_mask"].sum()), 4)
        if b["attention_mask"].shape[1] == 3:
            out[0, 0] = float("nan")
        return [out]

    point = ("sentences", 2, 4, batches)
    for dtype in ("float32", "int8"):
        (result,) = measure._run_point(point, {"broken": broken}, [[r] for r in rows], "m", "encoder", dtype, "cpu", 1,
                                       {})
        result.parity_limit = 1e-3
        assert result.max_abs_diff == float("inf") and math.isnan(result.min_cosine) and not result.parity_ok


def test_a_peer_failing_at_a_point_is_skipped_there(monkeypatch):
    """A peer runtime that raises at a point (a shape its first call did not meet) is left out of that point with
    its reason; mtbert_fast or HF raising still ends the run."""
    from mtbert_fast.bench import measure

    monkeypatch.setattr(measure, "SETTLE_S", 0.0)
    batches = [{"attention_mask": torch.ones(2, n)} for n in (4, 3)]
    rows = [[torch.ones(int(b["attention_mask"].sum()), 4)] for b in batches]

    def ok(b):
        return [torch.ones(int(b["attention_mask"].sum()), 4)]

    def fails(b):
        raise RuntimeError("shape not supported")

    skipped = {}
    point = ("sentences", 2, 4, batches)
    results = measure._run_point(point, {"mtbert_fast[cpu]": ok, "openvino[f32]": fails}, rows, "m", "encoder",
                                 "float32", "cpu", 1, {}, skipped=skipped)
    assert [r.provider for r in results] == ["mtbert_fast[cpu]"]
    assert skipped == {"openvino[f32] float32 at sentences B=2": "failed: RuntimeError: shape not supported"}
    with pytest.raises(RuntimeError, match="shape not supported"):
        measure._run_point(point, {"mtbert_fast[cpu]": fails}, rows, "m", "encoder", "float32", "cpu", 1, {},
                           skipped=skipped)


def test_gemm_summary_names_the_route_and_the_rates_at_the_points():
    from mtbert_fast.bench import measure

    def row(dtype, rate):
        return measure.Result("m", "encoder", "full", 8, 128, "p", dtype, 1, 1, 1, [1.0], [1.0], 0.0,
                              gemm_flops_per_s=rate)  # fmt: skip

    fastest = {"float32": (2.1e11, "onednn, packed weight", None), "bfloat16": (4.4e11, "F.linear", None)}
    rows = [row("float32", 2.0e11), row("float32", 2.2e11), row("bfloat16", float("nan"))]
    assert measure.gemm_summary(fastest, rows) == (
        "float32 210 GFLOP/s (onednn, packed weight; at the points 200-220), bfloat16 440 GFLOP/s (F.linear)")


def test_gemm_routes_compute_the_same_product():
    """Every route of the roofline's GEMM multiplies the same operands: the fastest one cannot win by computing
    something else. On a CPU with oneDNN the routes include its linear on a packed weight, as the encoder runs it,
    and where PyTorch carries MKL its packed sgemm for float32, and for bf16 where the CPU multiplies bf16 as
    float32."""
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        routes = harness.gemm_routes(dtype, torch.device("cpu"), (24, 40, 56))
        if weight_pack.AVAILABLE:
            assert any("packed weight" in r for r in routes), list(routes)
        bf16_on_float32 = dtype == torch.bfloat16 and weight_pack.onednn_dtype(dtype) != dtype
        mkl = "mkl, packed weight, float32 products" if bf16_on_float32 else "mkl, packed weight"
        assert (mkl in routes) == ((dtype == torch.float32 or bf16_on_float32) and mkl_available()), list(routes)
        with torch.inference_mode():
            outs = {r: call().float() for r, call in routes.items()}
        ref = outs.pop("F.linear")
        assert ref.shape == (24, 56)
        for r, out in outs.items():
            torch.testing.assert_close(out, ref, atol=tol * ref.abs().max().item(), rtol=0, msg=r)
    rate, route, call = harness.fastest_gemm(torch.float32, repeats=2, shape=(24, 40, 56))
    assert rate > 0 and call is not None
    assert route in harness.gemm_routes(torch.float32, torch.device("cpu"), (24, 40, 56))


def test_timing_spread_and_the_median_of_per_round_ratios():
    """A Timing's spread is (p90 - p10) / 2 over its median; median_ratio pairs two providers' samples round by
    round, and gives None where they do not pair up."""
    t = harness.Timing([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.spread == pytest.approx((t.p90 - t.p10) / 2 / 3.0) and harness.Timing([0.0, 0.0]).spread == 0.0
    assert harness.median_ratio([2.0, 9.0, 3.0], [1.0, 3.0, 1.0]) == 3.0
    assert harness.median_ratio([], []) is None and harness.median_ratio([1.0], [1.0, 2.0]) is None
