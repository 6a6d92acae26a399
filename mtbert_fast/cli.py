"""The mtbert-fast command.  `mtbert-fast bench`: HF transformers against mtbert_fast on real sentences."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtbert_fast.train.cli import add_train_parser

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _dtype(text: str) -> str:
    if text not in DTYPE_ALIASES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {', '.join(DTYPE_ALIASES)}")
    return DTYPE_ALIASES[text]


def _add_bench(sub) -> None:
    from mtbert_fast.ops.dispatch import CHOICES

    p = sub.add_parser(
        "bench",
        help="inference speed and parity: HF eager and sdpa against mtbert_fast.swap",
        description="Runs HF BertModel (eager and sdpa attention) and the same model after mtbert_fast.swap on "
        "ragged batches of real sentences, and prints real tokens/s, per-batch latency, the speed-up over HF "
        "sdpa in the same dtype and the parity with HF's float32 output. Exits 1 if a provider fails parity.",
    )
    p.add_argument("--batch", type=_positive_int, default=32, help="sentences per batch (default 32)")
    p.add_argument("--dtype", type=_dtype, nargs="+", default=["float32", "bfloat16"],
                   help="one or more of float32 (fp32), bfloat16 (bf16); default both")  # fmt: skip
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--sentences", type=_positive_int, default=None,
                   help="sentences per repetition (default: the whole text once; a larger number repeats it)")
    p.add_argument("--text", type=Path, default=None,
                   help="a file of sentences, one a line (default: the sentences shipped with mtbert_fast)")
    p.add_argument("--model", type=Path, default=None,
                   help="an HF BERT/RoBERTa model directory (default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available, else cpu)")
    p.add_argument("--backend", choices=CHOICES, default="auto", help="mtbert_fast backend for every op")
    p.add_argument("--max-length", type=_positive_int, default=512, help="tokens per sentence at most (default 512)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory whose results.csv gets the rows appended (default bench-results)")
    p.add_argument("--no-csv", action="store_true", help="print the table only")
    p.set_defaults(func=_run_bench, subparser=p)


def _run_bench(args: argparse.Namespace) -> int:
    from mtbert_fast.bench import runner

    cfg = runner.BenchConfig(
        batch=args.batch,
        dtypes=tuple(dict.fromkeys(args.dtype)),
        repeats=args.repeats,
        sentences=args.sentences,
        text=args.text,
        model=args.model,
        device=args.device,
        backend=args.backend,
        max_length=args.max_length,
        out=None if args.no_csv else args.out,
    )
    try:
        return runner.main(cfg)
    except runner.BenchError as exc:
        args.subparser.error(str(exc))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtbert-fast", description="mtbert_fast: fast BERT-family encoders")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_bench(sub)
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
