"""ZeRO-1 on plain (replicated) parameters.

The parameters of one dtype are laid out by :func:`plan.plan_zero1` in W equal
segments, one per rank: each rank owns whole Muon matrices (balanced by NS
cost) and contiguous ranges of the elementwise-updated tensors. A rank updates
only its segment; then the segments travel in all-gather buckets (windows of
the segments, a Muon matrix may span several), which restore every parameter
on every rank. With ``reduce_gradients=True`` the gradients are
reduce-scattered into the same segments first, so DDP is not needed.

With ``overlap=True`` each bucket's all-gather starts, async, as soon as the
last param group with items in it has been updated, so it runs while later
groups update; ``finish()`` waits for them. With ``overlap_param_gather``
(set by the optimizer) ``finish()`` leaves them in flight: :meth:`wait_params`
lands a bucket (copies the gathered pieces into the parameters) when a forward
pre-hook of a module using one of its parameters asks, and lands every bucket
at the next step. The bytes are the same either way, and so are the results.
"""
from __future__ import annotations

import torch

from ..kernels import is_dense
from . import comm
from .layout import Layout
from .plan import plan_zero1

DEFAULT_BUCKET_ELEMENTS = 1 << 27  # 512 MiB of fp32 per all-gather buffer
ALIGN_BYTES = 128


def flat(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``'s elements as a 1-D view, in storage order (its logical order when contiguous).

    A ``channels_last`` weight is dense but not contiguous: its storage order
    still pairs every element with the same position of its gradient and state
    (given the same strides), which is all an elementwise update needs.
    """
    t = t.detach()
    if t.is_contiguous():
        return t.view(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def like_param(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``g`` with ``p``'s strides (a copy only when they differ)."""
    if all(a == b for n, a, b in zip(p.shape, p.stride(), g.stride()) if n > 1):
        return g
    return torch.empty_like(p, dtype=g.dtype).copy_(g)


class Zero1Layout(Layout):
    name = "zero1"
    distributed = True

    def __init__(self, params, names, whole, costs, group, *, reduce_gradients=False, bucket_elements=None,
                 overlap=True, group_of=None, blocks=None):
        super().__init__(params, names)
        self.group = group
        self.overlap = overlap
        self.overlap_param_gather = False
        self.hooked: set = set()  # parameter indices whose modules wait in a forward pre-hook
        self.world_size, self.rank = comm.world(group)
        self.reduce_gradients = reduce_gradients
        for i, p in enumerate(params):
            if not is_dense(p):
                raise ValueError(
                    f"shardopt ZeRO-1: parameter {names[i]} (shape {tuple(p.shape)}, strides {p.stride()}) has gaps "
                    "or overlaps in memory; make it a dense tensor (e.g. .contiguous()) before building the optimizer"
                )
        plan = plan_zero1([p.numel() for p in params], [p.dtype for p in params], whole, costs, self.world_size,
                          bucket_elements=bucket_elements or DEFAULT_BUCKET_ELEMENTS, align_bytes=ALIGN_BYTES,
                          blocks=blocks)
        self.owner: list = plan.owner  # owner rank of whole items
        self.range: list = [None] * len(params)  # (start, end) owned of the flattened param
        self.streams = plan.streams
        self.buckets = plan.buckets
        for st in self.streams:
            for piece in st.plan.pieces[self.rank]:
                self.range[st.indices[piece.index]] = (piece.start, piece.end)
        self.whole = list(whole)
        self._grad_views: dict = {}
        # the items each bucket carries (a bucket is a window of the segments; a matrix may span several)
        self._items = [sorted({b.indices[pc.index] for pcs in b.plan.pieces for pc in pcs}) for b in self.buckets]
        self._buckets_of: dict = {}
        for k, items in enumerate(self._items):
            for i in items:
                self._buckets_of.setdefault(i, []).append(k)
        # a bucket is complete once the last param group with items in it has been updated
        group_of = group_of or [0] * len(params)
        self._last_group = [max((group_of[i] for i in items), default=-1) for items in self._items]
        self._started: set = set()  # buckets whose all-gather this step has started
        self._inflight: dict = {}  # bucket -> (Pending or None, receive buffer)

    # -- shapes and views -------------------------------------------------
    def local_shape(self, i):
        if self.whole[i]:
            return tuple(self.params[i].shape) if self.owner[i] == self.rank else (0,)
        r = self.range[i]
        return (0,) if r is None else (r[1] - r[0],)

    def owns(self, i):
        return (self.owner[i] == self.rank) if self.whole[i] else self.range[i] is not None

    def _flat_slice(self, t: torch.Tensor, i: int) -> torch.Tensor:
        if self.whole[i]:
            return t if self.owner[i] == self.rank else flat(t)[:0]
        r = self.range[i]
        if r is None:
            return flat(t)[:0]
        return flat(t)[r[0]:r[1]]

    def param_view(self, i):
        return self._flat_slice(self.params[i], i)

    def grad_view(self, i):
        if self.reduce_gradients:
            return self._grad_views.get(i)
        g = self.params[i].grad
        if g is None:
            return None
        return self._flat_slice(like_param(g, self.params[i]), i)

    # -- communication ----------------------------------------------------
    def all_reduce_sum(self, t):
        comm.all_reduce_sum(t, self.group)
        return t

    def prepare_grads(self):
        """reduce_gradients=True: reduce-scatter the local gradients into the owned segments.

        A missing local gradient counts as zeros (DDP with ``find_unused_parameters=True``
        does the same); whether the parameter steps at all is decided for the whole
        group by the step's stats all-reduce. The buffers have the parameters' dtype
        on every rank, whatever gradients a rank happens to have.
        """
        self.wait_params()  # the last step's gathers, if overlap_param_gather left them in flight
        if not self.reduce_gradients:
            return
        self._grad_views = {}
        W = self.world_size
        for st in self.streams:
            device = self.params[st.indices[0]].device
            # this rank's whole segment: each bucket reduce-scatters into its window, so a Muon matrix
            # that spans buckets still ends up contiguous here
            own = torch.empty(st.plan.segment, dtype=st.dtype, device=device)
            for b in st.buckets:
                S = b.plan.segment
                full = torch.zeros(W * S, dtype=st.dtype, device=device)
                dst, src = [], []
                for r in range(W):
                    for pc in b.plan.pieces[r]:
                        p = self.params[st.indices[pc.index]]
                        if p.grad is not None:
                            dst.append(full[r * S + pc.offset: r * S + pc.offset + pc.end - pc.start])
                            src.append(flat(like_param(p.grad, p))[pc.start:pc.end])
                if dst:
                    torch._foreach_copy_(dst, src)
                # DDP multiplies each gradient by 1/W before summing; do the same so results match it.
                full.mul_(1.0 / W)
                comm.reduce_scatter_tensor(own[b.plan.lo:b.plan.lo + S], full, self.group)
            for pc in st.plan.pieces[self.rank]:
                i = st.indices[pc.index]
                v = own[pc.offset: pc.offset + pc.end - pc.start]
                if self.whole[i]:
                    p = self.params[i]
                    v = v.as_strided(p.shape, p.stride()) if not p.is_contiguous() else v.view(p.shape)
                self._grad_views[i] = v

    def group_done(self, gi: int) -> None:
        """Param group ``gi`` is updated: start the all-gathers of the buckets it completes."""
        if not self.overlap:
            return
        for k, last in enumerate(self._last_group):
            if last == gi and k not in self._started:
                self._start_gather(k, async_op=True)

    def finish(self):
        """One all-gather per bucket restores the full parameters on every rank.

        Buckets not yet started start now (without overlap: one after the other, each
        waited). Then every bucket is landed, unless ``overlap_param_gather`` leaves the
        ones whose parameters all wait in forward pre-hooks in flight."""
        for k in range(len(self.buckets)):
            if k not in self._started:
                self._start_gather(k, async_op=self.overlap)
        self._started = set()
        for k in list(self._inflight):
            if not (self.overlap_param_gather and all(i in self.hooked for i in self._items[k])):
                self._land(k)

    def wait_params(self, indices=None) -> None:
        """Land the in-flight all-gathers (of the buckets holding ``indices``; None: all)."""
        if not self._inflight:
            return
        if indices is None:
            ks = list(self._inflight)
        else:
            ks = sorted({k for i in indices for k in self._buckets_of.get(i, ()) if k in self._inflight})
        for k in ks:
            self._land(k)

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _start_gather(self, k: int, *, async_op: bool) -> None:
        self._started.add(k)
        b = self.buckets[k]
        S = b.plan.segment
        if S == 0:
            return
        W = self.world_size
        device = self.params[b.indices[0]].device
        send = torch.empty(S, dtype=b.dtype, device=device)
        mine = b.plan.pieces[self.rank]
        if mine:
            torch._foreach_copy_(
                [send[pc.offset: pc.offset + pc.end - pc.start] for pc in mine],
                [flat(self.params[b.indices[pc.index]])[pc.start:pc.end] for pc in mine],
            )
        recv = torch.empty(W * S, dtype=b.dtype, device=device)
        pending = comm.all_gather_into_tensor(recv, send, self.group, async_op=async_op)
        self._inflight[k] = (pending, recv, send)
        if not async_op:
            self._land(k)

    def _land(self, k: int) -> None:
        pending, recv, _ = self._inflight.pop(k)
        if pending is not None:
            pending.wait()
        b = self.buckets[k]
        S = b.plan.segment
        dst, src = [], []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            for pc in b.plan.pieces[r]:
                dst.append(flat(self.params[b.indices[pc.index]])[pc.start:pc.end])
                src.append(recv[r * S + pc.offset: r * S + pc.offset + pc.end - pc.start])
        if dst:
            torch._foreach_copy_(dst, src)

    def summary_rows(self):
        return []
