"""The flat-partition layout (DeepSpeed ZeRO-1/2/3 geometry) against the single-process optimizer.

No DeepSpeed here: each rank cuts the case table's parameters the way
DeepSpeed does (ZeRO-1/2: one flat buffer per group in equal partitions;
ZeRO-3: every parameter in equal partitions), hands the optimizer its flat
partitions, and steps it one group at a time as DeepSpeed does (ZeRO-1/2
narrow ``param_groups``, ZeRO-3 empties the other groups). The full parameters
are rebuilt from every rank's partition and compared with the single-process
run. tests/test_deepspeed.py runs the same layout inside real engines.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import dist_utils
from cases import CASE_IDS, assert_close_params, build, make_grads, make_params, run_single
from shardopt.sharding import comm
from shardopt.sharding.flat import FlatPlan, build_group
from shardopt.sharding.plan import contiguous_pieces, per_item_pieces

STEPS = 4


def _geometry(params, world, geometry):
    """(per-rank pieces, per-rank partition numel, function: full tensors -> this rank's flat)."""
    numels = [p.numel() for p in params]
    if geometry == "zero12":
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        align = 2 * world
        P = math.ceil(sum(numels) / align) * align // world
        pieces = contiguous_pieces(numels, offsets, P, world)

        def cut(tensors, rank):
            flat = torch.zeros(P * world)
            flat[:sum(numels)] = torch.cat([t.reshape(-1).float() for t in tensors])
            return flat[rank * P:(rank + 1) * P].clone()

        return pieces, [P] * world, cut
    parts = [-(-n // world) for n in numels]
    pieces = per_item_pieces(numels, world)

    def cut(tensors, rank):
        out = []
        for t, part in zip(tensors, parts):
            padded = torch.zeros(part * world)
            padded[:t.numel()] = t.reshape(-1).float()
            out.append(padded[rank * part:(rank + 1) * part])
        return torch.cat(out)

    return pieces, [sum(parts)] * world, cut


def _run(rank, world):
    return {g: _run_geometry(rank, world, g) for g in ("zero12", "zero3")}


def _run_geometry(rank, world, geometry):
    out = {}
    for name in CASE_IDS:
        ps = make_params()
        opt = build(name, ps, backend="torch", sharding="none")
        shapes = [tuple(p.shape) for p in ps]
        index = {id(p): k for k, p in enumerate(ps)}
        specs, flats, members = [], [], []
        for gi, g in enumerate(opt.param_groups):
            gp = list(g["params"])
            pieces, numel, cut = _geometry(gp, world, geometry)
            matrix = [g["algorithm"] == "muon"] * len(gp)
            specs.append(build_group(f"g{gi}", [f"p{index[id(p)]}" for p in gp], [p.shape for p in gp], matrix,
                                     pieces, numel))
            flats.append(cut([p.detach() for p in gp], rank))
            members.append((gp, pieces, cut))
        plan = FlatPlan(specs, None, name=f"test-{geometry}")
        for gi, (g, f) in enumerate(zip(opt.param_groups, flats)):
            g["params"] = [f]
            g.pop("param_names", None)
            plan.bind(f, f"g{gi}")
        opt._layout_factory = plan.layout_for
        opt._layout = None
        assert opt.layout.name == f"test-{geometry}"
        ns, a2a = [], []
        for k in range(STEPS):
            grads = make_grads(k)
            for (gp, _, cut), f in zip(members, flats):
                f.grad = cut([grads[index[id(p)]] for p in gp], rank)
            full = list(opt.param_groups)
            comm.reset_counters()
            step_ns = []
            for gi in range(len(full)):
                if geometry == "zero12":
                    opt.param_groups = [full[gi]]  # DeepSpeed ZeRO-1/2 narrows the groups
                    opt.step()
                else:  # ZeRO-3 keeps the groups and empties all but one
                    keep = [g["params"] for g in full]
                    for gj, g in enumerate(full):
                        g["params"] = keep[gj] if gj == gi else []
                    opt.step()
                    for g, pl in zip(full, keep):
                        g["params"] = pl
                step_ns.extend(opt.ns_shapes)
            opt.param_groups = full
            ns.append(step_ns)
            a2a.append(comm.COUNTERS["all_to_all"])
        # the full parameters from every rank's partitions
        result = [None] * len(ps)
        for (gp, pieces, _), f in zip(members, flats):
            gathered = torch.empty(world * f.numel())
            dist.all_gather_into_tensor(gathered, f.detach())
            allf = gathered.view(world, -1)
            for j, p in enumerate(gp):
                t = torch.empty(p.numel())
                for r in range(world):
                    for pc in pieces[r]:
                        if pc.item == j:
                            t[pc.lo:pc.hi] = allf[r, pc.offset:pc.offset + pc.numel]
                result[index[id(p)]] = t.view(shapes[index[id(p)]])
        muon_local = sum(f.numel() for g, f in zip(opt.param_groups, flats) if g["algorithm"] == "muon") * 4
        out[name] = dict(params=result, ns=ns, a2a=a2a, muon_local_bytes=muon_local,
                         keys=sorted(tuple(sorted(st)) for st in opt.state.values()),
                         layout=opt.state_dict()["shardopt"])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_flat_layout_matches_single_process(world):
    both = dist_utils.run(_run, world)
    for geometry in ("zero12", "zero3"):
        _check(world, geometry, [b[geometry] for b in both])


def _check(world, geometry, res):
    for name in CASE_IDS:
        ref, _ = run_single(name, STEPS)
        matrices = sorted(tuple(s) for s in [p.shape for p in make_params()] if len(s) == 2)
        for rank in range(world):
            r = res[rank][name]
            assert_close_params(r["params"], ref, name)
            assert r["keys"] == res[0][name]["keys"]
            assert r["layout"] == {"format": 2, "layout": f"test-{geometry}", "world_size": world, "rank": rank}
        if not name.startswith("muon"):
            continue
        for k in range(STEPS):
            per_rank = [res[r][name]["ns"][k] for r in range(world)]
            # every matrix orthogonalized exactly once per step, whole, somewhere in the group
            assert sorted(s for pr in per_rank for s in pr) == matrices, per_rank
            assert sum(1 for pr in per_rank if pr) >= min(world, len(matrices)) - 1, "NS not spread over ranks"
            for r in range(world):
                # out and back: at most twice this rank's Muon partition bytes
                assert res[r][name]["a2a"][k] <= 2 * res[r][name]["muon_local_bytes"]
