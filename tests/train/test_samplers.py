"""Task samplers: drawn proportions match each definition, round robin cycles exactly, seeds and saved state
reproduce the sequence."""

from __future__ import annotations

import collections

import pytest
import torch

from mtbert_fast.train import ProportionalSampler, RoundRobinSampler, TemperatureSampler, make_sampler

SIZES = {"a": 100, "b": 300, "c": 600, "d": 4000}
DRAWS = 40_000


def _frequencies(sampler, n=DRAWS):
    counts = collections.Counter(sampler.next() for _ in range(n))
    return {t: counts[t] / n for t in SIZES}


def _check(freq, expected):
    # binomial standard deviation of a frequency is at most sqrt(0.25 / DRAWS) = 0.0025: 4 sigma
    for task, p in expected.items():
        assert abs(freq[task] - p) < 0.01, f"{task}: drawn {freq[task]:.4f}, expected {p:.4f}"


def test_proportional_draws_by_dataset_size():
    sampler = ProportionalSampler(SIZES, seed=0)
    total = sum(SIZES.values())
    expected = {t: n / total for t, n in SIZES.items()}
    assert sampler.probabilities == pytest.approx(expected)
    _check(_frequencies(sampler), expected)


@pytest.mark.parametrize("temperature", [2.0, 5.0])
def test_temperature_draws_by_size_to_the_one_over_t(temperature):
    sampler = TemperatureSampler(SIZES, temperature=temperature, seed=1)
    weights = {t: n ** (1 / temperature) for t, n in SIZES.items()}
    expected = {t: w / sum(weights.values()) for t, w in weights.items()}
    assert sampler.probabilities == pytest.approx(expected)
    _check(_frequencies(sampler), expected)


def test_temperature_one_is_proportional_and_large_is_uniform():
    assert TemperatureSampler(SIZES, 1.0).probabilities == pytest.approx(ProportionalSampler(SIZES).probabilities)
    uniform = TemperatureSampler(SIZES, 1e6).probabilities
    assert uniform == pytest.approx({t: 0.25 for t in SIZES}, abs=1e-4)


def test_round_robin_cycles_exactly():
    sampler = RoundRobinSampler(["x", "y", "z"])
    assert [sampler.next() for _ in range(9)] == ["x", "y", "z"] * 3
    assert make_sampler("round_robin", {"p": 1, "q": 99}).probabilities == {"p": 0.5, "q": 0.5}


@pytest.mark.parametrize("name", ["proportional", "temperature", "round_robin"])
def test_seed_and_state_reproduce_the_sequence(name):
    a = make_sampler(name, SIZES, temperature=3.0, seed=7)
    b = make_sampler(name, SIZES, temperature=3.0, seed=7)
    first = [a.next() for _ in range(50)]
    assert first == [b.next() for _ in range(50)]
    state = a.state_dict()
    rest = [a.next() for _ in range(100)]
    c = make_sampler(name, SIZES, temperature=3.0, seed=123)
    c.load_state_dict(state)
    assert [c.next() for _ in range(100)] == rest
    if name != "round_robin":
        other = make_sampler(name, SIZES, temperature=3.0, seed=8)
        assert [other.next() for _ in range(50)] != first


def test_sampler_state_loads_with_weights_only(tmp_path):
    sampler = TemperatureSampler(SIZES, 2.0, seed=0)
    [sampler.next() for _ in range(10)]
    torch.save(sampler.state_dict(), tmp_path / "s.pt")
    expected = [sampler.next() for _ in range(20)]
    fresh = TemperatureSampler(SIZES, 2.0, seed=99)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [fresh.next() for _ in range(20)] == expected


def test_bad_sampler_arguments():
    with pytest.raises(ValueError, match="unknown sampler 'random'"):
        make_sampler("random", SIZES)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TemperatureSampler(SIZES, 0.0)
    with pytest.raises(ValueError, match="positive dataset size"):
        ProportionalSampler({"a": 0, "b": 3})
    with pytest.raises(ValueError, match="at least one task"):
        RoundRobinSampler([])
