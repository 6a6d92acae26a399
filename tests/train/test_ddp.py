"""Two processes under torchrun (gloo, CPU) with DistributedDataParallel: each rank reads a disjoint shard of every
task, and both end with identical weights; the collectives get their tensors on the training device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from mtbert_fast.train import Trainer, load_config

import train_synthetic as syn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed without gloo")
def test_two_ranks_read_disjoint_shards_and_end_identical(tmp_path):
    files = syn.write_tasks(str(tmp_path), n=96)
    config = syn.base_config(files, tasks=("topic", "tags", "lm"), max_steps=8, batch_size=8, grad_accum_steps=2,
                             sampler="proportional", eval_every=4, device="cpu",
                             checkpoint_dir=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "final"))
    config["model"]["config"].update(hidden_dropout_prob=0.1)  # each rank draws its own dropout
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "ddp_worker.py"), str(path), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    # the DDP wrapper holds the process group; train() frees it before leaving the group
    assert [r["ddp_wrappers_alive"] for r in ranks] == [0, 0]
    weights = [load_file(str(out / f"rank{r}.safetensors")) for r in range(2)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), f"{key} differs between the ranks"

    # both ranks ran the same tasks in the same order, on different rows of them
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 8 * 2
    for a, b in zip(ranks[0]["seen"], ranks[1]["seen"]):
        assert (a["task"], a["epoch"]) == (b["task"], b["epoch"])
    shards = [{}, {}]
    for r in range(2):
        for s in ranks[r]["seen"]:
            shards[r].setdefault((s["task"], s["epoch"]), set()).update(s["rows"])
    for key in shards[0]:
        assert not shards[0][key] & shards[1][key], f"task {key[0]} epoch {key[1]}: ranks share rows"
    # losses are averaged over the ranks, so both report the same history; the evaluation covers both shards
    assert ranks[0]["history"] == ranks[1]["history"] and ranks[0]["evals"] == ranks[1]["evals"]
    assert [e["step"] for e in ranks[0]["evals"]] == [0, 4, 8]

    checkpoint = tmp_path / "ckpt" / "checkpoint-00000008"
    assert {"rng-0.pt", "rng-1.pt", "trainer_state.pt", "COMPLETE"} <= set(os.listdir(checkpoint))
    assert (tmp_path / "final" / "model.safetensors").is_file()


class _Reduced(Exception):
    """Raised by the stand-in collective once it has seen its tensor."""


def test_collectives_take_tensors_on_the_training_device(tmp_path, monkeypatch):
    """nccl, the process group on CUDA, serves CUDA tensors only: the step loss and the held-out loss sums reach the
    collective on the training device, whatever device the losses come back on.  The meta device stands in for the
    GPU; the stand-in all_reduce records the device of its tensor."""
    files = syn.write_tasks(str(tmp_path), n=16)
    trainer = Trainer(load_config(syn.base_config(files, tasks=("topic",), max_steps=2, device="cpu")))
    devices = []

    def all_reduce(tensor, *args, **kwargs):
        devices.append(tensor.device)
        raise _Reduced

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    trainer.world_size, trainer.device = 2, torch.device("meta")
    weight = torch.nn.Parameter(torch.ones(()))
    trainer.loss_module = lambda *inputs: (2 * weight, torch.tensor(2.0))
    with pytest.raises(_Reduced):
        trainer.train_step()

    class HeldOut(torch.nn.Module):
        def forward(self, *inputs, tasks, labels, mlm_logits):
            return SimpleNamespace(losses={tasks: torch.tensor(2.0)})

    trainer.model = HeldOut()
    with pytest.raises(_Reduced):
        trainer.evaluate()
    assert devices == [torch.device("meta")] * 2
