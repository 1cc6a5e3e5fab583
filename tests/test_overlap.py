"""Overlapped communication changes the timing, never the bits.

* ZeRO-1: each bucket's all-gather starts (async) as soon as the last param
  group with items in it is updated; ``overlap_comm=False`` runs them one by
  one at the end. Mixed dtypes give two buckets, the fp32 one complete after
  group 0.
* FSDP2 (1-D and 2 x 2 dp x tp): the gather step runs in chunks, the next
  chunk's all-to-all in flight during NS of this one.
* ``overlap_param_gather=True`` leaves the last all-gathers in flight after
  ``step()`` and waits in the modules' forward pre-hooks (``opt.attach``):
  the demo model trains to the same losses, bit for bit.

One job per world size (2 and 4) runs all of it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import dist_utils
import tp_models as tm
from cases import CASE_IDS, build, make_grads, make_params

STEPS = 4


def _mixed_params():
    ps = make_params()
    return [p if k % 2 == 0 else torch.nn.Parameter(p.detach().bfloat16()) for k, p in enumerate(ps)]


def _zero1(name, params, **kw):
    from shardopt.sharding import comm

    opt = build(name, params, backend="torch", **kw)
    assert opt.layout.name == "zero1"
    for k in range(STEPS):
        for p, g in zip(params, make_grads(k)):
            p.grad = g.to(p.dtype)
        comm.reset_counters()
        opt.step()
    return [p.detach().clone() for p in params], dict(comm.COUNTERS), len(opt.layout.buckets)


def _fsdp2(name, **kw):
    from test_fsdp2 import _full, _shard, _train

    m = _shard(dist_utils_world())
    ps = list(m.parameters())
    opt = build(name, ps, backend="torch", **kw)
    _train(opt, ps, 0, STEPS)
    return _full(ps)


def dist_utils_world():
    import torch.distributed as dist

    return dist.get_world_size()


def _tp_muon(mesh, **kw):
    model = tm.parallelize(tm.build(), mesh)
    params = list(model.parameters())
    opt = tm.make_opt("muon", model, **kw)
    for k in range(STEPS):
        tm.set_grads(params, tm.grads_for(model, k))
        opt.step()
    return [p.full_tensor().detach().clone() for p in params]


def _demo(rank, world, name, overlap_param_gather, attach=True):
    """The demo model under DDP + ZeRO-1: per-step losses and the final parameters."""
    import shardopt
    from shardopt.tools._demo_model import SIZES, Corpus, build_model

    cfg = SIZES["tiny"]
    model = build_model(cfg, seed=0)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    if name == "muon":
        opt = shardopt.Muon(shardopt.muon_param_groups(model, aux_lr=3e-3), lr=0.02, backend="torch",
                            overlap_param_gather=overlap_param_gather)
    else:
        opt = shardopt.AdamW(model.parameters(), lr=3e-3, backend="torch", overlap_param_gather=overlap_param_gather)
    if attach:
        opt.attach(ddp)
    data = Corpus(cfg, seed=0)
    losses, in_flight = [], []
    for step in range(6):
        x, y = data.batch(step, rank, world)
        opt.zero_grad()
        loss = ddp(x, y)
        in_flight.append(opt.layout.in_flight)  # landed by the forward pre-hooks
        loss.backward()
        opt.step()
        in_flight.append(opt.layout.in_flight)  # left in flight by step()
        losses.append(loss.item())
    opt.wait_param_gather()
    return losses, [p.detach().clone() for p in model.parameters()], in_flight


def _job(rank, world):
    from torch.distributed.device_mesh import init_device_mesh

    out = {}
    for name in CASE_IDS:
        for mixed in (False, True):
            make = _mixed_params if mixed else make_params
            out[("zero1", name, mixed)] = [_zero1(name, make(), overlap_comm=o) for o in (True, False)]
        out[("fsdp2", name)] = [_fsdp2(name, overlap_comm=o) for o in (True, False)]
    if world == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        out["tp"] = [_tp_muon(mesh, overlap_comm=o) for o in (True, False)]
    for name in ("adamw", "muon"):
        out[("demo", name)] = [_demo(rank, world, name, o) for o in (True, False)]
    # checkpoints wait for the gathers left in flight: save right after step() sees the updated weights
    import shardopt
    import shardopt.checkpoint
    from test_fsdp2 import _shard

    if world == 2:
        import tempfile

        from shardopt.tools._demo_model import SIZES, Corpus, build_model

        def one_step(**kw):
            model = build_model(SIZES["tiny"], seed=0)
            opt = shardopt.AdamW(model.parameters(), lr=3e-3, backend="torch", reduce_gradients=True, **kw)
            opt.attach(model)
            x, y = Corpus(SIZES["tiny"], seed=0).batch(0, rank, world)
            model(x, y).backward()
            opt.step()
            return model, opt

        truth = [p.detach().clone() for p in one_step()[0].parameters()]
        model, opt = one_step(overlap_param_gather=True)
        in_flight = opt.layout.in_flight
        d = tempfile.mkdtemp() if rank == 0 else None
        import torch.distributed as dist

        box = [d]
        dist.broadcast_object_list(box)
        shardopt.checkpoint.save(box[0] + "/c", model, opt)
        twin = build_model(SIZES["tiny"], seed=1)
        topt = shardopt.AdamW(twin.parameters(), lr=3e-3, backend="torch", reduce_gradients=True)
        shardopt.checkpoint.load(box[0] + "/c", twin, topt)
        out["ckpt"] = (in_flight, _bitwise(truth, [p.detach() for p in twin.parameters()]))
        # FSDP2 gathers its parameters itself: the option is refused there
        try:
            shardopt.Lion(list(_shard(world).parameters()), overlap_param_gather=True)
            out["fsdp2_refused"] = None
        except ValueError as e:
            out["fsdp2_refused"] = str(e)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["unattached"] = _demo(rank, world, "adamw", True, attach=False)
    out["unattached_warning"] = [str(w.message) for w in caught if "no model is attached" in str(w.message)]
    return out


def _bitwise(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("world", [2, 4])
def test_overlap_on_off_bitwise_zero1_fsdp2_tp_and_param_gather_in_hooks(world):
    res = dist_utils.run(_job, world)
    for r in res:
        for name in CASE_IDS:
            for mixed in (False, True):
                (p_on, c_on, nb), (p_off, c_off, _) = r[("zero1", name, mixed)]
                assert _bitwise(p_on, p_off), (name, mixed)
                assert c_on == c_off  # the same bytes, counted the same way
                assert nb == (2 if mixed else 1)
            on, off = r[("fsdp2", name)]
            assert _bitwise(on, off), name
        if world == 4:
            assert _bitwise(*r["tp"])
        for name in ("adamw", "muon"):
            (l_on, p_on, f_on), (l_off, p_off, f_off) = r[("demo", name)]
            assert l_on == l_off and _bitwise(p_on, p_off), name
            # step() left the all-gathers in flight; the forward pre-hooks landed every one
            assert all(f_on[k] > 0 for k in range(1, len(f_on), 2)), f_on
            assert all(f_on[k] == 0 for k in range(2, len(f_on), 2)), f_on
            assert not any(f_off)
        losses, params, flight = r["unattached"]
        assert losses == r[("demo", "adamw")][1][0] and not any(flight)
        assert len(r["unattached_warning"]) == 1
    if world == 2:
        for r in res:
            assert r["ckpt"][0] > 0 and r["ckpt"][1]  # saved with gathers in flight, loaded intact
            assert "overlap_param_gather=True applies to the ZeRO-1 layout" in r["fsdp2_refused"]
    # every rank holds the same parameters
    for r in res[1:]:
        assert _bitwise(r[("demo", "muon")][0][1], res[0][("demo", "muon")][0][1])
