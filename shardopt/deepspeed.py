"""``import shardopt.deepspeed``: name shardopt optimizers in a DeepSpeed JSON config.

    import deepspeed
    import shardopt.deepspeed  # noqa: F401  (registers "shardopt.Lion", "shardopt.AdamW", "shardopt.Muon")

    cfg = {"train_batch_size": 32,
           "zero_optimization": {"stage": 2},
           "optimizer": {"type": "shardopt.Lion", "params": {"lr": 3e-5, "weight_decay": 0.1}}}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)

Without the import DeepSpeed rejects the type ("shardopt.Lion is not a
supported DeepSpeed Optimizer"). See docs/integrations.md and
:mod:`shardopt.integrations.deepspeed` for what runs where.
"""
from .integrations.deepspeed import OPTIMIZERS, config_keys, install, valid_names

install()

__all__ = ["install", "OPTIMIZERS", "config_keys", "valid_names"]
