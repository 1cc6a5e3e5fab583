"""The per-rank table behind :meth:`ShardedOptimizer.summary`.

:func:`summary` gathers, for every rank, the elements it owns, the bytes of
optimizer state it holds and the Newton-Schulz FLOPs it runs per step, and has
rank 0 print them in human units. Columns that mean nothing for the optimizer
are left out (no NS column without a Muon group). The returned rows keep the
raw numbers.

A framework that partitions the optimizer state itself (DeepSpeed ZeRO hands
shardopt one flat partition per rank, and shardopt then runs unsharded on it)
says so by setting ``optimizer.partitioned_by`` to an
:class:`ExternalPartitioning`; the table then reports that partitioning, over
that framework's data-parallel group, instead of shardopt's own ``none``
layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import state_precision
from ..sharding import comm
from .base import ALGORITHMS, _device_of, _is_dtensor


@dataclass(frozen=True, eq=False)
class ExternalPartitioning:
    """Who partitions the optimizer state when it is not shardopt (set as ``optimizer.partitioned_by``).

    ``label`` names the layout in tables (``"ds-zero1"``), ``description`` is
    one line for people, and ``group`` is the process group the partitions are
    spread over (``None``: the default group). The partitions add up to the
    whole state, so the unsharded size is their sum.
    """

    label: str
    description: str
    group: Any = None

    # A process group can be neither copied nor pickled; the description is what matters offline.
    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (ExternalPartitioning, (self.label, self.description, None))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (binary units, as the demo's tables use)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def format_flops(n: float) -> str:
    """3.1e7 -> '31.0 M' (decimal units, as FLOP counts are quoted)."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if n < 10 * scale else f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t


def _unsharded_bytes(opt) -> int:
    """What one rank would hold without sharding: each state tensor at its parameter's full size (the
    block scales of int8 state: one per 256 elements of it)."""
    from ..kernels import state_precision as sp

    layout = opt.layout
    params, _, _ = opt._flat_params()
    total = 0
    for i, p in enumerate(params):
        numel = layout.unsharded_numel(i)
        st = opt.state[p]
        for k, v in st.items():
            if k == "step" or not torch.is_tensor(v):
                continue
            if k.endswith(state_precision.SCALE_SUFFIX) and k[:-len(state_precision.SCALE_SUFFIX)] in st:
                # one scale per block
                total += state_precision.n_blocks(numel, layout.int8_block(i) or state_precision.BLOCK) * \
                    _local(v).element_size()
            else:
                total += numel * _local(v).element_size()
    return total


def summary(opt, print_fn=print) -> list[dict]:
    """Collective: gather every rank's row; rank 0 prints the table with ``print_fn`` (None: print nothing).

    Returns one dict per rank: ``rank``, ``owned_elements``, ``state_bytes``,
    ``ns_flops`` (per step), ``unsharded_state_bytes`` (per rank, without
    sharding) and ``layout``.
    """
    layout = opt.layout
    external = getattr(opt, "partitioned_by", None)
    group = external.group if external is not None else layout.group
    params, _, gidx = opt._flat_params()
    owned = flops = 0
    has_matrix = False
    for i, p in enumerate(params):
        shape = layout.local_shape(i)
        owned += math.prod(shape) if shape else 1
        g = opt.param_groups[gidx[i]]
        if ALGORITHMS[g["algorithm"]].matrix:
            has_matrix = True
            if layout.owns_matrix(i):
                flops += ALGORITHMS[g["algorithm"]].ns_cost(g, p.shape)
    unsharded = _unsharded_bytes(opt)
    row = torch.tensor([float(owned), float(opt.state_bytes()), float(flops), float(unsharded)], dtype=torch.float64)
    w, rank = comm.world(group)
    rows = [row]
    if w > 1:
        dev = _device_of(params[0]) if params else torch.device("cpu")
        out = torch.empty(w * row.numel(), dtype=torch.float64, device=dev)
        comm.all_gather_untracked(out, row.to(dev), group)
        allr = out.view(w, row.numel()).cpu()
        rows = [allr[r] for r in range(w)]
    if external is not None:
        # each rank's optimizer sees only its partition: the whole is the sum of the partitions
        unsharded = int(sum(float(x[1]) for x in rows))
    name = external.label if external is not None else layout.name
    table = [
        {"rank": r, "owned_elements": int(x[0]), "state_bytes": int(x[1]), "ns_flops": int(x[2]),
         "unsharded_state_bytes": unsharded if external is not None else int(x[3]), "layout": name}
        for r, x in enumerate(rows)
    ]
    if print_fn is not None and rank == 0:
        for line in format_table(type(opt).__name__, name, w, table, show_ns=has_matrix,
                                 note=external.description if external is not None else None):
            print_fn(line)
    return table


def format_table(opt_name: str, layout: str, world: int, table: list[dict], *, show_ns: bool,
                 note: str | None = None) -> list[str]:
    head = f"{opt_name} layout={layout} world={world}" + (f": {note}" if note else "")
    cols = f"{'rank':>4} {'owned elements':>15} {'state':>11} {'share':>6}" + (f" {'NS FLOP/step':>13}" if show_ns else "")
    lines = [head, cols]
    for t in table:
        full = t["unsharded_state_bytes"]
        share = f"{t['state_bytes'] / full:.0%}" if full else "-"
        line = f"{t['rank']:>4} {t['owned_elements']:>15,} {format_bytes(t['state_bytes']):>11} {share:>6}"
        if show_ns:
            line += f" {format_flops(t['ns_flops']):>13}"
        lines.append(line)
    full = {t["unsharded_state_bytes"] for t in table}
    if len(full) == 1:
        lines.append(f"without sharding, each rank would hold {format_bytes(full.pop())} of optimizer state")
    return lines
