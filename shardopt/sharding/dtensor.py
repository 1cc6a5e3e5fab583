"""DTensor parameters on any mesh: FSDP2 (``Shard(0)``), HSDP, tensor parallelism, and their products.

Elementwise algorithms run on the local shards, whatever the placements
(``Shard``, ``_StridedShard``, ``Replicate``), and keep their state as DTensors
with the parameter's placements. The layout communicates over the group of
:class:`~shardopt.sharding.mesh.MeshGeometry`: the ranks along every root mesh
dimension on which some parameter is sharded (FSDP2: the mesh; HSDP: the shard
dimension; FSDP2 x TP: dp x tp). A parameter replicated over a dimension of
that group (a norm weight under TP) is counted in the gradient norm once, by
its canonical copy.

Muon keeps momentum on the local shards too; its gather step is batched
all-to-alls over the group, in chunks:

1. every rank sends its piece of each matrix's NS input to the matrix's owner
   (owners balanced by NS FLOPs over the whole group), which assembles the full
   matrix from all the mesh dimensions that cut it;
2. the owner runs Newton-Schulz (batched over same-shape matrices);
3. a second all-to-all returns each rank its piece of the result.

With ``overlap=True`` the matrices go in chunks (:func:`plan.ns_chunks`): the
all-to-all of chunk k+1 is in flight while chunk k runs NS, and chunk k's
return overlaps NS of chunk k+1. The NS batches are the same with and without
overlap, so the results are bit for bit the same.

Per rank this sends its local shard bytes once and its owned matrices once,
i.e. about 2x the local shard bytes per step, whatever W; uneven and empty
shards are just zero-length splits.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..kernels import state_precision

from . import comm
from .layout import Layout, batched_by_shape
from .mesh import MeshGeometry
from .plan import boxes, ns_chunks, plan_mesh, runs_len


def _slices(offsets, sizes):
    return tuple(slice(o, o + n) for o, n in zip(offsets, sizes))


class _Chunk:
    """One chunk of the gather step in flight: its buffers and pending all-to-all."""

    __slots__ = ("items", "mine", "recv", "layout", "pending", "send")


class DTensorLayout(Layout):
    name = "fsdp2"
    distributed = True

    def __init__(self, params, names, whole, costs, *, comm_dtype=None, overlap=True, geometry=None):
        super().__init__(params, names)
        self.whole = list(whole)
        self.comm_dtype = comm_dtype
        self.overlap = overlap
        geo = geometry if geometry is not None else MeshGeometry(params, names)
        self.geo = geo
        self.mesh = geo.root
        self.group = geo.group
        self.world_size, self.rank = geo.size, geo.index
        self.shapes = [tuple(p.shape) for p in params]
        plan = plan_mesh(whole, costs, geo.mesh_shape, geo.group_dims)
        self.owner: list = plan.owner
        self._counted = [geo.canonical(i) for i in range(len(params))]
        self._pieces: dict = {}

    # -- shapes and views -------------------------------------------------
    def local_shape(self, i):
        return tuple(self.params[i]._local_tensor.shape)

    def owns(self, i):
        return True

    def owns_matrix(self, i):
        return self.owner[i] == self.rank

    def matrix_indices(self, indices):
        return list(indices)

    def counts_in_norm(self, i):
        return self._counted[i]

    def param_view(self, i):
        return self.params[i]._local_tensor

    def grad_view(self, i):
        g = self.params[i].grad
        if g is None:
            return None
        if not isinstance(g, DTensor):
            raise ValueError(f"shardopt: parameter {self.names[i]} is a DTensor but its gradient is not")
        if g.placements != self.params[i].placements:
            g = g.redistribute(self.params[i].device_mesh, self.params[i].placements)
        return g._local_tensor

    def wrap_state(self, i, local):
        p = self.params[i]
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())

    def local_state(self, value):
        return value._local_tensor if isinstance(value, DTensor) else value

    def int8_block(self, i):
        # FSDP2's Shard(0) cuts by rows, which hold whole blocks; another placement could cut one
        p = self.params[i]
        rows_only = all(type(pl) in (Shard, Replicate) and (not isinstance(pl, Shard) or pl.dim == 0)
                        for pl in p.placements)
        return super().int8_block(i) if rows_only else 0

    def wrap_scale(self, i, local):
        # the scales are (rows, row/block): they shard by rows with the parameter
        p = self.params[i]
        shape = state_precision.scale_shape(p.shape, self.int8_block(i))
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                                  stride=(shape[1], 1))

    # -- communication ----------------------------------------------------
    def all_reduce_sum(self, t):
        # ranks outside the group (HSDP replicas) hold identical gradients: reduce over the group only
        # (a group of one rank too, as ZeRO-1 does, so the step's collectives do not depend on W)
        if not self.geo.solo:
            comm.all_reduce_sum(t, self.group)
        return t

    def _piece(self, i: int, r: int):
        """(boxes, local shape, sends) of group rank ``r``'s piece of matrix ``i``."""
        key = (i, r)
        got = self._pieces.get(key)
        if got is None:
            runs = self.geo.runs(i, self.shapes[i], r)
            shape = tuple(runs_len(x) for x in runs)
            n = shape[0] * shape[1]
            got = (boxes(runs) if n else [], shape, n, n > 0 and self.geo.canonical(i, r))
            self._pieces[key] = got
        return got

    def orthogonalize(self, indices, inputs, fn, exact_dtype=None):
        # exact_dtype (results exact in bf16) is not used for the return trip here yet: both trips in comm_dtype
        W, me = self.world_size, self.rank
        if W == 1:
            return batched_by_shape([x.reshape(self.shapes[i]) for i, x in zip(indices, inputs)], fn)
        if not indices:
            return []
        self._inputs = dict(zip(indices, inputs))
        self._device = inputs[0].device
        self._dtype = self.comm_dtype or torch.float32
        chunks = ns_chunks(indices, self.owner, self.shapes, self.overlap)
        results: dict = {}
        backs = []
        ahead = self._send_forward(chunks[0], self.overlap)
        for k in range(len(chunks)):
            cur = ahead
            if k + 1 < len(chunks):
                ahead = self._send_forward(chunks[k + 1], self.overlap)  # in flight during NS of chunk k
            if cur.pending is not None:
                cur.pending.wait()
            backs.append(self._send_back(cur, self._assemble_and_orthogonalize(cur, fn), self.overlap))
        for b in backs:
            if b.pending is not None:
                b.pending.wait()
            for i, off, shape in b.layout:
                n = shape[0] * shape[1]
                results[i] = b.recv[off:off + n].view(shape).float()
        self._inputs = None
        return [results[i] for i in indices]

    def _empty(self, n):
        return torch.empty(n, dtype=self._dtype, device=self._device)

    def _send_forward(self, items, async_op):
        """All-to-all #1 of a chunk: my canonical piece of each matrix -> its owner."""
        me, order = self.rank, self.geo.pg_order
        c = _Chunk()
        c.items = items
        by_owner: dict = {}
        for i in items:
            by_owner.setdefault(self.owner[i], []).append(i)
        c.mine = by_owner.get(me, [])
        in_splits, dst, src = [], [], []
        for r in order:
            n_r = 0
            for i in by_owner.get(r, []):
                _, shape, n, sends = self._piece(i, me)
                if sends:
                    dst.append((n_r + sum(in_splits), n, shape))
                    src.append(self._inputs[i])
                    n_r += n
            in_splits.append(n_r)
        send = self._empty(sum(in_splits))
        if dst:
            torch._foreach_copy_([send[o:o + n].view(s) for o, n, s in dst], src)
        out_splits, c.layout, off = [], [], 0
        for r in order:
            n_r = 0
            for i in c.mine:
                bx, shape, n, sends = self._piece(i, r)
                if sends:
                    c.layout.append((i, off, shape, bx))
                    off += n
                    n_r += n
            out_splits.append(n_r)
        c.recv = self._empty(off)
        c.send = send
        c.pending = comm.all_to_all_single(c.recv, send, out_splits, in_splits, self.group, self.geo.pg_rank,
                                           async_op=async_op)
        return c

    def _assemble_and_orthogonalize(self, c, fn) -> dict:
        full = {i: torch.empty(self.shapes[i], dtype=torch.float32, device=self._device) for i in c.mine}
        dst, src = [], []
        for i, off, shape, bx in c.layout:
            piece = c.recv[off:off + shape[0] * shape[1]].view(shape)
            for g, size, loc in bx:
                dst.append(full[i][_slices(g, size)])
                src.append(piece[_slices(loc, size)])
        if dst:
            torch._foreach_copy_(dst, src)
        c.recv = c.send = None
        return dict(zip(c.mine, batched_by_shape([full[i] for i in c.mine], fn)))

    def _send_back(self, c, results: dict, async_op):
        """All-to-all #2 of a chunk: each holder's piece of the result -> back to it."""
        me, order = self.rank, self.geo.pg_order
        in_splits, dst, src, off = [], [], [], 0
        segs = []
        for r in order:
            n_r = 0
            for i in c.mine:
                bx, shape, n, _ = self._piece(i, r)
                if n:
                    segs.append((off, shape, bx, results[i]))
                    off += n
                    n_r += n
            in_splits.append(n_r)
        send = self._empty(off)
        for o, shape, bx, res in segs:
            seg = send[o:o + shape[0] * shape[1]].view(shape)
            for g, size, loc in bx:
                dst.append(seg[_slices(loc, size)])
                src.append(res[_slices(g, size)])
        if dst:
            torch._foreach_copy_(dst, src)
        by_owner: dict = {}
        for i in c.items:
            by_owner.setdefault(self.owner[i], []).append(i)
        out_splits, layout, off = [], [], 0
        for r in order:
            n_r = 0
            for i in by_owner.get(r, []):
                _, shape, n, _ = self._piece(i, me)
                layout.append((i, off, shape))
                off += n
                n_r += n
            out_splits.append(n_r)
        b = _Chunk()
        b.recv = self._empty(off)
        b.send = send
        b.layout = layout
        b.pending = comm.all_to_all_single(b.recv, send, out_splits, in_splits, self.group, self.geo.pg_rank,
                                           async_op=async_op)
        return b
