"""Sharding: which rank owns which optimizer state, and the communication of a step.

``make_layout`` picks one of:

* :class:`~shardopt.sharding.layout.LocalLayout`: one process, or ``sharding='none'``;
* :class:`~shardopt.sharding.zero1.Zero1Layout`: plain parameters under
  ``torch.distributed`` (DDP / torchrun);
* :class:`~shardopt.sharding.dtensor.DTensorLayout`: FSDP2 ``DTensor`` parameters.
"""
from __future__ import annotations

import torch

from . import comm
from .layout import Layout, LocalLayout


def _is_dtensor(p) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(p, DTensor)


def _signature(params, names, whole, group_of, group_signatures):
    sig = []
    for i, (n, p, wh) in enumerate(zip(names, params, whole)):
        extra = ""
        if _is_dtensor(p):
            extra = f":{tuple(p.device_mesh.shape)}:{p.placements}"
        else:
            extra = f":{p.stride()}"
        g = group_of[i] if group_of else 0
        hyper = group_signatures[g] if group_signatures else ""
        sig.append(f"{n}:{tuple(p.shape)}:{p.dtype}{extra}:{'matrix' if wh else 'elementwise'}:group {g} {hyper}")
    return sig


def make_layout(params, names, whole, sharding, process_group, reduce_gradients, *, ns_steps=None, comm_dtype=None,
                group_signatures=None, group_of=None, copies_now=None, overlap=True,
                ns_costs=None, blocks=None) -> Layout:
    """The layout for these parameters; sharded layouts first check that every rank agrees (see agreement)."""
    from ..functional import ns_flops
    from . import agreement

    ns_steps = ns_steps or [5] * len(params)
    copies_now = copies_now or [False] * len(params)
    if ns_costs is None:
        costs = [float(ns_flops(p.shape, s)) if w else 0.0 for p, w, s in zip(params, whole, ns_steps)]
    else:
        costs = [float(c) if w else 0.0 for c, w in zip(ns_costs, whole)]
    dt = [_is_dtensor(p) for p in params]
    if any(dt):
        if not all(dt):
            bad = names[dt.index(False)]
            raise ValueError(
                f"shardopt: some parameters are DTensors (FSDP2) and some are not, e.g. {bad}; "
                "shard the whole model with fully_shard or none of it"
            )
        if sharding not in ("auto", "fsdp2"):
            raise ValueError(f"sharding={sharding!r} cannot be used with FSDP2 DTensor parameters; use 'auto' or 'fsdp2'")
        if reduce_gradients:
            raise ValueError("reduce_gradients=True is for plain parameters; FSDP2 already reduce-scatters gradients")
        for n, p in zip(names, params):
            if p.is_complex():
                raise ValueError(f"shardopt: {n} is a complex DTensor; complex parameters work on one device and "
                                 "under ZeRO-1, not under FSDP2")
        from .dtensor import DTensorLayout
        from .mesh import MeshGeometry

        geo = MeshGeometry(params, names)
        problem = _local_shard_problem(params, names, geo)
        classes, group = _replica_classes(geo, len(params))
        agreement.check(_signature(params, names, whole, group_of, group_signatures),
                        [p._local_tensor for p in params], classes, group, params[0]._local_tensor.device,
                        copies_now=copies_now, problem=problem)
        return DTensorLayout(params, names, whole, costs, comm_dtype=comm_dtype, overlap=overlap, geometry=geo)
    if sharding == "fsdp2":
        raise ValueError("sharding='fsdp2' needs parameters sharded by torch.distributed.fsdp.fully_shard (DTensors)")
    w, _ = comm.world(process_group)
    if sharding in ("auto", "zero1") and w > 1:
        from .zero1 import Zero1Layout

        dev = params[0].device if params else torch.device("cpu")
        agreement.check(_signature(params, names, whole, group_of, group_signatures), list(params), None,
                        process_group, dev, copies_now=copies_now)
        return Zero1Layout(params, names, whole, costs, process_group, reduce_gradients=reduce_gradients,
                           overlap=overlap, group_of=group_of, blocks=blocks)
    if reduce_gradients and w > 1:
        raise ValueError("reduce_gradients=True needs sharding='zero1' or 'auto'")
    return LocalLayout(params, names)


def _local_shard_problem(params, names, geo) -> str | None:
    """A local shard that its placements do not describe (checked on every rank, raised on all)."""
    for i, (n, p) in enumerate(zip(names, params)):
        want = geo.local_shape(i, p.shape)
        got = tuple(p._local_tensor.shape)
        if got != want:
            return (f"shardopt: parameter {n} (shape {tuple(p.shape)}, placements {p.placements}) has a local shard "
                    f"of shape {got} on global rank {comm.world(None)[1]}, but its placements give {want}. torch's "
                    "_StridedShard describes FSDP2 over a tensor-parallel weight only when the sharded dimension "
                    "splits evenly enough; make that dimension divisible by tp x dp, or shard it over fewer ranks")
    return None


def _replica_classes(geo, n: int):
    """(classes, group) for the agreement check: which ranks hold equal values of each parameter.

    Over the whole job when the mesh spans it (HSDP replicas compare values too), else over the
    layout's group."""
    w = comm.world(None)[0]
    if geo.root.size() == w:
        coords = [None] * w
        for idx in torch.cartesian_prod(*[torch.arange(s) for s in geo.mesh_shape]).reshape(-1, len(geo.mesh_shape)):
            c = tuple(int(v) for v in idx)
            coords[int(geo.root.mesh[c])] = c
        group = None
    else:
        coords = [geo.coords[k] for k in geo.pg_order]
        group = geo.group
    shared: dict = {}
    classes = []
    for i in range(n):
        dims = tuple(sorted({d for sp in geo.splits[i] for d in sp.mesh_dims}))
        if dims not in shared:
            shared[dims] = tuple(tuple(c[d] for d in dims) for c in coords)
        classes.append(shared[dims])
    return classes, group


__all__ = ["make_layout", "Layout", "LocalLayout", "comm"]
