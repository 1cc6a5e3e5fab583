"""Collectives used by the layouts, with per-op byte counters.

Every collective shardopt issues goes through here, so ``shardopt bench`` and
the tests can count what a step communicates. Counted is what this rank puts
on the wire: for all-gather the bytes of its own contribution times (W-1)
receivers is *not* used; we count the collective's payload as NCCL's bus
accounting does per rank: all-gather = output bytes, reduce-scatter = input
bytes, all-to-all = bytes sent to other ranks.

The docstring's bus accounting: for W ranks an all-gather of an N-byte buffer
is counted as N bytes, the same figure for ZeRO-1 AdamW and ZeRO-1 Muon.

The overlapped paths (ZeRO-1's per-bucket all-gathers, FSDP2's chunked gather
step) call the same functions with ``async_op=True``: the bytes are counted at
the start, the returned :class:`Pending` is waited for later, and
``WAIT_SECONDS`` records how long each wait (or blocking call) held this rank.
"""
from __future__ import annotations

import collections
import hashlib
import os
import sys
import time
from typing import NoReturn

import torch
import torch.distributed as dist

COUNTERS: collections.Counter = collections.Counter()
# Seconds this rank spent blocked in each kind of collective: a blocking call's duration, or an
# async one's wait(). On CPU (gloo) that is the time communication was not hidden; on a GPU it is
# host time only (NCCL work runs on its own stream).
WAIT_SECONDS: collections.Counter = collections.Counter()


def reset_counters() -> None:
    COUNTERS.clear()
    WAIT_SECONDS.clear()


class Pending:
    """An async collective in flight (``async_op=True``): ``wait()`` once before reading its output."""

    __slots__ = ("work", "op", "done")

    def __init__(self, work, op: str):
        self.work, self.op, self.done = work, op, False

    def wait(self) -> None:
        if self.done:
            return
        t0 = time.perf_counter()
        if self.work is not None:
            self.work.wait()
        WAIT_SECONDS[self.op] += time.perf_counter() - t0
        self.done = True


def _run(op: str, fn, async_op: bool):
    if async_op:
        return Pending(fn(True), op)
    t0 = time.perf_counter()
    fn(False)
    WAIT_SECONDS[op] += time.perf_counter() - t0
    return None


# torch >= 2.13 renamed the tensor collectives; keep working on 2.6+.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def world(group) -> tuple[int, int]:
    """(world_size, rank) of ``group``; (1, 0) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def all_gather_into_tensor(out: torch.Tensor, inp: torch.Tensor, group, *, async_op: bool = False):
    """Counted as its output bytes; with ``async_op`` returns a :class:`Pending` (counted the same)."""
    COUNTERS["all_gather"] += _nbytes(out)
    return _run("all_gather", lambda a: _all_gather(out, inp, group=group, async_op=a), async_op)


def reduce_scatter_tensor(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    COUNTERS["reduce_scatter"] += _nbytes(inp)
    _reduce_scatter(out, inp, op=dist.ReduceOp.SUM, group=group)


def all_to_all_single(out, inp, out_splits, in_splits, group, self_rank: int, *, async_op: bool = False):
    """Counted as the bytes sent to other ranks; with ``async_op`` returns a :class:`Pending`."""
    elem = inp.element_size()
    COUNTERS["all_to_all"] += (sum(in_splits) - in_splits[self_rank]) * elem
    return _run("all_to_all", lambda a: dist.all_to_all_single(
        out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group, async_op=a), async_op)


def needs_device_buffers(group) -> bool:
    """Whether ``group``'s backend takes accelerator tensors only (NCCL): CPU buffers must be staged."""
    try:
        return dist.get_backend(group) == "nccl"
    except Exception:  # noqa: BLE001 - no process group: nothing to stage for
        return False


def accelerator_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def all_reduce_sum(t: torch.Tensor, group) -> None:
    COUNTERS["all_reduce"] += _nbytes(t)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def check_ranks_agree(signature: list[str], group, device: torch.device, what: str) -> None:
    """Raise the same clear error on every rank if ranks disagree on ``signature``.

    A cheap hash all-gather first; only on mismatch are the full lists
    exchanged, to name the first differing entry. Every rank takes part in the
    same collectives whatever it finds, so nobody hangs.
    """
    w, rank = world(group)
    if w == 1:
        return
    digest = hashlib.sha256("\n".join(signature).encode()).digest()[:8]
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True), len(signature)], dtype=torch.int64, device=device)
    allh = torch.empty(w * 2, dtype=torch.int64, device=device)
    _all_gather(allh, mine, group=group)
    allh = allh.view(w, 2).tolist()
    if all(h == allh[0] for h in allh):
        return
    lists: list = [None] * w
    dist.all_gather_object(lists, signature, group=group)
    first = None
    for r in range(w):
        other = lists[r]
        n = max(len(other), len(signature))
        for i in range(n):
            a = signature[i] if i < len(signature) else "<missing>"
            b = other[i] if i < len(other) else "<missing>"
            if a != b:
                if first is None or i < first[0]:
                    first = (i, r, a, b)
                break
    counts = ", ".join(f"rank {r}: {len(lists[r])}" for r in range(w))
    msg = f"shardopt: ranks disagree on the {what} ({counts} entries)"
    if first is not None:
        i, r, a, b = first
        msg += f"; first difference at entry {i}: this rank ({rank}) has {a}, rank {r} has {b}"
    msg += ". Build the optimizer from the same model on every rank."
    raise ValueError(msg)


def all_gather_untracked(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    """For reporting only; not counted as a step's traffic."""
    _all_gather(out, inp, group=group)


# The one per-step all-reduce of every distributed layout ("step stats"): float64
# [sum of squared gradients, non-finite count, then one has-a-gradient count per
# optimizer parameter], so clipping, the skip decision and "which parameters
# step" agree on every rank. ``shardopt plan`` counts its bytes with these.
STATS_DTYPE = torch.float64


def stats_numel(n_params: int) -> int:
    """Elements of the per-step stats all-reduce for an optimizer of ``n_params`` parameters."""
    return 2 + n_params


def group_ranks(group) -> list[int]:
    """Global ranks of ``group`` in its rank order (None: the default group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [0]
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def exit_distributed(code: int = 0, *, barrier: bool = True) -> NoReturn:
    """End a distributed run's process: barrier, destroy the process group, flush, ``os._exit(code)``.

    Call it as the last line of a torchrun/spawn rank (``shardopt.exit_distributed()``). With
    ``barrier`` (the default) no rank tears gloo down while a peer still finishes the last
    collective. Then the process ends without interpreter finalisation: a gloo worker thread can
    still be dropping its last reference to a collective's tensors when Python starts finalising,
    and taking the GIL there ends the thread inside a ``noexcept`` destructor, so ``std::terminate``
    aborts a rank whose work is all done ("terminate called without an active exception", SIGABRT;
    seen with torch alone, 2 in 40 two-rank torchrun runs on a loaded 2-core machine). Skipping
    finalisation also skips ``atexit`` handlers: flush or close loggers before calling it.
    multiprocessing's own exit step does run, as in the children it starts itself: without it a
    semaphore made in a spawned rank (tqdm's lock, for one) stays registered, and the resource
    tracker warns of a leak when the job ends.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            if barrier:
                dist.barrier()
            dist.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - e.g. a peer died first: say so, and do not exit 0
            print(f"shardopt: leaving the process group failed ({type(e).__name__}: {e})", file=sys.stderr)
            code = code or 1
    _multiprocessing_exit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _multiprocessing_exit() -> None:
    """What multiprocessing runs before its own children ``os._exit``: its finalizers (a semaphore
    unlinks and leaves the resource tracker's list). ``util._exit_function`` is private, so a
    Python without it only loses the clean-up."""
    try:
        from multiprocessing import util

        util._exit_function()
    except Exception as e:  # noqa: BLE001 - the clean-up is best effort; the exit goes on
        print(f"shardopt: multiprocessing's exit step failed ({type(e).__name__}: {e})", file=sys.stderr)
