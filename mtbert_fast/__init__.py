"""mtbert_fast: fast BERT-family encoders for PyTorch, on GPU and CPU."""

__version__ = "0.1.0"

from mtbert_fast import ops
from mtbert_fast.integrations.hf import is_swapped, swap, unswap
from mtbert_fast.models import EncoderConfig
from mtbert_fast.models.encoder import FastBertModel
from mtbert_fast.models.multitask import MultiTaskBert

__all__ = ["EncoderConfig", "FastBertModel", "MultiTaskBert", "__version__", "is_swapped", "ops", "swap", "unswap"]
