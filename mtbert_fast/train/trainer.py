"""The multi-task training loop: one task per optimizer step, AdamW with linear warmup and decay, gradient
accumulation, bf16 autocast, held-out evaluation, checkpoints with exact resume, and DistributedDataParallel.

Each optimizer step the sampler names a task; that step's grad_accum_steps batches all come from that task, so
every process runs the same heads in a step (the sampler is seeded alike on every rank) while reading its own
disjoint shard of the task's data.  Everything random that a step consumes is saved in a checkpoint: the sampler's
generator, each task's (epoch, cursor), each rank's masking generator and torch RNG (dropout).  Resuming from a
checkpoint therefore continues with the same losses and ends with the same weights as an uninterrupted run.

Under `torchrun` (WORLD_SIZE > 1) `train()` joins the process group (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from mtbert_fast.models import (
    EncoderConfig,
    FastBertModel,
    MaskedLMHead,
    MultiTaskBert,
    NextSentenceHead,
    PreTrainingHead,
    SequenceClassificationHead,
    SpanExtractionHead,
    TokenClassificationHead,
    UnsupportedModelError,
)
from mtbert_fast.models.hf_mapping import dense_classifier_form
from mtbert_fast.train.config import NAMED_CONFIGS, ConfigError, TaskSpec, TrainConfig, load_config
from mtbert_fast.train.data import (
    DROPOUT_STREAM,
    MASK_STREAM,
    MASKED_KINDS,
    Batch,
    TaskStream,
    _mix,
    collate,
    encode_task,
    load_records,
    load_tokenizer,
    mask_held_out,
)
from mtbert_fast.train.masking import IGNORE_INDEX
from mtbert_fast.train.samplers import make_sampler

CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.pt"
COMPLETE_NAME = "COMPLETE"


@dataclasses.dataclass
class TrainResult:
    """history: per optimizer step {"step", "task", "loss" (the task's unweighted loss over the step's micro-batches
    and processes, as one batch of them all would give it), "lr"}; evals: {"step", "losses": task -> held-out loss}; model: the trained
    MultiTaskBert."""

    steps: int
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    model: MultiTaskBert


# --- model ------------------------------------------------------------------------------------------------------

def _encoder_fields(spec: str | dict) -> dict:
    if isinstance(spec, dict):
        fields = dict(spec)
        known = {f.name for f in dataclasses.fields(EncoderConfig)} | {"model_type"}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"model.config: unknown encoder fields {unknown}; known: {', '.join(sorted(known))}")
        return fields
    if spec in NAMED_CONFIGS:
        return dict(NAMED_CONFIGS[spec])
    with open(spec) as f:
        return json.load(f)


def build_model(config: TrainConfig, tokenizer) -> MultiTaskBert:
    """The encoder (pretrained or random, seeded with training.seed) and one head per task."""
    m = config.model
    torch.manual_seed(config.training.seed)
    try:
        if m.pretrained is not None:
            encoder = FastBertModel.from_pretrained(m.pretrained, dtype=torch.float32, backend=m.backend)
        else:
            fields = _encoder_fields(m.config)
            fields.setdefault("vocab_size", len(tokenizer))
            fields.setdefault("pad_token_id", tokenizer.pad_token_id)
            encoder = FastBertModel(EncoderConfig.from_dict(fields), backend=m.backend)
    except (UnsupportedModelError, TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from exc
    enc = encoder.config
    problems = []
    if len(tokenizer) > enc.vocab_size:
        problems.append(f"the tokenizer has {len(tokenizer)} tokens but the encoder's vocabulary only {enc.vocab_size}")
    longest = max([m.max_length] + [t.max_length or 0 for t in config.tasks])
    # the rows of the position table a sequence can reach: RoBERTa and MPNet number from the padding id + 1; rotary
    # positions (ModernBERT) and DeBERTa's relative-only ones index no table
    if not enc.pre_norm and enc.position_biased_input:
        offset = enc.position_padding_idx + 1 if enc.position_padding_idx is not None else 0
        if longest + offset > enc.max_position_embeddings:
            problems.append(f"max_length {longest} exceeds the {enc.max_position_embeddings - offset} tokens the "
                            f"encoder's {enc.max_position_embeddings} position embeddings hold"
                            + (f" (positions start at {offset})" if offset else ""))
    if encoder.pooler is None:
        needs = [t.name for t in config.tasks if t.kind in ("next_sentence", "pretraining")]
        if needs:
            problems.append(f"tasks {needs} read the pooler output, but {m.pretrained} has no pooler weights")
    if problems:
        raise ConfigError(problems)
    heads = {t.name: make_head(t, enc, encoder.pooler is not None) for t in config.tasks}
    return MultiTaskBert(encoder, heads, {t.name: t.loss_weight for t in config.tasks}).train()


def make_head(task: TaskSpec, enc: EncoderConfig, has_pooler: bool):
    id2label = {i: str(v) for i, v in enumerate(task.labels)} if task.labels is not None else None
    # ModernBERT's task heads run its prediction head (no dense bias, the encoder's LayerNorm) before their output
    transform = ({"eps": enc.layer_norm_eps, "activation": "gelu", "dense_bias": False, "norm_bias": enc.norm_bias}
                 if enc.family == "modernbert" else None)
    if task.kind == "sequence_classification":
        # the family's HF classifier: BERT's on the pooler, a dense head on the first token (RoBERTa, MPNet,
        # DistilBERT, ELECTRA, DeBERTa's ContextPooler), ModernBERT's prediction head
        dense = dense_classifier_form(enc.family)
        if dense is None:
            return SequenceClassificationHead(enc.hidden_size, task.num_labels, task.problem_type,
                                              pooled=has_pooler and transform is None, dropout=enc.hidden_dropout_prob,
                                              id2label=id2label, transform=transform)
        activation, dropout_first = dense
        # DeBERTa's ContextPooler has its own dropout before the dense, 0 in HF's default config
        return SequenceClassificationHead(enc.hidden_size, task.num_labels, task.problem_type, roberta_style=True,
                                          dropout=enc.hidden_dropout_prob, id2label=id2label, activation=activation,
                                          dropout_before_dense=dropout_first,
                                          dense_dropout=0.0 if enc.family == "deberta" else None)
    if task.kind == "token_classification":
        return TokenClassificationHead(enc.hidden_size, task.num_labels, enc.hidden_dropout_prob, id2label, transform)
    if task.kind == "masked_lm":
        if transform is not None:
            return MaskedLMHead(enc, dense_bias=False, norm_bias=enc.norm_bias)
        return MaskedLMHead(enc)
    if task.kind == "next_sentence":
        return NextSentenceHead(enc.hidden_size)
    if task.kind == "span_extraction":
        if transform is not None:
            return SpanExtractionHead(enc.hidden_size, transform, enc.hidden_dropout_prob)
        # DistilBERT's QA head has a dropout before its linear (qa_dropout, the encoder's rate by default)
        qa_dropout = enc.hidden_dropout_prob if enc.family == "distilbert" else 0.0
        return SpanExtractionHead(enc.hidden_size, dropout=qa_dropout)
    if task.kind == "pretraining":
        return PreTrainingHead(enc)
    raise ValueError(f"unknown task kind {task.kind!r}")


class _TaskLoss(nn.Module):
    """The module DistributedDataParallel wraps: one task's batch -> its weighted loss and its raw loss."""

    def __init__(self, model: MultiTaskBert):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids, task: str, labels: dict):
        """-> (weighted loss, raw loss, pre-training's (masked-LM loss, next-sentence loss) or None)."""
        out = self.model(input_ids, attention_mask, token_type_ids, tasks=task, labels=labels)
        parts = out.outputs[task]
        return out.loss, out.losses[task], (parts["mlm_loss"], parts["nsp_loss"]) if "nsp_loss" in parts else None


def linear_schedule(warmup_steps: int, total_steps: int):
    """lr factor: 0 -> 1 over warmup_steps, then 1 -> 0 at total_steps (BERT's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _Progress:
    """tqdm when installed and wanted, else a line every log_every steps; rank 0 only."""

    def __init__(self, enabled: bool, total: int, initial: int, log_every: int):
        self.enabled, self.total, self.log_every = enabled, total, log_every
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)

    def step(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(task=record["task"], loss=f"{record['loss']:.4f}", refresh=False)
        elif record["step"] % self.log_every == 0 or record["step"] == self.total:
            print(f"step {record['step']}/{self.total}  task {record['task']}  loss {record['loss']:.4f}  "
                  f"lr {record['lr']:.3g}", flush=True)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _labelled(labels: torch.Tensor) -> int:
    """How many labels a token-level loss averages over: those that are not IGNORE_INDEX."""
    return int((labels != IGNORE_INDEX).sum())


# the task kinds whose loss is a mean over labelled tokens, not over rows
_TOKEN_LEVEL = ("token_classification", "masked_lm")


def _step_tokens(kind: str, batch: Batch) -> int:
    """The labelled tokens of a batch's token-level loss (pre-training's masked-LM part); 0 for row-level ones."""
    labels = batch.labels[batch.task]
    if kind == "pretraining":
        return _labelled(labels[0])
    return _labelled(labels) if kind in _TOKEN_LEVEL else 0


class Trainer:
    """Checks the configuration and every data file, then builds the tokenizer, model, batches, optimizer and
    sampler.  `train()` runs (or resumes) the loop; `evaluate()` gives each task's held-out loss."""

    def __init__(self, config: TrainConfig):
        self.config = config
        tr = config.training
        self.records = load_records(config)  # every data problem is raised here, before any work
        self.rank, self.world_size = _rank_world()
        self.device = self._device(tr.device)
        self.tokenizer = load_tokenizer(config.model.tokenizer)
        self.model = build_model(config, self.tokenizer).to(self.device)
        self.tasks = {t.name: t for t in config.tasks}

        self.features, self.eval_batches, sizes = {}, {}, {}
        for task in config.tasks:
            max_length = task.max_length or config.model.max_length
            examples = encode_task(task, self.records[task.name].train, self.tokenizer, max_length, seed=tr.seed)
            held = encode_task(task, self.records[task.name].eval, self.tokenizer, max_length, seed=tr.seed + 1)
            if len(examples) < self.world_size:
                raise ConfigError(f"task {task.name!r}: {len(examples)} training examples cannot be shared out "
                                  f"among {self.world_size} processes")
            self.features[task.name] = examples
            sizes[task.name] = len(examples)
            # held-out batches are built once, masks included, so every evaluation measures the same thing
            if task.kind in MASKED_KINDS:
                held = mask_held_out(task, held, self.model.encoder.config.vocab_size, self.tokenizer.mask_token_id,
                                     tr.seed)
            mine = held[self.rank::self.world_size]
            bs = tr.eval_batch_size or tr.batch_size
            self.eval_batches[task.name] = [self._collate(task, mine[j:j + bs], None)
                                            for j in range(0, len(mine), bs)] if held else None
        self.streams = {t.name: TaskStream(sizes[t.name], tr.batch_size, tr.seed, i, self.rank, self.world_size)
                        for i, t in enumerate(config.tasks)}
        # a task of loss weight 0 is watched only: evaluated, never drawn for a step (whose zero loss would still
        # move the weights through the optimizer's momentum and decay)
        trained = [t.name for t in config.tasks if t.loss_weight > 0]
        self.sampler = make_sampler(tr.sampler, {n: sizes[n] for n in trained}, tr.temperature, tr.seed)
        self.mask_generator = torch.Generator().manual_seed(_mix(tr.seed, MASK_STREAM, self.rank))

        per_epoch = sum(self.streams[n].batches_per_epoch for n in trained)
        self.total_steps = tr.max_steps or max(1, math.ceil(tr.epochs * per_epoch / tr.grad_accum_steps))
        warmup = tr.warmup_steps if tr.warmup_steps is not None else round(tr.warmup_ratio * self.total_steps)
        if warmup >= self.total_steps > 1:
            warnings.warn(f"training: {warmup} warmup steps in a run of {self.total_steps}: the learning rate never "
                          f"reaches training.lr ({tr.lr})", stacklevel=2)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tr.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_schedule(warmup, self.total_steps))
        self.loss_module = _TaskLoss(self.model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # a step runs one task's heads: the other heads' parameters get no gradient that step
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        # dropout draws from torch's generator: its own stream on each rank
        torch.manual_seed(_mix(tr.seed, DROPOUT_STREAM, self.rank))
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []

    # --- pieces -------------------------------------------------------------------------------------------------

    def _device(self, name: str) -> torch.device:
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ConfigError(f"training.device is {name!r} but CUDA is not available")
            if name == "cuda":
                name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        return torch.device(name)

    def _collate(self, task: TaskSpec, features: list[dict], generator: torch.Generator | None) -> Batch:
        return collate(task, features, self.tokenizer.pad_token_id, self.model.encoder.config.vocab_size,
                       self.tokenizer.mask_token_id, generator)

    def _autocast(self):
        if not self.config.training.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """values summed over the processes, on the CPU.  The collective runs on the training device: nccl, the
        process group on CUDA, serves CUDA tensors only."""
        if self.world_size > 1:
            values = values.to(self.device, copy=True)
            dist.all_reduce(values)
        return values.cpu()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- evaluation ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Each task's held-out loss over every process's shard, as one batch of all of it would give: a mean over
        the labelled tokens for the token-level losses (tagging, masked LM), over the rows for the others; for
        pre-training the sum of its masked-LM and next-sentence means."""
        was_training = self.model.training
        self.model.eval()
        names = [name for name, batches in self.eval_batches.items() if batches is not None]
        # per task: (sum, weight) of the token-level part, then of the row-level part
        sums = torch.zeros(len(names), 4, dtype=torch.float64)
        for i, name in enumerate(names):
            kind = self.tasks[name].kind
            for batch in self.eval_batches[name]:
                b = batch.to(self.device)
                with self._autocast():
                    out = self.model(b.input_ids, b.attention_mask, b.token_type_ids, tasks=name, labels=b.labels,
                                     mlm_logits=False)
                labels = b.labels[name]
                if kind == "pretraining":
                    parts = ((out.outputs[name]["mlm_loss"], _labelled(labels[0])),
                             (out.outputs[name]["nsp_loss"], b.rows))
                elif kind in _TOKEN_LEVEL:
                    parts = ((out.losses[name], _labelled(labels)),)
                else:
                    parts = ((None, 0), (out.losses[name], b.rows))
                for j, (loss, weight) in enumerate(parts):
                    if weight:
                        sums[i, 2 * j] += float(loss) * weight
                        sums[i, 2 * j + 1] += weight
        sums = self._sum_over_ranks(sums)
        self.model.train(was_training)
        return {name: float(sum(sums[i, j] / sums[i, j + 1] for j in (0, 2) if sums[i, j + 1] > 0))
                for i, name in enumerate(names)}

    def _record_eval(self, progress: _Progress) -> None:
        losses = self.evaluate()
        if losses:
            self.evals.append({"step": self.step, "losses": losses})
            progress.write(f"eval step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    # --- training -----------------------------------------------------------------------------------------------

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the task the sampler draws."""
        tr = self.config.training
        name = self.sampler.next()
        task, stream, features = self.tasks[name], self.streams[name], self.features[name]
        batches = [self._collate(task, [features[i] for i in stream.next_indices()], self.mask_generator)
                   for _ in range(tr.grad_accum_steps)]
        # each micro-batch's loss counts by its share of the step's labelled tokens (token-level losses) or rows,
        # over every process (whose gradients DistributedDataParallel averages): the step's gradient is then that of
        # one batch of all of them, however they were split
        counts = torch.tensor([[_step_tokens(task.kind, b), b.rows] for b in batches], dtype=torch.float64)
        shares = (counts * self.world_size / self._sum_over_ranks(counts.sum(0)).clamp(min=1)).tolist()
        step_losses = []  # each micro-batch's share of the step's loss
        for micro, batch in enumerate(batches):
            b = batch.to(self.device)
            last = micro == tr.grad_accum_steps - 1
            no_sync = getattr(self.loss_module, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                with self._autocast():
                    weighted, raw, parts = self.loss_module(b.input_ids, b.attention_mask, b.token_type_ids, name,
                                                            b.labels)
                token_share, row_share = shares[micro]
                if parts is not None:  # pre-training: a token-level masked-LM loss plus a row-level one
                    share = parts[0] * token_share + parts[1] * row_share
                    scaled = task.loss_weight * share
                else:
                    part = token_share if task.kind in _TOKEN_LEVEL else row_share
                    share, scaled = raw * part, weighted * part
                scaled.backward()
            step_losses.append(share.detach().float())
        if tr.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tr.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = self._sum_over_ranks(torch.stack(step_losses).sum()) / self.world_size
        record = {"step": self.step, "task": name, "loss": float(loss), "lr": lr}
        self.history.append(record)
        return record

    def train(self, stop_after: int | None = None) -> TrainResult:
        """Runs to training.max_steps (or the epochs' worth of steps), resuming first when training.resume_from
        says so.  stop_after: return after this many steps of this call (a checkpoint is written there when a
        checkpoint_dir is set), as a job with a time limit would."""
        tr = self.config.training
        resumed = self.resume()
        if self.step > self.total_steps:
            raise ConfigError(f"the checkpoint {resumed} is at step {self.step}, past the {self.total_steps} steps this "
                              "configuration trains to: raise training.max_steps (or epochs), or start afresh")
        progress = _Progress(tr.progress and self.is_main, self.total_steps, self.step, tr.log_every)
        if resumed:
            progress.write(f"resumed from {resumed} at step {self.step}")
        else:
            self._record_eval(progress)
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        start = time.perf_counter()
        try:
            while self.step < end:
                progress.step(self.train_step())
                at_end = self.step == end
                if tr.eval_every and self.step % tr.eval_every == 0 and self.step != self.total_steps:
                    self._record_eval(progress)
                if tr.checkpoint_dir and ((tr.checkpoint_every and self.step % tr.checkpoint_every == 0) or at_end):
                    self.save_checkpoint()
            if self.step == self.total_steps and (not self.evals or self.evals[-1]["step"] != self.step):
                self._record_eval(progress)
        finally:
            progress.close()
        if self.step == self.total_steps and tr.output_dir and self.is_main:
            self.save_model(tr.output_dir)
        if self.is_main and tr.progress:
            seconds = time.perf_counter() - start
            print(f"trained to step {self.step} of {self.total_steps} ({seconds:.1f} s in this run)", file=sys.stderr,
                  flush=True)
        return TrainResult(self.step, list(self.history), list(self.evals), self.model)

    def close(self) -> None:
        """Unwraps DistributedDataParallel and frees it now.  Its reducer sits in a reference cycle and holds the
        process group: left to the cyclic collector, the group's worker threads could be torn down during
        interpreter shutdown, which aborts the process."""
        if isinstance(self.loss_module, nn.parallel.DistributedDataParallel):
            self.loss_module = self.loss_module.module
            gc.collect()

    def save_model(self, path: str) -> None:
        """The trained MultiTaskBert (save_pretrained), its tokenizer and the training configuration."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, "train_config.json"), "w") as f:
            json.dump(self.config.to_dict(), f, indent=2)

    # --- checkpoints --------------------------------------------------------------------------------------------

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_checkpoint(self) -> str:
        """checkpoint_dir/checkpoint-<step>/: model/ (save_pretrained), trainer_state.pt (optimizer, scheduler,
        sampler, data positions, history) and one rng-<rank>.pt per process; COMPLETE is written last."""
        tr = self.config.training
        final = os.path.join(tr.checkpoint_dir, f"{CHECKPOINT_PREFIX}{self.step:08d}")
        tmp = final + ".tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self.model.save_pretrained(os.path.join(tmp, "model"))
            torch.save({
                "step": self.step,
                "world_size": self.world_size,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "sampler": self.sampler.state_dict(),
                "streams": {name: s.state_dict() for name, s in self.streams.items()},
                "history": self.history,
                "evals": self.evals,
            }, os.path.join(tmp, STATE_NAME))
        self._barrier()
        rng = {"torch": torch.get_rng_state(), "mask": self.mask_generator.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, os.path.join(tmp, f"rng-{self.rank}.pt"))
        self._barrier()
        if self.is_main:
            with open(os.path.join(tmp, COMPLETE_NAME), "w") as f:
                f.write(f"{self.step}\n")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune_checkpoints()
        self._barrier()
        return final

    def _prune_checkpoints(self) -> None:
        keep = self.config.training.keep_checkpoints
        if keep:
            for old in list_checkpoints(self.config.training.checkpoint_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)

    def resume(self) -> str | None:
        """Loads training.resume_from ("latest": the newest complete checkpoint in checkpoint_dir, or a fresh
        start when there is none); returns the checkpoint loaded, or None."""
        tr = self.config.training
        if tr.resume_from is None:
            return None
        if tr.resume_from == "latest":
            found = list_checkpoints(tr.checkpoint_dir)
            if not found:
                # a first run under a job scheduler that always resumes: said, since a misspelt directory looks alike
                warnings.warn(f"no complete checkpoint in {tr.checkpoint_dir} to resume from: training starts at "
                              "step 0", stacklevel=2)
                return None
            path = found[-1]
        else:
            path = tr.resume_from
        self.load_checkpoint(path)
        return path

    def load_checkpoint(self, path: str) -> None:
        if not os.path.isfile(os.path.join(path, COMPLETE_NAME)):
            raise ConfigError(f"{path} is not a complete training checkpoint (no {COMPLETE_NAME} file)")
        state = torch.load(os.path.join(path, STATE_NAME), weights_only=True)
        if state["world_size"] != self.world_size:
            raise ConfigError(f"{path} was written by {state['world_size']} processes; resuming exactly needs "
                              f"the same number, got {self.world_size}")
        saved = MultiTaskBert.from_pretrained(os.path.join(path, "model"))
        if set(saved.heads) != set(self.model.heads):
            raise ConfigError(f"{path} has tasks {sorted(saved.heads)}, the configuration {sorted(self.model.heads)}")
        self.model.load_state_dict(saved.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        for name, s in state["streams"].items():
            self.streams[name].load_state_dict(s)
        self.step, self.history, self.evals = state["step"], list(state["history"]), list(state["evals"])
        rng = torch.load(os.path.join(path, f"rng-{self.rank}.pt"), weights_only=True)
        torch.set_rng_state(rng["torch"])
        self.mask_generator.set_state(rng["mask"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def list_checkpoints(checkpoint_dir: str | None) -> list[str]:
    """Complete checkpoints in checkpoint_dir, oldest first."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        return []
    names = sorted(n for n in os.listdir(checkpoint_dir)
                   if n.startswith(CHECKPOINT_PREFIX) and not n.endswith(".tmp")
                   and os.path.isfile(os.path.join(checkpoint_dir, n, COMPLETE_NAME)))
    return [os.path.join(checkpoint_dir, n) for n in names]


def train(config: TrainConfig | dict | str | os.PathLike, stop_after: int | None = None) -> TrainResult:
    """Trains from a TrainConfig, a parsed config dict or a config file path.  Under torchrun (WORLD_SIZE > 1)
    joins the process group first and leaves it at the end."""
    if not isinstance(config, TrainConfig):
        config = load_config(config)
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if config.training.device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        joined = True
    trainer = None
    try:
        trainer = Trainer(config)
        result = trainer.train(stop_after=stop_after)
        if joined:
            dist.barrier()  # no rank leaves the group while another still writes its model or checkpoint
        return result
    finally:
        if trainer is not None:
            trainer.close()
        if joined:
            dist.destroy_process_group()
