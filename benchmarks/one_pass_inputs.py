"""What the one-pass input steps save a short call: pack_mask (the mask's checks and packing) and token_embeddings
(the embeddings), against the per-op path they replace, in one process.

    HF_HUB_OFFLINE=1 python benchmarks/one_pass_inputs.py [--models minilm bert-base] [--dtypes fp32 bf16 int8]
        [--rounds 150] [--threads 2]

Each model (all-MiniLM-L6-v2 with its real weights, a random bert-base) is swapped in each dtype (int8: swap with
torch.qint8) and runs the bundled sentences as the benchmark's sentence point does (16 sentences in batches of 8,
each padded to its longest): once with the one-pass steps, once with the encoder made to take the per-op path
(encoder._packed_mask and encoder._one_call_embeddings answering "no"), the order alternating round by round. The
outputs of both paths are compared first. Printed per model and dtype: the median time of the 16 sentences each way
and the median over the rounds of per-op time / one-pass time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtbert_fast import swap
from mtbert_fast.bench import harness, measure
from mtbert_fast.models import encoder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.qint8}


def sentence_batches(batch: int = 8, count: int = 16) -> list[dict[str, torch.Tensor]]:
    """The bundled sentences tokenized by MiniLM's tokenizer (bert-base's vocabulary too), each batch padded to its
    longest."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(measure.default_model_dir()))
    sentences = measure.load_sentences(count=count)
    return [dict(tokenizer(sentences[i:i + batch], padding=True, return_tensors="pt")) for i in range(0, count, batch)]


def load(model_name: str):
    from transformers import BertModel

    if model_name == "minilm":
        return BertModel.from_pretrained(str(measure.default_model_dir()), attn_implementation="sdpa").eval()
    return measure.random_bert(measure.bert_base_config())


class PerOpPath:
    """While entered, the encoder takes the per-op path for the mask and the embeddings."""

    def __enter__(self):
        self.saved = encoder._packed_mask, encoder._one_call_embeddings
        encoder._packed_mask = lambda *args: None
        encoder._one_call_embeddings = lambda *args: False

    def __exit__(self, *exc):
        encoder._packed_mask, encoder._one_call_embeddings = self.saved


def run(model, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        model(**b)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=["minilm", "bert-base"])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{harness.describe_device('cpu')}, {args.threads} threads, torch {torch.__version__}")
    batches = sentence_batches()
    for model_name in args.models:
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        for dtype_name in args.dtypes:
            model = swap(load(model_name), dtype=DTYPES[dtype_name])
            with torch.inference_mode():
                one_pass = model(**batches[0]).last_hidden_state
                with PerOpPath():
                    per_op = model(**batches[0]).last_hidden_state
                diff = (one_pass.float() - per_op.float()).abs().max().item()
                for _ in range(5):
                    run(model, batches)
                    with PerOpPath():
                        run(model, batches)
                times = {"one pass": [], "per op": []}
                for r in range(args.rounds):
                    for path in (("one pass", "per op") if r % 2 else ("per op", "one pass")):
                        if path == "per op":
                            with PerOpPath():
                                times[path].append(run(model, batches))
                        else:
                            times[path].append(run(model, batches))
            ratio = statistics.median(a / b for a, b in zip(times["per op"], times["one pass"]))
            print(f"{model_name:9s} {dtype_name:4s} {tokens} tokens in {len(batches)} calls: one pass "
                  f"{statistics.median(times['one pass']) * 1e3:.2f} ms, per op "
                  f"{statistics.median(times['per op']) * 1e3:.2f} ms, per op / one pass per round {ratio:.3f} "
                  f"(outputs within {diff:.1e})")


if __name__ == "__main__":
    main()
