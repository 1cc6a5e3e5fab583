"""Lion (Chen et al., 2023), with decoupled weight decay and sign(0) = 0.

    g = -g if maximize
    c = beta1*m + (1-beta1)*g
    p = p - lr*(sign(c) + wd*p)        # wd reads p before the step
    m = beta2*m + (1-beta2)*g
"""
from __future__ import annotations

import torch


def lion(params, grads, exp_avgs, *, lr: float, beta1: float, beta2: float, weight_decay: float,
         maximize: bool = False) -> None:
    """One Lion step, in place. Math in fp32 (fp64 for fp64 params); bf16 params are rounded on store."""
    for p, g, m in zip(params, grads, exp_avgs):
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32
        p32 = p.to(wide)
        g32 = g.to(wide)
        if maximize:
            g32 = -g32
        c = m * beta1 + g32 * (1.0 - beta1)
        update = torch.sign(c)
        if weight_decay != 0:
            update = update + p32 * weight_decay
        p32 = p32 - update * lr
        p.copy_(p32)
        m.mul_(beta2).add_(g32 * (1.0 - beta2))
