"""Who owns what: pure functions, no communication.

* ``lpt_assign``: whole items (Muon matrices) to ranks, largest cost first
  onto the least-loaded rank (Longest Processing Time).
* ``fill_segments``: the ZeRO-1 flat layout. Every rank gets one segment of
  ``S`` elements in the all-gather buffer; whole items sit in their owner's
  segment, splittable items (elementwise algorithms) fill the rest in order,
  so each rank owns one contiguous range of each splittable tensor. With no
  whole items this is the classic contiguous ZeRO-1 partition.
* ``contiguous_pieces`` / ``per_item_pieces``: where the elements of each item
  sit in partitions someone else laid out. DeepSpeed ZeRO-1/2 cuts one flat
  buffer into ``W`` equal ranges; ZeRO-3 cuts every parameter into ``W``
  equal ranges. Both give, per rank, which element range of each item it holds
  and where in its flat partition that range lies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def round_up(n: int, unit: int) -> int:
    return ((n + unit - 1) // unit) * unit


def lpt_assign(costs: list[float], world: int, loads: list[float] | None = None) -> list[int]:
    """Owner rank for each cost; ``loads`` (updated in place) carries prior load."""
    if loads is None:
        loads = [0.0] * world
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    owner = [0] * len(costs)
    for i in order:
        r = min(range(world), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += costs[i]
    return owner


@dataclass
class Piece:
    index: int  # position in the layout's item list
    start: int  # range of the item's flattened elements
    end: int
    offset: int = 0  # position inside the rank's segment


@dataclass
class SegmentPlan:
    segment: int  # S, elements per rank
    pieces: list[list[Piece]] = field(default_factory=list)  # per rank, in segment order


def fill_segments(numels: list[int], owners: list[int | None], world: int, align: int) -> SegmentPlan:
    """Lay out items in ``world`` equal segments. ``owners[i]`` is None for splittable items."""
    total = sum(numels)
    whole = [0] * world
    for n, o in zip(numels, owners):
        if o is not None:
            whole[o] += n
    seg = max(round_up(math.ceil(total / world), align) if total else 0, max(whole) if whole else 0)
    seg = round_up(seg, align) if seg else 0
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    used = [0] * world
    for i, (n, o) in enumerate(zip(numels, owners)):
        if o is not None:
            pieces[o].append(Piece(i, 0, n, used[o]))
            used[o] += n
    r = 0
    for i, (n, o) in enumerate(zip(numels, owners)):
        if o is not None:
            continue
        start = 0
        while start < n:
            while used[r] >= seg:
                r += 1
            take = min(seg - used[r], n - start)
            pieces[r].append(Piece(i, start, start + take, used[r]))
            used[r] += take
            start += take
    return SegmentPlan(seg, pieces)


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
