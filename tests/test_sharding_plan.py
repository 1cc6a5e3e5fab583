"""The pure planning functions of ``shardopt.sharding.plan`` that the layouts and ``shardopt plan`` share.

``fill_segments`` and ``lpt_assign`` were rewritten to plan thousands of ranks
cheaply (a closed form for the splittable stream, a heap for LPT); they are
held to the loops they replaced, kept here as the reference.
"""
from __future__ import annotations

import math
import random

import torch

from shardopt.sharding.plan import (Piece, fill_segments, lpt_assign, plan_fsdp2, plan_zero1, round_up,
                                    row_ranges)


def fill_segments_loop(numels, owners, world, align):
    """fill_segments as it was written before the planner (a loop over ranks): (segment, pieces)."""
    total = sum(numels)
    whole = [0] * world
    for n, o in zip(numels, owners):
        if o is not None:
            whole[o] += n
    seg = max(round_up(math.ceil(total / world), align) if total else 0, max(whole) if whole else 0)
    seg = round_up(seg, align) if seg else 0
    pieces = [[] for _ in range(world)]
    used = [0] * world
    for i, (n, o) in enumerate(zip(numels, owners)):
        if o is not None:
            pieces[o].append(Piece(i, 0, n, used[o]))
            used[o] += n
    r = 0
    for i, (n, o) in enumerate(zip(numels, owners)):
        if o is not None:
            continue
        start = 0
        while start < n:
            while used[r] >= seg:
                r += 1
            take = min(seg - used[r], n - start)
            pieces[r].append(Piece(i, start, start + take, used[r]))
            used[r] += take
            start += take
    return seg, pieces


def lpt_linear(costs, world, loads):
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += costs[i]
    return owner


def random_cases(n_cases, seed=18):
    """(numels, owners, world, align) with LPT owners, checked against the linear LPT on the way."""
    rng = random.Random(seed)
    for _ in range(n_cases):
        world = rng.choice([1, 2, 3, 4, 7, 16])
        n = rng.randint(0, 12)
        numels = [rng.choice([0, 1, 5, 17, 64, 300, 1000]) for _ in range(n)]
        costs = [float(rng.choice([0, 1, 2, 5, 5, 9])) for _ in range(n)]
        whole = [rng.random() < 0.4 for _ in range(n)]
        prior = [float(rng.randint(0, 3)) for _ in range(world)]
        la, lb = list(prior), list(prior)
        w_idx = [i for i in range(n) if whole[i]]
        oa = lpt_assign([costs[i] for i in w_idx], world, la)
        assert oa == lpt_linear([costs[i] for i in w_idx], world, lb) and la == lb
        owners = [None] * n
        for i, o in zip(w_idx, oa):
            owners[i] = o
        yield numels, owners, world, rng.choice([1, 4, 32])


def test_fill_segments_and_lpt_match_the_loops_they_replaced():
    for numels, owners, world, align in random_cases(400):
        sp = fill_segments(numels, owners, world, align)
        seg, pieces = fill_segments_loop(numels, owners, world, align)
        assert sp.segment == seg and sp.pieces == pieces, (numels, owners, world, align)


def test_plan_zero1_buckets_like_the_layout():
    numels = [10, 2 ** 20, 7, 3 * 2 ** 19, 5]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    W, bucket = 3, 2 ** 20 + 10
    p = plan_zero1(numels, dtypes, [False, True, False, True, False], [0, 2.0, 0, 1.0, 0], W,
                   bucket_elements=bucket, align_bytes=128)
    assert [(s.dtype, s.indices) for s in p.streams] == [(torch.float32, [0, 2, 4]), (torch.bfloat16, [1, 3])]
    assert p.owner == [None, 0, None, 1, None] and p.loads == [2.0, 1.0, 0.0]  # LPT load carries across dtypes
    # one segment per rank and dtype: 128 bytes = 32 fp32 / 64 bf16; the bf16 one is the larger matrix
    assert p.streams[0].plan.segment == 32 and p.streams[1].plan.segment == 3 * 2 ** 19
    # buckets are windows of the segments, each at most `bucket` elements over the W ranks
    bf = p.streams[1].buckets
    assert len(bf) > 2 and all(W * b.plan.segment <= bucket + W * 64 for b in bf)
    assert sum(b.plan.segment for b in bf) == 3 * 2 ** 19
    # every element of every item travels exactly once, a whole matrix always from its owner's segment
    for st in p.streams:
        seen = {}
        for b in st.buckets:
            for r in range(W):
                for pc in b.plan.pieces[r]:
                    i = st.indices[pc.index]
                    if p.owner[i] is not None:
                        assert r == p.owner[i]
                    seen.setdefault(i, []).append((pc.start, pc.end))
        for i, runs in seen.items():
            runs.sort()
            assert runs[0][0] == 0 and runs[-1][1] == numels[i]
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert set(seen) == {i for i in st.indices if numels[i]}


def test_plan_fsdp2_rows_and_owners():
    p = plan_fsdp2([10, 3, 0, 7], [True, False, True, True], [5.0, 0.0, 0.0, 9.0], 4)
    assert p.chunk == [3, 1, 0, 2] and p.owner == [1, None, 2, 0] and p.loads == [9.0, 5.0, 0.0, 0.0]
    assert row_ranges(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_ranges(3, 4) == [(0, 1), (1, 2), (2, 3), (3, 3)]  # torch.chunk: the tail rank is empty
    assert [hi - lo for lo, hi in row_ranges(7, 4)] == [len(c) for c in torch.arange(7).chunk(4)]


def test_local_runs_are_torch_placements_on_random_meshes():
    """local_runs (the planner's and DTensorLayout's index arithmetic) against torch's own
    Shard / _StridedShard splitting and compute_local_shape_and_global_offset, on random
    1-3-D meshes, placements and uneven shapes."""
    import itertools

    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    from shardopt.sharding.plan import Split, boxes, flat_runs, local_runs, runs_len

    rng = random.Random(0)
    checked = 0
    for _ in range(600):
        mesh = tuple(rng.choice([1, 2, 3, 4]) for _ in range(rng.choice([1, 2, 3])))
        shape = (rng.randint(0, 13), rng.randint(0, 7))
        pls, splits = [], []
        for d in range(len(mesh)):
            kind, td = rng.choice(["R", "S", "SS"]), rng.randint(0, 1)
            if kind == "R":
                pls.append(Replicate())
            elif kind == "S":
                pls.append(Shard(td))
                splits.append(Split(td, (d,)))
            else:
                sf = rng.choice([1, 2, 3])
                pls.append(_StridedShard(td, split_factor=sf))
                splits.append(Split(td, (d,), sf))
        for coord in itertools.product(*[range(m) for m in mesh]):
            runs = local_runs(shape, splits, coord, mesh)
            size, _ = _compute_local_shape_and_global_offset(shape, mesh, list(coord), pls)
            assert tuple(runs_len(r) for r in runs) == tuple(size)
            loc = torch.arange(shape[0] * shape[1]).view(shape)
            for d, pl in enumerate(pls):
                if not isinstance(pl, Replicate):
                    loc = pl._split_tensor(loc, mesh[d], with_padding=False)[0][coord[d]]
            fl = flat_runs(shape, runs)
            got = torch.cat([torch.arange(a, a + n) for a, n in fl]) if fl else torch.empty(0, dtype=torch.long)
            assert torch.equal(got, loc.reshape(-1)), (shape, mesh, pls, coord)
            assert sum(math.prod(b[1]) for b in boxes(runs)) == loc.numel()
            checked += 1
    assert checked > 3000
