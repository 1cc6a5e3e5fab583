"""Optimizers: torch.optim.Optimizer subclasses over a shared sharded base."""
from .adamw import AdamW
from .base import ALGORITHMS, NonFiniteGradientError, ShardedOptimizer
from .lion import Lion
from .muon import Muon, muon_param_groups

__all__ = ["AdamW", "Lion", "Muon", "muon_param_groups", "ShardedOptimizer", "NonFiniteGradientError", "ALGORITHMS"]
