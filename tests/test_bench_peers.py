"""The bench's peer runtimes and parity measures: a tiny random BertModel through each peer that is installed
matches HF float32 on a padded batch; a peer whose package is missing is a skip with the reason; the parity
helpers; mtbert_fast's int8 rows (float32 and bfloat16 activations) with their bfloat16 reference, and a skip with
swap's reason where it refuses qint8."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import mtbert_fast
from mtbert_fast.bench import measure, peers

CPU = torch.device("cpu")


def test_max_abs_diff_and_pooled_cosine_by_hand():
    ref = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])  # sequences of lengths 2 and 1
    out = torch.tensor([[1.0, 1.0], [3.0, 1.0], [0.0, 2.0]])  # first sequence pools to (2, 1) against (2, 0)
    assert measure.max_abs_diff([out], [ref]) == 1.0
    assert measure.max_abs_diff([torch.empty(0)], [torch.empty(0)]) == 0.0
    assert measure.min_pooled_cosine(out, ref, [2, 1]) == pytest.approx(2 / 5**0.5)
    assert measure.min_pooled_cosine(ref, ref, torch.tensor([2, 1])) == pytest.approx(1.0)


def test_int8_rows_are_judged_by_the_cosine():
    row = measure.Result("m", "encoder", "full", 8, 128, "ctranslate2", "int8", 10, 10, 1, [1.0], [1.0],
                         max_abs_diff=5.0, min_cosine=0.95)  # fmt: skip
    assert row.parity_ok and row.base_key == ("m", "encoder", "full", 8, "float32")
    row.min_cosine = 0.5
    assert not row.parity_ok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF float32 BertModel with 2 layers of hidden 32, a batch with rows of 12, 7 and 3 tokens, HF eager's
    output on it, the model's Peers)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)  # fmt: skip
    hf = measure.random_bert(config)
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(12) < torch.tensor([[12], [7], [3]])).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.inference_mode():
        ref = measure.with_attention(hf, "eager")(**batch).last_hidden_state
    return hf, batch, ref, peers.Peers(hf, batch, tmp_path_factory.mktemp("peers"), threads=1)


@pytest.mark.parametrize(
    "package, peer, dtype",
    [("torch", "torch.compile", "float32"), ("onnxruntime", "onnxruntime", "float32"),
     ("onnxruntime", "onnxruntime", "int8"), ("openvino", "openvino", "float32"),
     ("openvino", "openvino", "bfloat16"), ("ctranslate2", "ctranslate2", "float32"),
     ("ctranslate2", "ctranslate2", "int8"), ("torch", "torch.quantize_dynamic", "int8")],
)  # fmt: skip
def test_each_installed_peer_matches_hf_float32_on_a_padded_batch(tiny, package, peer, dtype):
    pytest.importorskip(package)
    hf, batch, ref, peer_set = tiny
    peer_set.selected = (peer,)
    with torch.inference_mode():
        runs, skipped = peer_set.providers(dtype, CPU)
        if f"{peer} {dtype}" in skipped:
            pytest.skip(skipped[f"{peer} {dtype}"])
        (name, run), = runs.items()
        out = measure._real_rows(run(batch), batch)
    real = measure._real_rows(ref, batch)
    assert name.startswith(peer)
    if dtype == "float32":
        assert measure.max_abs_diff([out], [real]) < measure.FP32_TOLERANCE
    assert measure.min_pooled_cosine(out, real, batch["attention_mask"].sum(1)) > 0.99


def test_onnxruntime_exports_a_model_without_pooler_or_token_types(tmp_path):
    """A DistilBertModel has neither: its export has the last hidden state alone and takes two inputs."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                                                    vocab_size=100)).eval()
    ids = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(9) < torch.tensor([[9], [4]])).long()
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    assert peers._outputs(hf) == ["last_hidden_state"]
    peer_set = peers.Peers(hf, batch, tmp_path, threads=1, selected=("onnxruntime",))
    with torch.inference_mode():
        runs, skipped = peer_set.providers("float32", CPU)
        assert not skipped, skipped
        (run,) = runs.values()
        out, ref = (measure._real_rows(x, batch) for x in (run(batch), hf(**batch).last_hidden_state))
    assert measure.max_abs_diff([out], [ref]) < measure.FP32_TOLERANCE


def test_a_missing_package_is_a_skip_with_the_reason(tiny, monkeypatch):
    for package in ("onnxruntime", "openvino", "ctranslate2"):
        monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    fresh = peers.Peers(*tiny[:2], "/nonexistent", threads=1, selected=("onnxruntime", "openvino", "ctranslate2"))
    runs, skipped = fresh.providers("float32", CPU)
    assert runs == {}
    assert skipped == {f"{p} float32": f"{p} is not installed (pip install {p})"
                       for p in ("onnxruntime", "openvino", "ctranslate2")}  # fmt: skip
    why = fresh.providers("int8", CPU)[1]["onnxruntime int8"]
    assert why == "onnxruntime is not installed (pip install onnxruntime)"


def test_onnxruntime_in_bfloat16_is_a_skip_with_the_reason(tiny):
    pytest.importorskip("onnxruntime")
    fresh = peers.Peers(*tiny[:2], "/nonexistent", threads=1, selected=("onnxruntime",))
    assert fresh.providers("bfloat16", CPU) == ({}, {"onnxruntime bfloat16": "ONNX Runtime has no fast bfloat16 "
                                                                              "path on cpu"})  # fmt: skip


def test_peers_other_than_torch_compile_run_on_cpu_only(tiny):
    fresh = peers.Peers(*tiny[:2], "/nonexistent", threads=1, selected=("onnxruntime", "openvino", "ctranslate2"))
    _, skipped = fresh.providers("float32", torch.device("meta"))
    assert skipped == {f"{p} float32": "runs on cpu only here (asked meta)"
                       for p in ("onnxruntime", "openvino", "ctranslate2")}  # fmt: skip


def test_mtbert_fast_int8_rows_and_their_skips(tiny, monkeypatch):
    hf, batch = tiny[0], tiny[1]
    skipped = {}
    calls, extra = measure._fast_calls(measure.BenchConfig(backend="cpu"), hf, "int8", CPU, skipped)
    assert skipped == {} and set(calls) == {"mtbert_fast[cpu]", "mtbert_fast[cpu,bf16-act]", measure.OWN_BF16}
    assert set(extra) == {"mtbert_fast[cpu]", "mtbert_fast[cpu,bf16-act]"}, "the bf16 reference gets no row"
    with torch.no_grad():
        own = calls[measure.OWN_BF16](batch)[0]
        bf16 = mtbert_fast.swap(copy.deepcopy(hf), backend="cpu", dtype=torch.bfloat16)
        torch.testing.assert_close(own, measure._real_rows(bf16(**batch), batch), rtol=0, atol=0)
    assert extra["mtbert_fast[cpu,bf16-act]"] == {"backends": "int8, cpu, bfloat16 activations"}
    with torch.inference_mode():
        rows = calls["mtbert_fast[cpu]"](batch)[0]
    assert rows.shape == (int(batch["attention_mask"].sum()), hf.config.hidden_size)

    def refuse(model, backend="auto", dtype=None):
        raise TypeError(f"no {dtype}")

    monkeypatch.setattr(measure.mtbert_fast, "swap", refuse)
    skipped = {}
    calls, extra = measure._fast_calls(measure.BenchConfig(), hf, "int8", CPU, skipped)
    assert calls == {} and extra == {}
    assert skipped == {f"mtbert_fast[auto{s}] int8": "mtbert_fast.swap(dtype=torch.qint8) refused: no torch.qint8"
                       for s in ("", ",bf16-act")}


def test_a_ctranslate2_worker_that_cannot_load_is_a_skip_with_the_reason(tiny, tmp_path):
    """CTranslate2 runs in a worker process; one that dies before its encoder is ready is reported, not waited on."""
    pytest.importorskip("ctranslate2")
    fresh = peers.Peers(*tiny[:2], tmp_path, threads=1, selected=("ctranslate2",))
    fresh._once("ctranslate2", lambda: tmp_path)  # a directory without a converted model
    assert fresh.providers("float32", CPU) == ({}, {"ctranslate2 float32": "the CTranslate2 worker process ended "
                                                                           "before its encoder was ready"})  # fmt: skip
