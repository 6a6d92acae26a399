"""Training: BERT pre-training inputs, task samplers, the configuration and the multi-task training loop."""

from mtbert_fast.train.config import ConfigError, TrainConfig, load_config
from mtbert_fast.train.masking import make_nsp_examples, mask_tokens
from mtbert_fast.train.samplers import (
    ProportionalSampler,
    RoundRobinSampler,
    TaskSampler,
    TemperatureSampler,
    make_sampler,
)
from mtbert_fast.train.trainer import Trainer, TrainResult, train

__all__ = ["ConfigError", "ProportionalSampler", "RoundRobinSampler", "TaskSampler", "TemperatureSampler",
           "TrainConfig", "TrainResult", "Trainer", "load_config", "make_nsp_examples", "make_sampler",
           "mask_tokens", "train"]
