"""What the optimizer does with the fused gradient pass: the skip flag and the clip coefficient.

:func:`shardopt.kernels.grad_stats` gives each rank float64 ``[sum of squares,
bad]`` over its gradient pieces; the layout sums them over the ranks (one
all-reduce, together with the has-a-gradient counts). From the global sums this
module makes, on the gradients' device and without reading anything back:

* ``found_inf``: fp32 0-d, 1.0 when any gradient on any rank was inf or NaN;
* ``grad_scale``: fp32 0-d, ``min(1, max_norm / (norm + 1e-6))`` as
  ``torch.nn.utils.clip_grad_norm_`` computes it, or None without clipping;
* ``norm``: float64 0-d, the global L2 norm of the (value-clipped) gradients.

The update kernels take ``found_inf`` and ``grad_scale`` as tensors, so a CUDA
step never waits for the host; a CPU flag is simply read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Decision:
    found_inf: torch.Tensor
    grad_scale: torch.Tensor | None
    norm: torch.Tensor

    def host_skip(self) -> bool | None:
        """True/False where the flag can be read for free (CPU); None on a device (the kernels read it)."""
        if self.found_inf.device.type == "cpu":
            return bool(self.found_inf.item())
        return None


def decide(stats: torch.Tensor, *, clip_norm: float | None) -> Decision:
    """``stats``: the global float64 ``[sum of squares, bad]``."""
    sumsq, bad = stats[0], stats[1]
    found_inf = (~torch.isfinite(sumsq + bad)).to(torch.float32)
    norm = sumsq.sqrt()
    scale = None
    if clip_norm is not None:
        scale = (clip_norm / (norm + 1e-6)).clamp(max=1.0).to(torch.float32)
    return Decision(found_inf, scale, norm)
