"""Layouts over flat partitions that someone else cut: DeepSpeed ZeRO-1/2/3.

DeepSpeed hands the optimizer one flat fp32 tensor per param group (ZeRO-1/2)
or per sub-group (ZeRO-3): this rank's partition. Elementwise algorithms run
on it as it is. A Muon matrix is cut across several ranks' partitions, so its
gather step works like the FSDP2 one (:mod:`.dtensor`), on element ranges
instead of rows:

1. every rank sends its range of each matrix's NS input to the matrix's owner
   (owners balanced by NS FLOPs over all matrices, :func:`plan.lpt_assign`),
   in one batched all-to-all per flat partition stepped;
2. the owner assembles each matrix once and runs Newton-Schulz on it once
   (batched over same-shape matrices);
3. a second all-to-all returns each rank's range of the result. When the
   result is exact in a narrower dtype (bf16 Newton-Schulz), it travels in it.

The momentum stays on DeepSpeed's partitions, 1/W of it per rank, aligned
with the fp32 master partition, so DeepSpeed saves, offloads and reshards it
as it does Adam's moments. The updated values reach the other ranks through
DeepSpeed's own parameter all-gather (ZeRO-1/2) or its parameter partitions
(ZeRO-3).

:class:`FlatPlan` is built once, from the partition geometry (every rank
computes the same plan from the same metadata); :class:`FlatPartitionLayout`
is a cheap view of it over the flat tensors an optimizer step sees, since
DeepSpeed steps one group at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels import state_precision
from . import comm
from .layout import Layout, LocalLayout, WholeParams, batched_by_shape
from .plan import FlatPiece, lpt_assign


def partition_int8_block(p) -> int:
    """int8 state for a flat partition someone else cut (DeepSpeed): blocks of 256 for any partition of at
    least :data:`~shardopt.kernels.state_precision.INT8_MIN_NUMEL` elements, else 0 (fp32 state). Its blocks
    are its own, counted from its first element, so they need not line up with the parameters inside it or
    with another world size's partitions."""
    return state_precision.BLOCK if p.numel() >= state_precision.INT8_MIN_NUMEL else 0


class PartitionLayout(LocalLayout):
    """Lion/AdamW on DeepSpeed's flat partitions: the local layout (each rank steps its partition whole,
    ``name`` stays ``"none"``), with int8 state for every partition :func:`partition_int8_block` accepts."""

    def int8_block(self, i):
        return partition_int8_block(self.params[i])


def partition_layout(params, names, whole, *_args, **_kwargs) -> PartitionLayout:
    """``ShardedOptimizer``'s layout factory for :class:`PartitionLayout` (make_layout's arguments)."""
    return PartitionLayout(params, names)


@dataclass
class FlatItem:
    """One parameter inside a flat partition group."""

    name: str
    shape: tuple
    matrix: bool  # Newton-Schulz needs it whole
    pieces: list  # per rank: FlatPiece or None
    owner: int | None = None  # rank that orthogonalizes it (matrices)


@dataclass
class FlatGroup:
    """The partition geometry of one flat group (a DeepSpeed param group or ZeRO-3 sub-group)."""

    key: str
    numel: list  # elements of each rank's flat partition
    items: list = field(default_factory=list)

    def matrices(self) -> list[FlatItem]:
        return [it for it in self.items if it.matrix]


def build_group(key: str, names, shapes, matrix, pieces_per_rank: list[list[FlatPiece]], numel_per_rank) -> FlatGroup:
    """A :class:`FlatGroup` from :func:`plan.contiguous_pieces` / :func:`plan.per_item_pieces` output."""
    world = len(pieces_per_rank)
    items = [FlatItem(n, tuple(s), bool(m), [None] * world) for n, s, m in zip(names, shapes, matrix)]
    for r, pcs in enumerate(pieces_per_rank):
        for pc in pcs:
            items[pc.item].pieces[r] = pc
    return FlatGroup(key, list(numel_per_rank), items)


class FlatPlan:
    """Owners and piece tables for every flat group of one optimizer, shared by its layouts."""

    def __init__(self, groups: list[FlatGroup], group, *, name: str, costs=None, comm_dtype=None):
        from ..functional import ns_flops

        self.groups = {g.key: g for g in groups}
        self.order = [g.key for g in groups]
        self.group = group
        self.name = name
        self.comm_dtype = comm_dtype
        self.world_size, self.rank = comm.world(group)
        mats = [it for g in groups for it in g.matrices()]
        for g in groups:
            if len(g.numel) != self.world_size:
                raise ValueError(f"shardopt: flat group {g.key} is laid out for {len(g.numel)} ranks, but the process "
                                 f"group has {self.world_size}")
        cost = costs or [float(ns_flops(it.shape)) for it in mats]
        for it, o in zip(mats, lpt_assign(cost, self.world_size)):
            it.owner = o
        self._key_of: dict = {}  # id(flat tensor) -> group key

    def bind(self, tensor: torch.Tensor, key: str) -> None:
        """Say which flat group ``tensor`` (this rank's partition) belongs to."""
        g = self.groups[key]
        if tensor.numel() != g.numel[self.rank]:
            raise ValueError(f"shardopt: flat partition {key} has {tensor.numel()} elements on rank {self.rank}, "
                             f"but its layout expects {g.numel[self.rank]}")
        self._key_of[id(tensor)] = key

    def key_of(self, tensor) -> str | None:
        return self._key_of.get(id(tensor))

    def signature(self) -> list[str]:
        """What every rank must agree on: the geometry and the owners."""
        out = []
        for key in self.order:
            g = self.groups[key]
            out.append(f"group {key}: {g.numel}")
            for it in g.items:
                pcs = [(p.lo, p.hi, p.offset) if p else None for p in it.pieces]
                out.append(f"{key}:{it.name}:{it.shape}:{'matrix' if it.matrix else 'elementwise'}:{it.owner}:{pcs}")
        return out

    def ns_counts(self) -> list[int]:
        """Matrices each rank orthogonalizes per step (all groups stepped)."""
        n = [0] * self.world_size
        for g in self.groups.values():
            for it in g.matrices():
                n[it.owner] += 1
        return n

    def layout_for(self, params, names, whole, *_args, **_kwargs) -> "FlatPartitionLayout":
        """``ShardedOptimizer``'s layout factory: a view over the flat tensors of this step."""
        return FlatPartitionLayout(params, names, whole, self)


class FlatPartitionLayout(WholeParams, Layout):
    """A step's view of a :class:`FlatPlan` (see the module docstring)."""

    distributed = True
    state_per_param = True  # the state of a flat partition follows it when DeepSpeed narrows param_groups

    def __init__(self, params, names, whole, plan: FlatPlan):
        super().__init__(params, names)
        self.plan = plan
        self.name = plan.name
        self.group = plan.group
        self.world_size, self.rank = plan.world_size, plan.rank
        self.keys = []
        for i, p in enumerate(params):
            key = plan.key_of(p)
            if key is None:
                raise ValueError(f"shardopt: {names[i]} (shape {tuple(p.shape)}) is not a flat partition of the "
                                 f"{plan.name} layout; build the optimizer inside deepspeed.initialize")
            g = plan.groups[key]
            if any(it.matrix != bool(whole[i]) for it in g.items):
                raise ValueError(f"shardopt: flat partition {key} mixes Muon matrices and elementwise parameters, "
                                 "or sits in a group of the other kind; give Muon and its aux group separate "
                                 "param groups")
            self.keys.append(key)

    # -- shapes and views: the flat partitions themselves (WholeParams) -----
    def int8_block(self, i):
        # DeepSpeed cuts its flat groups where it likes: int8 blocks are the partition's own, from its start
        return partition_int8_block(self.params[i])

    def unsharded_numel(self, i):
        return sum(math.prod(it.shape) for it in self.plan.groups[self.keys[i]].items)  # the whole flat group

    def owns_matrix(self, i):
        return False  # a partition holds pieces; NS work is counted per matrix (FlatPlan.ns_counts)

    def matrix_indices(self, indices):
        return list(indices)  # every rank holds pieces and takes part in the exchange

    def matrix_pieces(self, i):
        """(offset, numel, matrix shape) of each matrix range in partition ``i`` on this rank."""
        out = []
        for it in self.plan.groups[self.keys[i]].matrices():
            pc = it.pieces[self.rank]
            if pc is not None:
                out.append((pc.offset, pc.numel, it.shape))
        return out

    # -- communication ----------------------------------------------------
    def all_reduce_sum(self, t):
        comm.all_reduce_sum(t, self.group)
        return t

    def orthogonalize(self, indices, inputs, fn, exact_dtype=None):
        W, me = self.world_size, self.rank
        mats = []  # (position in indices, item), in the same order on every rank
        for k, i in enumerate(indices):
            mats.extend((k, it) for it in self.plan.groups[self.keys[i]].matrices())
        device = inputs[0].device if inputs else torch.device("cpu")
        outs = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in inputs]
        if not mats:
            return outs
        send_dtype = self.plan.comm_dtype or torch.float32
        back_dtype = exact_dtype or send_dtype

        def n(it, r):
            pc = it.pieces[r]
            return pc.numel if pc is not None else 0

        by_owner = [[(k, it) for k, it in mats if it.owner == r] for r in range(W)]
        mine = by_owner[me]
        # 1) my range of every matrix -> its owner
        parts, in1 = [], []
        for r in range(W):
            ps = [inputs[k][it.pieces[me].offset: it.pieces[me].offset + n(it, me)]
                  for k, it in by_owner[r] if n(it, me)]
            parts.extend(ps)
            in1.append(sum(x.numel() for x in ps))
        out1 = [sum(n(it, s) for _, it in mine) for s in range(W)]
        recv = self._exchange(parts, in1, out1, send_dtype, device)
        full, off = {}, 0
        for _, it in mine:
            full[id(it)] = torch.zeros(_numel(it.shape), dtype=torch.float32, device=device)
        for s in range(W):
            for _, it in mine:
                m = n(it, s)
                if m:
                    pc = it.pieces[s]
                    full[id(it)][pc.lo:pc.hi].copy_(recv[off:off + m])
                    off += m
        results = batched_by_shape([full[id(it)].view(it.shape) for _, it in mine], fn)
        res = {id(it): r.reshape(-1) for (_, it), r in zip(mine, results)}
        # 2) each rank's range of the result -> back to it
        parts, in2 = [], []
        for s in range(W):
            ps = [res[id(it)][it.pieces[s].lo:it.pieces[s].hi] for _, it in mine if n(it, s)]
            parts.extend(ps)
            in2.append(sum(x.numel() for x in ps))
        out2 = [sum(n(it, me) for _, it in by_owner[r]) for r in range(W)]
        recv2 = self._exchange(parts, in2, out2, back_dtype, device)
        off = 0
        for r in range(W):
            for k, it in by_owner[r]:
                m = n(it, me)
                if m:
                    pc = it.pieces[me]
                    outs[k][pc.offset:pc.offset + m].copy_(recv2[off:off + m])
                    off += m
        return outs

    def _exchange(self, parts, in_splits, out_splits, dtype, device):
        """One all-to-all; CPU partitions (optimizer offload) go through the accelerator under NCCL."""
        wire = device
        if device.type == "cpu" and comm.needs_device_buffers(self.group):
            wire = comm.accelerator_device()
        send = torch.cat(parts).to(device=wire, dtype=dtype) if parts else torch.empty(0, dtype=dtype, device=wire)
        recv = torch.empty(sum(out_splits), dtype=dtype, device=wire)
        comm.all_to_all_single(recv, send, out_splits, in_splits, self.group, self.rank)
        return recv.to(device=device, dtype=torch.float32)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
