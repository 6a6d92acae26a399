"""int8 accuracy on real weights and real text: weights rounded to nearest against GPTQ's error-compensated rounding.

    python benchmarks/int8_accuracy.py [--seeds 40] [--bf16]

all-MiniLM-L6-v2 (bundled) quantized with `swap(model, dtype=torch.qint8, calibration=...)` on one part of the
bundled sentences and judged on the rest, both ways round (calibrated on the first 100, judged on the last 103;
then calibrated on the last 103, judged on the first 100). Per row: the worst and mean cosine between the int8 and
the float model's mean-pooled embeddings, the similarity error (mean |change| of the cosine between an embedding and
a centroid of the classifiers), and the top-1 agreement of nearest-centroid classifiers (4 and 8 classes, k-means on
the float embeddings of the calibration sentences, one classifier per seed).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mtbert_fast  # noqa: E402
from mtbert_fast.bench.measure import default_model_dir  # noqa: E402
from mtbert_fast.models import int8  # noqa: E402


def embeddings(model, batch):
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def centroids(train, classes, seed):
    c = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:classes]]
    for _ in range(20):
        nearest = (train @ c.T).argmax(-1)
        c = F.normalize(torch.stack([train[nearest == k].mean(0) if (nearest == k).any() else c[k]
                                     for k in range(classes)]))
    return c


def quantized(hf, calibration, rounding, dtype, smoothing):
    """hf swapped to int8; rounding "nearest" drops the X^T X that GPTQ's rounding reads."""
    compensated = int8.quantize_linear
    if rounding == "nearest":
        int8.quantize_linear = lambda w, b, a, s, gram: compensated(w, b, a, s)
    try:
        return mtbert_fast.swap(copy.deepcopy(hf).to(dtype), dtype=torch.qint8, calibration=calibration,
                                smoothing=smoothing)
    finally:
        int8.quantize_linear = compensated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--smoothing", type=float, default=int8.DEFAULT_SMOOTHING, help="SmoothQuant's alpha")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 activations (the model cast before quantizing)")
    args = parser.parse_args()
    from transformers import AutoModel, AutoTokenizer

    model_dir = default_model_dir()
    tokenizer, hf = AutoTokenizer.from_pretrained(model_dir), AutoModel.from_pretrained(model_dir).eval()
    raw = resources.files("mtbert_fast.bench").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    sentences = [line.strip() for line in raw.splitlines() if line.strip()]

    def enc(s):
        return dict(tokenizer(s, padding=True, truncation=True, max_length=128, return_tensors="pt"))

    splits = {"first 100 / last 103": (sentences[:100], sentences[100:]),
              "last 103 / first 100": (sentences[100:], sentences[:100])}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"all-MiniLM-L6-v2, int8 with {dtype} activations, smoothing {args.smoothing}, {args.seeds} classifiers per "
          "class count")
    print("| calibrated / judged | rounding | worst cosine | mean cosine | similarity error | top-1, 4 classes "
          "| top-1, 8 classes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, (cal_text, held_text) in splits.items():
        calibration, held = enc(cal_text), enc(held_text)
        train = F.normalize(embeddings(hf, calibration))
        want = embeddings(hf, held)
        for rounding in ("nearest", "gptq"):
            got = embeddings(quantized(hf, calibration, rounding, dtype, args.smoothing), held)
            cos = F.cosine_similarity(got, want)
            errors, agreement = [], []
            for classes in (4, 8):
                agree = []
                for seed in range(args.seeds):
                    c = centroids(train, classes, seed)
                    sim_got, sim_want = F.normalize(got) @ c.T, F.normalize(want) @ c.T
                    errors.append((sim_got - sim_want).abs().mean())
                    agree.append(sim_got.argmax(-1) == sim_want.argmax(-1))
                agreement.append(torch.cat(agree).float().mean().item())
            print(f"| {name} | {rounding} | {cos.min():.5f} | {cos.mean():.6f} | {torch.stack(errors).mean():.5f} "
                  f"| {agreement[0]:.2%} | {agreement[1]:.2%} |", flush=True)


if __name__ == "__main__":
    main()
