"""The ``torch`` backend: foreach ops, in exactly the reference order of operations.

Only plain IEEE elementwise ops are used (no ``alpha=``/``addcmul``/``lerp``):
ATen may contract those to FMAs in its vector path but not in its scalar tail,
which would make the result depend on where a ZeRO-1 partition boundary falls.
With plain mul/add/sub/div every element is computed identically wherever it
sits, so sharded and unsharded runs agree bitwise.

Scalars are rounded to fp32 the same way the C++/Triton kernels do:
``float(beta1)``, ``float(1 - beta1)`` (difference taken in double), etc.

Every update reads the gradient the same way before its own math
(:func:`effective_grads`), which is how clipping is folded into the step:

    g = float(g);  g = -g if maximize;  g = clamp(g, -clip_value, clip_value);  g = g * grad_scale

``grad_scale`` is the clip coefficient as an fp32 0-d tensor (1.0 when the norm
is below the threshold), ``found_inf`` an fp32 0-d tensor that, when nonzero,
turns the whole call into a no-op. Both are tensors so that a CUDA step never
reads them on the host. Gradients are never written.

fp64 parameters are computed in fp64 (as torch.optim does); everything else in fp32.

Low-precision (bf16) state is loaded to fp32, updated by the same fp32 math and
stored back by :mod:`.state_precision` (stochastic rounding keyed by value and
``state_step``, the parameter's step count); fp32 state takes the same path as
before, unchanged.
"""
from __future__ import annotations

import math

import torch

from . import state_precision


def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def effective_grads(grads, *, wide_like, maximize=False, clip_value=None, grad_scale=None):
    """The gradients the update sees, as new fp32 (fp64) tensors; ``grads`` are only read."""
    out = [g.to(_wide(p)) if g.dtype != _wide(p) else g.clone() for g, p in zip(grads, wide_like)]
    if maximize:
        torch._foreach_neg_(out)
    if clip_value is not None:
        v = float(torch.tensor(clip_value, dtype=torch.float32))
        torch._foreach_clamp_min_(out, -v)
        torch._foreach_clamp_max_(out, v)
    if grad_scale is not None:
        for dtype in {t.dtype for t in out}:
            torch._foreach_mul_([t for t in out if t.dtype == dtype], grad_scale.to(dtype))
    return out


def grad_stats(grads, *, clip_value=None) -> torch.Tensor:
    """float64 ``[sum of squares, bad]`` of this rank's gradient pieces.

    The squares are of the (value-clipped) gradients, exact in fp64 and summed in
    fp64. ``bad`` is the sum of ``g*0`` over the *raw* gradients: 0 when all are
    finite, NaN when any is inf or NaN (a clamp would hide an inf).
    """
    dev = grads[0].device if grads else torch.device("cpu")
    acc = torch.zeros(2, dtype=torch.float64, device=dev)
    for g in grads:
        if g.numel() == 0:
            continue
        g64 = g.detach().to(torch.float64)
        acc[1] += (g64 * 0).sum()
        if clip_value is not None:
            v = float(torch.tensor(clip_value, dtype=torch.float32))
            g64 = g64.clamp(-v, v)
        acc[0] += (g64 * g64).sum()
    return acc


def _gated(found_inf, targets, news):
    """Write ``news`` into ``targets`` (bf16/fp16 round to nearest even) unless the device flag
    ``found_inf`` is set."""
    if found_inf is None:
        for t, n in zip(targets, news):
            if n is not t:
                t.copy_(n)
        return
    keep = found_inf != 0
    for t, n in zip(targets, news):
        t.copy_(torch.where(keep, t, n.to(t.dtype)))


def _host_skip(found_inf) -> bool:
    """A CPU flag is read directly (no device sync); a CUDA one stays on the device."""
    return found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf.item())


def lion_step(params, grads, exp_avgs, *, lr, beta1, beta2, weight_decay, maximize=False, clip_value=None,
              grad_scale=None, found_inf=None, state_step=None):
    if _host_skip(found_inf):
        return
    if found_inf is not None and found_inf.device.type == "cpu":
        found_inf = None
    copy = found_inf is not None  # a device flag: compute aside, then write where it is clear
    p32 = [p.to(_wide(p)) if p.dtype != _wide(p) else (p.clone() if copy else p) for p in params]
    g32 = effective_grads(grads, wide_like=params, maximize=maximize, clip_value=clip_value, grad_scale=grad_scale)
    m = state_precision.load(exp_avgs, copy=copy)
    # c = beta1*m + (1-beta1)*g
    c = torch._foreach_mul(m, beta1)
    torch._foreach_add_(c, torch._foreach_mul(g32, 1.0 - beta1))
    # p = p - lr*(sign(c) + wd*p)
    upd = torch._foreach_sign(c)
    if weight_decay != 0:
        torch._foreach_add_(upd, torch._foreach_mul(p32, weight_decay))
    torch._foreach_mul_(upd, lr)
    torch._foreach_sub_(p32, upd)
    # m = beta2*m + (1-beta2)*g
    torch._foreach_mul_(m, beta2)
    torch._foreach_add_(m, torch._foreach_mul(g32, 1.0 - beta2))
    _gated(found_inf, params, p32)
    state_precision.store(exp_avgs, m, step=state_step, found_inf=found_inf)


def adamw_scalars(*, lr, beta1, beta2, weight_decay, step):
    """Step-dependent scalars shared by every backend (computed in double)."""
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return {
        "decay": 1.0 - lr * weight_decay,
        "step_size": lr / bc1,
        "bc2_sqrt": math.sqrt(bc2),
    }


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs=None, *, lr, beta1, beta2, eps,
               weight_decay, step, maximize=False, clip_value=None, grad_scale=None, found_inf=None, state_step=None):
    """One AdamW step at ``step`` (shared by the call). ``max_exp_avg_sqs`` given means amsgrad.
    Low-precision state rounds with ``state_step`` as its salt (default: ``step``)."""
    if _host_skip(found_inf):
        return
    if found_inf is not None and found_inf.device.type == "cpu":
        found_inf = None
    s = adamw_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, step=step)
    copy = found_inf is not None  # a device flag: compute aside, then write where it is clear
    p32 = [p.to(_wide(p)) if p.dtype != _wide(p) else (p.clone() if copy else p) for p in params]
    g32 = effective_grads(grads, wide_like=params, maximize=maximize, clip_value=clip_value, grad_scale=grad_scale)
    m = state_precision.load(exp_avgs, copy=copy)
    v = state_precision.load(exp_avg_sqs, copy=copy)
    vmax = None
    if max_exp_avg_sqs is not None:
        vmax = state_precision.load(max_exp_avg_sqs, copy=copy)
    if weight_decay != 0:
        torch._foreach_mul_(p32, s["decay"])
    # m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*g*g
    torch._foreach_mul_(m, beta1)
    torch._foreach_add_(m, torch._foreach_mul(g32, 1.0 - beta1))
    torch._foreach_mul_(v, beta2)
    torch._foreach_add_(v, torch._foreach_mul(torch._foreach_mul(g32, g32), 1.0 - beta2))
    if vmax is not None:
        torch._foreach_maximum_(vmax, v)
    # p = p - step_size * m / (sqrt(v)/bc2_sqrt + eps)
    denom = torch._foreach_sqrt(vmax if vmax is not None else v)
    torch._foreach_div_(denom, s["bc2_sqrt"])
    torch._foreach_add_(denom, eps)
    upd = torch._foreach_div(m, denom)
    torch._foreach_mul_(upd, s["step_size"])
    torch._foreach_sub_(p32, upd)
    _gated(found_inf, params, p32)
    salt = step if state_step is None else state_step
    state_precision.store(exp_avgs, m, step=salt, found_inf=found_inf)
    state_precision.store(exp_avg_sqs, v, step=salt, found_inf=found_inf)
    if vmax is not None:
        state_precision.store(max_exp_avg_sqs, vmax, step=salt, found_inf=found_inf)
