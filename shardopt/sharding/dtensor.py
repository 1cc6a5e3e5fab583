"""FSDP2: parameters are DTensors sharded on dim 0 (``Shard(0)``), optionally HSDP.

Elementwise algorithms run on the local shards and keep their state as
DTensors with the parameter's placements. Muon keeps momentum on the local
shards too; its gather step is two batched all-to-alls over the shard group:

1. every rank sends its rows of each matrix's NS input to the matrix's owner
   (owners balanced by NS FLOPs), which assembles the full matrices,
2. the owner runs Newton-Schulz (batched over same-shape matrices),
3. the second all-to-all returns each rank's rows of the result.

Per rank this sends its local shard bytes once and its owned matrices once,
i.e. about 2x the local shard bytes per step, whatever W; uneven and empty
shards are just zero-length splits.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import comm
from .layout import Layout, batched_by_shape
from .plan import plan_fsdp2, row_ranges


class DTensorLayout(Layout):
    name = "fsdp2"
    distributed = True

    def __init__(self, params, names, whole, costs, *, comm_dtype=None):
        super().__init__(params, names)
        self.whole = list(whole)
        self.comm_dtype = comm_dtype
        mesh = params[0].device_mesh
        self.mesh = mesh
        # the shard mesh dim: where Shard(0) sits (FSDP2: the only dim; HSDP: the last)
        shard_dims = set()
        for i, p in enumerate(params):
            if p.device_mesh != mesh:
                raise ValueError(f"shardopt: parameter {names[i]} lives on another device mesh than {names[0]}; "
                                 "one optimizer needs one mesh")
            sh = [d for d, pl in enumerate(p.placements) if isinstance(pl, Shard)]
            others = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
            if others:
                raise NotImplementedError(f"shardopt: parameter {names[i]} has placements {p.placements}; "
                                          "only Shard and Replicate are supported")
            if whole[i]:
                if len(sh) != 1 or p.placements[sh[0]] != Shard(0) or type(p.placements[sh[0]]) is not Shard:
                    raise NotImplementedError(
                        f"shardopt Muon: parameter {names[i]} (shape {tuple(p.shape)}) has placements {p.placements}; "
                        "Muon supports matrices sharded on dim 0 over one mesh dimension (FSDP2/HSDP). "
                        "Tensor parallelism (sharding on more than one dimension) is not supported yet; "
                        "put this parameter in an AdamW/Lion group or drop TP for it"
                    )
            if sh:
                shard_dims.add(sh[0])
        if len(shard_dims) > 1:
            raise NotImplementedError("shardopt: parameters are sharded over different mesh dimensions")
        self.shard_dim = shard_dims.pop() if shard_dims else mesh.ndim - 1
        self.group = mesh.get_group(self.shard_dim)
        self.world_size, self.rank = comm.world(self.group)
        W = self.world_size
        self.rows = {}
        plan = plan_fsdp2([p.shape[0] if p.dim() else 1 for p in params], whole, costs, W)
        self.owner: list = plan.owner
        for i in (i for i in range(len(params)) if whole[i]):
            self.rows[i] = row_ranges(params[i].shape[0], W)
            lo, hi = self.rows[i][self.rank]
            loc = params[i]._local_tensor.shape[0] if params[i]._local_tensor.dim() else 0
            if loc != hi - lo:
                raise NotImplementedError(
                    f"shardopt Muon: parameter {names[i]} has {loc} local rows on rank {self.rank}, expected {hi - lo} "
                    "(torch.chunk-style Shard(0)); this sharding is not supported"
                )

    @staticmethod
    def replica_ranks(p) -> list[int]:
        """Global ranks that hold the same local shard of ``p`` as this one (its HSDP replicas, and itself)."""
        mesh = p.device_mesh
        coord = mesh.get_coordinate()
        ranks = mesh.mesh
        for d in reversed(range(mesh.ndim)):
            if isinstance(p.placements[d], Replicate):
                continue
            ranks = ranks.select(d, coord[d]).unsqueeze(d)
        return sorted(int(r) for r in ranks.flatten().tolist())

    # -- shapes and views -------------------------------------------------
    def local_shape(self, i):
        return tuple(self.params[i]._local_tensor.shape)

    def owns(self, i):
        return True

    def owns_matrix(self, i):
        return self.owner[i] == self.rank

    def matrix_indices(self, indices):
        return list(indices)

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

    # -- communication ----------------------------------------------------
    def all_reduce_sum(self, t):
        # replicas of an HSDP mesh hold identical gradients: reduce over the shard group only
        comm.all_reduce_sum(t, self.group)
        return t

    def orthogonalize(self, indices, inputs, fn, exact_dtype=None):
        W, me = self.world_size, self.rank
        if W == 1:
            return batched_by_shape([x.reshape(self.params[i].shape) for i, x in zip(indices, inputs)], fn)
        device = inputs[0].device if inputs else self.params[indices[0]]._local_tensor.device if indices else None
        if device is None:
            return []
        dtype = self.comm_dtype or torch.float32
        cols = {i: (self.params[i].shape[1]) for i in indices}
        pos = {i: k for k, i in enumerate(indices)}
        by_owner = [[i for i in indices if self.owner[i] == r] for r in range(W)]
        mine = by_owner[me]

        def nrows(i, r):
            lo, hi = self.rows[i][r]
            return hi - lo

        # 1) my rows of every matrix -> its owner
        send_parts, in_splits = [], []
        for r in range(W):
            parts = [inputs[pos[i]].reshape(-1) for i in by_owner[r]]
            send_parts.extend(parts)
            in_splits.append(sum(x.numel() for x in parts))
        out_splits = [sum(nrows(i, s) * cols[i] for i in mine) for s in range(W)]
        send = torch.cat(send_parts).to(dtype) if send_parts else torch.empty(0, dtype=dtype, device=device)
        recv = torch.empty(sum(out_splits), dtype=dtype, device=device)
        comm.all_to_all_single(recv, send, out_splits, in_splits, self.group, me)
        # assemble full matrices on their owner
        full = {i: torch.empty(self.params[i].shape, dtype=torch.float32, device=device) for i in mine}
        off = 0
        for s in range(W):
            for i in mine:
                lo, hi = self.rows[i][s]
                n = (hi - lo) * cols[i]
                full[i][lo:hi].copy_(recv[off:off + n].view(hi - lo, cols[i]))
                off += n
        results = dict(zip(mine, batched_by_shape([full[i] for i in mine], fn)))
        # 2) each rank's rows of the result -> back to it
        back_parts, in2 = [], []
        for r in range(W):
            parts = [results[i][self.rows[i][r][0]:self.rows[i][r][1]].reshape(-1) for i in mine]
            back_parts.extend(parts)
            in2.append(sum(x.numel() for x in parts))
        out2 = [sum(nrows(i, me) * cols[i] for i in by_owner[s]) for s in range(W)]
        send2 = torch.cat(back_parts).to(dtype) if back_parts else torch.empty(0, dtype=dtype, device=device)
        recv2 = torch.empty(sum(out2), dtype=dtype, device=device)
        comm.all_to_all_single(recv2, send2, out2, in2, self.group, me)
        outs: list = [None] * len(indices)
        off = 0
        for s in range(W):
            for i in by_owner[s]:
                n = nrows(i, me) * cols[i]
                outs[pos[i]] = recv2[off:off + n].view(nrows(i, me), cols[i]).float()
                off += n
        return outs
