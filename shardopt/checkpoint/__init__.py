"""World-size-agnostic checkpoints for shardopt optimizers.

    import shardopt.checkpoint as ckpt
    ckpt.save("ckpt/step1000", model, opt, extra={"step": 1000, "sched": sched.state_dict()})
    extra = ckpt.load("ckpt/step1000", model, opt)      # any world size, any layout

Storage is ``torch.distributed.checkpoint`` keyed by parameter FQN; see
``docs/checkpoints.md`` and ``shardopt ckpt --help`` for the offline tools
(inspect, verify, consolidate, split, convert to/from DeepSpeed).
"""
from .api import load, rng_state, save, set_rng_state
from .errors import (
    AlgorithmMismatchError,
    CheckpointError,
    CorruptCheckpointError,
    MissingEntryError,
    ShapeMismatchError,
)

__all__ = [
    "AlgorithmMismatchError",
    "CheckpointError",
    "CorruptCheckpointError",
    "MissingEntryError",
    "ShapeMismatchError",
    "load",
    "rng_state",
    "save",
    "set_rng_state",
]
