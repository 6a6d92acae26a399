"""Integrations with other libraries: swap the fast encoder into Hugging Face transformers models."""

from mtbert_fast.integrations.hf import is_swapped, swap, unswap

__all__ = ["is_swapped", "swap", "unswap"]
