"""The training configuration and its data: every mistake is a ConfigError that names the task, file, column or
value, raised before the tokenizer or the model is built; and the data pipeline's encodings are right."""

from __future__ import annotations

import json
import os
import random
import zlib
import pytest
import torch

from mtbert_fast.train import ConfigError, Trainer, load_config
from mtbert_fast.train import data as data_module
from mtbert_fast.train import trainer as trainer_module
from mtbert_fast.train.data import (
    DROPOUT_STREAM,
    EVAL_MASK_STREAM,
    MASK_STREAM,
    SHUFFLE_STREAM,
    TaskStream,
    _mix,
    collate,
    encode_task,
    load_records,
    load_tokenizer,
    mask_held_out,
)
from mtbert_fast.train.masking import IGNORE_INDEX

import train_synthetic as syn


@pytest.fixture
def files(tmp_path):
    return syn.write_tasks(str(tmp_path), n=40)


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the tokenizer or the model is built: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the configuration was checked")

    monkeypatch.setattr(trainer_module, "load_tokenizer", refuse)
    monkeypatch.setattr(trainer_module, "build_model", refuse)


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(config))
    return str(info.value)


def _one_task(files, task: dict) -> dict:
    """The base config with `task` as its only task."""
    config = syn.base_config(files, tasks=())
    config["tasks"] = [task]
    return config


def _task_error(files, task: dict) -> str:
    return _error(_one_task(files, task))


def test_good_config_loads(files, no_work):
    config = load_config(syn.base_config(files, tasks=("topic", "tags", "lm", "docs", "span")))
    records = load_records(config)
    assert [t.name for t in config.tasks] == ["topic", "tags", "lm", "docs", "span"]
    assert len(records["topic"].train) == 32 and len(records["topic"].eval) == 8
    assert records["topic"].train[0]["label"] in (0, 1)
    assert all(len(r["tags"]) == len(r["tokens"]) for r in records["tags"].train)


def test_missing_data_file(files, no_work):
    config = syn.base_config(files)
    config["tasks"][0]["train_file"] = os.path.join(os.path.dirname(files["topic"]), "nope.jsonl")
    message = _error(config)
    assert "task 'topic'" in message and "nope.jsonl does not exist" in message


def test_missing_column_names_file_column_and_columns_present(files, no_work):
    config = syn.base_config(files)
    config["tasks"][0]["columns"] = {"text": "text"}  # the file calls it "sentence"
    message = _error(config)
    assert "task 'topic'" in message and files["topic"] in message
    assert "column 'text'" in message and "columns: sentence, label" in message
    assert "line 1 and 39 more rows" in message  # said once for the file, with the rows counted

    config = syn.base_config(files)
    config["tasks"][1]["columns"] = {"tags": "ner_tags"}  # CSV: the header says it once
    message = _error(config)
    assert f"{files['tags']} header" in message and "column 'ner_tags'" in message
    assert "the file has columns: tokens, tags" in message


def test_unknown_task_kind(files, no_work):
    config = syn.base_config(files)
    config["tasks"][0]["kind"] = "sentiment"
    message = _error(config)
    assert "unknown kind 'sentiment'" in message and "sequence_classification" in message


def test_label_not_in_the_label_list(files, no_work):
    config = syn.base_config(files)
    config["tasks"][0]["labels"] = ["neg", "positive"]
    message = _error(config)
    # one misspelt label is one problem, with the rows it spoils counted
    assert message == (f"task 'topic': {files['topic']} line 1 and 19 more rows: column 'label': label 'pos' is not "
                       "in the label list ['neg', 'positive']")

    config = syn.base_config(files)
    config["tasks"][1]["labels"] = ["X", "Y"]
    message = _error(config)
    assert "label 'Z' is not in the label list ['X', 'Y']" in message and files["tags"] in message


def test_integer_label_out_of_range(tmp_path, files, no_work):
    path = syn.write_jsonl(str(tmp_path / "ints.jsonl"), [{"text": "w1 w2", "label": i} for i in (0, 1, 2, 3)])
    config = syn.base_config(files, tasks=("topic",))
    config["tasks"][0].update(train_file=path, columns={}, labels=None, num_labels=3)
    message = _error(config)
    assert "label 3 is out of range [0, 3)" in message and f"{path} line 4" in message


def test_every_problem_is_reported_at_once(files, no_work):
    config = syn.base_config(files)
    config["tasks"][0]["kind"] = "sentiment"
    config["tasks"][1]["train_file"] = "missing.csv"
    config["training"]["lr_rate"] = 0.1
    config["training"]["sampler"] = "random"
    message = _error(config)
    assert message.startswith("4 problems")
    for part in ("unknown kind 'sentiment'", "missing.csv does not exist", "unknown key 'lr_rate'",
                 "sampler 'random' is unknown"):
        assert part in message


def test_structural_mistakes(files, no_work):
    cases = [
        (lambda c: c["model"].pop("tokenizer"), "model.tokenizer is needed"),
        (lambda c: c["model"].update(config="bert-huge"), "neither a named config"),
        (lambda c: c["training"].update(batch_size=0), "batch_size must be at least 1"),
        (lambda c: c["training"].update(batch_size="16"), "batch_size must be an integer"),
        (lambda c: c["training"].pop("max_steps"), "needs max_steps or epochs"),
        (lambda c: c["tasks"].append(dict(c["tasks"][0])), "task name 'topic' is used 2 times"),
        (lambda c: c["tasks"][0].update(name="keys"), "task 'keys': the name of an nn.ModuleDict attribute"),
        (lambda c: c["tasks"][0].update(columns={"tokens": "x"}), "does not use"),
        (lambda c: c["tasks"][0].update(labels=None), "give the label list"),
        (lambda c: c["tasks"][2].update(labels=["a"]), "takes no labels"),
        (lambda c: c.update(task=[]), "unknown top-level key 'task'"),
    ]
    for change, expected in cases:
        config = syn.base_config(files)
        change(config)
        assert expected in _error(config), expected


def test_training_numbers_must_be_usable(tmp_path, files, no_work):
    """Numbers that would train to nothing, to NaN or backwards are refused; JSON's NaN and Infinity too."""
    def without_max_steps(c, **training):
        c["training"].pop("max_steps")
        c["training"].update(training)

    cases = [
        (dict(max_grad_norm=0), "max_grad_norm must be a finite number > 0 (or null for no clipping), got 0.0"),
        (dict(max_grad_norm=-1.0), "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=float("nan")), "max_grad_norm must be a finite number > 0"),
        (dict(lr=float("inf")), "training.lr must be a finite number > 0, got inf"),
        (dict(lr=float("nan")), "training.lr must be a finite number > 0, got nan"),
        (dict(weight_decay=-0.5), "training.weight_decay must be a finite number >= 0, got -0.5"),
        (dict(temperature=float("nan")), "training.temperature must be a finite number > 0, got nan"),
        (dict(warmup_steps=-5), "training.warmup_steps must be >= 0, got -5"),
        (dict(warmup_ratio=0.1), "training takes warmup_steps or warmup_ratio, not both"),
        (dict(epochs=2), "training takes max_steps or epochs, not both"),
    ]
    for training, expected in cases:
        config = syn.base_config(files)
        config["training"].update(training)
        assert expected in _error(config), expected
    config = syn.base_config(files)
    without_max_steps(config, epochs=float("nan"))
    assert "training.epochs must be a finite number > 0, got nan" in _error(config)
    config = syn.base_config(files)
    config["tasks"][0]["columns"] = {"text": 5}
    assert "columns['text'] must name a column (a non-empty string), got 5" in _error(config)
    config = syn.base_config(files)
    config["tasks"][0]["train_file"] = str(tmp_path)
    assert f"train_file {tmp_path} is a directory; name the file" in _error(config)


def _topic_task(train_file, **spec):
    return {"name": "t", "kind": "sequence_classification", "train_file": train_file, "labels": ["neg", "pos"],
            **spec}


def _records(files, task):
    return load_records(load_config(_one_task(files, task)))["t"]


@pytest.mark.parametrize("model_type, longest", [("bert", 16), ("roberta", 15)])
def test_max_length_is_checked_against_the_rows_of_the_position_table(model_type, longest, files):
    """RoBERTa numbers positions from its padding id + 1: 16 position embeddings hold 15 tokens, and max_length 16
    is refused before training (it failed at the first full batch); BERT's hold 16."""
    config = syn.base_config(files, tasks=("lm",), max_steps=1)
    config["model"]["config"] = dict(syn.TINY_ENCODER, model_type=model_type, max_position_embeddings=16,
                                     pad_token_id=0)
    config["model"]["max_length"] = longest
    Trainer(load_config(config))
    config["model"]["max_length"] = longest + 1
    message = _error(config)
    assert f"max_length {longest + 1} exceeds the {longest} tokens the encoder's 16 position embeddings hold" in message


def test_tsv_quotes_are_text_and_a_bom_is_not_a_column(tmp_path, files):
    """A tab-separated file has no quoting (a " is text, as in GLUE's files); a UTF-8 byte-order mark is not part of
    the first column's name."""
    tsv = tmp_path / "d.tsv"
    tsv.write_text('text\tlabel\n"Hello" she said\tpos\n"unclosed quote\tneg\nthird row\tpos\n5 inches" long\tneg\n')
    records = _records(files, _topic_task(str(tsv)))
    assert sorted(r["text"] for r in records.train + records.eval) == sorted(
        ['"Hello" she said', '"unclosed quote', "third row", '5 inches" long'])
    csv_file = tmp_path / "d.csv"
    csv_file.write_bytes("\ufefftext,label\nw1 w2,pos\nw3,neg\n".encode())
    records = _records(files, _topic_task(str(csv_file)))
    assert len(records.train) + len(records.eval) == 2


def test_row_values_that_would_train_wrongly_are_refused(tmp_path, files, no_work):
    cases = [
        (syn.write_jsonl(str(tmp_path / "p.jsonl"), [{"text": "w1", "sentence_2": "w2", "label": "pos"}]),
         dict(columns={"text_pair": "sentence2"}), "column 'sentence2' (the second text of a pair) is missing"),
        (syn.write_jsonl(str(tmp_path / "r.jsonl"), [{"text": "w1", "label": float("nan")}]),
         dict(labels=None, num_labels=1, problem_type="regression"), "regression label nan is not a finite number"),
    ]
    for path, spec, expected in cases:
        assert expected in _task_error(files, {**_topic_task(path), **spec}), expected
    empty = syn.write_jsonl(str(tmp_path / "e.jsonl"), [{"tokens": [], "tags": []}])
    negative = syn.write_jsonl(str(tmp_path / "n.jsonl"),
                               [{"question": "w1", "context": "w2 w1", "answer": "w1", "answer_start": -2}])
    unanswerable = syn.write_jsonl(str(tmp_path / "u.jsonl"),
                                   [{"question": "w1", "context": "w2 w1", "answer": [], "answer_start": []}])
    cases = [
        ({"name": "t", "kind": "token_classification", "train_file": empty, "labels": ["X"]},
         "column 'tokens' holds no tokens"),
        ({"name": "s", "kind": "span_extraction", "train_file": negative}, "-2 is not a character offset"),
        ({"name": "s", "kind": "span_extraction", "train_file": unanswerable}, "the row has no answer"),
    ]
    for task, expected in cases:
        assert expected in _task_error(files, task), expected


def test_rows_with_nothing_to_train_on_are_refused(tmp_path, files, no_work):
    """A pretraining document without a sentence would crash the tokenizer, a masked-LM row of whitespace has no
    token to mask: the check names each such row."""
    for blank in ("   ", " \n\t\n", [], ["", " "]):
        docs = syn.write_jsonl(str(tmp_path / "d.jsonl"), syn.doc_rows(4, random.Random(0)) + [{"text": blank}])
        expected = f"task 'p': {docs} line 5: column 'text': the document holds no sentence"
        assert expected in _task_error(files, {"name": "p", "kind": "pretraining", "train_file": docs}), blank
    lm = syn.write_jsonl(str(tmp_path / "m.jsonl"), [{"text": "w1 w2"}, {"text": "  "}, {"text": "w3"}, {"text": "\t"}])
    message = _task_error(files, {"name": "m", "kind": "masked_lm", "train_file": lm})
    for line in (2, 4):
        assert f"task 'm': {lm} line {line}: column 'text' holds only whitespace" in message
    assert f"{lm} line 1" not in message and f"{lm} line 3" not in message


def test_row_level_mistakes(tmp_path, files, no_work):
    bad_tags = syn.write_jsonl(str(tmp_path / "t.jsonl"), [{"tokens": ["w1", "w2"], "tags": ["X"]}])
    bad_span = syn.write_jsonl(str(tmp_path / "s.jsonl"),
                               [{"question": "w1", "context": "w2 w1", "answer": "w1", "answer_start": 0}])
    bad_json = str(tmp_path / "j.jsonl")
    with open(bad_json, "w") as f:
        f.write('{"text": "w1"}\n{"text": \n')
    one_doc = syn.write_jsonl(str(tmp_path / "d.jsonl"), [{"text": ["w1 w2", "w3"]}])
    cases = [
        ({"name": "t", "kind": "token_classification", "train_file": bad_tags, "labels": ["X"]},
         "2 tokens but 1 tags"),
        ({"name": "s", "kind": "span_extraction", "train_file": bad_span}, "is not at character 0"),
        ({"name": "m", "kind": "masked_lm", "train_file": bad_json}, "line 2 is not valid JSON"),
        ({"name": "p", "kind": "pretraining", "train_file": one_doc}, "at least two documents"),
    ]
    for task, expected in cases:
        assert expected in _task_error(files, task), expected


def test_yaml_and_json_files_give_the_same_config(tmp_path, files):
    yaml = pytest.importorskip("yaml")
    config = syn.base_config(files)
    (tmp_path / "c.json").write_text(json.dumps(config))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert load_config(tmp_path / "c.json") == load_config(tmp_path / "c.yaml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")


def test_relative_paths_resolve_against_the_config_file(tmp_path, files):
    config = syn.base_config(files, tasks=("topic",))
    config["tasks"][0]["train_file"] = "topic.jsonl"
    config["model"]["tokenizer"] = "tokenizer"
    (tmp_path / "c.json").write_text(json.dumps(config))
    loaded = load_config(str(tmp_path / "c.json"))
    assert loaded.tasks[0].train_file == files["topic"] and loaded.model.tokenizer == files["tokenizer"]


# --- the data pipeline ------------------------------------------------------------------------------------------

def test_token_labels_sit_on_each_words_first_subword(files):
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("tags",)))
    feats = encode_task(config.tasks[0], [{"tokens": ["w1s", "w2"], "tags": [1, 2]}], tok, 32)
    assert tok.convert_ids_to_tokens(feats[0]["input_ids"]) == ["[CLS]", "w1", "##s", "w2", "[SEP]"]
    assert feats[0]["token_labels"] == [IGNORE_INDEX, 1, IGNORE_INDEX, 2, IGNORE_INDEX]


def test_span_positions_cover_the_answer(files):
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("span",)))
    records = load_records(config)["span"].train
    for rec, feat in zip(records, encode_task(config.tasks[0], records, tok, 64)):
        start, end = feat["start_position"], feat["end_position"]
        answer = rec["context"][rec["start_char"]:rec["end_char"]]
        assert start > 0 and tok.decode(feat["input_ids"][start:end + 1]) == answer
    # an answer cut off by truncation points at [CLS] (and is counted in a warning)
    with pytest.warns(UserWarning, match="have their answer past max_length=8 tokens"):
        cut = encode_task(config.tasks[0], [{"question": "w1", "context": "w2 w3 w4 w5 w6 w7 w1",
                                              "start_char": 18, "end_char": 20}], tok, 8)
    assert (cut[0]["start_position"], cut[0]["end_position"]) == (0, 0)


def test_pairs_and_single_texts_in_one_call(files):
    """A row without a pair is encoded as a single text even beside rows with one: no empty second segment."""
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("topic",)))
    feats = encode_task(config.tasks[0], [{"text": "w1 w2", "text_pair": "w3", "label": 0},
                                          {"text": "w4", "text_pair": None, "label": 1}], tok, 32)
    assert tok.convert_ids_to_tokens(feats[0]["input_ids"]) == ["[CLS]", "w1", "w2", "[SEP]", "w3", "[SEP]"]
    assert tok.convert_ids_to_tokens(feats[1]["input_ids"]) == ["[CLS]", "w4", "[SEP]"]
    assert feats[1]["token_type_ids"] == [0, 0, 0]


def test_span_answers_with_tokenless_edges_keep_their_tokens(files):
    """Characters that make no token at an answer's edges (spaces, a zero-width mark) do not turn it into "no
    answer"."""
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("span",)))
    for context, answer, start_char in (("w2 w3 w1 ", "w1 ", 6), (" w1 w2", " w1", 0), ("w2 w1\u200b", "w1\u200b", 3)):
        feat = encode_task(config.tasks[0], [{"question": "w4", "context": context, "start_char": start_char,
                                              "end_char": start_char + len(answer)}], tok, 32)[0]
        start, end = feat["start_position"], feat["end_position"]
        assert tok.convert_ids_to_tokens(feat["input_ids"][start:end + 1]) == ["w1"], (context, answer)


def test_truncation_is_counted_and_a_question_too_long_is_named(files):
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("tags", "span")))
    tags, span = config.tasks
    with pytest.warns(UserWarning, match="task 'tags': 1 of 2 rows are longer than max_length=6 tokens and were cut: "
                                         "the words past the cut, and their tags, are left out"):
        encode_task(tags, [{"tokens": ["w1"] * 9, "tags": [0] * 9}, {"tokens": ["w1"], "tags": [1]}], tok, 6)
    with pytest.warns(UserWarning, match="task 'span': 1 of 1 rows have their answer past max_length=8 tokens"):
        encode_task(span, [{"question": "w1", "context": "w2 w3 w4 w5 w6 w7 w1", "start_char": 18,
                            "end_char": 20}], tok, 8)
    with pytest.raises(ValueError, match="task 'span': the question of row 0 .* is 9 tokens long, which leaves its "
                                         "context no room within max_length=8"):
        encode_task(span, [{"question": "w1 " * 9, "context": "w2", "start_char": 0, "end_char": 2}], tok, 8)
    docs = load_config(syn.base_config(files, tasks=("docs",))).tasks[0]
    with pytest.warns(UserWarning, match="task 'docs': 1 of 1 next-sentence pairs are longer than max_length=8 tokens "
                                         "and were cut"):
        encode_task(docs, [{"sentences": ["w1 w2 w3 w4 w5 w6", "w7"]}, {"sentences": ["w8"]}], tok, 8)


def test_rows_the_tokenizer_empties_are_named(files):
    """Characters the tokenizer drops (zero-width spaces) leave a masked-LM row nothing to mask and a tagging row
    nothing to tag: both are refused by row; a tagging word that makes no token loses its tag with a warning."""
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("lm", "tags")))
    lm, tags = config.tasks
    with pytest.raises(ValueError, match=r"task 'lm': 1 of 2 rows make no token but the special ones, row 1 "
                                         r"\('\\u200b \\u200b'\) first: a masked-LM row needs a token to mask"):
        encode_task(lm, [{"text": "w1 w2"}, {"text": "\u200b \u200b"}], tok, 32)
    with pytest.raises(ValueError, match=r"task 'tags': row 0 \(\['\\u200b'\]\) makes no token but the special ones"):
        encode_task(tags, [{"tokens": ["\u200b"], "tags": [0]}], tok, 32)
    with pytest.warns(UserWarning, match=r"task 'tags': 1 of 2 rows have words that make no token .* row 1 "
                                         r"\(\['w1', '\\u200b', 'w2'\]\) first: their tags are left out"):
        feats = encode_task(tags, [{"tokens": ["w1"], "tags": [0]},
                                   {"tokens": ["w1", "\u200b", "w2"], "tags": [0, 1, 2]}], tok, 32)
    assert [t for t in feats[1]["token_labels"] if t != IGNORE_INDEX] == [0, 2]


def test_collate_pads_and_masks(files):
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("lm", "docs")))
    records = load_records(config)
    lm, docs = config.tasks
    feats = encode_task(lm, records["lm"].train[:4], tok, 32)
    batch = collate(lm, feats, tok.pad_token_id, len(tok), tok.mask_token_id, torch.Generator().manual_seed(0))
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch.input_ids.shape == (4, max(lengths)) and batch.attention_mask.sum(1).tolist() == lengths
    labels = batch.labels["lm"]
    assert (labels != IGNORE_INDEX).any() and not (labels[batch.attention_mask == 0] != IGNORE_INDEX).any()

    feats = encode_task(docs, records["docs"].train, tok, 32, seed=0)
    batch = collate(docs, feats[:8], tok.pad_token_id, len(tok), tok.mask_token_id, torch.Generator())
    mlm, nsp = batch.labels["docs"]
    assert mlm.shape == batch.input_ids.shape and nsp.shape == (8,)
    assert set(batch.token_type_ids.unique().tolist()) == {0, 1}


def test_held_out_masks_are_drawn_per_example_and_collated_as_they_are(files):
    """mask_held_out masks each example from its own seed: the first examples get the same masks whatever follows
    them, the seed moves them, special tokens are never masked, and collate pads them without drawing again."""
    tok = load_tokenizer(files["tokenizer"])
    config = load_config(syn.base_config(files, tasks=("lm", "topic")))
    lm, topic = config.tasks
    feats = encode_task(lm, load_records(config)["lm"].train[:12], tok, 32)
    masked = mask_held_out(lm, feats, len(tok), tok.mask_token_id, seed=0)
    assert mask_held_out(lm, feats[:5], len(tok), tok.mask_token_id, seed=0) == masked[:5]
    assert [m["input_ids"] for m in masked] != [m["input_ids"] for m in
                                                mask_held_out(lm, feats, len(tok), tok.mask_token_id, seed=1)]
    for f, m in zip(feats, masked):
        picked = [i for i, t in enumerate(m["mlm_labels"]) if t != IGNORE_INDEX]
        assert picked and all(not f["special_tokens_mask"][i] and m["mlm_labels"][i] == f["input_ids"][i]
                              for i in picked)
        assert [a for i, a in enumerate(m["input_ids"]) if i not in picked] == [
            a for i, a in enumerate(f["input_ids"]) if i not in picked]
    batch = collate(lm, masked[:4], tok.pad_token_id, len(tok), tok.mask_token_id, None)
    for row, m in enumerate(masked[:4]):
        n = len(m["input_ids"])
        assert batch.input_ids[row, :n].tolist() == m["input_ids"]
        assert batch.labels["lm"][row].tolist() == m["mlm_labels"] + [IGNORE_INDEX] * (batch.input_ids.shape[1] - n)
    with pytest.raises(ValueError, match=r"collate: task 'lm': 1 of 3 features carry their masks"):
        collate(lm, masked[:1] + feats[1:3], tok.pad_token_id, len(tok), tok.mask_token_id, None)
    with pytest.raises(ValueError, match=r"mask_held_out: task 'topic' is sequence_classification, not a masked-LM"):
        mask_held_out(topic, feats, len(tok), tok.mask_token_id, seed=0)


def test_streams_give_each_rank_a_disjoint_shard():
    world, size, bs = 3, 50, 4
    streams = [TaskStream(size, bs, seed=0, task_index=1, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        seen = []
        for s in streams:
            mine = [i for _ in range(s.batches_per_epoch) for i in s.next_indices()]
            assert len(mine) == size // world
            seen.append(mine)
        flat = [i for m in seen for i in m]
        assert len(set(flat)) == len(flat)  # disjoint within an epoch
        if epoch == 0:
            first = seen
    assert seen != first  # each epoch is reshuffled
    # (epoch, cursor) is the whole state
    s = TaskStream(size, bs, seed=0, task_index=1)
    [s.next_indices() for _ in range(17)]
    t = TaskStream(size, bs, seed=0, task_index=1)
    t.load_state_dict(s.state_dict())
    assert [s.next_indices() for _ in range(20)] == [t.next_indices() for _ in range(20)]


def test_random_streams_of_different_purposes_have_different_seeds():
    """The shuffles (per task and epoch), the masks and dropout (per rank) and the held-out masks (per task and
    example) never share a seed."""
    for seed in (0, 1, 12345):
        seeds = [_mix(seed, SHUFFLE_STREAM, task, epoch) for task in range(8) for epoch in range(8)]
        seeds += [_mix(seed, purpose, rank) for purpose in (MASK_STREAM, DROPOUT_STREAM) for rank in range(8)]
        seeds += [_mix(seed, EVAL_MASK_STREAM, zlib.crc32(name.encode()), i) for name in ("lm", "pre")
                  for i in range(64)]
        assert len(set(seeds)) == len(seeds)


def test_trainer_seeds_masks_and_dropout_apart_from_the_shuffles(files, monkeypatch):
    """The seeds a trainer draws its masks, held-out masks and dropout from are none of its tasks' shuffle seeds."""

    def recording(module) -> dict[int, set[int]]:
        mix, seeds = module._mix, {}

        def recorded(*parts: int) -> int:
            seeds.setdefault(parts[1], set()).add(mix(*parts))
            return mix(*parts)

        monkeypatch.setattr(module, "_mix", recorded)
        return seeds

    in_data, in_trainer = recording(data_module), recording(trainer_module)
    trainer = Trainer(load_config(syn.base_config(files, tasks=("lm", "topic"), eval_split=0.25)))
    for stream in trainer.streams.values():
        for epoch in range(8):
            stream.load_state_dict({"epoch": epoch, "cursor": 0})
    held_out = len(trainer.records["lm"].eval)
    assert held_out > 0
    assert set(in_data) == {SHUFFLE_STREAM, EVAL_MASK_STREAM} and set(in_trainer) == {MASK_STREAM, DROPOUT_STREAM}
    assert len(in_data[SHUFFLE_STREAM]) == 2 * 8 and len(in_data[EVAL_MASK_STREAM]) == held_out
    assert {trainer.mask_generator.initial_seed(), torch.initial_seed()} == in_trainer[MASK_STREAM] | in_trainer[
        DROPOUT_STREAM]
    every = [seed for seeds in (*in_data.values(), *in_trainer.values()) for seed in seeds]
    assert len(set(every)) == len(every)


def test_held_out_split_partitions_the_rows_by_seed(files):
    split = load_config(syn.base_config(files, tasks=("topic",), eval_split=0.25))
    whole = load_config(syn.base_config(files, tasks=("topic",), eval_split=0.0))
    a, b = load_records(split)["topic"], load_records(split)["topic"]
    everything = load_records(whole)["topic"]
    assert len(a.eval) == 10 and len(a.train) == 30 and a.eval == b.eval and everything.eval == []
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, a.train + a.eval)) == sorted(map(key, everything.train))
    other = load_config(syn.base_config(files, tasks=("topic",), eval_split=0.25, seed=1))
    assert load_records(other)["topic"].eval != a.eval
