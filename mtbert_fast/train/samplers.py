"""Task samplers for multi-task training: each draw names the task the next batch comes from.

proportional: p_i = n_i / sum_j n_j; temperature: p_i ∝ n_i^(1/T) (T = 1 is proportional, T -> inf uniform;
Arivazhagan et al. 2019); round_robin: the tasks in order, cyclically.  Every sampler is deterministic given its
seed, and its state_dict (plain tensors and ints) resumes it exactly.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

SAMPLERS = ("proportional", "temperature", "round_robin")


class TaskSampler:
    """Base: `next()` -> task name; iterable; `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, tasks: list[str]):
        if not tasks:
            raise ValueError("a task sampler needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names repeat: {tasks}")
        self.tasks = list(tasks)

    def next(self) -> str:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class TemperatureSampler(TaskSampler):
    """Draws task i with probability n_i^(1/T) / sum_j n_j^(1/T), from a torch.Generator seeded with `seed`."""

    def __init__(self, sizes: Mapping[str, int], temperature: float = 1.0, seed: int = 0):
        super().__init__(list(sizes))
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        bad = {t: n for t, n in sizes.items() if n <= 0}
        if bad:
            raise ValueError(f"every task needs a positive dataset size, got {bad}")
        n = torch.tensor([float(sizes[t]) for t in self.tasks], dtype=torch.float64)
        weights = n ** (1.0 / temperature)
        self.probabilities = {t: float(p) for t, p in zip(self.tasks, weights / weights.sum())}
        self._cumulative = torch.cumsum(weights / weights.sum(), 0)
        self._generator = torch.Generator().manual_seed(seed)

    def next(self) -> str:
        u = torch.rand((), generator=self._generator, dtype=torch.float64)
        i = int(torch.searchsorted(self._cumulative, u, right=True))
        return self.tasks[min(i, len(self.tasks) - 1)]

    def state_dict(self) -> dict:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self._generator.set_state(state["generator"])


class ProportionalSampler(TemperatureSampler):
    """Draws task i with probability n_i / sum_j n_j."""

    def __init__(self, sizes: Mapping[str, int], seed: int = 0):
        super().__init__(sizes, temperature=1.0, seed=seed)


class RoundRobinSampler(TaskSampler):
    """The tasks in the order given, cyclically."""

    def __init__(self, tasks: list[str]):
        super().__init__(tasks)
        self.position = 0
        self.probabilities = {t: 1.0 / len(self.tasks) for t in self.tasks}

    def next(self) -> str:
        task = self.tasks[self.position]
        self.position = (self.position + 1) % len(self.tasks)
        return task

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def make_sampler(name: str, sizes: Mapping[str, int], temperature: float = 1.0, seed: int = 0) -> TaskSampler:
    """A sampler by name (one of SAMPLERS) over tasks with the given dataset sizes."""
    if name == "proportional":
        return ProportionalSampler(sizes, seed=seed)
    if name == "temperature":
        return TemperatureSampler(sizes, temperature=temperature, seed=seed)
    if name == "round_robin":
        return RoundRobinSampler(list(sizes))
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
