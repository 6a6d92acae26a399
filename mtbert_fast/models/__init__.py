"""The fast encoder, its configuration, the HF weight mapping, the task heads and the multi-task model."""

from mtbert_fast.models.config import EncoderConfig, UnsupportedModelError
from mtbert_fast.models.encoder import EncoderOutput, FastBertModel, PackedBatch
from mtbert_fast.models.heads import (
    Head,
    HeadInput,
    MaskedLMHead,
    NextSentenceHead,
    PreTrainingHead,
    SentenceEmbeddingHead,
    SequenceClassificationHead,
    SpanExtractionHead,
    TokenClassificationHead,
)
from mtbert_fast.models.hf_mapping import MissingWeightError
from mtbert_fast.models.multitask import MultiTaskBert, MultiTaskOutput

__all__ = ["EncoderConfig", "EncoderOutput", "FastBertModel", "Head", "HeadInput", "MaskedLMHead", "MissingWeightError",
           "MultiTaskBert", "MultiTaskOutput", "NextSentenceHead", "PackedBatch", "PreTrainingHead",
           "SentenceEmbeddingHead", "SequenceClassificationHead", "SpanExtractionHead", "TokenClassificationHead",
           "UnsupportedModelError"]
