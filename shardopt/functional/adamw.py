"""AdamW (Loshchilov & Hutter), the same function as ``torch.optim.AdamW``.

    p = p*(1 - lr*wd)
    m = beta1*m + (1-beta1)*g
    v = beta2*v + (1-beta2)*g^2
    p = p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
"""
from __future__ import annotations

import math

import torch


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, *, lr: float, beta1: float, beta2: float, eps: float,
    weight_decay: float, step: int,
) -> None:
    """One AdamW step at (already incremented) ``step``, in place."""
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    step_size = lr / bc1
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        p32 = p.float()
        g32 = g.float()
        if weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        m.mul_(beta1).add_(g32 * (1.0 - beta1))
        v.mul_(beta2).add_((g32 * g32) * (1.0 - beta2))
        denom = torch.sqrt(v) / bc2_sqrt + eps
        p32 = p32 - (m / denom) * step_size
        p.copy_(p32)
