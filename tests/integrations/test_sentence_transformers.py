"""mtbert_fast.swap / unswap on sentence-transformers models: SentenceTransformer (the real all-MiniLM-L6-v2 on the
bundled sentences, and a random-weight DistilBERT one) and CrossEncoder (a random-weight BertForSequenceClassification
saved to a temporary directory).
encode() / predict() keep working and agree with the unswapped model; unswap gives back its exact outputs.
Skipped where sentence-transformers is not installed.
"""

from __future__ import annotations

import pytest
import torch

from mtbert_fast import is_swapped, swap, unswap
from mtbert_fast.bench.measure import load_sentences
from mtbert_fast.models import UnsupportedModelError

st = pytest.importorskip("sentence_transformers")
pytestmark = pytest.mark.usefixtures("one_thread_unless_marked")
COSINE = 0.99999


@pytest.fixture(scope="module")
def real_sentences() -> list[str]:
    """The first 48 bundled sentences: one word to a long sentence, encoded in ragged batches of 16."""
    return load_sentences()[:48]


def _embed(model, sentences):
    return model.encode(sentences, batch_size=16, convert_to_tensor=True, normalize_embeddings=False)


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


@pytest.fixture(scope="module")
def minilm_st(minilm_dir, real_sentences):
    """all-MiniLM-L6-v2 as a SentenceTransformer (tokenizer, BertModel, mean pooling, normalize) and its unswapped
    embeddings of the sentences."""
    model = st.SentenceTransformer(minilm_dir, device="cpu")
    model.eval()
    return model, _embed(model, real_sentences)


def test_sentence_transformer_wraps_a_bert_model(minilm_st):
    model, _ = minilm_st
    assert type(model[0].auto_model).__name__ == "BertModel"


def test_a_subclass_of_sentence_transformer_is_swapped(minilm_dir, minilm_st, real_sentences):
    """A SentenceTransformer subclass defined outside sentence-transformers is a sentence-transformers model too."""

    class Embedder(st.SentenceTransformer):
        pass

    model = Embedder(minilm_dir, device="cpu").eval()
    swap(model)
    assert is_swapped(model) and is_swapped(model[0].auto_model)
    assert _cosine(_embed(model, real_sentences), minilm_st[1]).min().item() >= COSINE
    unswap(model)
    assert not is_swapped(model)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_sentence_transformer_swap_unswap(backend, minilm_st, real_sentences):
    model, ref = minilm_st
    assert not is_swapped(model)
    assert swap(model, backend=backend) is model
    try:
        assert is_swapped(model) and is_swapped(model[0].auto_model)
        out = _embed(model, real_sentences)
        assert out.shape == ref.shape and torch.isfinite(out).all()
        cos = _cosine(out, ref)
        assert cos.min().item() >= COSINE, f"lowest cosine {cos.min().item():.8f}"
        with pytest.raises(RuntimeError, match="already swapped"):
            swap(model)
    finally:
        unswap(model)
    assert not is_swapped(model)
    assert torch.equal(_embed(model, real_sentences), ref)
    with pytest.raises(RuntimeError, match="not swapped"):
        unswap(model)


def test_sentence_transformer_bf16(minilm_dir, minilm_st, real_sentences):
    """In bf16 the swapped model's embeddings are at least as close to the fp32 ones as HF's own bf16 model's,
    within twice its cosine distance."""
    _, ref = minilm_st
    native = st.SentenceTransformer(minilm_dir, device="cpu").to(torch.bfloat16).eval()
    native_cos = _cosine(_embed(native, real_sentences).float(), ref)
    model = swap(st.SentenceTransformer(minilm_dir, device="cpu").eval(), dtype=torch.bfloat16)
    assert model[0].auto_model.dtype == torch.bfloat16
    cos = _cosine(_embed(model, real_sentences).float(), ref)
    assert (1 - cos).max().item() <= 2 * (1 - native_cos).max().item() + 1e-6


@pytest.fixture
def cross_encoder_dir(tmp_path, minilm_dir):
    """A random-weight BertForSequenceClassification (hidden 48, 3 heads, 2 layers, one label) with MiniLM's
    tokenizer, saved as an HF model directory."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=48, num_attention_heads=3, num_hidden_layers=2,
                        intermediate_size=80, num_labels=1)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    return tmp_path


def test_cross_encoder_swap_unswap(cross_encoder_dir, real_sentences):
    model = st.CrossEncoder(str(cross_encoder_dir), device="cpu")
    pairs = list(zip(real_sentences[:24], real_sentences[24:48]))
    ref = torch.as_tensor(model.predict(pairs, batch_size=8))
    assert ref.shape == (24,)
    swap(model)
    assert is_swapped(model)
    out = torch.as_tensor(model.predict(pairs, batch_size=8))
    assert (out.double() - ref.double()).abs().max().item() <= 1e-4
    unswap(model)
    assert not is_swapped(model)
    assert torch.equal(torch.as_tensor(model.predict(pairs, batch_size=8)), ref)


def test_distilbert_sentence_transformer(tmp_path, minilm_dir, real_sentences):
    """A SentenceTransformer built from modules around a random-weight DistilBertModel (MiniLM's tokenizer)."""
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(dim=48, n_heads=3, n_layers=2, hidden_dim=80)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(tmp_path)
    model = st.SentenceTransformer(modules=[Transformer(str(tmp_path)), Pooling(48)], device="cpu").eval()
    ref = _embed(model, real_sentences)
    swap(model)
    assert type(model[0].auto_model).__name__ == "DistilBertModel" and is_swapped(model)
    cos = _cosine(_embed(model, real_sentences), ref)
    assert cos.min().item() >= COSINE, f"lowest cosine {cos.min().item():.8f}"
    unswap(model)
    assert torch.equal(_embed(model, real_sentences), ref)


def test_unsupported_inner_model_is_refused_and_nothing_changes(cross_encoder_dir):
    """A refusal comes before any change: the model's forward is HF's own afterwards."""
    model = st.CrossEncoder(str(cross_encoder_dir), device="cpu")
    inner = model[0].auto_model
    inner.config.hidden_act = "relu"
    with pytest.raises(UnsupportedModelError, match="hidden_act='relu'"):
        swap(model)
    assert not is_swapped(model) and "forward" not in vars(inner.base_model)
