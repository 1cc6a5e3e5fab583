"""Newton-Schulz options: ``ns_coefficients="polar_express"`` and ``ns_split``.

The references are written from the methods' descriptions, not from the
implementation: Polar Express from Algorithm 1 of Amsel et al. 2025 (arXiv
2505.16932), in fp64; ``ns_split`` as "orthogonalize each block by hand, as a
matrix of its own" (its own normalisation, its own lr adjustment). Under FSDP2
and TP the blocks span shards (a W=4 job on a 1-D mesh and a 2 x 2 dp x tp mesh).
"""
from __future__ import annotations

import math

import pytest
import torch

import dist_utils
import shardopt
from shardopt import functional as F
from shardopt.functional.muon import split_blocks

# Algorithm 1 of the paper, typed in from it: one quintic per iteration
PAPER = [
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
]


def polar_express_reference(G, steps):
    """The paper's method in fp64: safety factor 1.01 on every polynomial but the last
    (a/1.01, b/1.01^3, c/1.01^5), X0 = G / (1.01 ||G||_F + 1e-7), the last polynomial repeated."""
    hs = [(a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in PAPER[:-1]] + [PAPER[-1]]
    X = G.double()
    wide = X.shape[0] > X.shape[1]
    if wide:
        X = X.T
    X = X / (X.norm() * 1.01 + 1e-7)
    for k in range(steps):
        a, b, c = hs[min(k, len(hs) - 1)]
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if wide else X


def spread(X):
    s = torch.linalg.svdvals(X.double())
    return (s.max() - s.min()).item(), (s - 1).abs().max().item()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (33, 33)], ids=str)
@pytest.mark.parametrize("steps", [5, 10])
def test_polar_express_matches_the_paper(shape, steps):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref = polar_express_reference(G, steps)
    out = F.newton_schulz(G, steps=steps, coefficients="polar_express", dtype=torch.float32)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    # a batch gives the same as one matrix at a time
    batch = F.newton_schulz(torch.stack([G, 2 * G]), steps=steps, coefficients="polar_express")
    assert ((batch[0] - out).norm() / out.norm()).item() < 1e-6


def test_polar_express_converges_where_the_quintic_plateaus():
    gen = torch.Generator().manual_seed(1)
    U, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(96, 48, generator=gen, dtype=torch.float64))
    G = (U @ torch.diag(torch.logspace(-3, 0, 48, dtype=torch.float64)) @ V.T).float()
    quintic = spread(F.newton_schulz(G, steps=8))
    pe = spread(F.newton_schulz(G, steps=8, coefficients="polar_express"))
    # Jordan's quintic stays ~0.3 from 1 however long it runs; Polar Express keeps improving
    assert quintic[1] > 0.2 and pe[1] < 0.05, (quintic, pe)


def _by_hand(G, blocks, dim, adjust_lr_fn=None, **ns):
    """Each block orthogonalized as a matrix of its own, with its own lr adjustment; returned
    relative to the whole matrix's adjustment (what Muon multiplies by)."""
    out = torch.empty_like(G)
    full = F.adjust_lr(1.0, adjust_lr_fn, G.shape)
    for start, n in blocks:
        b = G.narrow(dim, start, n)
        out.narrow(dim, start, n).copy_(F.newton_schulz(b, **ns) * F.adjust_lr(1.0, adjust_lr_fn, b.shape) / full)
    return out


@pytest.mark.parametrize("split, dim, shape", [
    (3, 0, (36, 12)),  # a fused QKV: three 12 x 12 blocks
    (4, 0, (12, 16)),  # per head: 4 heads of 3 rows
    ((16, 4, 4), 0, (24, 16)),  # GQA: q, then a smaller k and v
    (4, 1, (16, 12)),  # an output projection per head: column blocks
])
def test_ns_split_equals_blocks_by_hand(split, dim, shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    blocks = split_blocks(shape[dim], split)
    for fn in (None, "match_rms_adamw"):
        got = F.newton_schulz_split(G, lambda x: F.newton_schulz(x), ns_split=split, ns_split_dim=dim,
                                    adjust_lr_fn=fn)
        want = _by_hand(G, blocks, dim, fn)
        assert ((got - want).norm() / want.norm()).item() < 1e-6
        whole = F.newton_schulz(G)
        assert ((got - whole).norm() / whole.norm()).item() > 0.1  # not the whole-matrix result


def _muon_by_hand(params, grads_per_step, groups, lr=2e-2, wd=0.1):
    """A Muon loop where each group's matrices are orthogonalized per block, by hand."""
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for k, (p, g) in enumerate(zip(params, grads)):
            split, dim, coeffs = groups[k]
            u = F.muon_momentum(g, bufs[k], momentum=0.95, nesterov=True)
            blocks = split_blocks(p.shape[dim], split) if split is not None else [(0, p.shape[dim])]
            X = _by_hand(u, blocks, dim, coefficients=coeffs)
            with torch.no_grad():
                p.mul_(1 - lr * wd).sub_(X * F.adjust_lr(lr, None, p.shape))
    return [p.detach().clone() for p in params]


SHAPES = [(18, 6), (6, 18), (10, 4)]
SPLITS = [(3, 0, "polar_express"), (3, 1, (3.4445, -4.7750, 2.0315)), ((4, 3, 3), 0, "polar_express")]


def _grads(k):
    g = torch.Generator().manual_seed(50 + k)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _groups(params):
    return [{"params": [p], "ns_split": s, "ns_split_dim": d, "ns_coefficients": c, "ns_dtype": torch.float32}
            for p, (s, d, c) in zip(params, SPLITS)]


def test_muon_with_ns_split_and_polar_express_single_process():
    init = [torch.randn(s, generator=torch.Generator().manual_seed(9 + k)) for k, s in enumerate(SHAPES)]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = shardopt.Muon(_groups(params), lr=2e-2, backend="torch", sharding="none")
    for k in range(3):
        for p, g in zip(params, _grads(k)):
            p.grad = g
        opt.step()
    want = _muon_by_hand([t.clone() for t in init], [_grads(k) for k in range(3)], SPLITS)
    for a, b in zip(params, want):
        assert ((a.detach() - b).norm() / b.norm()).item() < 1e-6
    # the split is part of the owner-balancing cost
    assert opt._layout is not None
    cost = shardopt.optim.base.ALGORITHMS["muon"].ns_cost(opt.param_groups[0], (18, 6))
    assert cost == 3 * F.ns_flops((6, 6))


def _job_sharded(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import tp_models as tm

    out = {}
    # FSDP2 over 4 ranks: 18 rows -> 5,5,5,3 (blocks of 6 span shards), 10 rows -> 3,3,3,1
    init = [torch.randn(s, generator=torch.Generator().manual_seed(9 + k)) for k, s in enumerate(SHAPES)]
    m = torch.nn.Module()
    m.ps = torch.nn.ParameterList([torch.nn.Parameter(t.clone()) for t in init])
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    params = list(m.parameters())
    opt = shardopt.Muon(_groups(params), lr=2e-2, backend="torch")
    for k in range(3):
        tm.set_grads(params, _grads(k))
        opt.step()
    out["fsdp2"] = [p.full_tensor().detach().clone() for p in params]
    # 2 x 2 dp x tp: a column-parallel fused QKV (18 rows: TP 9/9, FSDP 5/4) and a row-parallel
    # projection split per head over its columns; the blocks of 6 cross both cuts
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    seq = torch.nn.Sequential(torch.nn.Linear(6, 18, bias=False), torch.nn.Linear(18, 6, bias=False))
    with torch.no_grad():
        seq[0].weight.copy_(init[0])
        seq[1].weight.copy_(init[1])
    parallelize_module(seq, mesh["tp"], {"0": ColwiseParallel(), "1": RowwiseParallel()})
    fully_shard(seq, mesh=mesh["dp"])
    params = list(seq.parameters())
    out["placements"] = [str(p.placements) for p in params]
    opt = shardopt.Muon(_groups(params), lr=2e-2, backend="torch")
    for k in range(3):
        tm.set_grads(params, _grads(k)[:2])
        opt.step()
    out["tp"] = [p.full_tensor().detach().clone() for p in params]
    return out


def test_ns_split_blocks_spanning_fsdp2_and_tp_shards():
    res = dist_utils.run(_job_sharded, 4)
    init = [torch.randn(s, generator=torch.Generator().manual_seed(9 + k)) for k, s in enumerate(SHAPES)]
    want = _muon_by_hand([t.clone() for t in init], [_grads(k) for k in range(3)], SPLITS)
    for r in res:
        assert r["placements"] == ["(_StridedShard(dim=0, sf=2), Shard(dim=0))", "(Shard(dim=0), Shard(dim=1))"]
        for got, case in ((r["fsdp2"], want), (r["tp"], want[:2])):
            for a, b in zip(got, case):
                assert ((a - b).norm() / b.norm()).item() < 1e-6


@pytest.mark.parametrize("group, fragment", [
    ({"ns_coefficients": "polar"}, "unknown ns_coefficients 'polar' for param group 0"),
    ({"ns_coefficients": (1.0, 2.0)}, "invalid ns_coefficients (1.0, 2.0) for param group 0"),
    ({"ns_split": 0}, "invalid ns_split 0 for param group 0"),
    ({"ns_split": (4, 0)}, "invalid ns_split (4, 0) for param group 0"),
    ({"ns_split": "heads"}, "invalid ns_split 'heads' for param group 0"),
    ({"ns_split_dim": 2}, "invalid ns_split_dim 2 for param group 0"),
    ({"ns_split": 3}, "ns_split=3 cannot cut the 10 rows of w (shape (10, 4))"),
    ({"ns_split": (4, 4)}, "ns_split=(4, 4) adds up to 8, but w (shape (10, 4)) in param group 0"),
    ({"ns_split": 3, "ns_split_dim": 1}, "ns_split=3 cannot cut the 4 columns of w"),
])
def test_bad_ns_options_name_the_group(group, fragment):
    p = torch.nn.Parameter(torch.randn(10, 4))
    with pytest.raises(ValueError) as e:
        shardopt.Muon([{"params": [p], "param_names": ["w"], **group}])
    assert fragment in str(e.value), str(e.value)


def test_named_schedule_survives_state_dict_deepcopy_and_checkpoint(tmp_path):
    import copy

    import shardopt.checkpoint

    model = torch.nn.Linear(8, 6, bias=False)
    opt = shardopt.Muon([{"params": list(model.parameters()), "ns_split": 2}], ns_coefficients="polar_express",
                        backend="torch")
    model.weight.grad = torch.randn(6, 8)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0]["ns_coefficients"] == "polar_express" and twin.param_groups[0]["ns_split"] == 2
    sd = opt.state_dict()
    assert sd["param_groups"][0]["ns_coefficients"] == "polar_express"
    shardopt.checkpoint.save(str(tmp_path / "c"), model, opt)
    m2 = torch.nn.Linear(8, 6, bias=False)
    other = shardopt.Muon([{"params": list(m2.parameters()), "ns_split": 2}], ns_coefficients="polar_express",
                          backend="torch")
    shardopt.checkpoint.load(str(tmp_path / "c"), m2, other)
    assert other.param_groups[0]["ns_coefficients"] == "polar_express"
    assert math.isclose(float(other.state[m2.weight]["step"]), 1.0)


def test_muon_param_groups_makes_split_groups_by_name():
    from shardopt.tools._demo_model import SIZES, build_model

    model = build_model(SIZES["tiny"], seed=0)
    groups = shardopt.muon_param_groups(model, ns_split={"qkv": 3, "proj": {"ns_split": 2, "ns_split_dim": 1}})
    assert [g["algorithm"] for g in groups] == ["muon", "adamw", "muon", "muon"]
    assert all(n.endswith("qkv.weight") for n in groups[2]["param_names"]) and groups[2]["ns_split"] == 3
    assert all(n.endswith("proj.weight") for n in groups[3]["param_names"]) and groups[3]["ns_split_dim"] == 1
    assert not any(n.endswith(("qkv.weight", "proj.weight")) for n in groups[0]["param_names"])
    opt = shardopt.Muon(groups, lr=0.02, backend="torch")
    assert len(opt.param_groups) == 4
