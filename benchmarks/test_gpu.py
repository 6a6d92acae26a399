"""The GPU targets, on a GPU only (skipped without CUDA); each result row names the device. bert-base, bf16:
inference at B=32 L=128 (>= 2x HF sdpa tokens/s) and B=32 with lengths averaging 0.6*128 (>= 3x real tokens/s),
B=1 L=128 latency, forward tokens/s as a fraction of the bf16 GEMM rate measured in the same run (>= 0.5); the
MLM+NSP training step with dropout 0.1 against BertForPreTraining (>= 2x) and its peak memory at B=32 L=512
(<= 0.5x); each op, CUDA against Triton."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from mtbert_fast import FastBertModel
from mtbert_fast.bench import harness, measure
from mtbert_fast.models.multitask import MultiTaskBert
from mtbert_fast.ops import dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmarks need CUDA (a lent GPU)")
DEV = torch.device("cuda")


def _batch(lengths):
    ids = torch.randint(1000, 30000, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids.to(DEV), "attention_mask": mask.to(DEV), "token_type_ids": torch.zeros_like(ids).to(DEV)}


@pytest.fixture(scope="module")
def models():
    hf32 = measure.random_bert(measure.bert_base_config()).to(DEV)
    hf = copy.deepcopy(hf32).to(torch.bfloat16)
    return hf32, hf, FastBertModel.from_hf(hf32, dtype=torch.bfloat16)


@pytest.mark.parametrize("case, lengths, target", [
    ("B=32 L=128", [128] * 32, ">=2x"),
    ("B=32 lengths averaging 0.6*128", measure.ragged_lengths(32, 26, 128), ">=3x"),
    ("B=1 L=128 latency", [128], "<=0.6x"),
])  # fmt: skip
def test_encoder_bf16(compare, report, models, case, lengths, target):
    hf32, hf, fast = models
    batch = _batch(lengths)
    mask = batch["attention_mask"].bool()
    with torch.inference_mode():
        ref = hf32(**batch).last_hidden_state[mask].float()
        own = float((hf(**batch).last_hidden_state[mask].float() - ref).abs().max())
        err = float((fast(**batch).last_hidden_state[mask].float() - ref).abs().max())
        assert err <= 2 * own + 1e-3
        t = compare({"hf-sdpa": lambda: hf(**batch), "mtbert_fast": lambda: fast(**batch)}, rounds=20, warmup=3,
                    device=DEV)
    ratio = t["hf-sdpa"].median / t["mtbert_fast"].median
    report(case, "bf16", "latency ratio" if len(lengths) == 1 else "speed-up vs hf-sdpa",
           1 / ratio if len(lengths) == 1 else ratio, target, torch.cuda.get_device_name())
    gemm = harness.gemm_flops_per_s(torch.bfloat16, DEV, repeats=20)
    flops = harness.encoder_flops(hf32.config, lengths)
    report(case, "bf16", "fraction of bf16 GEMM roofline", flops / t["mtbert_fast"].median / gemm, ">=0.5",
           f"{torch.cuda.get_device_name()}, GEMM {gemm / 1e12:.0f} TFLOP/s")


def _pretraining_steps(lengths, dropout):
    """One MLM+NSP training step of HF BertForPreTraining and of MultiTaskBert built from it (bf16, bert-base),
    with `dropout` as hidden and attention dropout on both (HF's default is 0.1)."""
    from transformers import BertForPreTraining

    config = measure.bert_base_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    torch.manual_seed(0)
    hf = BertForPreTraining._from_config(config, attn_implementation="sdpa").to(DEV, torch.bfloat16).train()
    fast = MultiTaskBert.from_hf_heads({"pretraining": hf}, dtype=torch.bfloat16).train()
    batch = _batch(lengths)
    positions = measure.mlm_positions({k: v.cpu() for k, v in batch.items()}).to(DEV)
    labels = torch.where(positions, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    nsp = (torch.arange(len(lengths)) % 2).to(DEV)

    def hf_step():
        hf.zero_grad(set_to_none=True)
        loss = hf(**batch, labels=labels, next_sentence_label=nsp).loss
        loss.backward()
        return float(loss)

    def fast_step():
        fast.zero_grad(set_to_none=True)
        loss = fast(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    labels={"pretraining": (labels, nsp)}).loss
        loss.backward()
        return float(loss)

    return hf_step, fast_step


@pytest.mark.parametrize("case, lengths", [
    ("B=32 L=128", [128] * 32),
    ("B=32 lengths averaging 0.6*128", measure.ragged_lengths(32, 26, 128)),
])  # fmt: skip
def test_pretraining_step_speed_with_dropout(compare, report, case, lengths):
    hf_step, fast_step = _pretraining_steps(lengths, dropout=0.1)
    hf_loss, fast_loss = hf_step(), fast_step()
    assert abs(fast_loss - hf_loss) <= 0.1 * max(1.0, abs(hf_loss)), (fast_loss, hf_loss)
    t = compare({"hf-sdpa": hf_step, "mtbert_fast": fast_step}, rounds=10, warmup=2, device=DEV)
    report(f"MLM+NSP training step {case}, dropout 0.1", "bf16", "speed-up vs BertForPreTraining",
           t["hf-sdpa"].median / t["mtbert_fast"].median, ">=2x", torch.cuda.get_device_name())


def test_pretraining_step_memory_b32_l512(benchmark, report):
    hf_step, fast_step = _pretraining_steps([512] * 32, dropout=0.1)
    hf_step(), fast_step()
    hf_loss, hf_peak = harness.peak_memory(hf_step, DEV)
    fast_loss, fast_peak = harness.peak_memory(fast_step, DEV)
    assert abs(fast_loss - hf_loss) <= 0.1 * max(1.0, abs(hf_loss)), (fast_loss, hf_loss)
    benchmark.pedantic(fast_step, rounds=3, iterations=1)
    report("MLM+NSP step B=32 L=512, dropout 0.1", "bf16", "peak memory ratio vs BertForPreTraining",
           fast_peak / hf_peak, "<=0.5x",
           f"{torch.cuda.get_device_name()}: fast {fast_peak / 2**20:.0f} MiB, hf {hf_peak / 2**20:.0f} MiB")


@pytest.mark.parametrize("op", ["bias_gelu", "bias_residual_layer_norm", "bias_gelu_layer_norm", "attention_varlen"])
def test_cuda_vs_triton(compare, report, op):
    import mtbert_fast.ops as ops

    for b in ("cuda", "triton"):
        why = dispatch.reason(b, op, DEV, torch.bfloat16)
        if why:
            pytest.skip(f"{b}: {why}")
    T, H, I, heads = 4096, 768, 3072, 12
    g = torch.Generator(device=DEV).manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device=DEV).to(torch.bfloat16)  # noqa: E731
    x, xi, bh, bi, res = r(T, H), r(T, I), r(H), r(I), r(T, H)
    qkv, cu = r(T, 3, heads, H // heads), torch.arange(0, T + 1, 128, dtype=torch.int32, device=DEV)
    call = {
        "bias_gelu": lambda b: ops.bias_gelu(xi, bi, backend=b),
        "bias_residual_layer_norm": lambda b: ops.bias_residual_layer_norm(x, bh, res, bh, bh, 1e-12, backend=b),
        "bias_gelu_layer_norm": lambda b: ops.bias_gelu_layer_norm(x, bh, bh, bh, 1e-12, backend=b),
        "attention_varlen": lambda b: ops.attention_varlen(qkv, cu, 128, 1 / math.sqrt(H // heads), backend=b),
    }[op]
    with torch.inference_mode():
        assert float((call("cuda").float() - call("triton").float()).abs().max()) <= 5e-2
        t = compare({"triton": lambda: call("triton"), "cuda": lambda: call("cuda")}, rounds=50, warmup=5,
                    device=DEV)
    report(op, "bf16", "CUDA speed-up vs Triton", t["triton"].median / t["cuda"].median, "reported",
           torch.cuda.get_device_name())
