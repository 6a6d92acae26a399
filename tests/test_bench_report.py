"""The bench's reporting half renders given result rows (table, CSV, plot) without loading or running any model;
runner.main prints, writes and sets the exit status from what measuring returns."""

from __future__ import annotations

import csv

import pytest

from mtbert_fast.bench import measure, report, runner

META = {"time": "2025-01-02T03:04:05+00:00", "device": "cpu (test)", "torch": "2.x", "transformers": "4.x",
        "mtbert_fast": "0.1.0", "commit": "abc1234", "sentences": "6", "repeats": "2", "threads": "2",
        "gemm": "float32 100 GFLOP/s"}  # fmt: skip


def _result(provider, tokens_per_s, point="sentences", batch=4, max_length=512, task="encoder", diff=1e-6,
            dtype="float32", cosine=0.99999, **extra):  # fmt: skip
    return measure.Result(
        model="tiny", task=task, point=point, batch=batch, max_length=max_length, provider=provider, dtype=dtype,
        real_tokens=1000, padded_tokens=1200, batches=2, tokens_per_s=tokens_per_s, latencies_s=[0.01, 0.02, 0.03],
        max_abs_diff=diff, parity_limit=measure.FP32_TOLERANCE, min_cosine=cosine, **extra,
    )  # fmt: skip


@pytest.fixture
def rows():
    """Two points of the encoder task (HF sdpa the baseline, a fast provider twice as fast, one failing parity,
    two peers: one 1.6x as fast as HF, one faster still but failing parity), one int8 point (two peers and
    mtbert_fast, one peer's output broken; mtbert_fast's own bf16 model timed beside it) and one multitask point."""
    out = []
    for point, batch, max_length in (("sentences", 4, 512), ("L=32", 8, 32)):
        out += [
            _result("hf-eager", [800.0, 900.0], point, batch, max_length),
            _result(measure.BASELINE, [1000.0, 1000.0], point, batch, max_length),
            _result("onnxruntime[fused]", [1600.0, 1600.0], point, batch, max_length),
            _result("openvino[f32]", [5000.0, 5000.0], point, batch, max_length, diff=0.5, cosine=0.9),
            _result("mtbert_fast[cpu]", [2000.0, 2000.0], point, batch, max_length, flops=1e10,
                    gemm_flops_per_s=1e11, backends="all ops on cpu"),
            _result("mtbert_fast[reference]", [3000.0, 3000.0], point, batch, max_length, diff=1.0),
        ]
    out += [_result("ctranslate2", [2500.0], "L=32", 8, 32, dtype="int8", diff=0.2, cosine=0.99),
            _result("torch.quantize_dynamic", [9000.0], "L=32", 8, 32, dtype="int8", diff=3.0, cosine=0.5),
            _result("mtbert_fast[auto]", [3000.0], "L=32", 8, 32, dtype="int8", diff=0.3, cosine=0.98,
                    own_bf16_tokens_per_s=[2000.0])]
    out += [_result(measure.MULTITASK_BASELINE, [500.0], "L=32", 8, 32, task="multitask", cosine=float("nan")),
            _result("mtbert_fast[cpu]", [1500.0], "L=32", 8, 32, task="multitask", cosine=float("nan"))]
    return out


def _row(rows, provider, point="sentences", task="encoder", dtype="float32"):
    return next(r for r in rows if (r.provider, r.point, r.task, r.dtype) == (provider, point, task, dtype))


def test_speedups_are_against_the_baseline_and_none_on_failed_parity(rows):
    ratio = report.speedups(rows)
    by_name = {(r.task, r.point, r.provider): ratio[id(r)] for r in rows}
    assert by_name[("encoder", "sentences", measure.BASELINE)] == 1.0
    assert by_name[("encoder", "sentences", "mtbert_fast[cpu]")] == 2.0
    assert by_name[("encoder", "L=32", "hf-eager")] == pytest.approx(0.85)
    assert by_name[("encoder", "L=32", "mtbert_fast[reference]")] is None
    assert by_name[("multitask", "L=32", "mtbert_fast[cpu]")] == 3.0
    assert ratio[id(_row(rows, "ctranslate2", "L=32", dtype="int8"))] == 2.5, "int8 rows: over HF sdpa float32"
    assert ratio[id(_row(rows, "torch.quantize_dynamic", "L=32", dtype="int8"))] is None, "cosine below 0.8"


def test_a_baseline_failing_parity_gives_way_to_hf_eager(rows):
    sdpa = _row(rows, measure.BASELINE)
    sdpa.max_abs_diff = 1.0
    assert not sdpa.parity_ok
    ratio = report.speedups(rows)
    assert ratio[id(_row(rows, "mtbert_fast[cpu]"))] == pytest.approx(2000.0 / 850.0), "over HF eager's median"
    assert ratio[id(sdpa)] is None


def test_versus_fastest_peer_ranks_only_peers_that_passed_parity(rows):
    peer = report.versus_fastest_peer(rows)
    assert peer[id(_row(rows, "mtbert_fast[cpu]"))] == (1.25, 1.25, "onnxruntime[fused]"), "openvino failed parity"
    assert peer[id(_row(rows, "mtbert_fast[auto]", "L=32", dtype="int8"))] == (1.2, 1.2, "ctranslate2")
    assert id(_row(rows, "mtbert_fast[reference]")) not in peer, "a row failing parity gets no ratio"
    assert id(_row(rows, "onnxruntime[fused]")) not in peer and id(_row(rows, measure.BASELINE)) not in peer
    assert id(_row(rows, "mtbert_fast[cpu]", "L=32", "multitask")) not in peer, "no peer runs multitask"


def test_table_renders_every_row_and_the_skipped_providers(rows):
    text = report.format_table(rows, META, {"onnxruntime": "onnxruntime is not installed"})
    lines = text.splitlines()
    assert lines[0] == "cpu (test); measured GEMM rate: float32 100 GFLOP/s"
    assert "mtbert_fast 0.1.0 (abc1234), 2025-01-02T03:04:05+00:00" in lines[1]
    header = next(line for line in lines if line.startswith("model"))
    assert "2 threads for every provider" in lines[2]
    for column in ("real tok/s", "p10-p90", "p50 ms", "p90 ms", "peak MiB", "vs base", "vs peer", "per round",
                   "fastest peer", "vs bf16", "roofline", "max|diff|", "cos", "parity"):  # fmt: skip
        assert column in header
    body = lines[lines.index(header) + 2: lines.index(header) + 2 + len(rows)]
    assert len(body) == len(rows) and all(line.startswith("tiny") for line in body)
    fast = next(line for line in body if "mtbert_fast[cpu]" in line and "encoder" in line)
    assert "2,000" in fast and "2.00x" in fast and "20%" in fast and fast.endswith("ok")
    assert "1.25x      1.25x  onnxruntime[fused]" in fast and "1.0000" in fast
    failed = next(line for line in body if "mtbert_fast[reference]" in line)
    assert failed.endswith("FAIL") and " - " in failed
    assert next(line for line in body if "openvino[f32]" in line).split()[-2:] == ["0.9000", "FAIL"]
    int8 = next(line for line in body if "mtbert_fast[auto]" in line)
    assert "int8" in int8 and "3.00x" in int8 and "1.20x      1.20x  ctranslate2" in int8
    assert int8.split()[int8.split().index("ctranslate2") + 1] == "1.50x", "over our own bf16, per round"
    assert fast.split()[fast.split().index("onnxruntime[fused]") + 1] == "-", "a float row has no int8 ratio"
    assert any(line.startswith("vs bf16: ") for line in lines)
    assert int8.endswith("0.9800  ok")
    assert next(line for line in body if "torch.quantize_dynamic" in line).endswith("0.5000  FAIL")
    multitask = next(line for line in body if "multitask" in line and "mtbert_fast[cpu]" in line)
    assert "3.00x" in multitask and multitask.split()[-2:] == ["-", "ok"]
    assert any(line.startswith("vs peer: ") for line in lines) and "int8 rows: over that baseline in float32" in text
    assert lines[-1] == "skipped onnxruntime: onnxruntime is not installed"


def test_csv_appends_one_row_per_result(rows, tmp_path):
    path = report.append_csv(rows, META, tmp_path / "out")
    assert path == tmp_path / "out" / report.CSV_NAME
    report.append_csv(rows[:1], META, tmp_path / "out")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == report.CSV_FIELDS
        written = list(reader)
    assert len(written) == len(rows) + 1
    fast = written[4]
    assert fast["provider"] == "mtbert_fast[cpu]" and fast["speedup_vs_hf_sdpa"] == "2.0000"
    assert fast["speedup_vs_fastest_peer"] == "1.2500" and fast["fastest_peer"] == "onnxruntime[fused]"
    assert fast["speedup_vs_fastest_peer_per_round"] == "1.2500"
    assert fast["roofline_fraction"] == "0.2000" and fast["gemm_gflops"] == "100.0"
    assert fast["tokens_per_s_median"] == "2000.0" and fast["latency_p50_ms"] == "20.000"
    assert fast["commit"] == "abc1234" and fast["backends"] == "all ops on cpu"
    assert fast["min_cosine"] == "0.999990" and fast["threads"] == "2"
    assert fast["speedup_vs_own_bf16"] == "" and fast["own_bf16_tokens_per_s_median"] == ""
    assert written[5]["parity"] == "FAIL" and written[5]["speedup_vs_hf_sdpa"] == ""
    int8 = next(w for w in written if w["dtype"] == "int8" and w["provider"] == "mtbert_fast[auto]")
    assert int8["own_bf16_tokens_per_s_median"] == "2000.0"
    assert int8["speedup_vs_own_bf16"] == "1.5000" and int8["speedup_vs_own_bf16_per_round"] == "1.5000"


def test_plot_draws_the_encoder_points(rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = report.plot(rows, tmp_path)
    assert path == tmp_path / report.PLOT_NAME and path.stat().st_size > 0


def test_runner_prints_writes_and_exits_1_on_failed_parity(rows, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(measure, "run", lambda cfg: (rows, META, {}))
    assert runner.main(measure.BenchConfig(out=tmp_path)) == 1
    text = capsys.readouterr().out
    assert report.format_table(rows, META, {}) in text
    assert f"results appended to {tmp_path / report.CSV_NAME}" in text
    assert (tmp_path / report.PLOT_NAME).is_file()
    passing = [r for r in rows if r.parity_ok or measure.is_peer(r.provider)]
    monkeypatch.setattr(measure, "run", lambda cfg: (passing, META, {}))
    assert runner.main(measure.BenchConfig(out=None)) == 0
    assert "results appended" not in capsys.readouterr().out


def test_per_round_ratio_pairs_the_repetitions():
    """One repetition that met a busy minute for the fast row moves the ratio of medians (0.88x) but not the median
    of the per-repetition ratios (1.1x in two of three)."""
    fast = _result("mtbert_fast[cpu]", [880.0, 1100.0, 440.0])
    peer = _result("openvino[f32]", [800.0, 1000.0, 1250.0])
    assert fast.median / peer.median == pytest.approx(0.88)
    assert report.per_round_ratio(fast, peer) == pytest.approx(1.1)
    assert report.per_round_ratio(fast, _result("openvino[f32]", [800.0, 1000.0])) is None, "unpaired repetitions"
    assert report.per_round_ratio(_result("mtbert_fast[cpu]", []), _result("openvino[f32]", [])) is None


def test_int8_rows_over_our_own_bf16_pair_the_repetitions():
    """The bf16 reference runs in the int8 point's repetitions: its row leaves the results and each mtbert_fast int8
    row carries its repetitions, paired one by one; peers get none."""
    int8 = _result("mtbert_fast[cpu]", [1400.0, 1500.0, 600.0], dtype="int8")
    peer = _result("onnxruntime[int8]", [1000.0, 1000.0, 1000.0], dtype="int8")
    own = _result(measure.OWN_BF16, [1000.0, 1000.0, 500.0], dtype="int8")
    assert measure._beside_own_bf16([int8, peer, own]) == [int8, peer]
    assert int8.own_bf16_tokens_per_s == [1000.0, 1000.0, 500.0] and peer.own_bf16_tokens_per_s == []
    assert int8.over_own_bf16 == (pytest.approx(1.4), pytest.approx(1.4)) and peer.over_own_bf16 is None
    assert measure._beside_own_bf16([int8, peer]) == [int8, peer], "no reference: the rows as they are"
    failing = _result("mtbert_fast[cpu]", [3000.0, 3000.0, 3000.0], dtype="int8", cosine=0.5)
    assert measure._beside_own_bf16([failing, own]) == [failing]
    assert failing.over_own_bf16 is None, "a row failing parity gets no ratio over our bf16"
    broken_own = _result(measure.OWN_BF16, [1000.0, 1000.0, 500.0], dtype="int8", cosine=float("nan"))
    fresh = _result("mtbert_fast[cpu]", [1400.0, 1500.0, 600.0], dtype="int8")
    assert measure._beside_own_bf16([fresh, broken_own]) == [fresh] and fresh.over_own_bf16 is None


def test_nan_outputs_fail_parity_wherever_they_are():
    """A NaN anywhere in a provider's outputs fails its parity: Python's max() and min() keep an earlier value over a
    NaN, which turned a NaN output into max|diff| 0."""
    import torch

    ref = [torch.zeros(3, 4)]
    bad = torch.zeros(3, 4)
    bad[1, 2] = float("nan")
    assert measure.max_abs_diff([bad], ref) == float("inf")
    assert measure._worst((0.0, measure.max_abs_diff([bad], ref), 0.5)) == float("inf")
    assert measure._worst((float("nan"), 0.25)) == float("inf")
    assert measure.max_abs_diff([torch.ones(3, 4)], ref) == 1.0
    assert not _result("peer", [1.0], diff=float("inf")).parity_ok
