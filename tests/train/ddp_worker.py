"""Run by tests/train/test_ddp.py under torchrun: trains from a config file and writes what this rank saw and
ended with to OUT/rank<r>.json and OUT/rank<r>.safetensors.  Usage: ddp_worker.py CONFIG OUT"""

import gc
import json
import os
import sys

import torch
from safetensors.torch import save_file

from mtbert_fast.train import data, train


def main(config_path: str, out: str) -> None:
    torch.set_num_threads(1)
    seen = []
    next_indices = data.TaskStream.next_indices

    def logged(stream):
        batch = next_indices(stream)
        seen.append({"task": stream.task_index, "epoch": stream.epoch, "rows": batch})
        return batch

    data.TaskStream.next_indices = logged
    gc.disable()  # what outlives train() must be freed by train() itself, not by a collection that may come late
    result = train(config_path)
    wrappers = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
    gc.enable()
    rank = int(os.environ["RANK"])
    # clones: the tied decoder shares the word embeddings' storage, which safetensors refuses
    save_file({k: v.detach().clone() for k, v in result.model.state_dict().items()},
              os.path.join(out, f"rank{rank}.safetensors"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "history": result.history, "evals": result.evals,
                   "ddp_wrappers_alive": wrappers}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
