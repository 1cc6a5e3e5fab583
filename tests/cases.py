"""The one table that drives equivalence tests across backends and layouts.

Each row is (name, optimizer class, kwargs, group builder). A new algorithm or
variant is one row here, not a new test file.
"""
from __future__ import annotations

import torch

import shardopt

# odd sizes, a tensor smaller than any world size, matrices with rows not
# divisible by 2 or 4 and with fewer rows than 4
SHAPES = [(7, 5), (3,), (13, 11), (1,), (16, 8), (3, 9), (2,), (10, 6)]


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def make_grads(step, shapes=SHAPES, dtype=torch.float32):
    """The global-batch gradient of step ``step``: same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g)
        t[torch.rand(s, generator=g) < 0.05] = 0.0  # exact zeros exercise sign(0)
        out.append(t.to(dtype))
    return out


def two_groups(params):
    """Several groups with different hyperparameters."""
    return [{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3, "weight_decay": 0.05}]


def muon_groups(params, aux="adamw"):
    return [
        {"params": [p for p in params if p.dim() == 2], "ns_dtype": torch.float32},
        {"params": [p for p in params if p.dim() != 2], "algorithm": aux, "lr": 2e-3},
    ]


# name, class, kwargs, group builder, exact (bitwise) across layouts with the same backend
CASES = [
    ("lion", shardopt.Lion, dict(lr=1e-2, weight_decay=0.1), two_groups),
    ("adamw", shardopt.AdamW, dict(lr=1e-2, weight_decay=0.1), two_groups),
    ("muon", shardopt.Muon, dict(lr=2e-2, weight_decay=0.1), muon_groups),
    ("muon_lion_aux", shardopt.Muon, dict(lr=2e-2, nesterov=False), lambda ps: muon_groups(ps, "lion")),
    ("adamw_amsgrad_maximize", shardopt.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True),
     two_groups),
]
CASE_IDS = [c[0] for c in CASES]
CASE_BY_NAME = {c[0]: c for c in CASES}

# relative tolerance vs the single-process optimizer; 0 means bitwise
TOL = {"lion": 0.0, "adamw": 1e-6, "muon": 2e-3, "muon_lion_aux": 2e-3, "adamw_amsgrad_maximize": 1e-6}


def build(name, params, **extra):
    _, cls, kw, groups = CASE_BY_NAME[name]
    return cls(groups(params), **{**kw, **extra})


def max_rel_err(a_list, b_list):
    err = 0.0
    for a, b in zip(a_list, b_list):
        a, b = a.float(), b.float()
        err = max(err, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    return err


def assert_close_params(got, ref, name):
    tol = TOL[name]
    if tol == 0.0:
        for k, (a, b) in enumerate(zip(got, ref)):
            assert torch.equal(a, b), f"{name}: param {k} differs (max abs {(a.float()-b.float()).abs().max().item()})"
    else:
        err = max_rel_err(got, ref)
        assert err <= tol, f"{name}: relative error {err} > {tol}"


def run_single(name, steps, dtype=torch.float32, **extra):
    """The single-process reference trajectory."""
    ps = make_params(dtype)
    opt = build(name, ps, backend="torch", sharding="none", **extra)
    for k in range(steps):
        for p, g in zip(ps, make_grads(k, dtype=dtype)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in ps], opt


def grad_stats_reference(grads, clip_value=None):
    """``(sum of squares, bad)`` of the fused gradient pass in float64 on the CPU, written independently of
    the kernels and of torch_ops: squares of the value-clipped gradients, and NaN in ``bad`` when any raw
    value is inf or NaN."""
    sq, bad = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    for g in grads:
        x = g.detach().double().cpu().reshape(-1)
        bad = bad + (x * 0).sum()
        if clip_value is not None:
            v = torch.tensor(clip_value, dtype=torch.float32).double()
            x = torch.minimum(torch.maximum(x, -v), v)
        sq = sq + (x * x).sum()
    return sq.item(), bad.item()
