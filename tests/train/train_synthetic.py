"""Small, learnable synthetic tasks and a word-level tokenizer, written to a test's tmp_path.

The language has 24 words w0..w23.
  topic (sequence_classification): 6-10 words, mostly (90%) from w0..w11 when "pos", from w12..w23 when "neg".
  tags (token_classification): random words; a word's tag is fixed by its index mod 3 (X, Y, Z).
  lm (masked_lm): a motif of 2-3 random words repeated: a masked word is one of the words around it.
  docs (pretraining): documents of runs of consecutive words w_k w_k+1 ... (mod 24), each sentence starting
    where the last ended, so a sentence's successor is predictable.
  span (span_extraction): the question is a word, the context random words holding it once; the answer is it.
"""

from __future__ import annotations

import csv
import json
import os
import random

WORDS = [f"w{i}" for i in range(24)]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TAGS = ["X", "Y", "Z"]
SUFFIX = "##s"  # "w1s" -> "w1", "##s": a word of two sub-words
TINY_ENCODER = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
                "max_position_embeddings": 64, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def make_tokenizer(path: str) -> str:
    """A WordPiece BERT-style tokenizer ([CLS] A [SEP] B [SEP]) over SPECIALS + WORDS + SUFFIX, saved to path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + [SUFFIX])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]")
    tok.save_pretrained(path)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_csv(path: str, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def topic_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        major, minor = (WORDS[:12], WORDS[12:]) if positive else (WORDS[12:], WORDS[:12])
        words = [rng.choice(major if rng.random() < 0.9 else minor) for _ in range(rng.randint(6, 10))]
        rows.append({"sentence": " ".join(words), "label": "pos" if positive else "neg"})
    return rows


def tag_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 10))]
        rows.append({"tokens": " ".join(words), "tags": " ".join(TAGS[int(w[1:]) % 3] for w in words)})
    return rows


def run(start: int, length: int) -> str:
    return " ".join(WORDS[(start + j) % len(WORDS)] for j in range(length))


def lm_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        motif = rng.sample(WORDS, rng.randint(1, 2))
        rows.append({"text": " ".join(motif[j % len(motif)] for j in range(rng.randint(8, 14)))})
    return rows


def doc_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        start, sentences = rng.randrange(len(WORDS)), []
        for _ in range(rng.randint(2, 5)):
            length = rng.randint(3, 6)
            sentences.append(run(start, length))
            start += length
        rows.append({"text": sentences})
    return rows


def span_rows(n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        target = rng.choice(WORDS)
        words = [rng.choice([w for w in WORDS if w != target]) for _ in range(rng.randint(5, 10))]
        at = rng.randrange(len(words))
        words[at] = target
        context = " ".join(words)
        start = len(" ".join(words[:at])) + (1 if at else 0)
        rows.append({"question": target, "context": context, "answers": {"text": [target], "answer_start": [start]}})
    return rows


def write_tasks(tmp: str, n: int = 480, seed: int = 0) -> dict[str, str]:
    """The data files of the four tasks, and the tokenizer directory."""
    rng = random.Random(seed)
    os.makedirs(tmp, exist_ok=True)
    return {
        "tokenizer": make_tokenizer(os.path.join(tmp, "tokenizer")),
        "topic": write_jsonl(os.path.join(tmp, "topic.jsonl"), topic_rows(n, rng)),
        "tags": write_csv(os.path.join(tmp, "tags.csv"), tag_rows(n, rng)),
        "lm": write_jsonl(os.path.join(tmp, "lm.jsonl"), lm_rows(n, rng)),
        "docs": write_jsonl(os.path.join(tmp, "docs.jsonl"), doc_rows(max(8, n // 4), rng)),
        "span": write_jsonl(os.path.join(tmp, "span.jsonl"), span_rows(n, rng)),
    }


def base_config(files: dict[str, str], tasks=("topic", "tags", "lm"), **training) -> dict:
    """A configuration dict for the tiny encoder over the given tasks."""
    specs = {
        "topic": {"name": "topic", "kind": "sequence_classification", "train_file": files["topic"],
                  "columns": {"text": "sentence"}, "labels": ["neg", "pos"]},
        "tags": {"name": "tags", "kind": "token_classification", "train_file": files["tags"], "labels": TAGS},
        "lm": {"name": "lm", "kind": "masked_lm", "train_file": files["lm"], "mlm_probability": 0.25},
        "docs": {"name": "docs", "kind": "pretraining", "train_file": files["docs"]},
        "span": {"name": "span", "kind": "span_extraction", "train_file": files["span"],
                 "columns": {"answer": "answers.text", "answer_start": "answers.answer_start"}},
    }
    settings = {"batch_size": 16, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 10, "max_steps": 60,
                "eval_split": 0.2, "sampler": "round_robin", "seed": 0, "progress": False}
    settings.update(training)
    return {
        "model": {"config": dict(TINY_ENCODER), "tokenizer": files["tokenizer"], "max_length": 32},
        "tasks": [specs[t] for t in tasks],
        "training": settings,
    }
