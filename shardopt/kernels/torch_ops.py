"""The ``torch`` backend: foreach ops, in exactly the reference order of operations.

Only plain IEEE elementwise ops are used (no ``alpha=``/``addcmul``/``lerp``):
ATen may contract those to FMAs in its vector path but not in its scalar tail,
which would make the result depend on where a ZeRO-1 partition boundary falls.
With plain mul/add/sub/div every element is computed identically wherever it
sits, so sharded and unsharded runs agree bitwise.

Scalars are rounded to fp32 the same way the C++/Triton kernels do:
``float(beta1)``, ``float(1 - beta1)`` (difference taken in double), etc.
"""
from __future__ import annotations

import math

import torch


def _as_fp32(ts):
    return [t if t.dtype == torch.float32 else t.float() for t in ts]


def _store(params, values):
    """Write fp32 results back; bf16 params round to nearest even."""
    for p, v in zip(params, values):
        if v is not p:
            p.copy_(v)


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay):
    p32 = _as_fp32(params)
    g32 = _as_fp32(grads)
    # c = beta1*m + (1-beta1)*g
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, torch._foreach_mul(g32, 1.0 - beta1))
    # p = p - lr*(sign(c) + wd*p)
    upd = torch._foreach_sign(c)
    if weight_decay != 0:
        torch._foreach_add_(upd, torch._foreach_mul(p32, weight_decay))
    torch._foreach_mul_(upd, lr)
    torch._foreach_sub_(p32, upd)
    _store(params, p32)
    # m = beta2*m + (1-beta2)*g
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g32, 1.0 - beta2))


def adamw_scalars(*, lr, beta1, beta2, weight_decay, step):
    """Step-dependent scalars shared by every backend (computed in double)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return {
        "decay": 1.0 - lr * weight_decay,
        "step_size": lr / bc1,
        "bc2_sqrt": math.sqrt(bc2),
    }


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step):
    s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    p32 = _as_fp32(params)
    g32 = _as_fp32(grads)
    if weight_decay != 0:
        torch._foreach_mul_(p32, s["decay"])
    # m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*g*g
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, torch._foreach_mul(g32, 1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, torch._foreach_mul(torch._foreach_mul(g32, g32), 1.0 - beta2))
    # p = p - step_size * m / (sqrt(v)/bc2_sqrt + eps)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, s["bc2_sqrt"])
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(exp_avgs, denom)
    torch._foreach_mul_(upd, s["step_size"])
    torch._foreach_sub_(p32, upd)
    _store(params, p32)
