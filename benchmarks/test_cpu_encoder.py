"""The CPU targets: FastBertModel against HF BertModel (sdpa) in the same dtype, inference, measured in the same
test. Each figure is recorded with its target in extra_info and printed; only parity is asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_parity, real_rows

from mtbert_fast import FastBertModel
from mtbert_fast.bench import harness, measure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (case, batch, (low, high) lengths, {dtype: target speed-up})
THROUGHPUT = [
    ("B=8 L=128 all real", 8, (128, 128), {"bf16": ">=1.7x", "fp32": ">=1.0x"}),
    ("B=32 lengths uniform in [16,128]", 32, (16, 128), {"bf16": ">=3x", "fp32": ">=1.8x"}),
]


@pytest.fixture(scope="module")
def sentences():
    return measure.load_sentences()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(measure.default_model_dir())


@pytest.fixture(scope="module")
def bert_base():
    return measure.random_bert(measure.bert_base_config())


@pytest.fixture(scope="module")
def gemm_rate():
    return {name: harness.gemm_flops_per_s(dt) for name, dt in DTYPES.items()}


def _pair(hf32, dtype):
    hf = hf32 if dtype == torch.float32 else copy.deepcopy(hf32).to(dtype)
    return hf, FastBertModel.from_hf(hf32, dtype=dtype)


def _measure(compare, report, case, dtype_name, hf32, batch, target, gemm_rate, latency=False):
    dtype = DTYPES[dtype_name]
    mask = batch["attention_mask"]
    with torch.inference_mode():
        hf, fast = _pair(hf32, dtype)
        ref = real_rows(hf32(**batch), mask)
        hf_out, hf_peak = harness.peak_memory(lambda: real_rows(hf(**batch), mask))
        fast_out, fast_peak = harness.peak_memory(lambda: real_rows(fast(**batch), mask))
        err = assert_parity(fast_out, hf_out, ref, dtype)
        t = compare({"hf-sdpa": lambda: hf(**batch), "mtbert_fast": lambda: fast(**batch)})
    real = int(mask.sum())
    speedup = t["hf-sdpa"].median / t["mtbert_fast"].median
    spread = f"hf {t['hf-sdpa'].median * 1e3:.1f} ms, fast {t['mtbert_fast'].median * 1e3:.1f} ms " \
             f"(p10-p90 {t['mtbert_fast'].p10 * 1e3:.1f}-{t['mtbert_fast'].p90 * 1e3:.1f}); max|diff| {err:.1e}"
    if latency:
        report(case, dtype_name, "latency ratio vs hf-sdpa", 1 / speedup, target, spread)
    else:
        report(case, dtype_name, "speed-up vs hf-sdpa", speedup, target,
               f"{real / t['mtbert_fast'].median:,.0f} real tok/s; " + spread)
    report(case, dtype_name, "peak memory ratio vs hf-sdpa", fast_peak / max(hf_peak, 1), "<=1.0x",
           f"fast {fast_peak / 2**20:.1f} MiB, hf {hf_peak / 2**20:.1f} MiB")
    flops = harness.encoder_flops(hf32.config, mask.sum(1).tolist())
    report(case, dtype_name, f"fraction of {dtype_name} GEMM roofline", flops / t["mtbert_fast"].median /
           gemm_rate[dtype_name], "reported", f"GEMM {gemm_rate[dtype_name] / 1e9:,.0f} GFLOP/s")


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("case, size, bounds, targets", THROUGHPUT, ids=["b8_l128", "b32_ragged"])
def test_bert_base_throughput(compare, report, bert_base, tokenizer, sentences, gemm_rate, dtype_name, case, size,
                              bounds, targets):  # fmt: skip
    lengths = measure.ragged_lengths(size, *bounds)
    batch = measure.text_batch(tokenizer, sentences, lengths)
    _measure(compare, report, f"bert-base {case}", dtype_name, bert_base, batch, targets[dtype_name], gemm_rate)


def test_bert_base_latency_b1(compare, report, bert_base, tokenizer, sentences, gemm_rate):
    batch = measure.text_batch(tokenizer, sentences, [128])
    _measure(compare, report, "bert-base B=1 L=128 latency", "bf16", bert_base, batch, "<=0.6x", gemm_rate,
             latency=True)


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_minilm_real_sentences(compare, report, tokenizer, sentences, gemm_rate, dtype_name):
    from transformers import AutoModel

    hf32 = AutoModel.from_pretrained(measure.default_model_dir(), attn_implementation="sdpa").float().eval()
    batch = measure.make_batches(tokenizer, sentences[:32], 32, 512, torch.device("cpu"))[0]
    _measure(compare, report, "all-MiniLM-L6-v2 B=32 real sentences", dtype_name, hf32, batch, ">=2x", gemm_rate)
