"""One warning when a plain ``transformers.Trainer`` saves a sharded shardopt optimizer from rank 0 alone.

Trainer's own checkpoint writes ``torch.save(optimizer.state_dict())`` on rank
0 only. For a sharded layout (ZeRO-1, FSDP2) at world size > 1 that file holds
rank 0's shard and nothing else: every other rank's state is lost, and
resuming from it is refused on those ranks. ``ShardoptTrainer`` and
``ShardoptCallback`` (:mod:`shardopt.integrations.transformers`) save every
rank's part through ``shardopt.checkpoint`` instead.

How the save is recognised, narrowly: ``import shardopt`` registers
:func:`watch` in ``shardopt.optim._state_dict.GLOBAL_STATE_DICT_POST_HOOKS``.
It returns at once unless ``transformers.trainer`` is imported and the state
is sharded across more than one rank; then it looks a few frames up the stack
for transformers' ``Trainer._save_optimizer_and_scheduler`` on the branch that
``torch.save``-s from rank 0 (not DeepSpeed, whose engine saves every rank's
part, nor FSDP, which goes through DCP). A user's own ``opt.state_dict()``,
``shardopt.checkpoint`` and DeepSpeed's checkpoints never warn. This module does
not import transformers.
"""
from __future__ import annotations

import sys
import warnings

from ..optim import _state_dict

# pack -> ShardedOptimizer.state_dict -> AcceleratedOptimizer.state_dict -> Trainer._save_optimizer_and_scheduler,
# with room for a wrapper or two in between
_MAX_DEPTH = 8
_WARNED = "_shardopt_trainer_save_warned"


def calling_trainer(start, max_depth: int = 12):
    """The nearest ``transformers.Trainer`` instance whose method is on the stack above frame ``start``."""
    tr = sys.modules.get("transformers.trainer")
    if tr is None:
        return None
    f = start
    for _ in range(max_depth):
        if f is None:
            return None
        obj = f.f_locals.get("self")
        if isinstance(obj, tr.Trainer):
            return obj
        f = f.f_back
    return None


def _trainer_saving_rank0_file(start):
    f = start
    for _ in range(_MAX_DEPTH):
        if f is None:
            return None
        code, module = f.f_code.co_name, f.f_globals.get("__name__")
        if code == "_save_optimizer_and_scheduler" and module == "transformers.trainer":
            trainer = f.f_locals.get("self")
            if trainer is None or getattr(trainer, "is_deepspeed_enabled", False) \
                    or getattr(trainer, "is_fsdp_enabled", False):
                return None
            return trainer
        f = f.f_back
    return None


def watch(opt, sd: dict) -> None:
    if "transformers.trainer" not in sys.modules:
        return
    meta = sd.get("shardopt") or {}
    if meta.get("layout") in (None, "none") or (meta.get("world_size") or 1) <= 1:
        return
    if getattr(opt, _WARNED, False):
        return
    trainer = _trainer_saving_rank0_file(sys._getframe(1))
    if trainer is None:
        return
    setattr(opt, _WARNED, True)
    warnings.warn(
        f"shardopt: {type(trainer).__name__} is saving {type(opt).__name__}'s optimizer state to optimizer.pt from "
        f"rank {meta.get('rank')} alone, but the optimizer is sharded ({meta.get('layout')} layout, world size "
        f"{meta.get('world_size')}): the file holds one rank's shard, the other ranks' state is not saved, and "
        "resuming from it is refused. Train with shardopt.integrations.transformers.ShardoptTrainer, or pass "
        "callbacks=[ShardoptCallback()], which save every rank's part through shardopt.checkpoint",
        RuntimeWarning, stacklevel=2,
    )


def install() -> None:
    if watch not in _state_dict.GLOBAL_STATE_DICT_POST_HOOKS:
        _state_dict.GLOBAL_STATE_DICT_POST_HOOKS.append(watch)
