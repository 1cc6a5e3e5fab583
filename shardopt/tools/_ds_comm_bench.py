"""The worker of ``shardopt bench --distributed --deepspeed``: bytes per step and rank, and NS counts.

Each spawned rank builds the same small transformer-shaped model (attention
and MLP projections of several shapes, so DeepSpeed's flat partitions cut
matrices) and trains it one step under DeepSpeed ZeRO-1/2/3 twice: with
``"type": "shardopt.Muon"`` and with DeepSpeed's own ``"type": "Muon"``. The
torch.distributed collectives are wrapped for the measured step (after one
warm-up step), so both optimizers are measured the same way, DeepSpeed's own
gradient and parameter traffic included; shardopt's part is also read from
:mod:`shardopt.sharding.comm`'s counters. Newton-Schulz calls are counted per
matrix: shardopt's ``newton_schulz`` and DeepSpeed's ``muon_update``.

Bytes are what one rank sends, for ring algorithms (NCCL's bus accounting):
all-reduce ``2(W-1)/W * N``, all-gather and reduce-scatter ``(W-1)/W * N``
(``N`` the full buffer), reduce and broadcast ``(W-1)/W * N``, all-to-all the
bytes addressed to other ranks.
"""
from __future__ import annotations

import collections
import os

import torch

_WRAPPED = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single",
            "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
            "_reduce_scatter_base", "all_to_all_single", "all_to_all")


class Wire:
    """Counts the bytes each collective sends from this rank, while ``on``."""

    def __init__(self):
        self.bytes = collections.Counter()
        self.calls = collections.Counter()
        self.on = False
        self._depth = 0

    def _sent(self, name, fn, args, kwargs):
        import inspect

        import torch.distributed as dist

        a = inspect.signature(fn).bind(*args, **kwargs).arguments
        group = a.get("group")
        world = dist.get_world_size(group)
        f = (world - 1) / world
        first, second = list(a.values())[:2] if len(a) > 1 else (list(a.values())[0], None)

        def nb(t):
            return t.numel() * t.element_size()

        if name == "all_reduce":
            return 2 * f * nb(first)
        if name in ("reduce", "broadcast"):
            return f * nb(first)
        if name in ("all_gather_into_tensor", "all_gather_single", "_all_gather_base"):
            return f * nb(first)  # the gathered output
        if name == "all_gather":
            return (world - 1) * nb(second)
        if name in ("reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base"):
            return f * nb(second)  # the full input
        if name == "reduce_scatter":
            return (world - 1) * nb(first)
        if name == "all_to_all_single":
            splits = a.get("input_split_sizes")
            if splits:
                per = second.numel() // max(1, sum(splits))
                return (sum(splits) - splits[dist.get_rank(group)]) * per * second.element_size()
            return f * nb(second)
        if name == "all_to_all":
            return f * sum(nb(t) for t in second)
        return 0

    def install(self):
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for mod in (dist, c10d):
            for name in _WRAPPED:
                fn = getattr(mod, name, None)
                if fn is None or getattr(fn, "_shardopt_wire", False):
                    continue
                setattr(mod, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            if self.on and self._depth == 0:  # a deprecated alias calls the new name: count the outer call
                self.bytes[name] += self._sent(name, fn, args, kwargs)
                self.calls[name] += 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        wrapped._shardopt_wire = True
        return wrapped


class Block(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.qkv = torch.nn.Linear(h, 3 * h)
        self.proj = torch.nn.Linear(h, h)
        self.up = torch.nn.Linear(h, 4 * h)
        self.down = torch.nn.Linear(4 * h, h)
        self.h = h

    def forward(self, x):
        a = self.qkv(x).view(x.shape[0], 3, self.h).sum(1)
        x = x + self.proj(torch.tanh(a))
        return x + self.down(torch.tanh(self.up(x)))


class Model(torch.nn.Module):
    def __init__(self, h, layers):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(h) for _ in range(layers))
        self.lm_head = torch.nn.Linear(h, h)  # "lm_head": the aux group for both Muons

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.lm_head(x)


def _config(stage, kind, micro):
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition every parameter, small ones too
    if kind == "deepspeed" and stage == 3:
        zero["reduce_scatter"] = False  # DeepSpeed 0.19.8: "Muon and reduce scatter cannot be used together"
    if kind == "shardopt":
        opt = {"type": "shardopt.Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0,
                                                   "aux_algorithm": "adamw", "aux_lr": 1e-3}}
    else:
        opt = {"type": "Muon", "params": {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.0}}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "steps_per_print": 10**9, "zero_optimization": zero, "optimizer": opt}


def worker(rank, world, port, hidden, layers, stages, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    wire = Wire()
    wire.install()  # before DeepSpeed caches its collective functions
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed
    import deepspeed.runtime.zero.muon.original_muon as ds_muon
    from deepspeed.utils import logger as ds_logger

    import shardopt.deepspeed  # noqa: F401
    import shardopt.optim.muon as our_muon
    from shardopt.sharding import comm

    ds_logger.setLevel(logging.ERROR)
    ns = [0]
    real_ns, real_update = our_muon.newton_schulz, ds_muon.muon_update

    def count_ns(batch, **kw):
        ns[0] += batch.shape[0] if batch.dim() == 3 else 1
        return real_ns(batch, **kw)

    def count_update(grad, *a, **kw):
        ns[0] += max(1, grad.numel() // (grad.shape[-2] * grad.shape[-1])) if grad.dim() >= 2 else 1
        return real_update(grad, *a, **kw)

    our_muon.newton_schulz = count_ns
    ds_muon.muon_update = count_update
    micro = 4
    res = {}
    for stage in stages:
        for kind in ("shardopt", "deepspeed"):
            torch.manual_seed(0)
            model = Model(hidden, layers)
            matrices = sum(1 for n, p in model.named_parameters() if p.dim() == 2 and "lm_head" not in n)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=_config(stage, kind, micro))
            g = torch.Generator().manual_seed(rank)
            phases = {}
            for step in range(2):
                x = torch.randn(micro, hidden, generator=g)
                y = torch.randn(micro, hidden, generator=g)
                measure = step == 1
                wire.bytes.clear()
                comm.reset_counters()
                ns[0] = 0
                wire.on = measure
                loss = torch.nn.functional.mse_loss(engine(x), y)
                engine.backward(loss)
                fwd_bwd = sum(wire.bytes.values())
                engine.step()
                wire.on = False
                if measure:
                    phases = {"fwd_bwd": fwd_bwd, "step": sum(wire.bytes.values()) - fwd_bwd,
                              "by_op": dict(wire.bytes), "shardopt_comm": dict(comm.COUNTERS), "ns": ns[0]}
            res[(stage, kind)] = dict(phases, matrices=matrices)
            del engine
    out[rank] = res
    comm.exit_distributed(0)
