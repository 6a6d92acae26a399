"""The multi-task targets, bert-base B=8 L=128: one MultiTaskBert pass with three heads against the three separate
HF models; the masked-LM head at the masked rows against HF's dense BertOnlyMLMHead on all tokens; peak memory of
an MLM+NSP training step against HF BertForPreTraining. Figures and targets in extra_info; parity asserted."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_parity

from mtbert_fast.bench import harness, measure
from mtbert_fast.models.heads import HeadInput
from mtbert_fast.models.multitask import MultiTaskBert

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
B, L = 8, 128


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(measure.default_model_dir())
    return measure.text_batch(tokenizer, measure.load_sentences(), [L] * B)


@pytest.fixture(scope="module")
def hf_tasks():
    return measure.hf_task_models(measure.random_bert(measure.bert_base_config()))


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_three_heads_one_pass(compare, report, batch, hf_tasks, dtype_name):
    dtype = DTYPES[dtype_name]
    positions = measure.mlm_positions(batch)
    with torch.inference_mode():
        ref = measure.hf_multitask_outputs(hf_tasks, batch, positions)
        hf = {k: copy.deepcopy(m).to(dtype) for k, m in hf_tasks.items()}
        fast = MultiTaskBert.from_hf_heads(hf_tasks, dtype=dtype)
        hf_out = measure.hf_multitask_outputs(hf, batch, positions)
        fast_out = measure.fast_multitask_outputs(fast, batch, positions)
        errs = [assert_parity(f, h, r, dtype, what) for f, h, r, what in
                zip(fast_out, hf_out, ref, ("sequence logits", "token logits", "masked-LM logits"))]  # fmt: skip
        t = compare({"hf-3-models": lambda: measure.hf_multitask_outputs(hf, batch, positions),
                     "mtbert_fast": lambda: measure.fast_multitask_outputs(fast, batch, positions)})  # fmt: skip
    report("3 heads, one pass vs 3 HF models", dtype_name, "speed-up",
           t["hf-3-models"].median / t["mtbert_fast"].median, ">=3.5x",
           f"hf {t['hf-3-models'].median * 1e3:.0f} ms, fast {t['mtbert_fast'].median * 1e3:.0f} ms; "
           f"max|diff| {max(errs):.1e}")


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_mlm_head_on_masked_rows(compare, report, batch, hf_tasks, dtype_name):
    dtype = DTYPES[dtype_name]
    positions = measure.mlm_positions(batch)
    with torch.inference_mode():
        hf_mlm = copy.deepcopy(hf_tasks["mlm"]).to(dtype)
        fast = MultiTaskBert.from_hf_heads({"mlm": hf_tasks["mlm"]}, dtype=dtype)
        encoded = fast.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        hidden = encoded.last_hidden_state
        head = fast.heads["mlm"]

        def fast_head():
            return head(HeadInput(encoded), None, positions, True)[0]["logits"]

        ref = hf_tasks["mlm"].cls(hidden.float())[positions].float()
        own = hf_mlm.cls(hidden)[positions].float()
        err = assert_parity(fast_head().float(), own, ref, dtype, "masked-LM logits")
        t = compare({"hf-BertOnlyMLMHead": lambda: hf_mlm.cls(hidden), "mtbert_fast": fast_head})
    report("masked-LM head, 15% masked", dtype_name, "time ratio vs HF dense head",
           t["mtbert_fast"].median / t["hf-BertOnlyMLMHead"].median, "<=0.25x",
           f"hf {t['hf-BertOnlyMLMHead'].median * 1e3:.1f} ms, fast {t['mtbert_fast'].median * 1e3:.1f} ms; "
           f"{int(positions.sum())} of {int(batch['attention_mask'].sum())} rows; max|diff| {err:.1e}")


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_pretraining_step_memory(benchmark, report, batch, dtype_name):
    from transformers import BertForPreTraining

    dtype = DTYPES[dtype_name]
    config = measure.bert_base_config()
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # the same loss on both sides
    torch.manual_seed(0)
    hf = BertForPreTraining._from_config(config, attn_implementation="sdpa").to(dtype).train()
    fast = MultiTaskBert.from_hf_heads({"pretraining": hf}, dtype=dtype).train()
    positions = measure.mlm_positions(batch)
    mlm_labels = torch.where(positions, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    nsp = torch.arange(B) % 2

    def hf_step():
        hf.zero_grad(set_to_none=True)
        loss = hf(**batch, labels=mlm_labels, next_sentence_label=nsp).loss
        loss.backward()
        return float(loss)

    def fast_step():
        fast.zero_grad(set_to_none=True)
        loss = fast(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                    labels={"pretraining": (mlm_labels, nsp)}).loss  # fmt: skip
        loss.backward()
        return float(loss)

    hf_step(), fast_step()  # allocate gradients once on both sides: the peaks below are the step's own
    hf_loss, hf_peak = harness.peak_memory(hf_step)
    fast_loss, fast_peak = harness.peak_memory(fast_step)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert abs(fast_loss - hf_loss) <= tol * max(1.0, abs(hf_loss)), (fast_loss, hf_loss)
    benchmark.pedantic(fast_step, rounds=1, iterations=1)
    report("MLM+NSP training step B=8 L=128", dtype_name, "peak memory ratio vs BertForPreTraining",
           fast_peak / hf_peak, "<=0.6x",
           f"fast {fast_peak / 2**20:.0f} MiB, hf {hf_peak / 2**20:.0f} MiB; loss {fast_loss:.4f} vs {hf_loss:.4f}")
