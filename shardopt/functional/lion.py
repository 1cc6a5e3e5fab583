"""Lion (Chen et al., 2023), with decoupled weight decay and sign(0) = 0.

    c = beta1*m + (1-beta1)*g
    p = p - lr*(sign(c) + wd*p)        # wd reads p before the step
    m = beta2*m + (1-beta2)*g
"""
from __future__ import annotations

import torch


def lion(params, grads, exp_avgs, *, lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step, in place. Math in fp32; bf16 params are rounded on store."""
    for p, g, m in zip(params, grads, exp_avgs):
        p32 = p.float()
        g32 = g.float()
        c = m * beta1 + g32 * (1.0 - beta1)
        update = torch.sign(c)
        if weight_decay != 0:
            update = update + p32 * weight_decay
        p32 = p32 - update * lr
        p.copy_(p32)
        m.mul_(beta2).add_(g32 * (1.0 - beta2))
