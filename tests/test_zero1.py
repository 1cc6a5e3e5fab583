"""ZeRO-1 (plain parameters under torch.distributed) against the single-process optimizer."""
from __future__ import annotations

import math
import time

import pytest
import torch

import dist_utils
import shardopt
from cases import CASE_IDS, SHAPES, assert_close_params, build, make_grads, make_params, run_single
from shardopt.functional import ns_flops
from shardopt.sharding.plan import lpt_assign

STEPS = 6


def _trajectories(rank, world):
    out = {}
    for name in CASE_IDS:
        for dtype in (torch.float32, torch.bfloat16):
            for clip in (None, 2.0):
                if clip and dtype == torch.bfloat16:
                    continue
                ps = make_params(dtype)
                opt = build(name, ps, backend="torch", grad_clip_norm=clip)
                assert opt.layout.name == ("zero1" if world > 1 else "none")
                norms = []
                for k in range(STEPS):
                    for p, g in zip(ps, make_grads(k, dtype=dtype)):
                        p.grad = g
                    opt.step()
                    norms.append(opt.last_grad_norm)
                table = opt.summary(print_fn=None)
                out[(name, dtype, clip)] = dict(
                    table=table,
                    params=[p.detach().clone() for p in ps], numel=opt.state_numel(), ns=list(opt.ns_shapes),
                    norms=norms, keys=sorted((i, tuple(sorted(st))) for i, st in enumerate(opt.state_dict()["state"].values())),
                )
    return out


@pytest.mark.parametrize("world", [1, 2, 4])
def test_zero1_equivalence_memory_and_ns_ownership(world):
    res = dist_utils.run(_trajectories, world)
    for (name, dtype, clip), r0 in res[0].items():
        ref, ref_opt = run_single(name, STEPS, dtype=dtype, grad_clip_norm=clip)
        for rank in range(world):
            r = res[rank][(name, dtype, clip)]
            # 1. trajectory equivalence (bitwise for Lion, also in bf16 via the fp32 master)
            assert_close_params(r["params"], ref, name)
            # same state key set on every rank (DCP contract)
            assert r["keys"] == r0["keys"]
            # clipping uses the global norm, equal to the single-process one
            if clip:
                assert r["norms"] == r0["norms"]  # every rank sees the same global norm
        if clip:
            single_norms = []
            ps = make_params(dtype)
            o = build(name, ps, backend="torch", sharding="none", grad_clip_norm=clip)
            for k in range(STEPS):
                for p, g in zip(ps, make_grads(k, dtype=dtype)):
                    p.grad = g
                o.step()
                single_norms.append(o.last_grad_norm)
            assert r0["norms"] == pytest.approx(single_norms, rel=1e-12)
        # 2. memory: per state tensor kind, at most ceil(N/W) plus one alignment unit (128 bytes of params)
        total = ref_opt.state_numel()
        n_params = sum(math.prod(s) for s in SHAPES)
        kinds = total // n_params
        align = 128 // torch.empty((), dtype=dtype).element_size()
        for rank in range(world):
            got = res[rank][(name, dtype, clip)]["numel"]
            if name.startswith("muon"):
                # whole matrices: balanced by NS cost, never more than an even share plus the largest matrix
                assert got <= kinds * (math.ceil(n_params / world) + 16 * 8 + align), (rank, got, total)
            else:
                assert got <= kinds * (math.ceil(n_params / world) + align), (rank, got, total)
        assert sum(res[r][(name, dtype, clip)]["numel"] for r in range(world)) >= total
        # the summary table lists every rank with what it holds
        table = r0["table"]
        assert [t["rank"] for t in table] == list(range(world))
        assert [t["state_bytes"] for t in table] == [res[r][(name, dtype, clip)]["numel"] * 4 for r in range(world)]
        assert sum(t["owned_elements"] for t in table) >= n_params
        assert {t["unsharded_state_bytes"] for t in table} == {4 * total}  # fp32 state (and master), unsharded
        if name.startswith("muon"):
            assert sum(t["ns_flops"] for t in table) == sum(ns_flops(s) for s in SHAPES if len(s) == 2)
        # 3. Muon: each matrix orthogonalized exactly once in the group, as a full matrix
        if name.startswith("muon"):
            seen = sorted(s for r in range(world) for s in res[r][(name, dtype, clip)]["ns"])
            assert seen == sorted(s for s in SHAPES if len(s) == 2)


def test_muon_owner_balance_on_transformer_shapes():
    h, layers = 2048, 24
    shapes = []
    for _ in range(layers):
        shapes += [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)]
    costs = [float(ns_flops(s)) for s in shapes]
    for world in (2, 4, 8, 16):
        loads = [0.0] * world
        lpt_assign(costs, world, loads)
        assert max(loads) / (sum(loads) / world) <= 1.25, (world, loads)


def _ddp_vs_reduce(rank, world, name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7))
    twin = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.Tanh(), torch.nn.Linear(24, 7))
    twin.load_state_dict(model.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cls = {"lion": shardopt.Lion, "adamw": shardopt.AdamW}[name]
    a = cls(ddp.parameters(), lr=1e-2, weight_decay=0.1, backend="torch")
    b = cls(twin.parameters(), lr=1e-2, weight_decay=0.1, backend="torch", reduce_gradients=True)
    for k in range(5):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(4 * world, 12, generator=g)[rank * 4:(rank + 1) * 4]
        for m, o in ((ddp, a), (twin, b)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    # non-finite: a NaN on this rank only; the step is skipped on every rank
    before = [p.detach().clone() for p in twin.parameters()]
    state_before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.state[next(twin.parameters())].items()}
    b.zero_grad()
    twin(torch.randn(4, 12)).pow(2).mean().backward()
    if rank == world - 1:
        next(twin.parameters()).grad[0, 0] = float("nan")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b.step()
    unchanged = all(torch.equal(p, q) for p, q in zip(twin.parameters(), before))
    state_same = all((torch.equal(v, b.state[next(twin.parameters())][k]) if torch.is_tensor(v) else v == b.state[next(twin.parameters())][k]) for k, v in state_before.items())
    return [p.detach().clone() for p in model.parameters()], before, unchanged and state_same, b.skipped_steps


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_reduce_gradients_equals_ddp_and_nonfinite_skips_everywhere(name):
    res = dist_utils.run(_ddp_vs_reduce, 2, name)
    for ddp_params, own_params, unchanged, skipped in res:
        for x, y in zip(ddp_params, own_params):
            assert torch.equal(x, y)  # W=2: 1/W scaling then a 2-term sum is exact both ways
        assert unchanged and skipped == 1
    assert all(torch.equal(x, y) for x, y in zip(res[0][0], res[1][0]))


def _mismatched(rank, world):
    shapes = SHAPES if rank == 0 else SHAPES[:3] + [(5, 5)] + SHAPES[4:]
    t0 = time.time()
    try:
        shardopt.Lion(make_params(shapes=shapes), backend="torch")
    except ValueError as e:
        return str(e), time.time() - t0
    return None, time.time() - t0


def test_mismatched_ranks_raise_quickly_without_hang():
    t0 = time.time()
    res = dist_utils.run(_mismatched, 2, timeout_s=30)
    assert time.time() - t0 < 60
    for msg, dt in res:
        assert msg is not None and "ranks disagree" in msg and "entry 3" in msg, msg
        assert dt < 10


def _tiny_buckets(rank, world):
    from shardopt.sharding import zero1

    zero1.DEFAULT_BUCKET_ELEMENTS = 48  # every Muon matrix spans several all-gather buckets
    out = {}
    for name in CASE_IDS:
        for reduce in (False, True):
            ps = make_params()
            opt = build(name, ps, backend="torch", reduce_gradients=reduce)
            assert len(opt.layout.buckets) > 3
            for k in range(STEPS):
                for p, g in zip(ps, make_grads(k)):
                    p.grad = g
                opt.step()
            out[(name, reduce)] = [p.detach().clone() for p in ps]
    return out


def test_muon_matrices_spanning_buckets_equal_the_single_process():
    res = dist_utils.run(_tiny_buckets, 2)
    for (name, reduce), got in res[0].items():
        ref, _ = run_single(name, STEPS)
        for r in res:
            assert_close_params(r[(name, reduce)], ref, name)
