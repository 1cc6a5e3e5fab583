"""DTensor parameters on any device mesh: which global indices each rank holds, and the group.

FSDP2, HSDP, tensor parallelism (``parallelize_module``) and their products put
an optimizer's parameters on one *root* mesh, or on submeshes of it: FSDP2 puts
a TP-sharded weight on the 2-D ``(dp, tp)`` mesh with placements such as
``(_StridedShard(0, sf=2), Shard(0))``, and the weights that TP leaves alone on
the 1-D ``dp`` submesh (so they are replicated over ``tp``). :class:`MeshGeometry`
relates every parameter to the root mesh:

* its :class:`~shardopt.sharding.plan.Split` s (which root mesh dimensions cut
  which tensor dimension, in DTensor's left-to-right order);
* the **group**: the ranks that vary along the root dimensions on which some
  parameter is sharded, with this rank's coordinates elsewhere. Ranks outside
  it (HSDP replicas) hold the same values as some rank inside. The layout's
  step-stats all-reduce and Muon's all-to-alls run over it;
* each parameter's **canonical** copy: inside the group, a parameter
  replicated over some group dimension (a norm weight under TP) is held by
  several ranks; the one at coordinate 0 there is the one counted in the
  gradient norm and the one that sends its piece to a Muon owner.

The index arithmetic itself is pure (:mod:`.plan`), so ``shardopt plan`` runs
it on meshes that do not exist yet.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import comm
from .plan import Split, group_coords, is_canonical, local_runs, mesh_index, replicated_dims, runs_len

_GROUPS: dict = {}  # tuple of global ranks -> process group (built once per process)


def root_mesh(mesh):
    get = getattr(mesh, "_get_root_mesh", None)
    root = get() if get is not None else None
    return root if root is not None else mesh


def _placement_kind(pl) -> str:
    from torch.distributed.tensor import Replicate, Shard

    name = type(pl).__name__
    if name == "_StridedShard":
        return "strided"
    if isinstance(pl, Shard):
        return "shard"
    if isinstance(pl, Replicate):
        return "replicate"
    return "other"


def _dims_in_root(root, mesh, root_coord, describe: str) -> list[tuple]:
    """For each dimension of ``mesh`` (``root`` or a submesh of it), the root dimensions it spans.

    Matched by the ranks along the line through this rank: a submesh dimension is one root
    dimension, or several consecutive ones flattened row-major.
    """
    if mesh.ndim == root.ndim and torch.equal(mesh.mesh, root.mesh):
        return [(d,) for d in range(root.ndim)]
    R = root.mesh
    mc = mesh.get_coordinate()
    out, used = [], set()
    for k in range(mesh.ndim):
        sel = tuple(slice(None) if j == k else mc[j] for j in range(mesh.ndim))
        line = mesh.mesh[sel].reshape(-1).tolist()
        found = None
        for n in range(1, root.ndim + 1):
            for start in range(root.ndim - n + 1):
                dims = tuple(range(start, start + n))
                if used & set(dims):
                    continue
                sub = R[tuple(slice(None) if d in dims else root_coord[d] for d in range(root.ndim))]
                if sub.reshape(-1).tolist() == line:
                    found = dims
                    break
            if found:
                break
        if found is None:
            raise ValueError(
                f"shardopt: cannot place the device mesh of {describe} (ranks {mesh.mesh.tolist()}) inside its root "
                f"mesh (ranks {R.tolist()}); build the meshes with init_device_mesh and take submeshes by name"
            )
        used |= set(found)
        out.append(found)
    return out


def splits_of(p, root, root_coord, describe: str) -> list[Split]:
    """The placements of DTensor ``p`` as splits of the root mesh's dimensions."""
    dims = _dims_in_root(root, p.device_mesh, root_coord, describe)
    out = []
    for k, pl in enumerate(p.placements):
        kind = _placement_kind(pl)
        if kind == "replicate":
            continue
        if kind == "other":
            raise ValueError(
                f"shardopt: parameter {describe} has placements {p.placements}; only Shard, _StridedShard and "
                "Replicate are supported (a Partial parameter has no values of its own to update)"
            )
        sf = int(pl.split_factor) if kind == "strided" else 1
        d = pl.dim if pl.dim >= 0 else pl.dim + p.dim()
        out.append(Split(d, dims[k], sf))
    return out


def subgroup(ranks: tuple):
    """The process group of these global ranks (created once; only its members call this)."""
    g = _GROUPS.get(ranks)
    if g is None:
        g = dist.new_group(list(ranks), use_local_synchronization=True)
        _GROUPS[ranks] = g
    return g


class MeshGeometry:
    """Every DTensor parameter of one optimizer related to their common root mesh."""

    def __init__(self, params, names):
        self.root = root_mesh(params[0].device_mesh)
        coord = self.root.get_coordinate()
        if coord is None:
            raise ValueError(f"shardopt: this rank is not part of the device mesh of {names[0]}")
        self.coord = tuple(coord)
        self.mesh_shape = tuple(self.root.mesh.shape)
        self.splits: list = []
        for i, p in enumerate(params):
            if root_mesh(p.device_mesh) != self.root:
                raise ValueError(f"shardopt: parameter {names[i]} lives on another device mesh than {names[0]}; "
                                 "one optimizer needs one mesh (or submeshes of one)")
            self.splits.append(splits_of(p, self.root, self.coord, names[i]))
        self.group_dims = tuple(sorted({d for sps in self.splits for sp in sps for d in sp.mesh_dims}))
        self.coords = group_coords(self.mesh_shape, self.group_dims, self.coord)  # group index -> root coordinate
        self.index = mesh_index(self.coord, self.group_dims, self.mesh_shape)  # this rank's group index
        self.size = len(self.coords)
        mesh_ranks = self.root.mesh
        self.global_ranks = [int(mesh_ranks[c]) for c in self.coords]
        self.solo = not self.group_dims  # every parameter whole on every rank: nothing to exchange
        self.group = self._make_group()
        if not self.solo:
            # the process group's rank order, as positions in self.coords (the same for standard meshes)
            pg_ranks = comm.group_ranks(self.group)
            where = {g: k for k, g in enumerate(self.global_ranks)}
            self.pg_order = [where[g] for g in pg_ranks]
        else:
            self.pg_order = [0]
        self.pg_rank = self.pg_order.index(self.index)

    def _make_group(self):
        if not self.group_dims:
            return None  # nothing is sharded anywhere: no group (see ``solo``)
        world, _ = comm.world(None)
        if len(self.group_dims) == self.root.ndim and self.root.size() == world:
            return None  # every rank of the job: the default group
        if len(self.group_dims) == 1:
            return self.root.get_group(self.group_dims[0])
        return subgroup(tuple(sorted(self.global_ranks)))

    # -- per parameter ----------------------------------------------------------
    def runs(self, i: int, shape, r: int | None = None) -> tuple:
        """Per tensor dimension, the global index runs of group rank ``r``'s piece of parameter ``i``."""
        c = self.coord if r is None else self.coords[r]
        return local_runs(tuple(shape), self.splits[i], c, self.mesh_shape)

    def local_shape(self, i: int, shape) -> tuple:
        return tuple(runs_len(r) for r in self.runs(i, shape))

    def canonical(self, i: int, r: int | None = None) -> bool:
        c = self.coord if r is None else self.coords[r]
        return is_canonical(c, self.splits[i], self.group_dims)

    def replicated_over(self, i: int) -> tuple:
        return replicated_dims(self.splits[i], self.group_dims)

    def replica_classes(self, i: int, coords) -> tuple:
        """For each rank at ``coords``, a key equal among exactly the ranks holding the same values of
        parameter ``i`` (their coordinates on the dimensions that cut it)."""
        dims = sorted({d for sp in self.splits[i] for d in sp.mesh_dims})
        return tuple(tuple(c[d] for d in dims) for c in coords)


def dtensor_local_runs(shape, mesh, placements):
    """Per tensor dimension, the global index runs of this rank's local shard of a DTensor with
    these placements (``None`` when this rank is not in ``mesh``). Unlike torch's
    ``compute_local_shape_and_global_offset`` (one offset per dimension), this is exact for a
    ``_StridedShard``, whose local shard may be several boxes."""
    coord = mesh.get_coordinate()
    if coord is None:
        return None
    splits = []
    for k, pl in enumerate(placements):
        kind = _placement_kind(pl)
        if kind in ("shard", "strided"):
            d = pl.dim if pl.dim >= 0 else pl.dim + len(shape)
            splits.append(Split(d, (k,), int(pl.split_factor) if kind == "strided" else 1))
    return local_runs(tuple(shape), splits, tuple(coord), tuple(mesh.shape))
