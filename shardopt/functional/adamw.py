"""AdamW (Loshchilov & Hutter), the same function as ``torch.optim.AdamW``.

    g = -g if maximize
    p = p*(1 - lr*wd)
    m = beta1*m + (1-beta1)*g
    v = beta2*v + (1-beta2)*g^2
    vmax = max(vmax, v) if amsgrad              (the denominator then uses vmax)
    p = p - lr/(1-beta1^t) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)

``t`` is each parameter's own step count (already incremented), as in torch.
"""
from __future__ import annotations

import math

import torch


def _steps(step, n):
    return list(step) if isinstance(step, (list, tuple)) else [step] * n


def adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float, step, amsgrad: bool = False, maximize: bool = False,
) -> None:
    """One AdamW step, in place. ``step`` is an int or one int per parameter."""
    steps = _steps(step, len(params))
    maxes = max_exp_avg_sqs if amsgrad else [None] * len(params)
    for p, g, m, v, vmax, t in zip(params, grads, exp_avgs, exp_avg_sqs, maxes, steps):
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32
        p32 = p.to(wide)
        g32 = g.to(wide)
        if maximize:
            g32 = -g32
        bc1 = 1.0 - beta1**t
        bc2_sqrt = math.sqrt(1.0 - beta2**t)
        if weight_decay != 0:
            p32 = p32 * (1.0 - lr * weight_decay)
        m.mul_(beta1).add_(g32 * (1.0 - beta1))
        v.mul_(beta2).add_((g32 * g32) * (1.0 - beta2))
        if amsgrad:
            torch.maximum(vmax, v, out=vmax)
        denom = torch.sqrt(vmax if amsgrad else v) / bc2_sqrt + eps
        p32 = p32 - (m / denom) * (lr / bc1)
        p.copy_(p32)
