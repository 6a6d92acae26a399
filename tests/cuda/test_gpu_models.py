"""The encoder, the HF swap and a short MLM+NSP training run on the GPU, with each GPU backend forced and with the
automatic choice. Skipped without CUDA.

Parity at the real tokens: fp32 within 1e-4 of HF (TF32 off); bf16 / fp16 error against HF fp32 at most twice HF's
own error in that dtype, plus a small floor."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mtbert_fast  # noqa: E402
from mtbert_fast import FastBertModel, MultiTaskBert  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU tests need CUDA (a lent GPU)")
DEV = torch.device("cuda")
BACKENDS = ["auto", "cuda", "triton"]


@pytest.fixture(autouse=True)
def _full_fp32(no_tf32):
    yield


def _config(**kw):
    base = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                max_position_embeddings=512, type_vocab_size=2, pad_token_id=0)
    base.update(kw)
    return transformers.BertConfig(**base)


def _hf(cls, config, seed=0):
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="sdpa").eval().to(DEV)


def _batch(lengths, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask
    return ids.to(DEV), mask.to(DEV), torch.zeros_like(ids).to(DEV)


LENGTHS = [[1], [512], [7, 130, 1, 64, 300]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lengths", LENGTHS, ids=["one", "512", "ragged"])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_fast_bert_matches_hf(backend, dtype, lengths, head_dim):
    hf32 = _hf(transformers.BertModel, _config(num_attention_heads=128 // head_dim))
    ids, mask, types = _batch(lengths)
    real = mask.bool()
    with torch.inference_mode():
        ref = hf32(ids, mask, types).last_hidden_state[real].double()
        fast = FastBertModel.from_hf(hf32, dtype=dtype, backend=backend).to(DEV)
        out = fast(ids, mask, types).last_hidden_state
        assert out.dtype == dtype
        err = (out[real].double() - ref).abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4, f"{backend}: fp32 error {err}"
        else:
            own = (copy.deepcopy(hf32).to(dtype)(ids, mask, types).last_hidden_state[real].double() - ref)
            assert err <= 2 * own.abs().max().item() + 1e-2, f"{backend} {dtype}: error {err} vs HF's own {own}"
        assert not out[~real].any(), "padding must be zeros"


@pytest.mark.parametrize("backend", BACKENDS)
def test_swap_matches_unswapped_with_gradients(backend):
    hf = _hf(transformers.BertForSequenceClassification, _config(num_labels=3))
    ids, mask, types = _batch([5, 40, 17])
    labels = torch.tensor([0, 2, 1], device=DEV)
    ref_model = copy.deepcopy(hf)
    ref = ref_model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    ref.loss.backward()
    mtbert_fast.swap(hf, backend=backend)
    out = hf(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4)
    ours, theirs = dict(hf.named_parameters()), dict(ref_model.named_parameters())
    common = sorted(set(ours) & set(theirs))
    assert "classifier.weight" in common and "bert.embeddings.word_embeddings.weight" in common
    for name in common:
        torch.testing.assert_close(ours[name].grad, theirs[name].grad, atol=1e-4, rtol=1e-3, msg=f"gradient of {name}")
    mtbert_fast.unswap(hf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlm_nsp_training_loss_falls_with_attention_dropout(backend):
    """A short MLM+NSP run in bf16 autocast with HF's default dropout (0.1, fused into the attention kernels)."""
    config = _config(hidden_size=256, num_attention_heads=4, intermediate_size=512)
    assert config.attention_probs_dropout_prob == 0.1
    hf = _hf(transformers.BertForPreTraining, config)
    model = MultiTaskBert.from_hf_heads({"pretraining": hf}, backend=backend).to(DEV).train()
    torch.manual_seed(0)
    ids, mask, types = _batch([64] * 16 + [20] * 16, vocab=1000, seed=1)
    positions = (torch.rand(ids.shape, device=DEV) < 0.15) & mask.bool()
    mlm = torch.where(positions, ids, torch.full_like(ids, -100))
    inputs = torch.where(positions, torch.full_like(ids, 3), ids)
    nsp = (torch.arange(32, device=DEV) % 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs, mask, types, labels={"pretraining": (mlm, nsp)}).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, f"loss did not fall: {losses}"
