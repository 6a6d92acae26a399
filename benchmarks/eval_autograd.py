"""A model in eval mode called with autograd on: mtbert_fast.swap against the HF model it swaps.

    HF_HUB_OFFLINE=1 python benchmarks/eval_autograd.py [--models minilm bert-base] [--shapes 1x16 1x128 8x128]
                                                        [--threads 2] [--repeats 10]

Users call a model without torch.no_grad (and gradient attributions need autograd with the weights unchanged), and
fine-tune in eval mode to keep dropout off. For each model (the bundled all-MiniLM-L6-v2, a random bert-base) and
shape (batch x length, every token real), fp32, in one process, interleaved round by round (`--block` calls in a
row per engine after an untimed one; medians):
  - hf, swap: the forward with autograd recording, weights unchanged between calls;
  - hf stepped, swap stepped: the same with every weight of the encoder written in place before each call (as an
    optimizer step writes them), the write included in both;
  - swap no_grad: the swapped model under torch.no_grad, for scale.
Each row gives the medians and hf over swap (above 1: the swapped model is faster). The outputs are checked against
HF's first.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mtbert_fast import swap  # noqa: E402
from mtbert_fast.bench import harness, measure  # noqa: E402


def load(name: str):
    if name == "bert-base":
        return measure.random_bert(measure.bert_base_config())
    from transformers import BertModel

    return BertModel.from_pretrained(str(measure.default_model_dir()), attn_implementation="sdpa").eval()


def parse_shape(text: str) -> tuple[int, int]:
    try:
        batch, length = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BATCHxLENGTH, like 8x128 (got {text!r})") from None
    if batch <= 0 or length <= 0:
        raise argparse.ArgumentTypeError(f"batch and length must be positive (got {text!r})")
    return batch, length


def stepped(model: torch.nn.Module, call):
    """call() after every encoder weight is written in place, as an optimizer step writes it."""
    params = [p for name, p in model.named_parameters() if ".layer." in name]

    def run():
        with torch.no_grad():
            torch._foreach_mul_(params, 1.0)
        return call()

    return run


def engines(hf: torch.nn.Module, batch: dict) -> dict:
    fast = swap(copy.deepcopy(hf))

    def no_grad():
        with torch.no_grad():
            return fast(**batch)

    return {"hf": lambda: hf(**batch), "swap": lambda: fast(**batch),
            "hf stepped": stepped(hf, lambda: hf(**batch)), "swap stepped": stepped(fast, lambda: fast(**batch)),
            "swap no_grad": no_grad}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=["minilm", "bert-base"], default=["minilm", "bert-base"])
    ap.add_argument("--shapes", nargs="+", type=parse_shape, default=[(1, 16), (1, 128), (8, 128)])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--block", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(harness.describe_device("cpu"), f"torch {torch.__version__}")
    print(f"{'model':10} {'shape':7} {'hf':>9} {'swap':>9} {'hf/swap':>8} {'hf stepped':>11} {'swap stepped':>13} "
          f"{'hf/swap':>8} {'no_grad':>9}")
    for name in args.models:
        hf = load(name)
        for b, n in args.shapes:
            g = torch.Generator().manual_seed(0)
            batch = {"input_ids": torch.randint(1000, hf.config.vocab_size, (b, n), generator=g),
                     "attention_mask": torch.ones(b, n, dtype=torch.long)}
            fns = engines(hf, batch)
            got, want = fns["swap"]().last_hidden_state, fns["hf"]().last_hidden_state
            diff = (got - want).abs().max().item()
            if diff > 1e-3:
                raise SystemExit(f"{name} {b}x{n}: the swapped model's output is {diff:.3g} off HF's")
            t = {k: v.median * 1e3 for k, v in harness.time_interleaved(fns, args.repeats, 1, block=args.block,
                                                                          settle=0.1).items()}
            print(f"{name:10} {b}x{n:<5} {t['hf']:8.2f}ms {t['swap']:8.2f}ms {t['hf'] / t['swap']:7.2f}x "
                  f"{t['hf stepped']:9.2f}ms {t['swap stepped']:11.2f}ms {t['hf stepped'] / t['swap stepped']:7.2f}x "
                  f"{t['swap no_grad']:8.2f}ms")


if __name__ == "__main__":
    main()
