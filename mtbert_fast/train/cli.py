"""`mtbert-fast train CONFIG`: the training command, added to the mtbert-fast parser by add_train_parser."""

from __future__ import annotations

import argparse
import os
import sys

from mtbert_fast.train.config import ConfigError, read_config_file, parse_config


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the `train` command to an argparse subparsers object; its handler is set as `func`."""
    p = subparsers.add_parser(
        "train",
        help="multi-task training (or BERT pre-training) from a JSON/YAML configuration",
        description="Trains a MultiTaskBert on the tasks a configuration file declares (see "
        "mtbert_fast.train.config). The configuration and every data file are checked before any work. "
        "Run under torchrun for several processes (DistributedDataParallel, each process a disjoint shard).",
    )
    p.add_argument("config", help="the configuration file (.json, or .yaml/.yml with PyYAML installed)")
    p.add_argument("--check", action="store_true",
                   help="check the configuration and the data, print what would be trained, and stop")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from a checkpoint directory, or (no value) the newest one in checkpoint_dir")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="override training.max_steps")
    p.add_argument("--seed", type=int, default=None, help="override training.seed")
    p.add_argument("--device", default=None, help="override training.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--output-dir", default=None, help="override training.output_dir (the final model)")
    p.add_argument("--checkpoint-dir", default=None, help="override training.checkpoint_dir")
    p.add_argument("--stop-after", type=_positive_int, default=None,
                   help="stop after this many steps of this run, with a checkpoint (for jobs with a time limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.set_defaults(func=run_train, subparser=p)
    return p


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.max_steps is not None:  # the run's length from the command line, in place of the file's
        out["max_steps"], out["epochs"] = args.max_steps, None
    if args.seed is not None:
        out["seed"] = args.seed
    if args.device is not None:
        out["device"] = args.device
    # paths given on the command line are relative to the working directory, not to the configuration file
    for key in ("output_dir", "checkpoint_dir"):
        if getattr(args, key) is not None:
            out[key] = os.path.abspath(getattr(args, key))
    if args.resume is not None:
        out["resume_from"] = args.resume if args.resume == "latest" else os.path.abspath(args.resume)
    if args.no_progress:
        out["progress"] = False
    return out


def run_train(args: argparse.Namespace) -> int:
    """Handler of `mtbert-fast train`: 0 on success, 2 (with the problems on stderr) on a bad configuration."""
    from mtbert_fast.train.data import load_records
    from mtbert_fast.train.trainer import train

    try:
        raw = read_config_file(args.config)
        training = raw.setdefault("training", {})
        if isinstance(training, dict):
            training.update(_overrides(args))
        config = parse_config(raw, os.path.dirname(os.path.abspath(args.config)))
        if args.check:
            records = load_records(config)
            for task in config.tasks:
                r = records[task.name]
                print(f"{task.name}: {task.kind}, {len(r.train)} training rows, {len(r.eval)} held out, "
                      f"loss weight {task.loss_weight}")
            print("configuration and data OK")
            return 0
        train(config, stop_after=args.stop_after)
    except ConfigError as exc:
        print(f"mtbert-fast train: error in {args.config}: {exc}", file=sys.stderr)
        return 2
    return 0
