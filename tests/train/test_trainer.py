"""The training loop: a multi-task run really learns every task; the saved model gives the trained model's outputs;
a run resumed from a checkpoint continues exactly as an uninterrupted one; the CLI entry point works."""

from __future__ import annotations

import argparse
import json
import os
import sys

import pytest
import torch

from mtbert_fast.models import MultiTaskBert
from mtbert_fast.train import ConfigError, Trainer, load_config, train
from mtbert_fast.train.cli import add_train_parser
from mtbert_fast.train.data import load_tokenizer
from mtbert_fast.train.masking import IGNORE_INDEX
from mtbert_fast.train.trainer import list_checkpoints

import train_synthetic as syn

LEARNING_TASKS = ("topic", "tags", "lm", "span")


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """One short multi-task run (480 steps, 120 per task) on the synthetic tasks, kept for the module's tests."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("learn")
    files = syn.write_tasks(str(tmp))
    config = syn.base_config(files, tasks=LEARNING_TASKS, max_steps=480, eval_every=160,
                             output_dir=str(tmp / "final"))
    return train(config), tmp / "final", files


def test_every_task_learns(learned):
    result, _, _ = learned
    first, last = result.evals[0], result.evals[-1]
    assert first["step"] == 0 and last["step"] == 480 and result.steps == 480
    assert set(first["losses"]) == set(LEARNING_TASKS)
    for task in LEARNING_TASKS:
        before, after = first["losses"][task], last["losses"][task]
        assert after < 0.5 * before, f"{task}: held-out loss {before:.3f} -> {after:.3f}, not halved"
    # round robin: each task had a quarter of the steps
    assert [r["task"] for r in result.history[:8]] == list(LEARNING_TASKS) * 2


def test_saved_model_gives_the_trained_models_outputs(learned):
    result, final, files = learned
    saved = set(os.listdir(final))
    assert {"model.safetensors", "multitask_config.json", "train_config.json", "tokenizer.json"} <= saved
    loaded = MultiTaskBert.from_pretrained(final)
    trained = result.model.eval()
    assert loaded.loss_weights == trained.loss_weights and loaded.tasks == trained.tasks
    tok = load_tokenizer(str(final))  # the tokenizer is saved beside the model
    enc = tok(["w1 w2 w3 w1 w2", "w7"], ["w1", "w9 w9 w9 w9"], padding=True, return_tensors="pt",
              return_token_type_ids=True)
    with torch.no_grad():
        a = trained(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tasks=("topic", "tags", "span"))
        b = loaded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tasks=("topic", "tags", "span"))
    for task, outputs in a.outputs.items():
        for name, value in outputs.items():
            assert torch.equal(value, b.outputs[task][name]), f"{task}.{name} differs after save/load"
    # and the model predicts the synthetic rules
    with torch.no_grad():
        out = loaded(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], tasks="tags")
    predicted = out.outputs["tags"]["logits"][0, 1:6].argmax(-1).tolist()
    assert predicted == [syn.TAGS.index(syn.TAGS[i % 3]) for i in (1, 2, 3, 1, 2)]


def _resume_config(files, tmp, **training):
    config = syn.base_config(files, tasks=("topic", "lm", "docs", "span"), max_steps=16, batch_size=8,
                             grad_accum_steps=2, sampler="temperature", temperature=2.0, eval_every=8, **training)
    # dropout on: resuming must restore the random state of dropout too
    config["model"]["config"].update(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    return config


def test_resume_continues_exactly(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=96)
    whole = train(_resume_config(files, tmp_path))

    ckpt = str(tmp_path / "ckpt")
    config = _resume_config(files, tmp_path, checkpoint_dir=ckpt, checkpoint_every=6, keep_checkpoints=2)
    first = Trainer(load_config(config)).train(stop_after=7)  # interrupted at step 7: checkpoints 6 and 7
    assert first.steps == 7 and first.history == whole.history[:7]
    assert [os.path.basename(p) for p in list_checkpoints(ckpt)] == ["checkpoint-00000006", "checkpoint-00000007"]
    assert sorted(os.listdir(list_checkpoints(ckpt)[-1])) == ["COMPLETE", "model", "rng-0.pt", "trainer_state.pt"]

    config["training"]["resume_from"] = "latest"
    resumed = train(config)
    assert resumed.steps == 16
    assert resumed.history == whole.history  # the same task, loss and lr at every step
    assert resumed.evals == whole.evals
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the resumed and the uninterrupted run"
    assert [os.path.basename(p) for p in list_checkpoints(ckpt)] == ["checkpoint-00000012", "checkpoint-00000016"]


def test_resume_from_an_explicit_checkpoint_and_refusals(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=48)
    ckpt = str(tmp_path / "ckpt")
    config = syn.base_config(files, tasks=("topic", "tags"), max_steps=4, checkpoint_dir=ckpt, checkpoint_every=2)
    train(config)
    config["training"]["resume_from"] = os.path.join(ckpt, "checkpoint-00000002")
    assert train(config).history == train({**config, "training": {**config["training"], "resume_from": None,
                                                                   "checkpoint_dir": None,
                                                                   "checkpoint_every": None}}).history
    config["training"]["resume_from"] = str(tmp_path)
    with pytest.raises(ValueError, match="not a complete training checkpoint"):
        train(config)
    config["training"].update(resume_from="latest", max_steps=3)
    with pytest.raises(ConfigError, match="the checkpoint .*checkpoint-00000004 is at step 4, past the 3 steps this "
                                          "configuration trains to"):
        train(config)
    config["training"]["max_steps"] = 4
    config["training"].update(resume_from="latest", checkpoint_dir=str(tmp_path / "no-such-dir"))
    with pytest.warns(UserWarning, match="no complete checkpoint in .*no-such-dir to resume from: training starts at "
                                         "step 0"):
        assert Trainer(load_config(config)).resume() is None


def test_pretrained_encoder_is_fine_tuned(tmp_path, minilm_dir):
    from mtbert_fast.models import FastBertModel

    files = syn.write_tasks(str(tmp_path), n=32)
    config = syn.base_config(files, tasks=("topic", "tags"), max_steps=2, lr=1e-4, eval_split=0.0)
    config["model"] = {"pretrained": minilm_dir, "max_length": 32}  # its own tokenizer by default
    trainer = Trainer(load_config(config))
    start = FastBertModel.from_pretrained(minilm_dir).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in trainer.model.encoder.state_dict().items())
    result = trainer.train()
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert not torch.equal(trainer.model.encoder.state_dict()["layers.0.qkv.weight"], start["layers.0.qkv.weight"])


def test_epochs_set_the_step_count(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=50)
    config = syn.base_config(files, tasks=("topic", "tags"), batch_size=8, grad_accum_steps=2, epochs=3.0)
    del config["training"]["max_steps"]
    trainer = Trainer(load_config(config))
    # 40 training rows a task: 5 batches of 8 per epoch, two tasks, two batches a step
    assert trainer.total_steps == 3 * (5 + 5) // 2


def test_bf16_autocast_trains(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=48)
    config = syn.base_config(files, tasks=("topic", "tags", "lm"), max_steps=3, bf16=True)
    result = train(config)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_a_task_of_weight_zero_is_watched_not_trained(tmp_path):
    """A task of loss weight 0 is evaluated but never drawn for a step (a step on its zero loss would still move the
    weights through AdamW's momentum and decay); every task of weight 0 is refused."""
    files = syn.write_tasks(str(tmp_path), n=48)
    config = syn.base_config(files, tasks=("topic", "tags"), max_steps=6, sampler="round_robin")
    config["tasks"][1]["loss_weight"] = 0.0
    result = train(config)
    assert {r["task"] for r in result.history} == {"topic"}
    assert set(result.evals[-1]["losses"]) == {"topic", "tags"}
    config["tasks"][0]["loss_weight"] = 0
    with pytest.raises(ConfigError, match="every task has loss_weight 0: nothing would train"):
        train(config)


def test_gradient_accumulation_is_one_larger_batch(tmp_path):
    """16 rows a step as 1 x 16, 2 x 8 or 4 x 4 micro-batches train alike, for a row-level and a token-level task:
    each micro-batch counts by its share of the step's rows or labelled tokens (a mean of micro-batch means weighed
    a tagging row of few tags as much as one of many)."""
    files = syn.write_tasks(str(tmp_path), n=96)
    runs = [train(syn.base_config(files, tasks=("topic", "tags"), max_steps=6, batch_size=16 // accum,
                                  grad_accum_steps=accum, warmup_steps=0))
            for accum in (1, 2, 4)]
    first = runs[0]
    for run in runs[1:]:
        assert [r["task"] for r in run.history] == [r["task"] for r in first.history]
        for a, b in zip(run.history, first.history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        want = first.model.state_dict()
        for key, value in run.model.state_dict().items():
            torch.testing.assert_close(value, want[key], atol=1e-5, rtol=1e-4)


def test_warmup_longer_than_the_run_is_named(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=48)
    with pytest.warns(UserWarning, match=r"training: 10 warmup steps in a run of 3: the learning rate never reaches "
                                         r"training.lr \(0.002\)"):
        Trainer(load_config(syn.base_config(files, tasks=("topic",), max_steps=3)))


def test_held_out_loss_does_not_depend_on_how_rows_fall_into_batches(tmp_path):
    """The held-out loss of a token-level task is the mean over its labelled tokens, whatever eval_batch_size splits
    the rows into (a row-weighted mean of batch means moved with it); pre-training's is its masked-LM token mean plus
    its next-sentence row mean."""
    from mtbert_fast.train.data import Batch, encode_task

    files = syn.write_tasks(str(tmp_path), n=64)
    trainer = Trainer(load_config(syn.base_config(files, tasks=("tags", "lm", "docs"), eval_split=0.25)))
    for name in ("tags", "lm", "docs"):
        task = trainer.tasks[name]
        held = encode_task(task, trainer.records[name].eval, trainer.tokenizer, 32, seed=1)
        full = trainer._collate(task, held, torch.Generator().manual_seed(0))  # one set of masks for every split

        def rows(a, b):
            labels = full.labels[name]
            labels = tuple(t[a:b] for t in labels) if isinstance(labels, tuple) else labels[a:b]
            return Batch(name, full.input_ids[a:b], full.attention_mask[a:b], full.token_type_ids[a:b],
                         {name: labels})

        losses = []
        for size in (1, 3, full.rows):
            trainer.eval_batches = {name: [rows(a, a + size) for a in range(0, full.rows, size)]}
            losses.append(trainer.evaluate()[name])
        assert losses[0] == pytest.approx(losses[2], rel=1e-5) and losses[1] == pytest.approx(losses[2], rel=1e-5), (
            name, losses)


def _held_out_rows(trainer: Trainer, name: str) -> list[tuple[list[int], list[int]]]:
    """Each held-out example of a masked-LM task as its trainer evaluates it: (corrupted ids, labels), unpadded."""
    rows = []
    for batch in trainer.eval_batches[name]:
        labels = batch.labels[name]
        labels = labels[0] if isinstance(labels, tuple) else labels
        for ids, mask, lab in zip(batch.input_ids, batch.attention_mask, labels):
            n = int(mask.sum())
            rows.append((ids[:n].tolist(), lab[:n].tolist()))
    return rows


@pytest.mark.parametrize("name", ["lm", "docs"])
def test_held_out_masks_do_not_depend_on_other_tasks_or_batching(tmp_path, name):
    """A masked-LM task's held-out examples keep their masks whatever other tasks train beside it, in whatever order,
    and however eval_batch_size batches them, so its held-out loss compares across such runs."""
    files = syn.write_tasks(str(tmp_path), n=64)
    alone = Trainer(load_config(syn.base_config(files, tasks=(name,), eval_split=0.25)))
    rows = _held_out_rows(alone, name)
    assert rows and all(any(t != IGNORE_INDEX for t in labels) for _, labels in rows)
    others = (name, "topic", "lm" if name == "docs" else "docs")
    for tasks, extra in ((others, {}), (others[::-1], {"eval_batch_size": 3})):
        trainer = Trainer(load_config(syn.base_config(files, tasks=tasks, eval_split=0.25, **extra)))
        assert _held_out_rows(trainer, name) == rows, (tasks, extra)


def test_progress_without_tqdm_prints_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # as if tqdm were not installed
    files = syn.write_tasks(str(tmp_path), n=48)
    train(syn.base_config(files, tasks=("topic",), max_steps=4, log_every=2, progress=True))
    out = capsys.readouterr().out
    assert "step 2/4  task topic  loss" in out and "step 4/4" in out and "eval step 4: topic" in out


def _cli(argv):
    parser = argparse.ArgumentParser(prog="mtbert-fast")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_checks_trains_and_reports_errors(tmp_path, capsys):
    files = syn.write_tasks(str(tmp_path), n=48)
    path = tmp_path / "train.json"
    path.write_text(json.dumps(syn.base_config(files, tasks=("topic", "lm"), max_steps=50)))

    assert _cli(["train", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "topic: sequence_classification, 38 training rows, 10 held out" in out and "data OK" in out

    final = tmp_path / "final"
    assert _cli(["train", str(path), "--max-steps", "3", "--output-dir", str(final), "--no-progress"]) == 0
    assert (final / "multitask_config.json").is_file()
    saved = json.loads((final / "train_config.json").read_text())
    assert saved["training"]["max_steps"] == 3

    bad = json.loads(path.read_text())
    bad["tasks"][0]["labels"] = ["neg"]
    path.write_text(json.dumps(bad))
    assert _cli(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"mtbert-fast train: error in {path}" in err and "label 'pos' is not in the label list ['neg']" in err


@pytest.mark.parametrize("family", ["distilbert", "electra", "mpnet", "modernbert", "deberta"])
def test_trainer_heads_are_the_familys_own(family, request, tmp_path):
    """The trainer builds each family's own task heads (ModernBERT's prediction head before each output; the dense
    classifiers of DistilBERT, ELECTRA, MPNet and DeBERTa), so every trained task exports to transformers, and the
    exported sequence classifier gives the trained head's logits."""
    from transformers import AutoModelForSequenceClassification

    from mtbert_fast.models import EncoderConfig, FastBertModel, MultiTaskBert
    from mtbert_fast.train.config import TaskSpec
    from mtbert_fast.train.trainer import make_head

    hf_config = request.getfixturevalue(f"{family}_config")()
    enc = EncoderConfig.from_hf(hf_config)
    torch.manual_seed(0)
    encoder = FastBertModel(enc, add_pooling_layer=False)
    kinds = {"sequence_classification": 3, "token_classification": 5, "span_extraction": None}
    if family != "electra":  # ELECTRA's masked LM is its generator, which MultiTaskBert does not map
        kinds["masked_lm"] = None
    heads = {kind: make_head(TaskSpec(name=kind, kind=kind, train_file="unused", num_labels=n), enc, False)
             for kind, n in kinds.items()}
    model = MultiTaskBert(encoder, heads).eval()
    exported = {}
    for kind in kinds:
        model.export_hf(kind, tmp_path / kind)
        exported[kind] = json.loads((tmp_path / kind / "config.json").read_text())
        assert exported[kind]["model_type"] == hf_config.model_type
    if family == "deberta":  # HF's ContextPooler has no dropout by default; the classifier's is the encoder's
        assert exported["sequence_classification"]["pooler_dropout"] == 0.0
        assert exported["sequence_classification"]["cls_dropout"] == enc.hidden_dropout_prob
    if family == "distilbert":  # its QA head drops out the tokens, at the encoder's rate by default
        assert heads["span_extraction"].dropout == exported["span_extraction"]["qa_dropout"] == enc.hidden_dropout_prob
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "sequence_classification").eval()
    ids = torch.randint(5, enc.vocab_size, (3, 11), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    with torch.no_grad():
        ours = model(ids, mask, tasks="sequence_classification").outputs["sequence_classification"]["logits"]
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)