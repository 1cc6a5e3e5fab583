"""shardopt: Lion, AdamW and Muon with sharded state and fused kernels.

    import shardopt
    opt = shardopt.Lion(model.parameters(), lr=3e-5, weight_decay=0.1)   # ZeRO-1 under torchrun

See README.md and docs/ for layouts (single device, ZeRO-1, FSDP2, DeepSpeed).
"""
from .integrations import _trainer_watch
from .optim import AdamW, Lion, Muon, NonFiniteGradientError, ShardedOptimizer, muon_param_groups

_trainer_watch.install()  # one warning when a plain transformers.Trainer saves one rank's shard (no import of it)

__version__ = "0.1.0"
__all__ = ["AdamW", "Lion", "Muon", "muon_param_groups", "ShardedOptimizer", "NonFiniteGradientError", "__version__"]
