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
   the replicas of an HSDP mesh. A parameter whose fingerprint sits at another
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


def check(signature: list[str], values: list[torch.Tensor], peers: list[int] | None, group, device,
          *, copies_now: list[bool]) -> None:
    """Raise the same ``ValueError`` on every rank of ``group`` unless all agree.

    ``values[k]`` is this rank's tensor for parameter ``k`` (the whole parameter,
    or its local shard); ``peers`` lists the group ranks whose ``values`` must
    equal this rank's (None: all of them). ``copies_now[k]`` says the optimizer
    copies parameter ``k``'s values at construction (fp32 master weights).
    """
    w, rank = comm.world(group)
    if w == 1:
        return
    comm.check_ranks_agree(signature, group, device, "optimizer parameters (names, shapes, dtypes, groups, "
                                                      "hyperparameters)")
    fp = torch.tensor([fingerprint(v) for v in values], dtype=torch.float64, device=device)
    table = torch.empty(w * len(values), dtype=torch.float64, device=device)
    comm.all_gather_untracked(table, fp, group)
    table = table.view(w, len(values)).cpu()
    # the same verdict on every rank: look at every rank pair that must agree
    everyone = list(range(w))
    same = [peers if peers is not None else everyone]
    if peers is not None:
        # every rank needs every pair to reach the same verdict: gather the peer sets too
        sets: list = [None] * w
        import torch.distributed as dist

        dist.all_gather_object(sets, sorted(peers), group=group)
        same = [s for k, s in enumerate(sets) if s not in sets[:k]]
    for ranks in same:
        if len(ranks) < 2:
            continue
        ref = ranks[0]
        for r in ranks[1:]:
            a, b = table[ref], table[r]
            diff = (a != b).nonzero().flatten().tolist()
            if not diff:
                continue
            k = diff[0]
            where = [j for j in range(len(values)) if b[j] == a[k] and a[k] != 0]
            if sorted(a.tolist()) == sorted(b.tolist()) or where:
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
