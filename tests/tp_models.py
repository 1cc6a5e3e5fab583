"""A small transformer that runs under tensor parallelism, and helpers shared by the TP tests.

Heads are counted from the local width (``head_dim`` is fixed), so the same
module computes the same function on one process and under
``parallelize_module`` (q/k/v and fc1 column-parallel, wo and fc2 row-parallel).
The embedding, the norms and the head are left to FSDP2 alone.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d, heads, head_dim, hidden):
        super().__init__()
        self.head_dim = head_dim
        self.ln1 = nn.LayerNorm(d)
        self.wq = nn.Linear(d, heads * head_dim, bias=False)
        self.wk = nn.Linear(d, heads * head_dim, bias=False)
        self.wv = nn.Linear(d, heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        h = self.ln1(x)
        B, T, _ = h.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (self.wq(h), self.wk(h), self.wv(h)))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.wo(a.transpose(1, 2).reshape(B, T, -1))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TPModel(nn.Module):
    """d=10 with 2 heads of 5: q/k/v rows split 5/5 by TP, then 3/2 by FSDP (uneven)."""

    def __init__(self, vocab=23, d=10, heads=2, head_dim=5, hidden=38, layers=2):
        super().__init__()
        self.vocab = vocab
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([Block(d, heads, head_dim, hidden) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        x = self.emb(idx)
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(self.ln_f(x)).flatten(0, 1), targets.flatten())


COLWISE = ("wq", "wk", "wv", "fc1")
ROWWISE = ("wo", "fc2")


def build(seed=0, **kw):
    torch.manual_seed(seed)
    return TPModel(**kw)


def parallelize(model, mesh, dp_dims=("dp",), tp_dim="tp"):
    """TP over ``mesh[tp_dim]``, then FSDP2 over ``mesh[dp_dims]`` (HSDP when that is 2-D)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {**{n: ColwiseParallel() for n in COLWISE}, **{n: RowwiseParallel() for n in ROWWISE}}
    dp = mesh[dp_dims] if len(dp_dims) > 1 else mesh[dp_dims[0]]
    for b in model.blocks:
        parallelize_module(b, mesh[tp_dim], plan)
        fully_shard(b, mesh=dp)
    fully_shard(model, mesh=dp)
    return model


def local_of(full, p):
    """``p``'s local piece of the full tensor ``full``, by torch's own placement rules."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    mesh = p.device_mesh
    coord = mesh.get_coordinate()
    t = full
    for d, pl in enumerate(p.placements):
        if isinstance(pl, (Shard, _StridedShard)):
            t = pl._split_tensor(t, mesh.size(d), with_padding=False)[0][coord[d]]
    return t.contiguous()


def set_grads(params, grads):
    from torch.distributed.tensor import DTensor

    for p, g in zip(params, grads):
        loc = local_of(g, p)
        assert tuple(loc.shape) == tuple(p._local_tensor.shape), (tuple(loc.shape), tuple(p._local_tensor.shape))
        p.grad = DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                    stride=p.stride())


def grads_for(model, step):
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for p in model.parameters():
        t = torch.randn(p.shape, generator=g)
        t[torch.rand(p.shape, generator=g) < 0.05] = 0.0
        out.append(t)
    return out


def batch(step, n=4, seq=8, vocab=23):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, vocab, (n, seq), generator=g), torch.randint(0, vocab, (n, seq), generator=g)


def make_opt(name, model, **kw):
    import shardopt

    if name == "lion":
        return shardopt.Lion(model.parameters(), lr=kw.pop("lr", 1e-3), weight_decay=0.1, backend="torch", **kw)
    if name == "adamw":
        return shardopt.AdamW(model.parameters(), lr=kw.pop("lr", 1e-2), weight_decay=0.1, backend="torch", **kw)
    groups = shardopt.muon_param_groups(model, aux_lr=1e-2, **kw.pop("group", {}))
    return shardopt.Muon(groups, lr=2e-2, backend="torch", ns_dtype=torch.float32, **kw)


def single(name, steps, *, grads=True, model_kw=None, **kw):
    """The single-process run: fed ``grads_for`` (grads=True) or trained on ``batch``."""
    model = build(**(model_kw or {}))
    opt = make_opt(name, model, sharding="none", **kw)
    norms = []
    for k in range(steps):
        if grads:
            for p, g in zip(model.parameters(), grads_for(model, k)):
                p.grad = g
        else:
            opt.zero_grad()
            model(*batch(k)).backward()
        opt.step()
        norms.append(opt.last_grad_norm)
    return [p.detach().clone() for p in model.parameters()], norms, copy.deepcopy(model)


def rel(a_list, b_list):
    return max(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()
               for a, b in zip(a_list, b_list))
