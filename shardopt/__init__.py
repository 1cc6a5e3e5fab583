"""shardopt: Lion, AdamW and Muon with sharded state and fused kernels.

    import shardopt
    opt = shardopt.Lion(model.parameters(), lr=3e-5, weight_decay=0.1)   # ZeRO-1 under torchrun

See README.md and docs/ for layouts (single device, ZeRO-1, FSDP2, DeepSpeed).
"""
from .optim import AdamW, Lion, Muon, NonFiniteGradientError, ShardedOptimizer, muon_param_groups

__version__ = "0.1.0"
__all__ = ["AdamW", "Lion", "Muon", "muon_param_groups", "ShardedOptimizer", "NonFiniteGradientError", "__version__"]
