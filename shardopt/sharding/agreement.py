"""The construction-time check that every rank built the same optimizer.

A sharded layout is only correct if every rank has the same parameter list in
the same order, with the same groups and hyperparameters: otherwise ranks
exchange the wrong pieces, or one of them waits in a collective the others
never join. Before any state is made, every rank of a sharded layout joins:

1. one all-gather of a hash of its *signature* (names, shapes, dtypes,
   strides, placements, group index and hyperparameters of every parameter);
   on a mismatch, the full lists are exchanged to name the first difference;
2. one all-gather of a *fingerprint* of every parameter's values (a weighted
   sum of up to 64 fixed positions, in fp64), compared among ranks that hold
   the same values: every rank under ZeRO-1 (DDP broadcasts rank 0's weights),
   the replicas of an HSDP mesh, the tensor-parallel ranks of a weight that TP
   leaves whole (each parameter has its own sets of such ranks). The same
   all-gather carries a flag for a local fault (a DTensor local shard that its
   placements do not describe), so that too is raised everywhere. A parameter whose fingerprint sits at another
   index on another rank means the list was reordered (same-shape parameters
   from a ``set``, say). Values that differ otherwise are only an error when
   the optimizer copies them now (the fp32 master of bf16/fp16 parameters),
   since DDP's broadcast or the first ZeRO-1 all-gather makes them agree later.

Every rank takes part in the same collectives whatever it finds and reaches the
same verdict from the same gathered data, so all raise together, never hang.
Same-shape parameters with identical values (two zero-initialised biases) can
not be told apart by value; give the groups ``param_names`` for those.
"""
from __future__ import annotations

import torch

from . import comm

_SAMPLES = 64


def fingerprint(t: torch.Tensor) -> float:
    """A weighted sum of up to 64 evenly spaced values of ``t`` (in logical order), in fp64."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    k = min(n, _SAMPLES)
    idx = torch.linspace(0, n - 1, k, device=flat.device).round().long()
    w = torch.arange(1, k + 1, dtype=torch.float64, device=flat.device)
    vals = flat.index_select(0, idx)
    if vals.is_complex():
        vals = torch.view_as_real(vals).sum(-1)
    return float((vals.to(torch.float64) * w).sum())


def check(signature: list[str], values: list[torch.Tensor], classes: list | None, group, device,
          *, copies_now: list[bool], problem: str | None = None) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all agree.

    ``values[k]`` is this rank's tensor for parameter ``k`` (the whole parameter,
    or its local shard). ``classes`` says which ranks must hold equal values:
    None means all of them (ZeRO-1); else ``classes[k]`` is None (all) or a
    tuple with one key per group rank, equal among exactly the ranks that hold
    the same piece of parameter ``k`` (HSDP replicas, the TP ranks of a weight
    TP leaves alone). Parameters of the same structure share one tuple object.
    ``copies_now[k]`` says the optimizer copies parameter ``k``'s values at
    construction (fp32 master weights). ``problem`` is a fault this rank found
    in its own pieces (a local shard that its placements do not describe): it
    is raised on every rank.
    """
    w, rank = comm.world(group)
    if w == 1:
        if problem:
            raise ValueError(problem)
        return
    comm.check_ranks_agree(signature, group, device, "optimizer parameters (names, shapes, dtypes, groups, "
                                                      "hyperparameters)")
    n = len(values)
    # the fingerprints, plus one flag column for a local problem
    fp = torch.tensor([fingerprint(v) for v in values] + [1.0 if problem else 0.0], dtype=torch.float64,
                      device=device)
    table = torch.empty(w * (n + 1), dtype=torch.float64, device=device)
    comm.all_gather_untracked(table, fp, group)
    table = table.view(w, n + 1).cpu()
    if table[:, n].any():
        import torch.distributed as dist

        msgs: list = [None] * w
        dist.all_gather_object(msgs, problem, group=group)
        r = next(k for k, m in enumerate(msgs) if m)
        raise ValueError(msgs[r] if r == rank else f"{msgs[r]} (found on rank {r} of the group)")
    table = table[:, :n]
    # the same verdict on every rank: every rank looks at every set of ranks that must agree
    for ranks, cols in _agreeing_sets(classes, n, w):
        if len(ranks) < 2:
            continue
        ref = ranks[0]
        for r in ranks[1:]:
            a, b = table[ref, cols], table[r, cols]
            diff = [cols[j] for j in (a != b).nonzero().flatten().tolist()]
            if not diff:
                continue
            k = diff[0]
            ak = table[ref, k]
            where = [j for j in range(n) if table[r, j] == ak and ak != 0]
            same_set = sorted(table[ref, cols].tolist()) == sorted(table[r, cols].tolist())
            if same_set or where:
                j = where[0] if where else None
                moved = f" (rank {r} has those values at entry {j})" if j is not None else ""
                raise ValueError(
                    f"shardopt: ranks disagree on the order of the optimizer parameters: entry {k} "
                    f"({signature[k].split(':')[0]}) holds different values on rank {ref} and rank {r}{moved}. "
                    "The parameter list was built in a different order on some rank (e.g. from a set); build it "
                    "the same way everywhere, e.g. from model.parameters() or model.named_parameters()"
                )
            if any(copies_now[j] for j in diff):
                j = next(j for j in diff if copies_now[j])
                raise ValueError(
                    f"shardopt: parameter {signature[j].split(':')[0]} has different values on rank {ref} and rank "
                    f"{r} while the optimizer takes its fp32 master copy. Build the optimizer after the model's "
                    "weights agree on every rank (after DDP(model), which broadcasts rank 0's weights, or with the "
                    "same seed everywhere)"
                )


def _agreeing_sets(classes, n: int, w: int):
    """``(ranks, columns)``: sets of group ranks that must hold equal values of those parameters."""
    if classes is None:
        yield list(range(w)), list(range(n))
        return
    by_structure: dict = {}
    for k, c in enumerate(classes):
        by_structure.setdefault(id(c) if c is not None else None, (c, []))[1].append(k)
    for c, cols in by_structure.values():
        if c is None:
            yield list(range(w)), cols
            continue
        parts: dict = {}
        for r, key in enumerate(c):
            parts.setdefault(key, []).append(r)
        for ranks in parts.values():
            yield ranks, cols
