"""Who owns what: pure functions, no communication.

* ``lpt_assign``: whole items (Muon matrices) to ranks, largest cost first
  onto the least-loaded rank (Longest Processing Time).
* ``fill_segments``: the ZeRO-1 flat layout. Every rank gets one segment of
  ``S`` elements in the all-gather buffer; whole items sit in their owner's
  segment, splittable items (elementwise algorithms) fill the rest in order,
  so each rank owns one contiguous range of each splittable tensor. With no
  whole items this is the classic contiguous ZeRO-1 partition.
* ``plan_zero1``: the whole ZeRO-1 plan (per dtype: owners, one segment per
  rank, cut into all-gather buckets) that
  :class:`~shardopt.sharding.zero1.Zero1Layout` runs on.
* ``plan_fsdp2``: the FSDP2 plan (``Shard(0)`` row chunks, Muon owners) that
  :class:`~shardopt.sharding.dtensor.DTensorLayout` runs on.
* ``contiguous_pieces`` / ``per_item_pieces``: where the elements of each item
  sit in partitions someone else laid out. DeepSpeed ZeRO-1/2 cuts one flat
  buffer into ``W`` equal ranges; ZeRO-3 cuts every parameter into ``W``
  equal ranges. Both give, per rank, which element range of each item it holds
  and where in its flat partition that range lies.

The layouts and ``shardopt plan`` call the same functions, so what the planner
prints for W ranks is what W ranks would do. Inputs are plain numbers (and
dtypes, for their ``itemsize``); nothing here needs a process group or torch.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from dataclasses import dataclass, field


def round_up(n: int, unit: int) -> int:
    return ((n + unit - 1) // unit) * unit


def lpt_assign(costs: list[float], world: int, loads: list[float] | None = None) -> list[int]:
    """Owner rank for each cost; ``loads`` (updated in place) carries prior load.

    Largest cost first (ties: lower index), each onto the least-loaded rank
    (ties: lower rank). A heap keeps this O(n log W), so plans for thousands of
    ranks stay cheap.
    """
    if loads is None:
        loads = [0.0] * world
    owner = [0] * len(costs)
    if not costs:
        return owner
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    heap = [(load, k) for k, load in enumerate(loads)]
    heapq.heapify(heap)
    for i in order:
        load, r = heapq.heappop(heap)
        owner[i] = r
        loads[r] = load + costs[i]
        heapq.heappush(heap, (loads[r], r))
    return owner


@dataclass
class Piece:
    index: int  # position in the layout's item list
    start: int  # range of the item's flattened elements
    end: int
    offset: int = 0  # position inside the rank's segment


@dataclass
class SegmentPlan:
    """W segments of ``segment`` elements.

    Rank r's segment holds its whole items first (``whole_used[r]`` elements),
    then a window of the *splittable stream*, the splittable items
    concatenated in order: stream elements ``[split_base[r], split_base[r] +
    segment - whole_used[r])``. ``split_start[i]`` is where splittable item i
    starts in that stream (None for whole items). ``pieces`` spells this out
    per rank; counting per rank (the planner) needs only the windows.
    """

    segment: int  # S, elements per rank
    numels: list[int] = field(default_factory=list)
    owners: list = field(default_factory=list)  # per item: owner rank of a whole item, None if splittable
    whole_used: list[int] = field(default_factory=list)  # per rank
    split_base: list[int] = field(default_factory=list)  # per rank
    split_start: list = field(default_factory=list)  # per item
    blocks: list = field(default_factory=list)  # per item: cuts inside it fall on multiples of this (empty: 1)
    slack: int = 0  # elements of each segment kept free for the cuts ``blocks`` moves
    _pieces: list | None = field(default=None, repr=False, compare=False)
    _starts: tuple | None = field(default=None, repr=False, compare=False)

    @property
    def world(self) -> int:
        return len(self.whole_used)

    @property
    def split_total(self) -> int:
        return sum(n for n, o in zip(self.numels, self.owners) if o is None)

    def split_window(self, r: int) -> tuple[int, int]:
        """The range of the splittable stream that rank ``r`` owns (possibly empty). A boundary that
        falls inside an item with ``blocks[i] > 1`` moves down to a multiple of it within the item, the
        same for both ranks that share it (``segment`` holds the slack, see :func:`fill_segments`)."""
        lo = min(self.split_base[r], self.split_total)
        hi = min(self.split_base[r] + self.segment - self.slack - self.whole_used[r], self.split_total)
        if self.blocks:
            lo, hi = self._snap(lo), self._snap(hi)
        return lo, max(lo, hi)

    def _snap(self, x: int) -> int:
        starts = self._split_starts()
        k = bisect.bisect_right(starts[0], x) - 1
        if k < 0:
            return x
        a, i = starts[0][k], starts[1][k]
        b = self.blocks[i]
        if b > 1 and a < x < a + self.numels[i]:
            return a + (x - a) // b * b
        return x

    def _split_starts(self):
        if self._starts is None:
            split = [i for i, o in enumerate(self.owners) if o is None and self.numels[i] > 0]
            self._starts = ([self.split_start[i] for i in split], split)
        return self._starts

    def rank_pieces(self, r: int) -> list[Piece]:
        out, used = [], 0
        for i, (n, o) in enumerate(zip(self.numels, self.owners)):
            if o == r:
                out.append(Piece(i, 0, n, used))
                used += n
        lo, hi = self.split_window(r)
        if lo >= hi:
            return out
        split = [i for i, o in enumerate(self.owners) if o is None and self.numels[i] > 0]
        ends = [self.split_start[i] + self.numels[i] for i in split]
        for k in range(bisect.bisect_right(ends, lo), len(split)):
            i = split[k]
            a = self.split_start[i]
            if a >= hi:
                break
            s, e = max(lo, a), min(hi, a + self.numels[i])
            out.append(Piece(i, s - a, e - a, used + s - lo))
        return out

    @property
    def pieces(self) -> list[list[Piece]]:
        """Per rank, in segment order (built on first use)."""
        if self._pieces is None:
            self._pieces = [self.rank_pieces(r) for r in range(self.world)]
        return self._pieces


def fill_segments(numels: list[int], owners: list[int | None], world: int, align: int,
                  blocks: list[int] | None = None) -> SegmentPlan:
    """Lay out items in ``world`` equal segments. ``owners[i]`` is None for splittable items.

    ``blocks[i] > 1``: rank boundaries inside splittable item i fall on multiples of it (int8 state's
    quantization blocks); each segment then has ``max(blocks)`` elements of slack for the moved cuts."""
    total = sum(numels)
    whole = [0] * world
    for n, o in zip(numels, owners):
        if o is not None:
            whole[o] += n
    blocks = list(blocks) if blocks and max(blocks) > 1 else []
    # a moved cut gives a rank up to (block - 1) more elements than its window
    slack = max((b - 1 for b, o in zip(blocks, owners) if o is None), default=0) if world > 1 else 0
    seg = max(round_up(math.ceil(total / world), align) if total else 0, max(whole) if whole else 0)
    seg = round_up(seg + slack, align) if seg else 0
    # splittable items fill the free space of the segments in rank order
    base = [0, *itertools.accumulate(seg - slack - w for w in whole)][:world]
    starts, pos = [], 0
    for n, o in zip(numels, owners):
        starts.append(pos if o is None else None)
        if o is None:
            pos += n
    return SegmentPlan(seg, list(numels), list(owners), whole, base, starts, blocks, slack)


@dataclass
class Window:
    """One all-gather bucket: stream positions ``[lo, lo + segment)`` of every rank's segment of a
    :class:`SegmentPlan` (its *stream*). ``pieces[r]`` are rank r's pieces clipped to the window, with
    offsets inside the window; a whole item may span several windows, always of its owner's segment."""

    stream: SegmentPlan
    lo: int
    segment: int
    _pieces: list | None = field(default=None, repr=False, compare=False)

    @property
    def pieces(self) -> list[list[Piece]]:
        if self._pieces is None:
            hi = self.lo + self.segment
            out = []
            for r in range(self.stream.world):
                mine = []
                for pc in self.stream.pieces[r]:
                    a, b = max(pc.offset, self.lo), min(pc.offset + pc.end - pc.start, hi)
                    if a < b:
                        mine.append(Piece(pc.index, pc.start + a - pc.offset, pc.start + b - pc.offset, a - self.lo))
                out.append(mine)
            self._pieces = out
        return self._pieces


@dataclass
class Zero1Bucket:
    indices: list[int]  # stream position -> item index (all items of the dtype)
    dtype: object
    plan: Window


@dataclass
class Zero1Stream:
    """All items of one dtype laid out in W segments (:func:`fill_segments`), cut into buckets."""

    indices: list[int]
    dtype: object
    plan: SegmentPlan
    buckets: list[Zero1Bucket]


@dataclass
class Zero1Plan:
    world: int
    streams: list[Zero1Stream]
    owner: list  # per item: owner rank of a whole item, None if splittable
    loads: list[float]  # per rank: summed cost of its whole items (Newton-Schulz FLOPs)

    @property
    def buckets(self) -> list[Zero1Bucket]:
        return [b for s in self.streams for b in s.buckets]


def plan_zero1(numels: list[int], dtypes: list, whole: list[bool], costs: list[float], world: int, *,
               bucket_elements: int, align_bytes: int, blocks: list[int] | None = None) -> Zero1Plan:
    """ZeRO-1: for each dtype (in first-seen order), whole items get owners by LPT on ``costs``
    (the load carries over from dtype to dtype) and all its items are laid out by
    :func:`fill_segments` in W segments of ``align_bytes``-aligned elements; the segments are then
    cut into all-gather buckets of at most ``bucket_elements`` (W windows of ``bucket_elements / W``).

    A whole item (a Muon matrix) is owned whole but may span several buckets of its owner's
    segment, so a matrix larger than ``bucket_elements / W`` pads nothing: the all-gather moves
    ``W * segment`` elements, the parameters' own size up to the owners' NS-cost balance and alignment.
    """
    loads = [0.0] * world
    owner: list = [None] * len(numels)
    by_dtype: dict = {}
    for i, d in enumerate(dtypes):
        by_dtype.setdefault(d, []).append(i)
    streams = []
    for dtype, idxs in by_dtype.items():
        align = max(1, align_bytes // dtype.itemsize)
        w_pos = [k for k, i in enumerate(idxs) if whole[i]]
        owners: list = [None] * len(idxs)
        for k, o in zip(w_pos, lpt_assign([costs[idxs[k]] for k in w_pos], world, loads)):
            owners[k] = o
            owner[idxs[k]] = o
        seg = fill_segments([numels[i] for i in idxs], owners, world, align,
                            [blocks[i] for i in idxs] if blocks else None)
        step = min(seg.segment, round_up(max(1, math.ceil(bucket_elements / world)), align))
        buckets = [Zero1Bucket(idxs, dtype, Window(seg, lo, min(step, seg.segment - lo)))
                   for lo in range(0, seg.segment, step)] if seg.segment else []
        streams.append(Zero1Stream(idxs, dtype, seg, buckets))
    return Zero1Plan(world, streams, owner, loads)


def chunk_rows(rows: int, world: int) -> int:
    """Rows per rank under ``Shard(0)``: torch.chunk semantics, ceil(rows/W)."""
    return -(-rows // world) if rows else 0


def row_ranges(rows: int, world: int) -> list[tuple[int, int]]:
    """``(start, end)`` rows of each rank: ceil(rows/W) each, the tail short or empty."""
    c = chunk_rows(rows, world)
    return [(min(r * c, rows), min((r + 1) * c, rows)) for r in range(world)]


@dataclass
class Fsdp2Plan:
    world: int
    chunk: list[int]  # per item: rows per rank (the last ranks may hold fewer, or none)
    owner: list  # per item: the rank that runs Newton-Schulz on a whole item, None otherwise
    loads: list[float]  # per rank: summed cost of the matrices it owns


def plan_fsdp2(rows: list[int], whole: list[bool], costs: list[float], world: int) -> Fsdp2Plan:
    """FSDP2 over a shard group of ``world`` ranks: every item cut by rows (``Shard(0)``);
    whole items (Muon matrices) get one owner each, by LPT on ``costs``."""
    midx = [i for i in range(len(rows)) if whole[i]]
    loads = [0.0] * world
    owner: list = [None] * len(rows)
    for i, o in zip(midx, lpt_assign([costs[i] for i in midx], world, loads)):
        owner[i] = o
    return Fsdp2Plan(world, [chunk_rows(r, world) for r in rows], owner, loads)


@dataclass(frozen=True)
class FlatPiece:
    """Elements ``[lo, hi)`` of item ``item`` (flattened), at ``offset`` in one rank's flat partition."""

    item: int
    lo: int
    hi: int
    offset: int

    @property
    def numel(self) -> int:
        return self.hi - self.lo


def contiguous_pieces(numels: list[int], offsets: list[int], partition: int, world: int) -> list[list[FlatPiece]]:
    """Items at ``offsets`` of one flat buffer that is cut into ``world`` partitions of ``partition`` elements.

    Rank ``r`` holds buffer elements ``[r*partition, (r+1)*partition)`` (DeepSpeed ZeRO-1/2).
    """
    out: list[list[FlatPiece]] = [[] for _ in range(world)]
    for k, (n, off) in enumerate(zip(numels, offsets)):
        for r in range(world):
            lo, hi = max(off, r * partition), min(off + n, (r + 1) * partition)
            if lo < hi:
                out[r].append(FlatPiece(k, lo - off, hi - off, lo - r * partition))
    return out


def per_item_pieces(numels: list[int], world: int) -> list[list[FlatPiece]]:
    """Every item cut into ``world`` ranges of ``ceil(n/world)`` elements (the tail short or empty, padded).

    Rank ``r``'s flat partition is the concatenation of its ranges, each padded to ``ceil(n/world)``
    elements (DeepSpeed ZeRO-3).
    """
    out: list[list[FlatPiece]] = [[] for _ in range(world)]
    base = 0
    for k, n in enumerate(numels):
        part = -(-n // world) if n else 0
        for r in range(world):
            lo, hi = min(n, r * part), min(n, (r + 1) * part)
            if lo < hi:
                out[r].append(FlatPiece(k, lo, hi, base))
        base += part
    return out


# ---------------------------------------------------------------------------- DTensor placements on any mesh
# A tensor's elements along one dimension are described by *runs*: ``((start, stop), ...)``,
# the global indices a rank holds along that dimension, in its local order.
Runs = tuple


def runs_len(runs: Runs) -> int:
    return sum(b - a for a, b in runs)


def _merge(runs) -> Runs:
    out: list = []
    for a, b in runs:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def take(runs: Runs, lo: int, hi: int) -> Runs:
    """The runs of the elements at local positions ``[lo, hi)`` of ``runs``."""
    out, pos = [], 0
    for a, b in runs:
        n = b - a
        s, e = max(lo, pos), min(hi, pos + n)
        if s < e:
            out.append((a + s - pos, a + e - pos))
        pos += n
        if pos >= hi:
            break
    return _merge(out)


def chunk(runs: Runs, n: int, k: int) -> Runs:
    """Chunk ``k`` of ``n`` with ``torch.chunk`` semantics (``Shard``): ceil(len/n) each, the tail short or empty."""
    total = runs_len(runs)
    c = -(-total // n) if total else 0
    return take(runs, min(k * c, total), min((k + 1) * c, total))


def strided_chunk(runs: Runs, n: int, split_factor: int, k: int) -> Runs:
    """Chunk ``k`` of ``n`` under ``_StridedShard(split_factor)``: the tensor is first cut into
    ``split_factor`` chunks (as if a later mesh dimension had sharded it first), each of those
    into ``n``, and rank ``k`` holds the k-th piece of every one of them, in order."""
    if split_factor == 1:
        return chunk(runs, n, k)
    out: list = []
    for j in range(split_factor):
        out.extend(chunk(chunk(runs, split_factor, j), n, k))
    return _merge(out)


@dataclass(frozen=True)
class Split:
    """One placement that cuts a tensor dimension: ``Shard(tensor_dim)`` (or ``_StridedShard``
    with its ``split_factor``) over the root mesh dimensions ``mesh_dims`` (several when the
    parameter's mesh dimension is a flattened one; row-major)."""

    tensor_dim: int
    mesh_dims: tuple
    split_factor: int = 1


def mesh_index(coord, dims, mesh_shape) -> int:
    """Row-major position of ``coord`` over the mesh dimensions ``dims``."""
    k = 0
    for d in dims:
        k = k * mesh_shape[d] + coord[d]
    return k


def local_runs(shape, splits, coord, mesh_shape) -> tuple:
    """Per tensor dimension, the runs of global indices the rank at root-mesh ``coord`` holds.

    The splits are applied in mesh-dimension order (DTensor's left-to-right rule, with
    ``_StridedShard`` as torch defines it), so the result is the DTensor's own local tensor:
    its shape is ``tuple(runs_len(r) for r in result)`` and its element ``[i, j]`` is the global
    element at the i-th index of the row runs and the j-th of the column runs.
    """
    runs = [((0, s),) if s else () for s in shape]
    for sp in splits:
        n = math.prod(mesh_shape[d] for d in sp.mesh_dims)
        k = mesh_index(coord, sp.mesh_dims, mesh_shape)
        runs[sp.tensor_dim] = strided_chunk(runs[sp.tensor_dim], n, sp.split_factor, k)
    return tuple(runs)


def flat_runs(shape, dim_runs) -> list[tuple[int, int]]:
    """``(flat start, length)`` runs of the elements a rank holds, in its local row-major order."""
    nd = len(shape)
    if nd == 0:
        return [(0, 1)]
    if any(not r for r in dim_runs):
        return []
    strides = [math.prod(shape[d + 1:]) for d in range(nd)]
    # trailing dimensions held whole fold into one run
    k = nd - 1
    while k > 0 and dim_runs[k] == ((0, shape[k]),):
        k -= 1
    inner = strides[k]
    out = []
    for idx in itertools.product(*[[i for a, b in dim_runs[d] for i in range(a, b)] for d in range(k)]):
        base = sum(i * strides[d] for d, i in enumerate(idx))
        for a, b in dim_runs[k]:
            out.append((base + a * inner, (b - a) * inner))
    return out


def boxes(dim_runs) -> list[tuple[tuple, tuple, tuple]]:
    """The N-D boxes ``(global offsets, sizes, local offsets)`` a rank's local tensor is made of
    (one box unless a ``_StridedShard`` left gaps)."""
    per_dim = []
    for runs in dim_runs:
        pos, lst = 0, []
        for a, b in runs:
            lst.append((a, b - a, pos))
            pos += b - a
        per_dim.append(lst)
    out = []
    for combo in itertools.product(*per_dim):
        out.append((tuple(c[0] for c in combo), tuple(c[1] for c in combo), tuple(c[2] for c in combo)))
    return out


def group_coords(mesh_shape, group_dims, base) -> list[tuple]:
    """Root-mesh coordinates of the ranks of the group spanning ``group_dims`` through ``base``,
    in row-major order over ``group_dims`` (a rank's position here is its group index)."""
    out = []
    for vals in itertools.product(*[range(mesh_shape[d]) for d in group_dims]):
        c = list(base)
        for d, v in zip(group_dims, vals):
            c[d] = v
        out.append(tuple(c))
    return out


def replicated_dims(splits, group_dims) -> tuple:
    """The group dimensions an item is replicated over (no split of it uses them)."""
    used = {d for sp in splits for d in sp.mesh_dims}
    return tuple(d for d in group_dims if d not in used)


def is_canonical(coord, splits, group_dims) -> bool:
    """Whether the rank at ``coord`` holds the first copy of its piece within the group
    (coordinate 0 on every group dimension the item is replicated over): the copy counted in
    the gradient norm and sent to a Muon owner."""
    return all(coord[d] == 0 for d in replicated_dims(splits, group_dims))


@dataclass
class MeshPlan:
    world: int  # ranks in the group (the product of the group dimensions' sizes)
    group_dims: tuple
    owner: list  # per item: group index of the rank that runs Newton-Schulz on a whole item, None otherwise
    loads: list[float]


def plan_mesh(whole: list[bool], costs: list[float], mesh_shape, group_dims) -> MeshPlan:
    """DTensor parameters on any mesh (FSDP2, HSDP, TP and their products): each whole item
    (Muon matrix) gets one owner among all the ranks of the group spanning ``group_dims``, by
    LPT on ``costs``. For one shard dimension this is :func:`plan_fsdp2`'s assignment."""
    world = math.prod(mesh_shape[d] for d in group_dims) if group_dims else 1
    midx = [i for i in range(len(whole)) if whole[i]]
    loads = [0.0] * world
    owner: list = [None] * len(whole)
    for i, o in zip(midx, lpt_assign([costs[i] for i in midx], world, loads)):
        owner[i] = o
    return MeshPlan(world, tuple(group_dims), owner, loads)


def ns_chunks(items: list[int], owner: list, shapes: list, overlap: bool) -> list[list[int]]:
    """The Muon gather step's chunks: each owner's matrices are batched by shape (in first-seen
    order); chunk k holds every owner's k-th batch, so each owner has Newton-Schulz work in
    every chunk while the next chunk's all-to-all is in flight. Without overlap, one chunk
    holds everything. The batches are the same either way, so are the results, bit for bit."""
    if not overlap:
        return [list(items)] if items else []
    per_owner: dict = {}
    for i in items:
        per_owner.setdefault(owner[i], {}).setdefault(tuple(shapes[i]), []).append(i)
    batches = {o: list(b.values()) for o, b in per_owner.items()}
    n = max((len(b) for b in batches.values()), default=0)
    chunks = []
    for k in range(n):
        members = {i for o in batches for i in (batches[o][k] if k < len(batches[o]) else [])}
        chunks.append([i for i in items if i in members])
    return chunks
