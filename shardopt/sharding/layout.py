"""The layout interface the optimizers program against, and the local layout.

A layout answers, for every parameter index of an optimizer:
* ``local_shape(i)``: the shape of this rank's optimizer state for it
  (``(0,)`` when the rank owns none of it);
* ``param_view(i)`` / ``grad_view(i)``: the tensors the kernels update/read;
* ``orthogonalize(indices, inputs, fn, exact_dtype=None)``: the Muon gather
  step; ``inputs`` are this rank's pieces, ``fn`` maps a batch of full
  matrices to their orthogonalized versions; returns this rank's pieces of the
  result (``exact_dtype``: the results are exact in that dtype, so they may
  travel in it);
* ``matrix_pieces(i)``: None when local tensor ``i`` is (a piece of) one
  matrix, else the ``(offset, numel, matrix shape)`` ranges of the matrices it
  holds (a DeepSpeed flat partition);
* ``prepare_grads()`` before the update and ``finish()`` after it, where the
  communication of a step happens; ``group_done(gi)`` after each param group's
  update (ZeRO-1 starts the all-gathers of the buckets it completes), and
  ``wait_params(indices)`` to land all-gathers left in flight
  (``overlap_param_gather``);
* ``counts_in_norm(i)``: whether this rank's piece of parameter ``i`` is the
  copy counted in the gradient norm (False for a replica inside the group);
* ``all_reduce_sum(t)`` for the step stats (grad norm, non-finite flag, and,
  where ``distributed``, the per-parameter has-a-gradient counts);
* ``wrap_state(i, local)`` what is stored in ``optimizer.state``;
* ``int8_ok(i)``, ``local_scale_shape(i)`` and ``wrap_scale(i, local)`` for
  int8 state (:mod:`shardopt.kernels.state_precision`): whether parameter
  ``i`` gets it here, and the shape and stored form of its block scales.

``grad_views()``, ``param_views(indices)`` and ``local_states(values)`` are
the list forms the step uses (one call per group, not per parameter); a
layout whose views are the parameters themselves overrides them.
"""
from __future__ import annotations

import torch

from ..kernels import state_precision


def batched_by_shape(inputs: list[torch.Tensor], fn) -> list[torch.Tensor]:
    """Apply ``fn`` to same-shape matrices stacked into one batch."""
    out: list = [None] * len(inputs)
    buckets: dict = {}
    for k, x in enumerate(inputs):
        buckets.setdefault(tuple(x.shape), []).append(k)
    for ks in buckets.values():
        res = fn(torch.stack([inputs[k] for k in ks]))
        for j, k in enumerate(ks):
            out[k] = res[j]
    return out


class Layout:
    name = "base"
    world_size = 1
    rank = 0
    group = None
    distributed = False  # ranks hold different pieces: they must agree on which parameters step
    state_per_param = False  # the state of a parameter stays valid when the parameter list narrows

    def __init__(self, params, names):
        self.params = params
        self.names = names

    # -- shapes and views -------------------------------------------------
    def local_shape(self, i: int) -> tuple:
        raise NotImplementedError

    def owns(self, i: int) -> bool:
        return 0 not in self.local_shape(i) or len(self.local_shape(i)) == 0

    def unsharded_numel(self, i: int) -> int:
        """Elements of parameter ``i`` without sharding (what its state would cover on one rank)."""
        return self.params[i].numel()

    def owns_matrix(self, i: int) -> bool:
        """Whether this rank runs Newton-Schulz for matrix ``i``."""
        return self.owns(i)

    def param_view(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def grad_view(self, i: int):
        raise NotImplementedError

    def wrap_state(self, i: int, local: torch.Tensor):
        return local

    def local_state(self, value):
        return value

    # -- int8 state ---------------------------------------------------------
    def int8_block(self, i: int) -> int:
        """The int8 block size of parameter ``i`` here, 0 when it keeps fp32 state under ``state_dtype="int8"``:
        its global shape must hold whole blocks in every layout (:func:`~shardopt.kernels.state_precision.int8_block`)."""
        return state_precision.int8_block(self.params[i].shape)

    def int8_ok(self, i: int) -> bool:
        """Whether parameter ``i`` gets int8 state under ``state_dtype="int8"`` (else fp32)."""
        return self.int8_block(i) > 0

    def local_scale_shape(self, i: int) -> tuple:
        """Shape of this rank's block scales of a quantized state of parameter ``i``."""
        return state_precision.scale_shape(self.local_shape(i), self.int8_block(i) or state_precision.BLOCK)

    def wrap_scale(self, i: int, local: torch.Tensor):
        return local

    def grad_views(self) -> list:
        """``grad_view(i)`` of every parameter, read afresh (gradients may be replaced between steps)."""
        return [self.grad_view(i) for i in range(len(self.params))]

    def param_views(self, indices) -> list:
        return [self.param_view(i) for i in indices]

    def local_states(self, values) -> list:
        return [self.local_state(v) for v in values]

    # -- communication ----------------------------------------------------
    def prepare_grads(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def group_done(self, gi: int) -> None:
        pass

    def wait_params(self, indices=None) -> None:
        pass

    in_flight = 0  # all-gathers left in flight by overlap_param_gather

    def counts_in_norm(self, i: int) -> bool:
        return True

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def orthogonalize(self, indices, inputs, fn, exact_dtype=None):
        return batched_by_shape(inputs, fn)

    def matrix_pieces(self, i):
        return None

    def matrix_indices(self, indices):
        """Which Muon matrices this rank takes part in updating."""
        return [i for i in indices if self.owns(i)]

    def summary_rows(self) -> list[dict]:
        return []


class WholeParams:
    """Mixin for a layout whose parameters are what the step updates (a local layout, DeepSpeed's flat
    partitions): each rank holds them whole, and the views are the parameters and state tensors themselves."""

    def local_shape(self, i):
        return tuple(self.params[i].shape)

    def owns(self, i):
        return True

    def param_view(self, i):
        return self.params[i]

    def grad_view(self, i):
        return self.params[i].grad

    def grad_views(self):
        return [p.grad for p in self.params]

    def param_views(self, indices):
        params = self.params
        return [params[i] for i in indices]

    def local_states(self, values):
        return list(values)


class LocalLayout(WholeParams, Layout):
    """Single device, or ``sharding='none'``: every state tensor is local and whole."""

    name = "none"
    state_per_param = True
