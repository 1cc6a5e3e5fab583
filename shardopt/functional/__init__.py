"""The reference math of each algorithm, on lists of tensors.

This layer defines what is correct. It is written for clarity (one tensor at a
time) and knows nothing of speed or ranks; every kernel backend and every
sharded layout is tested against it.
"""
from .adamw import adamw
from .lion import lion
from .muon import adjust_lr, muon, muon_momentum, newton_schulz, newton_schulz_split, ns_flops, ns_schedule

__all__ = ["adamw", "lion", "muon", "muon_momentum", "newton_schulz", "adjust_lr", "ns_flops", "ns_schedule",
           "newton_schulz_split"]
