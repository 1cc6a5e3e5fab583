"""Glue between shardopt's optimizers and the launchers people train with.

* :mod:`shardopt.integrations.deepspeed`: ``"optimizer": {"type": "shardopt.Lion"}``
  in a DeepSpeed config (activated by ``import shardopt.deepspeed``).
* accelerate needs no glue: pass a shardopt optimizer to ``accelerator.prepare``
  (DDP, FSDP2), or, with ``--use_deepspeed``, name it in the DeepSpeed config and
  use ``accelerate.utils.DummyOptim`` in the script. See docs/integrations.md.

Submodules import their framework lazily, so ``import shardopt`` never needs DeepSpeed.
"""
