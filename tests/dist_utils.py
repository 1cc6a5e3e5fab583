"""Spawn W gloo ranks on CPU, run a module-level function on each, collect results.

Each rank returns a picklable value (tensors are fine); ``run`` returns the
list, rank order. An exception on any rank is re-raised here with its traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardopt.sharding.comm import exit_distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, outdir, timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    try:
        res = ("ok", fn(rank, world, *args))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        res = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    torch.save(res, os.path.join(outdir, f"r{rank}.pt"))
    # a failed rank does not wait at the barrier for peers that may never reach it
    exit_distributed(0, barrier=res[0] == "ok")


def run(fn, world: int, *args, timeout_s: int = 300):
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(world, free_port(), fn, args, d, timeout_s), nprocs=world,
                                 join=False, start_method="spawn")
        try:
            while not ctx.join():
                pass
        except mp.ProcessExitedException:
            # gloo sometimes aborts in process teardown ("terminate called without an active
            # exception") after every rank has saved its result; only a rank without a result failed
            if not all(os.path.exists(os.path.join(d, f"r{r}.pt")) for r in range(world)):
                raise
        out = []
        for r in range(world):
            status, val = torch.load(os.path.join(d, f"r{r}.pt"), weights_only=False)
            if status == "err":
                raise RuntimeError(f"rank {r} failed: {val}")
            out.append(val)
        return out


# ---------------------------------------------------------------- layouts of a module, for the state-dtype tests
def layouts(world: int) -> tuple:
    """The layouts a state test runs at ``world`` ranks: HSDP (2 replicas) too where the ranks make a 2 x 2 mesh."""
    return ("zero1", "fsdp2", "hsdp") if world == 4 else ("zero1", "fsdp2")


def shard(module, layout: str, world: int):
    """``(module, its parameters)``: FSDP2 over all ranks, HSDP over a (2, W/2) mesh, or the module as it is
    (``zero1``: the optimizer shards)."""
    if layout in ("fsdp2", "hsdp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,)) if layout == "fsdp2" else \
            init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
        fully_shard(module, mesh=mesh)
    return module, list(module.parameters())


def train(opt, params, k0: int, k1: int, grads_of) -> None:
    """Steps ``k0 .. k1 - 1`` with the global gradients ``grads_of(k)``, distributed like each parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for k in range(k0, k1):
        for p, g in zip(params, grads_of(k)):
            p.grad = distribute_tensor(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g
        opt.step()


def full(params) -> list:
    """Every parameter whole (a DTensor gathered), as a detached copy."""
    from torch.distributed.tensor import DTensor

    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for p in params]
