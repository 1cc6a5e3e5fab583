"""shardopt: Lion, AdamW and Muon with sharded state and fused kernels.

    import shardopt
    opt = shardopt.Lion(model.parameters(), lr=3e-5, weight_decay=0.1)   # ZeRO-1 under torchrun

See README.md and docs/ for layouts (single device, ZeRO-1, FSDP2, DeepSpeed).
``shardopt.plan(...)`` plans a run (``shardopt plan``). Names load on first
use, so ``import shardopt`` (and ``shardopt --help``) does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    **{name: ".optim" for name in ("AdamW", "Lion", "Muon", "NonFiniteGradientError", "ShardedOptimizer",
                                   "muon_param_groups")},
    "plan": ".tools.plan",
    "exit_distributed": ".sharding.comm",
}
__all__ = ["AdamW", "Lion", "Muon", "muon_param_groups", "ShardedOptimizer", "NonFiniteGradientError", "plan",
           "exit_distributed", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'shardopt' has no attribute {name!r}")
    if _LAZY[name] == ".optim":
        # with the optimizers: one warning when a plain transformers.Trainer saves one rank's shard
        # (it does not import transformers)
        importlib.import_module(".integrations._trainer_watch", __name__).install()
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
