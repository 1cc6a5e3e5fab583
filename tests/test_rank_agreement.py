"""Every rank agreeing: gradients present on some ranks only, per-parameter steps, and ranks that
disagree at construction, under ZeRO-1 (DDP and reduce_gradients) and FSDP2, at W = 2 and 4.

References: DDP with ``find_unused_parameters=True`` and the single-process optimizer.
"""
from __future__ import annotations

import time

import pytest
import torch

import dist_utils
import shardopt
from cases import max_rel_err


class Branchy(torch.nn.Module):
    """A trunk every rank uses and a branch only some ranks use (an MoE expert, a conditional head)."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(6, 10)
        self.branch = torch.nn.Linear(10, 3)
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x, use_branch):
        h = torch.tanh(self.trunk(x))
        out = self.head(h)
        return out + self.branch(h) if use_branch else out


def _batch(step, rank, world):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(4 * world, 6, generator=g)
    return x[rank * 4:(rank + 1) * 4]


def _zero1_job(rank, world):
    torch.manual_seed(0)
    out = {}
    for cls in (shardopt.AdamW, shardopt.Lion):
        torch.manual_seed(0)
        ref_model = Branchy()
        own_model = Branchy()
        own_model.load_state_dict(ref_model.state_dict())
        ddp = torch.nn.parallel.DistributedDataParallel(ref_model, find_unused_parameters=True)
        a = cls(ddp.parameters(), lr=1e-2, weight_decay=0.1)
        b = cls(own_model.parameters(), lr=1e-2, weight_decay=0.1, reduce_gradients=True)
        for step in range(6):
            x = _batch(step, rank, world)
            use = rank == 0 and step % 2 == 0  # the branch gets a gradient on rank 0, every other step
            for m, o in ((ddp, a), (own_model, b)):
                o.zero_grad()
                m(x, use).pow(2).mean().backward()
                o.step()
        out[cls.__name__] = dict(
            ddp=[p.detach().clone() for p in ref_model.parameters()],
            own=[p.detach().clone() for p in own_model.parameters()],
            steps=[b.state[p]["step"] for p in own_model.parameters()],
            ddp_steps=[a.state[p]["step"] for p in ref_model.parameters()],
        )
    # fp64 parameters under ZeRO-1 with the default backend: served on every rank
    ps = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))]
    opt = shardopt.AdamW(ps, lr=1e-2)
    for step in range(3):
        ps[0].grad = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + step))
        opt.step()
    out["fp64"] = ps[0].detach().clone()
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_zero1_gradients_on_some_ranks_only_equal_ddp(world):
    res = dist_utils.run(_zero1_job, world)
    for name in ("AdamW", "Lion"):
        for r in res:
            d = r[name]
            tol = 0.0 if world == 2 else 1e-6  # W=2: 1/W then a 2-term sum is exact in any order
            assert max_rel_err(d["own"], d["ddp"]) <= tol, (name, max_rel_err(d["own"], d["ddp"]))
            assert d["steps"] == res[0][name]["steps"]  # identical counters on every rank
            assert d["steps"] == d["ddp_steps"]
        branch_steps = res[0][name]["steps"][2:4]
        assert branch_steps == [3, 3]  # the branch stepped (on every rank) exactly when rank 0 had a gradient
        assert res[0][name]["steps"][0] == 6
        # the branch moved: the owner did not drop the reduced gradient
        torch.manual_seed(0)
        init = Branchy()
        assert not torch.equal(res[-1][name]["own"][2], init.branch.weight.detach())
    ref = [torch.nn.Parameter(torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))]
    o = torch.optim.AdamW(ref, lr=1e-2)
    for step in range(3):
        ref[0].grad = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(10 + step))
        o.step()
    for r in res:
        assert (r["fp64"] - ref[0].detach()).abs().max().item() < 1e-12


def _disagree_job(rank, world, case):
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(6, 4, generator=g)) for _ in range(3))
    ps = [a, b, c]
    kw = {}
    if case == "reorder" and rank == world - 1:
        ps = [b, a, c]
    if case == "lr" and rank == world - 1:
        kw = dict(lr=2e-2)
    if case == "missing" and rank == world - 1:
        ps = [a, b]
    try:
        shardopt.AdamW(ps, **({"lr": 1e-2} | kw))
    except ValueError as e:
        return str(e), time.time() - t0
    return None, time.time() - t0


def _fsdp_disagree_job(rank, world, case):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    t0 = time.time()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    ps = list(m.parameters())
    kw = {}
    if case == "missing" and rank == 0:
        ps = ps[:-1]
    if case == "lr" and rank == 0:
        kw = dict(lr=5e-3)
    try:
        shardopt.Lion(ps, **({"lr": 1e-3} | kw))
    except ValueError as e:
        return str(e), time.time() - t0
    return None, time.time() - t0


@pytest.mark.parametrize("case, match", [("reorder", "order"), ("lr", "disagree"), ("missing", "disagree")])
def test_zero1_ranks_that_disagree_all_raise_within_seconds(case, match):
    t0 = time.time()
    res = dist_utils.run(_disagree_job, 2, case, timeout_s=30)
    assert time.time() - t0 < 60
    for msg, dt in res:
        assert msg is not None and match in msg, msg
        assert dt < 10
    if case == "lr":
        assert "lr" in res[0][0]


@pytest.mark.parametrize("case", ["missing", "lr"])
def test_fsdp2_ranks_that_disagree_all_raise(case):
    res = dist_utils.run(_fsdp_disagree_job, 2, case, timeout_s=30)
    for msg, dt in res:
        assert msg is not None and "disagree" in msg, msg
        assert dt < 10


def _fsdp_missing_grad_job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    out = {}
    shapes = [(8, 6), (5, 3), (7,)]
    for name in ("lion", "adamw", "muon"):
        g = torch.Generator().manual_seed(0)
        holder = torch.nn.Module()
        holder.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes])
        fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))
        ps = list(holder.parameters())
        if name == "muon":
            opt = shardopt.Muon([{"params": ps[:2], "ns_dtype": torch.float32},
                                 {"params": ps[2:], "algorithm": "adamw"}], lr=2e-2)
        else:
            opt = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[name](ps, lr=1e-2, weight_decay=0.1)
        for step in range(4):
            gg = torch.Generator().manual_seed(100 + step)
            for j, p in enumerate(ps):
                full = torch.randn(p.shape, generator=gg)
                p.grad = distribute_tensor(full, p.device_mesh, p.placements)
                if j == 0 and rank == world - 1 and step % 2:
                    p.grad = None  # this rank's shard of the gradient is missing
            opt.step()
        out[name] = dict(params=[p.full_tensor().detach().clone() for p in ps],
                         steps=[opt.state[p]["step"] for p in ps])
    return out


def _fsdp_missing_grad_reference(world):
    shapes = [(8, 6), (5, 3), (7,)]
    out = {}
    for name in ("lion", "adamw", "muon"):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        if name == "muon":
            opt = shardopt.Muon([{"params": ps[:2], "ns_dtype": torch.float32},
                                 {"params": ps[2:], "algorithm": "adamw"}], lr=2e-2, backend="torch")
        else:
            opt = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[name](ps, lr=1e-2, weight_decay=0.1, backend="torch")
        for step in range(4):
            gg = torch.Generator().manual_seed(100 + step)
            for j, p in enumerate(ps):
                full = torch.randn(p.shape, generator=gg)
                if j == 0 and step % 2:
                    rows = -(-p.shape[0] // world)
                    full[(world - 1) * rows:] = 0.0  # the missing shard counts as zeros
                p.grad = full
            opt.step()
        out[name] = [p.detach().clone() for p in ps]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_gradient_missing_on_one_rank_counts_as_zeros(world):
    res = dist_utils.run(_fsdp_missing_grad_job, world)
    ref = _fsdp_missing_grad_reference(world)
    for name, tol in (("lion", 0.0), ("adamw", 1e-6), ("muon", 2e-3)):
        for r in res:
            assert max_rel_err(r[name]["params"], ref[name]) <= tol, (name, max_rel_err(r[name]["params"], ref[name]))
            assert r[name]["steps"] == [4, 4, 4]
