"""The mtbert-fast command.  `mtbert-fast bench`: HF transformers and peer runtimes against mtbert_fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtbert_fast.train.cli import add_train_parser

DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                 "float16": "float16", "fp16": "float16", "int8": "int8"}


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


def _int_list(text: str) -> tuple[int, ...]:
    """A comma list of positive integers, e.g. "8,32"."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"empty list {text!r}: give a comma list of positive integers, e.g. 32,128")
    return tuple(_positive_int(t) for t in items)


def _word_list(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _peer_list(text: str) -> tuple[str, ...]:
    """A comma list of peer names; "none" for none."""
    return () if text.strip() == "none" else _word_list(text)


def _add_bench(sub) -> None:
    from mtbert_fast.bench.measure import POINTS
    from mtbert_fast.bench.peers import NAMES as PEERS
    from mtbert_fast.ops.dispatch import CHOICES

    p = sub.add_parser(
        "bench",
        help="inference speed, memory and parity: HF eager / sdpa and peer runtimes against mtbert_fast",
        description="Runs HF BertModel (eager and sdpa attention), the peer runtimes that can run (torch.compile, "
        "ONNX Runtime, OpenVINO, CTranslate2, and in int8 torch's dynamic quantization; a missing one is listed as "
        "skipped with the reason), and the same model after mtbert_fast.swap with each backend that can run, all "
        "with the same thread count on the same batches of real text, and prints real tokens/s, per-batch latency, "
        "peak memory, the speed-up over HF sdpa in the same dtype and over the fastest peer, the fraction of the "
        "measured GEMM roofline and the parity with HF's float32 output (largest difference, mean-pooled cosine); "
        "appends a CSV and draws speed-up against sequence length and batch size into --out. Exits 1 if HF or "
        "mtbert_fast fails parity (a peer that fails it is marked FAIL and not ranked).",
    )
    p.add_argument("--model", nargs="+", default=["minilm", "bert-base"],
                   help="minilm (the bundled all-MiniLM-L6-v2, real weights); bert-base, distilbert-base, "
                        "electra-small, mpnet-base, modernbert-base or deberta-v3-base (those configs, random "
                        "weights); or an HF BERT, RoBERTa, DistilBERT, ELECTRA, MPNet, ModernBERT or DeBERTa-v2/v3 "
                        "model directory; several allowed (default: minilm bert-base)")
    p.add_argument("--dtype", type=_dtype, nargs="+", default=["float32", "bfloat16"],
                   help="one or more of float32 (fp32), bfloat16 (bf16), float16 (fp16, cuda only), int8 (cpu, "
                        "with float32: the int8 runtimes against HF sdpa float32); default fp32 bf16")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available, else cpu)")
    p.add_argument("--batch", type=_int_list, default=(8, 32),
                   help="comma list of batch sizes for the sentence points (the largest also runs the length "
                        "sweep); default 8,32")
    p.add_argument("--lengths", type=_int_list, default=(32, 128),
                   help="comma list of max lengths for the length sweep (lengths uniform in [L/8, L]); default 32,128")
    p.add_argument("--points", type=_word_list, default=POINTS,
                   help="comma list of the encoder points: sentences (batches of real sentences at each --batch), "
                        "lengths (the length sweep), full (B=8, L=128, no padding), latency (B=1 at L=16 and L=128, "
                        "no padding); default sentences,lengths,full,latency")
    p.add_argument("--peers", type=_peer_list, default=PEERS,
                   help=f"comma list of the peer runtimes to run: {', '.join(PEERS)}, or none; default all (a peer "
                        "whose package is missing is listed as skipped)")
    p.add_argument("--tasks", type=_word_list, default=("encoder",),
                   help="comma list of encoder, multitask (three task heads on one pass vs three HF models); "
                        "default encoder")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed repetitions (default 3)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for every provider (torch, ONNX Runtime intra-op, OpenVINO, CTranslate2); "
                        "default torch's thread count")
    p.add_argument("--sentences", type=_positive_int, default=32,
                   help="sentences per sentence point (default 32; more than the text holds repeats it)")
    p.add_argument("--text", type=Path, default=None,
                   help="a file of sentences, one a line (default: the sentences shipped with mtbert_fast)")
    p.add_argument("--backend", choices=CHOICES, default="auto",
                   help="mtbert_fast backend for every op (default auto: one provider per backend that can run)")
    p.add_argument("--max-length", type=_positive_int, default=512, help="tokens per sentence at most (default 512)")
    p.add_argument("--out", type=Path, default=Path("bench-results"),
                   help="directory for results.csv (rows appended) and speedup.png (default bench-results)")
    p.add_argument("--no-csv", action="store_true", help="print the table only (no CSV, no plot)")
    p.set_defaults(func=_run_bench, subparser=p)


def _run_bench(args: argparse.Namespace) -> int:
    from mtbert_fast.bench import measure, runner

    cfg = measure.BenchConfig(
        models=tuple(str(m) for m in dict.fromkeys(args.model)),
        dtypes=tuple(dict.fromkeys(args.dtype)),
        batches=tuple(dict.fromkeys(args.batch)),
        lengths=tuple(dict.fromkeys(args.lengths)),
        tasks=tuple(dict.fromkeys(args.tasks)),
        points=tuple(dict.fromkeys(args.points)),
        peers=tuple(dict.fromkeys(args.peers)),
        repeats=args.repeats,
        threads=args.threads,
        sentences=args.sentences,
        text=args.text,
        device=args.device,
        backend=args.backend,
        max_length=args.max_length,
        out=None if args.no_csv else args.out,
    )
    try:
        return runner.main(cfg)
    except measure.BenchError as exc:
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
