"""The fast encoder, its configuration and the HF weight mapping."""

from mtbert_fast.models.config import EncoderConfig, UnsupportedModelError
from mtbert_fast.models.encoder import EncoderOutput, FastBertModel, PackedBatch
from mtbert_fast.models.hf_mapping import MissingWeightError

__all__ = ["EncoderConfig", "EncoderOutput", "FastBertModel", "MissingWeightError", "PackedBatch",
           "UnsupportedModelError"]
