"""The benchmark runner behind `mtbert-fast bench`: HF transformers against mtbert_fast on real sentences."""
