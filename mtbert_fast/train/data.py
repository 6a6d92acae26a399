"""Task data: reading and checking the files, tokenizing, per-process shards, batches.

`load_records` reads every task's files and checks columns and labels (raising ConfigError before any work);
`encode_task` tokenizes checked records into features; `TaskStream` deals a task's training features out in
shuffled epochs, each process taking a disjoint shard; `collate` pads a batch and builds the labels each head
reads (masking MLM inputs with the BERT recipe).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import warnings
import zlib
from typing import Any, Iterator

import torch

from mtbert_fast.train.config import COLUMN_HELP, KINDS, ConfigError, TaskSpec, TrainConfig
from mtbert_fast.train.masking import IGNORE_INDEX, make_nsp_examples, mask_tokens

# per task and file, problems beyond this many are counted, not listed
MAX_LISTED = 5


@dataclasses.dataclass
class TaskRecords:
    """A task's checked rows, role -> value (labels already turned into indices), train and held-out."""

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def _rows(path: str, fmt: str) -> Iterator[tuple[int, dict[str, Any] | None, list[str], str | None]]:
    """(line number, row or None, the columns present, a parse problem or None) for each row of a file."""
    # utf-8-sig: a byte-order mark some editors write is not read as part of the first column's name
    with open(path, encoding="utf-8-sig", newline="") as f:
        if fmt == "jsonl":
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield n, None, [], f"line {n} is not valid JSON ({exc.msg})"
                    continue
                if not isinstance(row, dict):
                    yield n, None, [], f"line {n} is not a JSON object (one object a line), got {type(row).__name__}"
                    continue
                yield n, row, list(row), None
        else:
            # a tab-separated file has no quoting: a " is text (GLUE's files are full of them), never a field's edge
            reader = (csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if fmt == "tsv"
                      else csv.DictReader(f))
            header = list(reader.fieldnames or [])
            for row in reader:
                yield reader.line_num, row, header, None


_MISSING = object()


def _lookup(row: dict[str, Any], column: str) -> Any:
    """row[column]; a dotted name reaches into nested JSON objects ("answers.text"); _MISSING when absent."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _key(value: Any) -> str:
    """Label identity across formats: CSV's "1" and JSON's 1 are the same label."""
    return value if isinstance(value, str) else json.dumps(value)


class _RowChecker:
    """Normalizes one task's rows role -> value and collects the problems: the same problem on many rows (a
    column missing from every row, one misspelt label) is reported once with its count; other row problems are
    listed up to MAX_LISTED per file."""

    def __init__(self, task: TaskSpec):
        self.task = task
        self.problems: list[str] = []
        self.label_index = {_key(v): i for i, v in enumerate(task.labels)} if task.labels is not None else None
        self._groups: dict[tuple, list] = {}

    def fail(self, where: str, message: str) -> None:
        self.problems.append(f"task {self.task.name!r}: {where}: {message}")

    def fail_grouped(self, key: tuple, where: str, message: str) -> None:
        group = self._groups.setdefault(key, [0, where, message])
        group[0] += 1

    def describe(self, role: str) -> str:
        if role == "text" and self.task.kind == "pretraining":
            return "a document: a list of sentences, or one string with a sentence a line"
        return COLUMN_HELP[role]

    def read(self, path: str) -> list[dict[str, Any]]:
        task = self.task
        fmt = task.file_format(path)
        required, _ = KINDS[task.kind]
        out, rows = [], 0
        before, self._groups = len(self.problems), {}
        for line, row, columns, problem in _rows(path, fmt):
            rows += 1
            where = f"{path} line {line}"
            if problem is not None:
                self.fail(path, problem)
                continue
            # an optional role the config's columns name is as required as the others: a pair task whose pair
            # column is misspelt must not train on single sentences
            wanted = list(required) + [r for r in KINDS[task.kind][1] if r in task.columns]
            missing = [r for r in wanted if _lookup(row, task.column(r)) is _MISSING]
            for role in missing:
                self.fail_grouped(("missing", role), where if fmt == "jsonl" else f"{path} header",
                                  f"column {task.column(role)!r} ({self.describe(role)}) is missing; the "
                                  f"{'row' if fmt == 'jsonl' else 'file'} has columns: {', '.join(columns)}")
            if missing and fmt != "jsonl":
                break  # a CSV header lacks it for every row
            record = None if missing else self.normalize(row, where)
            if record is not None:
                out.append(record)
        listed = self.problems[before:]
        if len(listed) > MAX_LISTED:
            self.problems[before:] = listed[:MAX_LISTED] + [
                f"task {task.name!r}: {path}: ... and {len(listed) - MAX_LISTED} more problems like these"
            ]
        for count, where, message in self._groups.values():
            self.fail(where if count == 1 or fmt != "jsonl" else f"{where} and {count - 1} more rows", message)
        if not rows and len(self.problems) == before:
            self.fail(path, "the file holds no rows")
        return out

    def normalize(self, row: dict[str, Any], where: str) -> dict[str, Any] | None:
        task = self.task
        required, optional = KINDS[task.kind]
        values = {r: _lookup(row, task.column(r)) for r in required + optional}
        values = {r: v for r, v in values.items() if v is not _MISSING}
        for role in required:
            if values[role] is None or values[role] == "":
                self.fail(where, f"column {task.column(role)!r} ({self.describe(role)}) is empty")
                return None
        kind = task.kind
        if kind in ("sequence_classification", "next_sentence"):
            text_roles = ("text", "text_pair")
            for role in text_roles:
                if role in values and values[role] is not None and not isinstance(values[role], str):
                    self.fail(where, f"column {task.column(role)!r} must hold a string, got {values[role]!r}")
                    return None
            label = self.label(values["label"], where, "label")
            if label is None:
                return None
            return {"text": values["text"], "text_pair": values.get("text_pair") or None, "label": label}
        if kind == "token_classification":
            tokens, tags = self.words(values["tokens"], where, "tokens"), self.words(values["tags"], where, "tags")
            if tokens is None or tags is None:
                return None
            if len(tokens) != len(tags):
                self.fail(where, f"{len(tokens)} tokens but {len(tags)} tags: one tag a token")
                return None
            if not tokens:
                self.fail(where, f"column {task.column('tokens')!r} holds no tokens: a row with nothing to tag "
                                 "would give its batch a loss of NaN")
                return None
            indices = [self.label(t, where, "tags") for t in tags]
            return None if any(i is None for i in indices) else {"tokens": tokens, "tags": indices}
        if kind == "masked_lm":
            if not isinstance(values["text"], str):
                self.fail(where, f"column {task.column('text')!r} must hold a string, got {values['text']!r}")
                return None
            if not values["text"].strip():
                self.fail(where, f"column {task.column('text')!r} holds only whitespace: a row with no token to mask "
                                 "would give its batch a loss of NaN")
                return None
            return {"text": values["text"]}
        if kind == "span_extraction":
            return self.span(values, where)
        return self.document(values["text"], where)

    def label(self, value: Any, where: str, role: str) -> int | float | None:
        task = self.task
        column = task.column(role)
        if task.problem_type == "regression":
            try:
                target = float(value)
            except (TypeError, ValueError):
                target = math.nan
            if isinstance(value, bool) or not math.isfinite(target):
                self.fail(where, f"column {column!r}: regression label {value!r} is not a finite number")
                return None
            return target
        if self.label_index is not None:
            index = self.label_index.get(_key(value))
            if index is None:
                self.fail_grouped(("label", _key(value)), where,
                                  f"column {column!r}: label {value!r} is not in the label list {task.labels}")
            return index
        try:
            index = int(value)
            if isinstance(value, float) and value != index or isinstance(value, bool):
                raise ValueError
        except (TypeError, ValueError):
            self.fail(where, f"column {column!r}: label {value!r} is not an integer (num_labels {task.num_labels}, "
                             "no label list)")
            return None
        if not 0 <= index < task.num_labels:
            self.fail_grouped(("range", index), where,
                              f"column {column!r}: label {index} is out of range [0, {task.num_labels})")
            return None
        return index

    def words(self, value: Any, where: str, role: str) -> list | None:
        if isinstance(value, str):
            return value.split()
        if isinstance(value, list) and (role == "tags" or all(isinstance(w, str) for w in value)):
            return value
        self.fail(where, f"column {self.task.column(role)!r} must hold a list of strings or a space-separated "
                         f"string, got {value!r}")
        return None

    def span(self, values: dict[str, Any], where: str) -> dict[str, Any] | None:
        task = self.task
        # SQuAD keeps lists of answers: the first one is trained on
        start, answer = values["answer_start"], values["answer"]
        if start == [] or answer == []:
            self.fail(where, "the row has no answer (SQuAD v2's unanswerable questions): span extraction trains on "
                             "answerable rows only; leave such rows out")
            return None
        start = start[0] if isinstance(start, list) and start else start
        answer = answer[0] if isinstance(answer, list) and answer else answer
        try:
            start = int(start)
            if isinstance(start, bool) or start < 0:
                raise ValueError
        except (TypeError, ValueError):
            self.fail(where, f"column {task.column('answer_start')!r}: {start!r} is not a character offset "
                             "(an integer >= 0)")
            return None
        context = values["context"]
        if not isinstance(context, str) or not isinstance(answer, str) or not isinstance(values["question"], str):
            self.fail(where, "question, context and answer must be strings")
            return None
        if context[start:start + len(answer)] != answer:
            self.fail(where, f"the answer {answer!r} is not at character {start} of the context "
                             f"(found {context[start:start + len(answer)]!r})")
            return None
        return {"question": values["question"], "context": context, "start_char": start,
                "end_char": start + len(answer)}

    def document(self, value: Any, where: str) -> dict[str, Any] | None:
        if isinstance(value, str):
            sentences = [s.strip() for s in value.splitlines() if s.strip()]
        elif isinstance(value, list) and all(isinstance(s, str) for s in value):
            sentences = [s.strip() for s in value if s.strip()]
        else:
            self.fail(where, f"column {self.task.column('text')!r} must hold a document: a list of sentences or "
                             f"a string with a sentence a line, got {value!r}")
            return None
        if not sentences:
            self.fail(where, f"column {self.task.column('text')!r}: the document holds no sentence (nothing but "
                             f"blanks), got {value!r}")
            return None
        return {"sentences": sentences}


def _split(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Holds out round(fraction * n) rows (at least one when fraction > 0 and n > 1), chosen by seed."""
    n = len(records)
    k = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n > 1 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:k])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def load_records(config: TrainConfig) -> dict[str, TaskRecords]:
    """Reads and checks every task's data; raises one ConfigError naming every problem found."""
    problems: list[str] = []
    out = {}
    for task in config.tasks:
        checker = _RowChecker(task)
        train = checker.read(task.train_file)
        held = checker.read(task.eval_file) if task.eval_file else None
        if task.kind == "pretraining" and not checker.problems:
            docs = train if held is None else train + held
            if len(docs) < 2 or not any(len(d["sentences"]) > 1 for d in docs):
                checker.fail(task.train_file, "pretraining needs at least two documents, one of them with two or "
                                              "more sentences (next-sentence pairs draw B from another document)")
        problems += checker.problems
        if held is None:
            train, held = _split(train, config.training.eval_split, config.training.seed)
        out[task.name] = TaskRecords(train=train, eval=held)
    if problems:
        raise ConfigError(problems)
    return out


# --- tokenizing -------------------------------------------------------------------------------------------------

def load_tokenizer(path: str):
    """A fast HF tokenizer from a directory (tokenizer.json, or vocab.txt for BERT)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError("training tokenizes with transformers: pip install 'mtbert_fast[hf]'") from exc
    tokenizer = AutoTokenizer.from_pretrained(path)
    needed = {"pad_token_id": "[PAD]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]", "mask_token_id": "[MASK]"}
    missing = [tok for attr, tok in needed.items() if getattr(tokenizer, attr, None) is None]
    if missing:
        raise ConfigError(f"the tokenizer in {path} lacks the special tokens {', '.join(missing)}")
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"the tokenizer in {path} is not a fast (Rust) tokenizer; training needs its offsets")
    return tokenizer


def _features(enc, i: int) -> dict[str, list[int]]:
    return {"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
            "special_tokens_mask": enc["special_tokens_mask"][i]}


def _warn_truncated(task: TaskSpec, encodings: list, max_length: int, lost: str) -> None:
    """Says how many rows max_length cut, and what they lost by it (tokenizers keep what a cut left over)."""
    cut = sum(1 for e in encodings if e.overflowing)
    if cut:
        warnings.warn(f"task {task.name!r}: {cut} of {len(encodings)} rows are longer than max_length={max_length} "
                      f"tokens and were cut: {lost}", stacklevel=3)


def _pair_encodings(tokenizer, texts: list[str], pairs: list[str | None], common: dict) -> tuple[list[dict], list]:
    """Features and encodings of each row, a pair where it has one and a single text where not (one call with ""
    for the missing pairs would end those rows with an empty second segment, [SEP] [SEP])."""
    features, encodings = [None] * len(texts), [None] * len(texts)
    for has_pair in (False, True):
        rows = [i for i, p in enumerate(pairs) if (p is not None) == has_pair]
        if not rows:
            continue
        args = ([texts[i] for i in rows], [pairs[i] for i in rows]) if has_pair else ([texts[i] for i in rows],)
        enc = tokenizer(*args, **common)
        for j, i in enumerate(rows):
            features[i], encodings[i] = _features(enc, j), enc.encodings[j]
    return features, encodings


def encode_task(task: TaskSpec, records: list[dict], tokenizer, max_length: int, seed: int = 0) -> list[dict]:
    """Checked records -> features: input_ids, token_type_ids, special_tokens_mask and the task's labels
    (label; token_labels; start_position/end_position; nothing for masked_lm, masked at batch time). Rows that
    max_length cuts are counted in a warning that says what they lose."""
    if not records:
        return []
    common = dict(truncation=True, max_length=max_length, return_token_type_ids=True,
                  return_special_tokens_mask=True)
    kind = task.kind
    if kind in ("sequence_classification", "next_sentence"):
        features, encodings = _pair_encodings(tokenizer, [r["text"] for r in records],
                                              [r["text_pair"] for r in records], common)
        _warn_truncated(task, encodings, max_length, "the model sees their first tokens only")
        return [{**f, "label": r["label"]} for f, r in zip(features, records)]
    if kind == "masked_lm":
        enc = tokenizer([r["text"] for r in records], **common)
        empty = [i for i in range(len(records)) if all(enc["special_tokens_mask"][i])]
        if empty:
            # characters the tokenizer drops (zero-width marks, control characters): nothing to mask, and a batch of
            # such rows would have a loss of NaN
            raise ValueError(f"task {task.name!r}: {len(empty)} of {len(records)} rows make no token but the special "
                             f"ones, row {empty[0]} ({records[empty[0]]['text'][:60]!r}) first: a masked-LM row needs "
                             "a token to mask")
        _warn_truncated(task, enc.encodings, max_length, "the text past the cut is not trained on")
        return [_features(enc, i) for i in range(len(records))]
    if kind == "token_classification":
        enc = tokenizer([r["tokens"] for r in records], is_split_into_words=True, **common)
        _warn_truncated(task, enc.encodings, max_length, "the words past the cut, and their tags, are left out")
        out, tokenless = [], []
        for i, r in enumerate(records):
            labels, previous = [], None
            for word in enc.word_ids(i):
                # the first sub-word of each word carries its tag; the rest and the specials are ignored
                labels.append(r["tags"][word] if word is not None and word != previous else IGNORE_INDEX)
                previous = word
            words = {w for w in enc.word_ids(i) if w is not None}
            if not words:
                raise ValueError(f"task {task.name!r}: row {i} ({r['tokens'][:8]!r}) makes no token but the special "
                                 "ones: a row with nothing to tag would give its batch a loss of NaN")
            if len(words) <= max(words):  # a word before the last one kept made no token
                tokenless.append(i)
            out.append({**_features(enc, i), "token_labels": labels})
        if tokenless:
            first = records[tokenless[0]]["tokens"]
            warnings.warn(f"task {task.name!r}: {len(tokenless)} of {len(records)} rows have words that make no token "
                          f"(characters the tokenizer drops), row {tokenless[0]} ({first[:8]!r}) first: their tags "
                          "are left out", stacklevel=2)
        return out
    if kind == "span_extraction":
        questions = [r["question"] for r in records]
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        for i, ids in enumerate(tokenizer(questions, add_special_tokens=False)["input_ids"]):
            if len(ids) >= room:
                raise ValueError(f"task {task.name!r}: the question of row {i} ({questions[i][:60]!r}) is "
                                 f"{len(ids)} tokens long, which leaves its context no room within "
                                 f"max_length={max_length}")
        enc = tokenizer(questions, [r["context"] for r in records],
                        truncation="only_second", max_length=max_length, return_token_type_ids=True,
                        return_special_tokens_mask=True, return_offsets_mapping=True)
        out, lost = [], 0
        for i, r in enumerate(records):
            offsets = enc["offset_mapping"][i]
            context = [t for t, seq in enumerate(enc.sequence_ids(i)) if seq == 1]
            # the context tokens the answer's characters overlap: characters that make no token (a trailing space,
            # a stripped accent, a zero-width mark) at its edges do not matter
            inside = [t for t in context if offsets[t][1] > r["start_char"] and offsets[t][0] < r["end_char"]]
            cut = bool(enc.encodings[i].overflowing) and (
                not inside or inside[-1] == context[-1] and offsets[context[-1]][1] < r["end_char"])
            if inside and not cut:
                start, end = inside[0], inside[-1]
            else:
                start = end = 0  # an answer cut off by truncation points at [CLS], as in SQuAD 2.0
                lost += cut
            out.append({**_features(enc, i), "start_position": start, "end_position": end})
        if lost:
            warnings.warn(f"task {task.name!r}: {lost} of {len(records)} rows have their answer past "
                          f"max_length={max_length} tokens: they train as unanswerable (start and end at [CLS])",
                          stacklevel=2)
        return out
    if kind == "pretraining":
        docs = [tokenizer([s for s in r["sentences"]], add_special_tokens=False)["input_ids"] for r in records]
        if len(docs) < 2 or not any(len(d) > 1 for d in docs):
            # a held-out split too small for pairs: no evaluation rather than a failure
            return []
        pairs = make_nsp_examples(docs, tokenizer.cls_token_id, tokenizer.sep_token_id, max_length, seed=seed)
        cut = sum(p.cut for p in pairs)
        if cut:
            warnings.warn(f"task {task.name!r}: {cut} of {len(pairs)} next-sentence pairs are longer than "
                          f"max_length={max_length} tokens and were cut: the longer sentence of each loses its last "
                          "tokens", stacklevel=2)
        return [{"input_ids": p.input_ids, "token_type_ids": p.token_type_ids,
                 "special_tokens_mask": p.special_tokens_mask, "label": p.label} for p in pairs]
    raise ValueError(f"unknown task kind {kind!r}")


# --- batches ----------------------------------------------------------------------------------------------------

# what a random stream is for: mixed into its seed after training.seed, so that streams of different purposes
# never share a seed, whatever their rank, task or epoch
SHUFFLE_STREAM, MASK_STREAM, EVAL_MASK_STREAM, DROPOUT_STREAM = 1, 2, 3, 4


def _mix(*parts: int) -> int:
    """One 63-bit seed from several integers (splitmix-style): each purpose, task, epoch and rank draws its own."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TaskStream:
    """A task's training features dealt in shuffled epochs, each process (rank) taking a disjoint shard.

    Epoch e's order is a permutation drawn from (seed, task_index, e) alone, so the stream's whole state is
    (epoch, cursor).  Every rank's shard has n // world_size rows (the remainder sits the epoch out, a different
    remainder each epoch); the last batch of an epoch may be short, equally on every rank.
    """

    def __init__(self, size: int, batch_size: int, seed: int, task_index: int, rank: int = 0, world_size: int = 1):
        if size < world_size:
            raise ConfigError(f"{size} training rows cannot be shared out among {world_size} processes")
        self.size, self.batch_size = size, batch_size
        self.seed, self.task_index, self.rank, self.world_size = seed, task_index, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._shard = self._make_shard(0)

    @property
    def shard_size(self) -> int:
        return self.size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.shard_size / self.batch_size)

    def _make_shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, SHUFFLE_STREAM, self.task_index, epoch))
        order = torch.randperm(self.size, generator=g)
        return order[self.rank:self.shard_size * self.world_size:self.world_size].tolist()

    def next_indices(self) -> list[int]:
        if self.cursor >= len(self._shard):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._shard = self._make_shard(self.epoch)
        batch = self._shard[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(batch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._shard = self._make_shard(self.epoch)


@dataclasses.dataclass
class Batch:
    """Model inputs [B, L] and the labels of one task, keyed by its name as MultiTaskBert.forward takes them."""

    task: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: dict[str, Any]

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device) -> Batch:
        def move(v):
            return tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)

        return Batch(self.task, self.input_ids.to(device), self.attention_mask.to(device),
                     self.token_type_ids.to(device), {k: move(v) for k, v in self.labels.items()})


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.int64)


MASKED_KINDS = ("masked_lm", "pretraining")


def mask_held_out(task: TaskSpec, features: list[dict], vocab_size: int, mask_token_id: int,
                  seed: int) -> list[dict]:
    """A masked-LM task's held-out features with their masks drawn once, each example's from a generator of its own,
    seeded by (seed, the task's name, the example's index): the masks, and so the held-out loss, do not depend on the
    other tasks, on eval_batch_size or on how many processes share the examples. Returns copies with the corrupted
    "input_ids" and their "mlm_labels", which `collate` takes as they are."""
    if task.kind not in MASKED_KINDS:
        raise ValueError(f"mask_held_out: task {task.name!r} is {task.kind}, not a masked-LM task")
    name = zlib.crc32(task.name.encode())
    masked = []
    for i, f in enumerate(features):
        generator = torch.Generator().manual_seed(_mix(seed, EVAL_MASK_STREAM, name, i))
        ids, labels = mask_tokens(torch.tensor([f["input_ids"]]), None, torch.tensor([f["special_tokens_mask"]]),
                                  vocab_size, mask_token_id, task.mlm_probability, generator)
        masked.append({**f, "input_ids": ids[0].tolist(), "mlm_labels": labels[0].tolist()})
    return masked


def collate(
    task: TaskSpec,
    features: list[dict],
    pad_token_id: int,
    vocab_size: int,
    mask_token_id: int,
    generator: torch.Generator | None = None,
) -> Batch:
    """Pads features to the batch's longest row (right padding) and builds each head's labels; masked-LM
    inputs are corrupted here with `mask_tokens`, drawing from `generator`, unless every feature carries its masks
    already (`mask_held_out`)."""
    input_ids = _pad([f["input_ids"] for f in features], pad_token_id)
    attention_mask = _pad([[1] * len(f["input_ids"]) for f in features], 0)
    token_type_ids = _pad([f["token_type_ids"] for f in features], 0)
    kind, name = task.kind, task.name
    labels: dict[str, Any] = {}
    if kind in MASKED_KINDS:
        premasked = sum("mlm_labels" in f for f in features)
        if premasked == len(features):
            labels[name] = _pad([f["mlm_labels"] for f in features], IGNORE_INDEX)
        elif premasked:
            raise ValueError(f"collate: task {name!r}: {premasked} of {len(features)} features carry their masks "
                             "(mlm_labels); mask all of them or none")
        else:
            special = _pad([f["special_tokens_mask"] for f in features], 1)
            input_ids, labels[name] = mask_tokens(input_ids, attention_mask, special, vocab_size, mask_token_id,
                                                  task.mlm_probability, generator)
    if kind == "pretraining":
        labels[name] = (labels[name], torch.tensor([f["label"] for f in features], dtype=torch.int64))
    elif kind in ("sequence_classification", "next_sentence"):
        dtype = torch.float32 if task.problem_type == "regression" else torch.int64
        labels[name] = torch.tensor([f["label"] for f in features], dtype=dtype)
    elif kind == "token_classification":
        labels[name] = _pad([f["token_labels"] for f in features], IGNORE_INDEX)
    elif kind == "span_extraction":
        labels[name] = (torch.tensor([f["start_position"] for f in features], dtype=torch.int64),
                        torch.tensor([f["end_position"] for f in features], dtype=torch.int64))
    return Batch(name, input_ids, attention_mask, token_type_ids, labels)
