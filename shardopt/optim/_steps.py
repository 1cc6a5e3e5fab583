"""Per-parameter step counts, kept on the host as ints.

As in torch.optim, each parameter's ``state[p]["step"]`` counts the steps in
which it had a gradient, and AdamW's bias correction uses that count. Here the
count is a Python ``int`` (``state_dict()`` writes the float tensor torch
writes), so no step reads a tensor to learn it.

On a CUDA device the skip decision for non-finite gradients stays on the
device: the kernels read the flag, and the host counts the step at once. The
flag is copied to pinned memory without blocking; the next step (or
``state_dict()``, or reading ``skipped_steps``) looks at it once the copy has
landed, without a device sync, and takes the count back if the step was
skipped. With any forward/backward between two steps the copy has long landed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def as_int(v) -> int:
    """A step count as an int, from an int, a float or a 0-d tensor (older or torch state_dicts)."""
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float):
        if not v.is_integer() or v < 0:
            raise ValueError(f"a step count must be a non-negative whole number, got {v!r}")
        return int(v)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise ValueError(f"a step count must be a non-negative whole number, got {v!r}")


def get(st: dict) -> int:
    v = st.get("step", 0)
    if type(v) is not int:  # someone (DeepSpeed's universal load, a user) wrote a tensor
        v = as_int(v)
        st["step"] = v
    return v


def by_step(indices, steps) -> dict[int, list[int]]:
    """Indices grouped by their step count (usually one group): one kernel call per count."""
    out: dict[int, list[int]] = {}
    for i, s in zip(indices, steps):
        out.setdefault(s, []).append(i)
    return out


@dataclass
class _Pending:
    flag: torch.Tensor  # pinned host copy of the device skip flag
    event: object  # torch.cuda.Event recorded after the copy
    states: list  # the state dicts counted optimistically


class StepCounter:
    """Counts steps, and takes back the counts of steps a device flag skipped."""

    def __init__(self):
        self.skipped = 0
        self._pending: list[_Pending] = []

    def count(self, states) -> None:
        for st in states:
            v = st.get("step", 0)
            st["step"] = (v if type(v) is int else get(st)) + 1  # get() only for a tensor someone wrote

    def count_unless(self, states, found_inf: torch.Tensor) -> None:
        """Count now; remember to undo it if the device flag ``found_inf`` turns out set."""
        self.count(states)
        pinned = torch.empty((), dtype=found_inf.dtype, pin_memory=True)
        pinned.copy_(found_inf, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._pending.append(_Pending(pinned, ev, list(states)))

    def resolve(self, wait: bool = False) -> int:
        """Apply the flags that have landed (all of them with ``wait``); returns how many skipped."""
        n = 0
        keep = []
        for pend in self._pending:
            if not wait and not pend.event.query():
                keep.append(pend)
                continue
            pend.event.synchronize()
            if bool(pend.flag.item()):
                for st in pend.states:
                    st["step"] = get(st) - 1
                n += 1
        self._pending = keep
        self.skipped += n
        return n
